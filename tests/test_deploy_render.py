"""``tasker deploy workers``: one worker Deployment per namespace queue, valid for Kubernetes.

Every rendered stream is validated like the repository's manifests (tests/deploy_support.py):
core objects against the strict Kubernetes schemas of kubernetes-validate, KEDA objects
structurally, and the KEDA query against a real database.
"""

from __future__ import annotations

import argparse
import copy
import io
import subprocess
import sys
from contextlib import redirect_stdout
from typing import Any

import psycopg
import pytest
from hypothesis import given
from hypothesis import strategies as st

import tasker
from tasker.cli import _parser, main
from tasker.deploy_manifests import (
    DEFAULT_IMAGE,
    ORCHESTRATION_QUEUES,
    RenderOptions,
    kubernetes_name,
    render_workers,
    worker_queue,
)
from tasker.exceptions import ConfigurationError
from tests.deploy_support import (
    BASE,
    OVERLAYS,
    check_hpa,
    check_name,
    check_one_autoscaler_each,
    check_pdbs,
    check_worker_deployment,
    container,
    load_docs,
    of_kind,
    parse_docs,
    pod_spec,
    scaling_row,
    store_desired_replicas,
    validate_any,
    worker_command,
)

LONG = "n" + "x" * 63  # the longest Tasker namespace: 64 characters


def render(argv: list[str]) -> list[dict[str, Any]]:
    out = io.StringIO()
    with redirect_stdout(out):
        assert main(["deploy", "workers", *argv]) == 0
    return parse_docs(out.getvalue())


