"""docs/operations.md against the code: every setting, variable and command it names exists, its
settings tables carry the shipped defaults, and its worked scaling example is what the SQL rule
computes, on the rule alone and on a real queue."""

from __future__ import annotations

import argparse
import json
import re
import shlex
import tomllib
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import msgspec
import psycopg
import pytest

from tasker.cli import _parser, main
from tasker.engine.scaling import ScalingRule, update_scaling_hints
from tasker.settings import BreakerSettings, CoordinatorSettings, SentrySettings, Settings
from tests.support import ROOT

DOC = (ROOT / "docs" / "operations.md").read_text()
SHIPPED = tomllib.loads((ROOT / "settings" / "settings.toml").read_text())["default"]
#: Variables that configure the settings loader itself rather than a key.
LOADER_VARIABLES = {"TASKER_ENV", "TASKER_SETTINGS_FILE"}
#: Options of the top-level parser that take a value.
GLOBAL_OPTIONS_WITH_VALUE = {"--env", "--settings"}


# -- settings and variables ----------------------------------------------------------------------


def setting_path(section: str, key: str) -> tuple[str, ...]:
    return (*section.split("."), key)


def variable_path(variable: str) -> tuple[str, ...]:
    return tuple(part.lower() for part in variable.removeprefix("TASKER_").split("__"))


def is_setting(path: tuple[str, ...]) -> bool:
    """Whether ``path`` names a leaf of :class:`Settings` (not a whole section)."""
    struct: Any = Settings
    for i, name in enumerate(path):
        fields = {f.name: f for f in msgspec.structs.fields(struct)}
        if name not in fields:
            return False
        kind = fields[name].type
        is_section = isinstance(kind, type) and issubclass(kind, msgspec.Struct)
        if i == len(path) - 1:
            return not is_section
        if not is_section:
            return False
        struct = kind
    return False


def named_settings() -> set[tuple[str, ...]]:
    return {
        setting_path(section, key) for section, key in re.findall(r"`\[([a-z_.]+)\] ([a-z_]+)", DOC)
    }


def named_variables() -> set[str]:
    return set(re.findall(r"\bTASKER_[A-Z0-9_]*[A-Z0-9]\b", DOC)) - LOADER_VARIABLES


def test_the_guide_names_settings_and_variables() -> None:
    assert len(named_settings()) >= 22
    assert len(named_variables()) >= 22


@pytest.mark.parametrize("path", sorted(named_settings()), ids=".".join)
def test_every_setting_named_exists(path: tuple[str, ...]) -> None:
    assert is_setting(path), f"docs/operations.md names [{'.'.join(path[:-1])}] {path[-1]}"


@pytest.mark.parametrize("variable", sorted(named_variables()))
def test_every_variable_named_exists(variable: str) -> None:
    assert is_setting(variable_path(variable)), f"docs/operations.md names {variable}"


def table_after(marker: str) -> list[list[str]]:
    """The body rows of the Markdown table that follows ``<!-- marker``."""
    start = DOC.index(f"<!-- {marker}")
    rows = []
    for line in DOC[start:].splitlines()[1:]:
        if not line.startswith("|"):
            break
        rows.append([cell.strip() for cell in line.strip().strip("|").split("|")])
    assert len(rows) > 2, f"no table after <!-- {marker}"
    return rows[2:]  # after the header and its --- line


def shipped_default(path: tuple[str, ...]) -> Any:
    value: Any = SHIPPED
    for name in path:
        value = value[name]
    return value


def leaves(struct: Any, prefix: tuple[str, ...]) -> Iterator[tuple[str, ...]]:
    for f in msgspec.structs.fields(struct):
        if isinstance(f.type, type) and issubclass(f.type, msgspec.Struct):
            yield from leaves(f.type, (*prefix, f.name))
        else:
            yield (*prefix, f.name)


#: Each settings table of the guide (its marker) and the settings it lists: every leaf of its
#: section (a step breaker's overrides are named in prose, not tabled).
SETTINGS_TABLES = {
    "coordinator": ("settings:", set(leaves(CoordinatorSettings, ("coordinator",)))),
    "sentry": ("sentry-settings:", set(leaves(SentrySettings, ("sentry",)))),
    "breakers": (
        "breaker-settings:",
        set(leaves(BreakerSettings, ("breakers",))) - {("breakers", "overrides")},
    ),
}


