"""Versions run their own handlers, rolling deploys strand nothing, one task per idempotency key,
and contexts meet the template's input_schema."""

from __future__ import annotations

from typing import Any

import msgspec
import psycopg
import pytest

import tasker
from tasker.brokers.pgmq import PGMQBroker
from tasker.engine.messages import StepMessage
from tasker.runtime.sender import BrokerSender
from tasker.workflow.definition import legacy_step_actor_name
from tests.support import InProcessFlows, scalar, wait_for


def versioned(version: str, name: str = "versioned", attempts: int = 3) -> tasker.Workflow:
    """``first -> second``; each returns the version that ran it."""
    flow = tasker.Workflow("deploys", name, version=version, register=False)
    flow.step("first", max_attempts=attempts)(lambda ctx: {"ran": version})

    @flow.step(depends_on=["first"])
    def second(ctx: tasker.StepContext) -> dict[str, Any]:
        return {"ran": version, "first": ctx.parent_results["first"]["ran"]}

    return flow


def test_each_version_runs_its_own_handlers(flows: InProcessFlows) -> None:
    flows.start(versioned("1.0.0"), versioned("2.0.0"))
    old = flows.client.submit("deploys", "versioned", {}, version="1.0.0")
    new = flows.client.submit("deploys", "versioned", {})
    assert new.version == "2.0.0"  # the latest release
    old_status = flows.client.wait(old.task_uuid)
    new_status = flows.client.wait(new.task_uuid)
    assert old_status.step("second").result == {"ran": "1.0.0", "first": "1.0.0"}
    assert new_status.step("second").result == {"ran": "2.0.0", "first": "2.0.0"}


def test_the_latest_version_follows_semver_and_prefers_releases(flows: InProcessFlows) -> None:
    for version in ("1.0.0", "1.10.0", "1.2.0", "2.0.0-rc.1", "1.0.123456789012345"):
        flows.client.register(versioned(version))
    assert flows.client.submit("deploys", "versioned", {}).version == "1.10.0"
    candidate = flows.client.submit("deploys", "versioned", {}, version="2.0.0-rc.1")
    assert candidate.version == "2.0.0-rc.1"
    for version in ("3.0.0-alpha", "3.0.0-beta.2", "3.0.0-beta.11"):
        flows.client.register(versioned(version, "previews"))
    latest_preview = flows.client.submit("deploys", "previews", {})
    assert latest_preview.version == "3.0.0-beta.11"  # no release: the latest pre-release


def test_a_task_of_a_version_no_worker_has_yet_waits_and_runs_when_one_comes(
    flows: InProcessFlows, database_url: str
) -> None:
    """A rolling deploy: v1.0 workers run while a client submits a v1.1 task."""
    flows.start(versioned("1.0.0"))
    newer = versioned("1.1.0")
    flows.client.register(newer)  # registered by the first v1.1 worker, say
    task = flows.client.submit("deploys", "versioned", {}).task_uuid

    def waiting() -> bool:
        first = flows.client.status(task).step("first")
        return first.waiting_for is not None and first.waiting_since is not None

    wait_for(waiting, 30, "the step to show that it waits")
    first = flows.client.status(task).step("first")
    assert first.state == "enqueued" and first.attempts == 0
    assert newer.actor_name("first") in str(first.waiting_for)
    dead = "SELECT count(*) FROM pgmq.q_tasker_worker_deploys_queue__xq"
    assert scalar(database_url, dead) == 0
    flows.start(newer)  # a worker that knows v1.1 takes it
    status = flows.client.wait(task, timeout=60)
    assert status.state == "complete"
    assert status.step("second").result == {"ran": "1.1.0", "first": "1.1.0"}
    assert status.step("first").waiting_for is None


def _send_legacy(broker: PGMQBroker, url: str, task: str, step: str, name: str) -> None:
    with psycopg.connect(url, autocommit=True) as conn, conn.transaction():
        actor = legacy_step_actor_name("deploys", "versioned", name)
        BrokerSender(broker).send_steps(
            conn, [StepMessage("worker_deploys_queue", actor, task, step)]
        )


def test_messages_queued_before_versioned_actors_still_run(
    flows: InProcessFlows, database_url: str
) -> None:
    """An upgrade strands nothing: an unversioned message runs the version its task records."""
    flows.register(versioned("1.0.0"), versioned("2.0.0"))
    task = flows.client.submit("deploys", "versioned", {}, version="1.0.0").task_uuid
    step = scalar(
        database_url,
        "SELECT workflow_step_uuid FROM tasker.workflow_steps WHERE task_uuid = %s"
        " AND name = 'first'",
        (task,),
    )
    with psycopg.connect(database_url, autocommit=True) as conn:  # as an old release queued it
        conn.execute("DELETE FROM pgmq.q_tasker_worker_deploys_queue")
    _send_legacy(flows.broker, database_url, task, str(step), "first")
    flows.start()
    status = flows.client.wait(task)
    assert status.state == "complete"
    assert status.step("second").result == {"ran": "1.0.0", "first": "1.0.0"}