def with_shared_objects(objects: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """The rendered objects plus what they reference: the database Secret and, for KEDA, the
    TriggerAuthentication, in the rendered objects' Kubernetes namespace."""
    namespace = objects[0]["metadata"]["namespace"]
    shared = [
        *load_docs(BASE / "secret.example.yaml"),
        *load_docs(OVERLAYS / "keda" / "keda-trigger-authentication.yaml"),
    ]
    for obj in shared:
        obj["metadata"]["namespace"] = namespace
    return [*objects, *shared]


def check_stream(objects: list[dict[str, Any]]) -> None:
    """Everything the manifests of the repository must satisfy, for a rendered stream."""
    everything = with_shared_objects(objects)
    for obj in objects:
        check_name(obj)
        validate_any(obj, everything)
    for hpa in of_kind(objects, "HorizontalPodAutoscaler"):
        check_hpa(hpa, everything)
    for deployment in of_kind(objects, "Deployment"):
        check_worker_deployment(deployment)
    check_pdbs(objects)


CASES = {
    "one namespace, HPA": ["fulfillment", "--modules", "myapp.flows"],
    "two namespaces, KEDA, orchestration, options": [
        "order_intake",
        "billing",
        "--modules",
        "myapp.flows",
        "myapp.more_flows",
        "--scaling",
        "keda",
        "--orchestration",
        "--image",
        "registry.example.com/myapp:1.4.0",
        "--namespace",
        "prod",
        "--min-replicas",
        "2",
        "--max-replicas",
        "20",
    ],
    "orchestration only, no scaler": ["--orchestration", "--modules", "m", "--scaling", "none"],
    "awkward names, KEDA": [LONG, "abc_", "a__b", "--modules", "m", "--scaling", "keda"],
    "longer grace period": [
        "slow",
        "--modules",
        "m",
        "--shutdown-timeout",
        "100",
        "--termination-grace-period",
        "130",
    ],
    "another metrics port": ["metered", "--modules", "m", "--metrics-port", "9300"],
}


@pytest.mark.parametrize("argv", CASES.values(), ids=CASES.keys())
def test_rendered_streams_are_valid(argv: list[str]) -> None:
    objects = render(argv)
    check_stream(objects)
    options = _parser().parse_args(["deploy", "workers", *argv])
    if options.scaling != "none":
        check_one_autoscaler_each(objects)
    deployments = of_kind(objects, "Deployment")
    expected = len(options.namespaces) + (1 if options.orchestration else 0)
    assert len(deployments) == expected
    assert len(objects) == expected * (2 if options.scaling == "none" else 3)
    for deployment in deployments:
        command = worker_command(deployment)
        assert command.modules == options.modules
        assert command.shutdown_timeout == options.shutdown_timeout
        assert pod_spec(deployment)["terminationGracePeriodSeconds"] == (
            options.termination_grace_period
        )
        assert container(deployment)["image"] == options.image
        assert deployment["metadata"]["namespace"] == options.k8s_namespace
        assert command.metrics_port == (options.metrics_port or 9192)  # also probed, annotated


@pytest.mark.parametrize(("setting", "port"), [("9300", 9300), ("0", 9192)])
def test_the_metrics_port_follows_the_setting_when_it_is_a_fixed_port(
    monkeypatch: pytest.MonkeyPatch, setting: str, port: int
) -> None:
    monkeypatch.setenv("TASKER_WORKER__METRICS_PORT", setting)
    [deployment, *_] = render(["shop", "--modules", "m"])
    assert worker_command(deployment).metrics_port == port


def test_each_namespace_gets_a_deployment_on_its_queue() -> None:
    objects = render(["order_intake", "billing", "--modules", "m", "--orchestration"])
    queues = {
        d["metadata"]["name"]: tuple(worker_command(d).queues)
        for d in of_kind(objects, "Deployment")
    }
    assert queues == {
        "tasker-worker-order-intake": ("worker_order_intake_queue",),
        "tasker-worker-billing": ("worker_billing_queue",),
        "tasker-orchestration": ORCHESTRATION_QUEUES,
    }
    assert set(ORCHESTRATION_QUEUES) == {
        "orchestration_task_requests",
        "orchestration_step_enqueue",
        "orchestration_step_results",
        "orchestration_task_finalizations",
    }


def test_the_default_image_is_the_bases_image() -> None:
    objects = load_docs(BASE / "workers.yaml")
    assert {container(d)["image"] for d in of_kind(objects, "Deployment")} == {DEFAULT_IMAGE}


def test_scalers_only_renders_just_the_scalers() -> None:
    objects = render(["billing", "--modules", "m", "--scaling", "keda", "--scalers-only"])
    assert [obj["kind"] for obj in objects] == ["ScaledObject"]


def test_rendered_keda_queries_run_against_the_coordinators_table(database_url: str) -> None:
    objects = render(["billing", LONG, "--modules", "m", "--scaling", "keda", "--orchestration"])
    desired = {worker_queue("billing"): 2, worker_queue(LONG): 7, "orchestration": 3}
    desired.update({queue: 1 for queue in ORCHESTRATION_QUEUES})  # each at the minimum
    with psycopg.connect(database_url, autocommit=True) as conn:
        store_desired_replicas(conn, desired)
        deployments = {d["metadata"]["name"]: d for d in of_kind(objects, "Deployment")}
        for scaled in of_kind(objects, "ScaledObject"):
            row = scaling_row(deployments[scaled["spec"]["scaleTargetRef"]["name"]])
            query = scaled["spec"]["triggers"][0]["metadata"]["query"]
            assert conn.execute(query).fetchall() == [(desired[row],)]


# ------------------------------------------------------------------------------ names


@given(st.from_regex(r"\A[a-z][a-z0-9_]{0,63}\Z"), st.from_regex(r"\A[a-z][a-z0-9_]{0,63}\Z"))
def test_every_namespace_gets_a_distinct_dns_1123_name(a: str, b: str) -> None:
    for namespace in (a, b):
        name = kubernetes_name("tasker-worker", namespace)
        check_name({"metadata": {"name": name}})
    if a != b:
        assert kubernetes_name("tasker-worker", a) != kubernetes_name("tasker-worker", b)


def test_readable_names_stay_readable() -> None:
    assert kubernetes_name("tasker-worker", "order_intake") == "tasker-worker-order-intake"
    assert kubernetes_name("tasker-worker", "abc_").startswith("tasker-worker-abc-")
    assert len(kubernetes_name("tasker-worker", LONG)) == 63


# ------------------------------------------------------------------------------ refusals


REFUSED = {
    "uppercase": (["Billing", "--modules", "m"], "invalid namespace 'Billing'"),
    "digit first": (["9lives", "--modules", "m"], "invalid namespace"),
    "dash": (["with-dash", "--modules", "m"], "invalid namespace"),
    "too long": (["x" * 65, "--modules", "m"], "invalid namespace"),
    "repeated": (["a", "a", "--modules", "m"], "more than once"),
    "nothing": (["--modules", "m"], "--orchestration"),
    "bad module": (["a", "--modules", "my app"], "invalid module name"),
    "grace": (["a", "--modules", "m", "--shutdown-timeout", "60"], "--termination-grace-period"),
    "bounds": (["a", "--modules", "m", "--min-replicas", "5", "--max-replicas", "2"], "<="),
    "hpa label": ([LONG, "--modules", "m"], "--scaling keda"),
    "scalers of none": (["a", "--modules", "m", "--scaling", "none", "--scalers-only"], "needs"),
    "k8s namespace": (["a", "--modules", "m", "--namespace", "Prod"], "Kubernetes namespace"),
}


@pytest.mark.parametrize(("argv", "message"), REFUSED.values(), ids=REFUSED.keys())
def test_bad_input_is_refused_with_one_line(
    argv: list[str], message: str, capsys: pytest.CaptureFixture[str]
) -> None:
    assert main(["deploy", "workers", *argv]) == 1
    captured = capsys.readouterr()
    assert captured.out == ""
    (line,) = captured.err.splitlines()
    assert line.startswith("tasker: error: ") and message in line


def test_refusals_print_no_traceback() -> None:
    for argv in (["Bad", "--modules", "m"], ["a", "--modules", "m", "--scaling", "both"]):
        result = subprocess.run(
            [sys.executable, "-m", "tasker.cli", "deploy", "workers", *argv],
            capture_output=True,
            text=True,
            check=False,
        )
        assert result.returncode in {1, 2} and result.stdout == ""
        assert "Traceback" not in result.stderr
        assert result.stderr.splitlines()[-1].startswith("tasker")


def test_the_render_functions_refuse_what_the_cli_refuses() -> None:
    with pytest.raises(ConfigurationError, match="modules"):
        render_workers(["a"], RenderOptions(modules=()))
    with pytest.raises(ConfigurationError, match="scaling"):
        render_workers(["a"], RenderOptions(modules=("m",), scaling="both"))  # type: ignore[arg-type]
    with pytest.raises(ConfigurationError, match="--metrics-port"):
        render_workers(["a"], RenderOptions(modules=("m",), metrics_port=0))
    options = RenderOptions(modules=("m",))
    objects = render_workers(["a"], options)
    before = copy.deepcopy(objects)
    render_workers(["a"], options)
    assert objects == before


# ------------------------------------------------------------------------------ help


def _workers_parser() -> argparse.ArgumentParser:
    def sub(parser: argparse.ArgumentParser, name: str) -> argparse.ArgumentParser:
        (action,) = [a for a in parser._actions if isinstance(a, argparse._SubParsersAction)]
        found = action.choices[name]
        assert isinstance(found, argparse.ArgumentParser)
        return found

    return sub(sub(_parser(), "deploy"), "workers")


def test_help_documents_every_option(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exit_info:
        main(["deploy", "workers", "--help"])
    assert exit_info.value.code == 0
    text = " ".join(capsys.readouterr().out.split())
    for action in _workers_parser()._actions:
        assert action.help, f"{action.dest} has no help"
        for option in action.option_strings:
            assert option in text, f"--help does not mention {option}"
    assert "NAMESPACE" in text and "example:" in text


def test_rendering_needs_no_database_url_even_in_production(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """A CI job renders the manifests of a production deploy without the database's secret."""
    monkeypatch.setenv("TASKER_ENV", "production")
    monkeypatch.delenv("TASKER_DATABASE__URL", raising=False)
    objects = render(["billing", "--modules", "m"])
    assert of_kind(objects, "Deployment")
    with pytest.raises(ConfigurationError, match=r"database\.url"):
        tasker.load_settings()  # a command that connects still needs one
