"""Send engine messages through a PGMQBroker, on the caller's connection and transaction."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from dramatiq.message import Message

from tasker.brokers.pgmq import PGMQBroker
from tasker.engine.messages import OrchestrationStage, StepMessage

__all__ = ["BrokerSender"]


class BrokerSender:
    """The engine's :class:`~tasker.engine.messages.Sender` over a :class:`PGMQBroker`.

    Every send runs on the connection the engine passes, so the messages commit (or roll back)
    with the state change that caused them.
    """

    def __init__(self, broker: PGMQBroker) -> None:
        self.broker = broker

    def send_steps(self, conn: Any, steps: Sequence[StepMessage]) -> None:
        """Send one message per step (one statement per queue)."""
        messages: list[Message[Any]] = []
        for step in steps:
            self.broker.declare_queue(step.queue)
            messages.append(
                Message(
                    queue_name=step.queue,
                    actor_name=step.actor,
                    args=(step.task_uuid, step.step_uuid),
                    kwargs={},
                    options={},
                )
            )
        with self.broker.use_connection(conn):
            if len(messages) == 1:
                self.broker.enqueue(messages[0])
            elif messages:
                self.broker.enqueue_batch(messages)

    def send_stage(
        self, conn: Any, stage: OrchestrationStage, *args: Any, delay_ms: int = 0
    ) -> None:
        """Send a message to an orchestration stage actor, after ``delay_ms`` milliseconds."""
        self.broker.declare_queue(stage.queue)
        message: Message[Any] = Message(
            queue_name=stage.queue, actor_name=stage.actor, args=args, kwargs={}, options={}
        )
        with self.broker.use_connection(conn):
            self.broker.enqueue(message, delay=delay_ms or None)

    def withdraw_task(
        self, conn: Any, queues: Sequence[str], task_uuid: str, *, keep: Sequence[str] = ()
    ) -> int:
        """Delete the task's queued messages from ``queues`` in the caller's transaction, except
        those of the steps in ``keep``; returns how many."""
        return sum(
            self.broker.delete_task_messages(conn, queue, task_uuid, keep=keep) for queue in queues
        )