def test_a_version_registered_again_with_another_definition_is_refused(
    flows: InProcessFlows,
) -> None:
    flows.client.register(versioned("1.0.0"))
    changed = versioned("1.0.0")
    changed.step("third", depends_on=["second"])(lambda ctx: None)
    with pytest.raises(tasker.TemplateConflictError, match="Bump the version") as caught:
        flows.client.register(changed)
    assert "step 'third' added" in str(caught.value)
    flows.client.register(changed, allow_replace=True)  # while iterating in development
    reworded = versioned("1.0.0")
    reworded.description = "only the words changed"
    reworded.step("third", depends_on=["second"])(lambda ctx: None)
    flows.client.register(reworded)  # nothing a task depends on changed


def test_a_worker_with_a_conflicting_definition_does_not_boot(
    flows: InProcessFlows, monkeypatch: pytest.MonkeyPatch
) -> None:
    from tasker.middleware import templates
    from tasker.middleware.templates import TemplateConflictAtBootError, TemplateRegistrar

    flows.client.register(versioned("1.0.0"))
    changed = versioned("1.0.0")
    changed.step("third", depends_on=["second"])(lambda ctx: None)
    monkeypatch.setattr(templates, "registered_workflows", lambda: [changed])
    registrar = TemplateRegistrar(flows.broker)
    with pytest.raises(TemplateConflictAtBootError, match="Bump the version"):
        registrar.before_worker_boot(flows.broker, None)
    TemplateRegistrar(flows.broker, allow_replace=True).before_worker_boot(flows.broker, None)


def test_a_conflict_names_the_steps_and_fields_that_changed(flows: InProcessFlows) -> None:
    flows.client.register(versioned("1.0.0"))
    changed = versioned("1.0.0", attempts=5)
    changed.step("third", depends_on=["second"])(lambda ctx: None)
    with pytest.raises(tasker.TemplateConflictError) as caught:
        flows.client.register(changed)
    assert "step 'third' added" in str(caught.value)
    assert "step 'first': max_attempts 3 -> 5" in str(caught.value)


