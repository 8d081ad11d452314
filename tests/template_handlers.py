"""Handlers named by tests/templates/diamond.yaml."""

from __future__ import annotations

import asyncio
from typing import Any

from tasker import StepContext


def start(ctx: StepContext) -> dict[str, Any]:
    return {"value": ctx.task_context["even_number"] * ctx.inputs["factor"]}


def branch(ctx: StepContext) -> dict[str, Any]:
    return {"value": ctx.parent_results["diamond_start"]["value"] + 1}


async def branch_async(ctx: StepContext) -> dict[str, Any]:
    await asyncio.sleep(0.01)
    return {"value": ctx.parent_results["diamond_start"]["value"] + 2}


def end(ctx: StepContext) -> dict[str, Any]:
    results = ctx.parent_results
    total = results["diamond_branch_b"]["value"] + results["diamond_branch_c"]["value"]
    return {"value": total, "saw": sorted(results)}