@pytest.mark.parametrize(
    ("marker", "expected"), list(SETTINGS_TABLES.values()), ids=list(SETTINGS_TABLES)
)
def test_a_settings_table_lists_every_setting_of_its_section_with_its_shipped_default(
    marker: str, expected: set[tuple[str, ...]]
) -> None:
    """The table after ``<!-- marker`` lists exactly ``expected``, each with its variable and
    the default shipped in settings/settings.toml."""
    documented = {}
    for setting, variable, default, *_ in table_after(marker):
        match = re.fullmatch(r"`\[([a-z_.]+)\] ([a-z_]+)`", setting)
        assert match is not None, setting
        path = setting_path(*match.groups())
        assert variable_path(variable.strip("`")) == path, (setting, variable)
        documented[path] = default
    assert set(documented) == expected
    for path, default in documented.items():
        shipped = shipped_default(path)
        if isinstance(shipped, bool):
            assert default == str(shipped).lower(), path
        elif isinstance(shipped, str):
            assert default == f"`{json.dumps(shipped)}`", path
        else:
            assert float(default) == float(shipped), path


# -- commands ----------------------------------------------------------------------------------


def subcommands(parser: argparse.ArgumentParser) -> dict[str, argparse.ArgumentParser]:
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            return dict(action.choices)
    return {}


def positionals(parser: argparse.ArgumentParser) -> list[argparse.Action]:
    return [
        a
        for a in parser._actions
        if not a.option_strings and not isinstance(a, argparse._SubParsersAction)
    ]


def options(parser: argparse.ArgumentParser) -> set[str]:
    return set(parser._option_string_actions)


def command_lines() -> set[str]:
    """Shell commands of the guide that run ``tasker``: from code spans and code blocks, one per
    ``;``/``&&``/`` | `` segment, after a ``$`` prompt and ``VAR=value`` assignments."""
    texts = []
    fence = False
    for line in DOC.splitlines():
        if line.startswith("```"):
            fence = not fence
        elif fence:
            texts.append(line)
        else:
            texts += re.findall(r"`([^`]+)`", line)
    found = set()
    for text in texts:
        for segment in re.split(r";|&&| \| ", text.removeprefix("$ ")):
            command = re.sub(r"^\s*(?:[A-Z_][A-Z0-9_]*=\S+\s+)*", "", segment)
            if re.match(r"tasker\s+\S", command):  # `tasker` alone names the program
                found.add(command.strip())
    return found


@dataclass(frozen=True, order=True)
class Command:
    """A ``tasker`` command of the guide: its command words, the options it uses, and what is
    wrong with it when a word is not a command."""

    path: tuple[str, ...]
    used: tuple[str, ...]
    line: str
    problem: str | None = None


def commands_of(line: str) -> list[Command]:
    """The commands of a ``tasker ...`` line; a word ``a|b`` stands for each of a and b."""
    try:
        tokens = shlex.split(line, comments=True)[1:]
    except ValueError:
        tokens = line.split()[1:]
    while tokens and tokens[0].startswith("-"):  # global options
        tokens = tokens[2:] if tokens[0] in GLOBAL_OPTIONS_WITH_VALUE else tokens[1:]
    paths: list[tuple[str, ...]] = [()]
    parser = _parser()
    while tokens and re.fullmatch(r"[a-z][a-z-]*(\|[a-z][a-z-]*)*", tokens[0]):
        choices = subcommands(parser)
        words = tokens[0].split("|")
        if not choices or (words[0] not in choices and len(words) == 1 and positionals(parser)):
            break  # a positional value (a namespace, a module)
        unknown = [w for w in words if w not in choices]
        if unknown:
            problem = f"{unknown} is not a command under `{parser.prog}`"
            return [Command(p, (), line, problem) for p in paths]
        paths = [(*p, w) for p in paths for w in words]
        parser = choices[words[0]]
        tokens = tokens[1:]
    used = tuple(t.split("=")[0] for t in tokens if t.startswith("-") and t != "--")
    return [Command(p, used, line) for p in paths]


def documented_commands() -> list[Command]:
    seen: dict[tuple[tuple[str, ...], tuple[str, ...]], Command] = {}
    for line in sorted(command_lines()):
        for command in commands_of(line):
            seen.setdefault((command.path, command.used), command)
    return sorted(seen.values())


COMMANDS = documented_commands()


def test_the_guide_names_commands() -> None:
    named = {" ".join(c.path) for c in COMMANDS}
    assert {"coordinator", "workers", "scale", "dlq tasks list", "deploy workers"} <= named


