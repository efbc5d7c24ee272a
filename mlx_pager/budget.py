"""How a memory budget divides: resident core + KV cache + headroom + expert slots."""

from __future__ import annotations

import math
from dataclasses import dataclass

from .units import format_bytes

MiB = 2**20


class BudgetError(ValueError):
    """The budget cannot hold even the minimum; the message says the minimum in GB."""


def headroom_bytes(resident_bytes: int) -> int:
    """Working memory for activations, read buffers and MLX's allocator: 48 MiB to 512 MiB."""
    return int(min(512 * MiB, max(48 * MiB, 0.1 * resident_bytes)))


@dataclass(frozen=True)
class BudgetPlan:
    budget_bytes: int
    resident_bytes: int
    kv_bytes: int
    headroom_bytes: int
    expert_bytes: int  # one routed expert, all its projections
    num_experts: int  # routed (layer, expert) pairs in the model
    top_k: int
    slots: int

    @property
    def cache_bytes(self) -> int:
        return self.slots * self.expert_bytes

    @property
    def total_expert_bytes(self) -> int:
        return self.num_experts * self.expert_bytes

    @property
    def fixed_bytes(self) -> int:
        return self.resident_bytes + self.kv_bytes + self.headroom_bytes

    @property
    def min_budget_bytes(self) -> int:
        return self.fixed_bytes + self.top_k * self.expert_bytes

    @property
    def full_budget_bytes(self) -> int:
        return self.fixed_bytes + self.total_expert_bytes

    def share_budget_bytes(self, share: float) -> int:
        """The budget whose slots hold ``share`` of the routed experts (at least top-k):
        how the benchmarks and scripts size "25% of the experts"."""
        slots = max(self.top_k, round(share * self.num_experts))
        return self.fixed_bytes + slots * self.expert_bytes

    @property
    def expert_fraction(self) -> float:
        return self.slots / self.num_experts if self.num_experts else 1.0

    @property
    def verdict(self) -> str:
        """'fits' (every expert resident), 'paged' or 'too_large'.

        The minimum comes first: a dense model (no experts, no slots) must still hold its
        resident core, KV cache and headroom."""
        if self.budget_bytes < self.min_budget_bytes:
            return "too_large"
        if self.slots >= self.num_experts:
            return "fits"
        return "paged" if self.slots >= self.top_k else "too_large"

    def explain(self) -> str:
        if self.verdict == "fits":
            return (
                f"Fits fully: {format_bytes(self.full_budget_bytes)} needed of "
                f"{format_bytes(self.budget_bytes)}."
            )
        if self.verdict == "paged":
            return (
                f"Runs paged: {self.slots} of {self.num_experts} experts "
                f"({self.expert_fraction:.0%}) stay in memory; the rest are read from disk."
            )
        slots = (
            f", {self.top_k} expert slots of {format_bytes(self.expert_bytes)}"
            if self.num_experts
            else ""
        )
        return (
            f"Too large for a budget of {format_bytes(self.budget_bytes)}: it needs at least "
            f"{gb_up(self.min_budget_bytes)} (resident core "
            f"{format_bytes(self.resident_bytes)}, KV cache {format_bytes(self.kv_bytes)}, "
            f"headroom {format_bytes(self.headroom_bytes)}{slots})."
        )


def plan_budget(
    budget_bytes: int,
    resident_bytes: int,
    kv_bytes: int,
    expert_bytes: int,
    num_experts: int,
    top_k: int,
) -> BudgetPlan:
    headroom = headroom_bytes(resident_bytes)
    free = budget_bytes - resident_bytes - kv_bytes - headroom
    slots = max(0, min(num_experts, free // expert_bytes)) if expert_bytes else num_experts
    return BudgetPlan(
        budget_bytes,
        resident_bytes,
        kv_bytes,
        headroom,
        expert_bytes,
        num_experts,
        top_k,
        int(slots),
    )


def gb_up(n: int) -> str:
    """A minimum in GB, rounded up: a budget of the figure shown is enough (rounded to
    nearest, 65 MB showed as 0.06 GB beside a minimum of 0.07)."""
    return f"{math.ceil(n / 1e7) / 100:.2f} GB"


def check_budget(plan: BudgetPlan) -> BudgetPlan:
    if plan.verdict == "too_large":
        raise BudgetError(
            f"The budget {plan.budget_bytes / 1e9:.2f} GB is below the minimum "
            f"{gb_up(plan.min_budget_bytes)} for this model. "
            f"{plan.explain()} "
            "Raise --budget (or the budget in settings) or lower the context length."
        )
    return plan
