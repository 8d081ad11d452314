"""Order fulfilment: validate -> reserve -> pay -> ship, as a Tasker workflow.

The payment provider is flaky on purpose: the first attempt of every order's payment fails with a
retryable error, and Tasker retries it after the provider's Retry-After. Run it with::

    tasker worker examples.order_fulfillment.flows          # a worker (registers the template)
    tasker demo                                             # or the whole demo end to end
"""

from __future__ import annotations

from typing import Any

import tasker

flow = tasker.Workflow(
    "fulfillment",
    "process_order",
    version="1.0.0",
    description="Validate an order, reserve stock, charge the card, ship the parcel.",
)


@flow.step()
def validate_order(ctx: tasker.StepContext) -> dict[str, Any]:
    """Check the order has items and a customer."""
    order = ctx.task_context
    if not order.get("items"):
        raise tasker.PermanentError("an order needs at least one item")
    total = sum(item["quantity"] * item["price"] for item in order["items"])
    return {"order_id": order["order_id"], "total": round(total, 2)}


@flow.step(depends_on=["validate_order"], max_attempts=3)
def reserve_inventory(ctx: tasker.StepContext) -> dict[str, Any]:
    """Reserve every item (idempotent on the step's key)."""
    skus = [item["sku"] for item in ctx.task_context["items"]]
    return {"reservation": f"R-{ctx.idempotency_key[-8:]}", "skus": skus}


@flow.step(depends_on=["validate_order", "reserve_inventory"], max_attempts=3)
def process_payment(ctx: tasker.StepContext) -> dict[str, Any]:
    """Charge the card; the provider is busy on the first attempt."""
    if ctx.attempt == 1:
        raise tasker.RetryableError("payment provider busy", retry_after=0.5)
    amount = ctx.parent_results["validate_order"]["total"]
    return {"charged": amount, "payment_id": f"P-{ctx.idempotency_key[-8:]}"}


@flow.step(depends_on=["validate_order", "reserve_inventory", "process_payment"])
def ship_order(ctx: tasker.StepContext) -> dict[str, Any]:
    """Book the carrier for the reserved items."""
    return {
        "tracking": f"T-{ctx.task_context['order_id']:05d}",
        "reservation": ctx.parent_results["reserve_inventory"]["reservation"],
    }