def test_a_template_postgresql_would_refuse_stops_the_boot_for_good(
    flows: InProcessFlows, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A definition changed after it was checked (here its metadata) is refused before anything
    is written, as a WorkflowDefinitionError: the worker exits with EX_CONFIG, not restarted."""
    from tasker.middleware import templates
    from tasker.middleware.templates import TemplateRefusedAtBootError, TemplateRegistrar

    broken = versioned("1.0.0")
    broken.metadata = {"note": "a\x00b"}
    monkeypatch.setattr(templates, "registered_workflows", lambda: [broken])
    with pytest.raises(
        TemplateRefusedAtBootError, match=r'\["metadata"\]\["note"\]: the text contains a NUL'
    ):
        TemplateRegistrar(flows.broker).before_worker_boot(flows.broker, None)
    assert issubclass(TemplateRefusedAtBootError, tasker.WorkflowDefinitionError)
    assert scalar(flows.url, "SELECT count(*) FROM tasker.named_tasks") == 0


def test_numbers_of_every_size_register_again_without_a_conflict(flows: InProcessFlows) -> None:
    """Stored templates read back equal, so a restart is not a conflict (1e300 comes back from
    jsonb as a 301-digit number)."""

    def big() -> tasker.Workflow:
        flow = tasker.Workflow(
            "deploys", "big", "1.0.0", register=False, metadata={"n": [1e19, 6.02e23, 1e300]}
        )
        flow.step("only", inputs={"limit": 1.5e300, "tiny": 5e-324, "whole": 1e16})(lambda c: 0)
        return flow

    flows.client.register(big())
    flows.client.register(big())


def test_the_development_environment_allows_replacing_templates(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setenv("TASKER_DATABASE__URL", "postgresql://app@db/app")  # production needs one
    assert tasker.load_settings("development").engine.allow_template_replace is True
    assert tasker.load_settings("production").engine.allow_template_replace is False
    assert tasker.load_settings("test").engine.allow_template_replace is False


def test_a_client_with_settings_follows_the_allow_template_replace_setting(
    flows: InProcessFlows,
) -> None:
    flows.client.register(versioned("1.0.0"))
    changed = versioned("1.0.0")
    changed.step("third", depends_on=["second"])(lambda ctx: None)
    for setting, replaced in ((False, False), (True, True)):
        settings = msgspec.structs.replace(
            tasker.load_settings("test"),
            database=msgspec.structs.replace(tasker.load_settings("test").database, url=flows.url),
            engine=msgspec.structs.replace(
                tasker.load_settings("test").engine, allow_template_replace=setting
            ),
        )
        with tasker.Client(settings=settings) as client:
            if replaced:
                client.register(changed)
            else:
                with pytest.raises(tasker.TemplateConflictError, match="allow_replace=True"):
                    client.register(changed)
            client.register(changed, allow_replace=True)  # the argument wins either way


def test_a_stored_version_that_is_not_semver_does_not_break_the_choice(
    flows: InProcessFlows, database_url: str
) -> None:
    flows.client.register(versioned("1.0.0"))
    with psycopg.connect(database_url, autocommit=True) as conn:  # stored by an older release
        conn.execute(
            "INSERT INTO tasker.named_tasks (task_namespace_uuid, name, version, configuration)"
            " SELECT task_namespace_uuid, name, '9.1', configuration FROM tasker.named_tasks"
        )
    assert flows.client.submit("deploys", "versioned", {}).version == "1.0.0"


# -- idempotency (decision 0006) -------------------------------------------------------------------


def test_each_submit_is_a_new_task_unless_it_has_a_key(flows: InProcessFlows) -> None:
    flows.client.register(versioned("1.0.0"))
    first = flows.client.submit("deploys", "versioned", {"order": 7})
    second = flows.client.submit("deploys", "versioned", {"order": 7})
    assert first.created and second.created and first.task_uuid != second.task_uuid


def test_a_key_names_one_task_across_versions(flows: InProcessFlows) -> None:
    flows.client.register(versioned("1.0.0"))
    old = flows.client.submit("deploys", "versioned", {"order": 7}, idempotency_key="order-7")
    flows.client.register(versioned("1.1.0"))  # a deploy
    again = flows.client.submit("deploys", "versioned", {"order": 7}, idempotency_key="order-7")
    assert again.task_uuid == old.task_uuid and not again.created
    assert again.version == "1.0.0"  # the task's own version


def test_a_key_reused_with_another_context_is_a_conflict(flows: InProcessFlows) -> None:
    flows.client.register(versioned("1.0.0"))
    first = flows.client.submit("deploys", "versioned", {"order": 7}, idempotency_key="k")
    with pytest.raises(tasker.IdempotencyConflictError, match="another context") as caught:
        flows.client.submit("deploys", "versioned", {"order": 8}, idempotency_key="k")
    assert caught.value.task_uuid == first.task_uuid
    assert scalar(flows.url, "SELECT count(*) FROM tasker.tasks") == 1


def test_a_key_whose_task_failed_still_names_that_task(flows: InProcessFlows) -> None:
    flow = tasker.Workflow("deploys", "fails", version="1.0.0", register=False)

    @flow.step(max_attempts=1)
    def boom(ctx: tasker.StepContext) -> None:
        raise tasker.PermanentError("no")

    flows.start(flow)
    first = flows.client.submit("deploys", "fails", {}, idempotency_key="once")
    assert flows.client.wait(first.task_uuid).state == "blocked_by_failures"
    again = flows.client.submit("deploys", "fails", {}, idempotency_key="once")
    assert again.task_uuid == first.task_uuid and not again.created


def test_a_strict_template_names_one_task_per_context(flows: InProcessFlows) -> None:
    flow = versioned("1.0.0", "strict_flow")
    flow.identity_strategy = "strict"
    flows.client.register(flow)
    first = flows.client.submit("deploys", "strict_flow", {"order": 7})
    again = flows.client.submit("deploys", "strict_flow", {"order": 7})
    assert again.task_uuid == first.task_uuid and not again.created


# -- input_schema -------------------------------------------------------------------------------


def test_a_context_must_meet_the_input_schema(flows: InProcessFlows) -> None:
    flow = tasker.Workflow(
        "deploys",
        "schema",
        version="1.0.0",
        register=False,
        input_schema={
            "type": "object",
            "required": ["order"],
            "properties": {
                "order": {
                    "type": "object",
                    "properties": {"qty": {"type": "integer", "minimum": 1}},
                    "required": ["qty"],
                }
            },
        },
    )
    flow.step("only")(lambda ctx: None)
    flows.client.register(flow)
    with pytest.raises(tasker.PayloadError, match=r'context\["order"\]\["qty"\]: -1 is less'):
        flows.client.submit("deploys", "schema", {"order": {"qty": -1}})
    with pytest.raises(tasker.PayloadError, match="'order' is a required property"):
        flows.client.submit("deploys", "schema", {})
    assert scalar(flows.url, "SELECT count(*) FROM tasker.tasks") == 0
    assert flows.client.submit("deploys", "schema", {"order": {"qty": 2}}).created