@pytest.mark.parametrize("command", COMMANDS, ids=[" ".join(c.path) for c in COMMANDS])
def test_every_command_named_exists(command: Command, capsys: pytest.CaptureFixture[str]) -> None:
    assert command.problem is None, f"`{command.line}`: {command.problem}"
    assert command.path, f"`{command.line}` names no tasker command"
    with pytest.raises(SystemExit) as exit_:
        main([*command.path, "--help"])
    assert exit_.value.code == 0, command.line
    words = " ".join(command.path)
    assert capsys.readouterr().out.startswith(f"usage: tasker {words}"), command.line
    parser = _parser()
    for word in command.path:
        parser = subcommands(parser)[word]
    unknown = set(command.used) - options(parser) - options(_parser())
    assert not unknown, f"`{command.line}`: no option {sorted(unknown)} in `tasker {words}`"


# -- the worked example ------------------------------------------------------------------------

SCALING = msgspec.convert(SHIPPED["coordinator"]["scaling"], type=ScalingRule)


def number(cell: str) -> float:
    return float(cell.replace("*", "").replace("%", "").strip())


def worked_example() -> list[dict[str, Any]]:
    rows = []
    for label, current, in_flight, depth, error_rate, since, desired in table_after(
        "worked-example:"
    ):
        rows.append(
            {
                "label": label,
                "current": int(number(current)),
                "in_flight": int(number(in_flight)),
                "depth": int(number(depth)),
                "error_rate": number(error_rate) / 100 if "%" in error_rate else number(error_rate),
                "since": number(since),
                "desired": int(number(desired)),
            }
        )
    return rows


def test_the_worked_example_uses_the_shipped_scaling_settings() -> None:
    assert (SCALING.processes, SCALING.threads, SCALING.target_utilization) == (2, 8, 0.75)
    assert (SCALING.backlog_per_replica, SCALING.min_replicas, SCALING.max_replicas) == (100, 1, 10)
    assert (SCALING.error_threshold, SCALING.cooldown_s) == (0.05, 60)
    assert (
        "2 processes \N{MULTIPLICATION SIGN} 8 threads (the defaults) give a capacity of 16" in DOC
    )
    assert worked_example()[0]["label"] == "the example"


def test_the_worked_example_is_what_the_sql_rule_computes(database_url: str) -> None:
    s = SCALING
    with psycopg.connect(database_url, autocommit=True) as conn:
        for row in worked_example():
            answer = conn.execute(
                "SELECT desired, changed FROM tasker.desired_replicas_v1("
                "%s, %s, %s, %s, %s, %s, %s, %s, %s, %s, %s, %s)",
                (
                    row["current"],
                    row["in_flight"],
                    row["depth"],
                    row["error_rate"],
                    s.capacity,
                    s.target_utilization,
                    s.backlog_per_replica,
                    s.min_replicas,
                    s.max_replicas,
                    s.error_threshold,
                    row["since"],
                    s.cooldown_s,
                ),
            ).fetchone()
            assert answer == (row["desired"], row["desired"] != row["current"]), row


def test_the_worked_example_on_a_real_queue(database_url: str) -> None:
    """30 messages leased and 450 waiting make a depth of 480; two live pods; the last change
    five minutes ago: 5 pods, at a utilization of 30 / (2 x 16)."""
    with psycopg.connect(database_url, autocommit=True) as conn:
        conn.execute("SELECT pgmq.create('tasker_example')")
        conn.execute("SELECT pgmq.send_batch('tasker_example', array_fill('{}'::jsonb, '{480}'))")
        leased = conn.execute("SELECT count(*) FROM pgmq.read('tasker_example', 600, 30)")
        assert leased.fetchone() == (30,)  # invisible for 10 minutes: no timing involved
        conn.execute(
            "INSERT INTO tasker.workers (worker_uuid, hostname, pid, queues, actors, threads,"
            " tasker_version) SELECT gen_random_uuid(), 'pod-' || i, 1, '{example}', '{}', 8,"
            " 'x' FROM generate_series(1, 2) AS i"
        )
        conn.execute(
            "INSERT INTO tasker.scaling_hints (queue, depth, oldest_age_s, in_flight,"
            " completions_per_s, live_replicas, error_rate, desired_replicas, updated_at,"
            " changed_at) VALUES ('example', 0, 0, 0, 0, 2, 0, 2, now() - interval '5 minutes',"
            " now() - interval '5 minutes')"
        )
        [hint] = update_scaling_hints(conn, [("example", "tasker_example")], SCALING, live_s=60)
    example = worked_example()[0]
    assert (hint.in_flight, hint.depth, hint.live_replicas) == (30, 480, 2)
    assert hint.desired_replicas == example["desired"] == 5
    assert hint.utilization == pytest.approx(30 / (2 * 16))
    assert "30 / (2 \N{MULTIPLICATION SIGN} 16) = 0.94" in DOC
