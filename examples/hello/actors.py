"""Demo actors: an order moves validate -> charge -> ship, one Dramatiq actor per step.

Each step updates the order row and sends the next message in the same PostgreSQL transaction
(``broker.use_connection``), so a crash can never record a step without queueing the next one, or
queue it without recording the step. Every fourth order's payment fails once and is retried.
Run by ``tasker demo`` (or ``tasker worker examples.hello.actors``).
"""

from __future__ import annotations

from typing import Any

import dramatiq

SCHEMA = """
CREATE TABLE IF NOT EXISTS tasker_demo_orders (
    id integer PRIMARY KEY,
    status text NOT NULL,
    charge_attempts integer NOT NULL DEFAULT 0,
    updated_at timestamptz NOT NULL DEFAULT clock_timestamp()
)
"""


class PaymentGatewayBusyError(Exception):
    """The (simulated) payment provider asks us to try again."""


def _advance(order_id: int, status: str, then: Any = None) -> None:
    """Record ``status`` and send the next step in one transaction."""
    broker: Any = dramatiq.get_broker()
    with broker.pool.connection() as conn, conn.transaction(), broker.use_connection(conn):
        conn.execute(
            "UPDATE tasker_demo_orders SET status = %s, updated_at = clock_timestamp()"
            " WHERE id = %s",
            (status, order_id),
        )
        if then is not None:
            then.send(order_id)


@dramatiq.actor(max_retries=3, min_backoff=100, max_backoff=500)
def validate(order_id: int) -> None:
    """Check the order, then hand it to payment."""
    _advance(order_id, "validated", then=charge)


@dramatiq.actor(max_retries=5, min_backoff=300, max_backoff=1000)
def charge(order_id: int) -> None:
    """Charge the card; every fourth order's first attempt fails and is retried."""
    broker: Any = dramatiq.get_broker()
    with broker.pool.connection() as conn:
        row = conn.execute(
            "UPDATE tasker_demo_orders SET charge_attempts = charge_attempts + 1"
            " WHERE id = %s RETURNING charge_attempts",
            (order_id,),
        ).fetchone()
    if order_id % 4 == 0 and row is not None and row[0] == 1:
        raise PaymentGatewayBusyError(f"payment gateway busy for order {order_id}")
    _advance(order_id, "charged", then=ship)


@dramatiq.actor
def ship(order_id: int) -> None:
    """Hand the parcel to the carrier."""
    _advance(order_id, "shipped")
