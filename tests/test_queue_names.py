from __future__ import annotations

import re

import pytest
from hypothesis import given
from hypothesis import strategies as st

from tasker.brokers.queue_names import MAX_PGMQ_NAME, map_queue_name
from tasker.exceptions import QueueNameError

dramatiq_names = st.from_regex(r"\A[a-zA-Z_][a-zA-Z0-9._-]{0,120}\Z")


@given(dramatiq_names)
def test_every_dramatiq_name_maps_to_a_valid_pgmq_name(name: str) -> None:
    names = map_queue_name(name, "tasker")
    assert re.fullmatch(r"[a-z0-9_]+", names.main)
    assert len(names.dead) <= MAX_PGMQ_NAME
    assert len(names.channel) < 64  # PostgreSQL's NOTIFY channel limit


@given(dramatiq_names, dramatiq_names)
def test_different_names_never_share_a_queue(a: str, b: str) -> None:
    if a != b:
        assert map_queue_name(a, "tasker").main != map_queue_name(b, "tasker").main


def test_simple_names_stay_readable() -> None:
    assert map_queue_name("default", "tasker").main == "tasker_default"
    assert map_queue_name("default", "tasker").dead == "tasker_default__xq"
    assert map_queue_name("Default", "tasker").main.startswith("tasker_default_")


@pytest.mark.parametrize("bad", ["", "1abc", "has space", "semi;colon", "quote'"])
def test_invalid_queue_names_are_refused(bad: str) -> None:
    with pytest.raises(QueueNameError, match="invalid"):
        map_queue_name(bad, "tasker")


@pytest.mark.parametrize("bad", ["", "Upper", "x" * 17, "9lives", "with-dash"])
def test_invalid_namespaces_are_refused(bad: str) -> None:
    with pytest.raises(QueueNameError, match="namespace"):
        map_queue_name("default", bad)
