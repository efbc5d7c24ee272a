"""What a model costs before it is opened: sizes, the KV cache, the verdict for a
budget and an estimated decode speed.

One home for these numbers: `mlx-pager models`, the Models screen and the settings screen
render what this module returns. A model on disk is planned by the engine itself
(``local_verdict``: the loader's ``inspect_model``), a remote one from its safetensors
headers or the catalogue by the same budget rule (``budget.plan_budget``).
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, replace
from pathlib import Path
from typing import TYPE_CHECKING

from .budget import BudgetPlan, plan_budget
from .paging.kv_cache import kv_bytes_per_token
from .speed import MachineConstants, TokenCosts, project_decode
from .storage.checkpoint import DTYPE_SIZES, declared_experts, declared_top_k, index_checkpoint

if TYPE_CHECKING:
    from .paging.loader import ModelLayout

# safetensors dtypes the engine casts to its compute dtype (``loader.cast_floating``);
# packed quantised weights (U32) and MXFP4 scales (U8) stay as stored.
FLOAT_DTYPES = frozenset({"F16", "BF16", "F32", "F64"})


@dataclass(frozen=True)
class ModelSizes:
    """Where a model's bytes are: what the budget and the speed estimate need.

    The byte counts are the checkpoint's (on disk). The engine holds floating-point
    tensors in its compute dtype (float32 on MLX's CPU backend), so ``in_memory`` gives
    what the budget must hold; the ``*_float_*`` fields say how much of each part is
    floating point (0 when unknown: then the stored bytes are taken as they are).
    """

    total_bytes: int  # weights (safetensors), all of them
    dense_bytes: int  # resident part: embeddings, attention, norms, routers, shared experts
    expert_bytes: int  # all routed experts of all MoE layers
    one_expert_bytes: int  # one routed expert of one layer, all its projections
    moe_layers: int
    experts: int  # routed experts per MoE layer
    top_k: int
    kv_bytes_per_token: int = 0  # all layers, float16; 0 when unknown
    dense_float_bytes: int = 0  # floating-point part of dense_bytes, as stored
    dense_float_values: int = 0  # ... in values (elements)
    expert_float_bytes: int = 0  # floating-point part of expert_bytes, as stored
    expert_float_values: int = 0
    float_itemsize: int = 2  # bytes per value of the checkpoint's floats

    @property
    def num_experts(self) -> int:
        return self.moe_layers * self.experts

    def in_memory(self, compute_itemsize: int | None) -> ModelSizes:
        """The sizes as the engine holds them: floats at ``compute_itemsize`` bytes (None:
        as stored, a GPU), quantised weights as stored, the KV cache in the compute dtype
        (``paging.loader.inspect_model`` does the same with the real tensors)."""
        kv = self.kv_bytes_per_token * (compute_itemsize or self.float_itemsize) // 2
        if compute_itemsize is None:
            return replace(self, kv_bytes_per_token=kv)
        dense_float = self.dense_float_values * compute_itemsize
        expert_float = self.expert_float_values * compute_itemsize
        dense = self.dense_bytes - self.dense_float_bytes + dense_float
        experts = self.expert_bytes - self.expert_float_bytes + expert_float
        units = self.num_experts
        return replace(
            self,
            total_bytes=dense + experts,
            dense_bytes=dense,
            expert_bytes=experts,
            one_expert_bytes=experts // units if units else 0,
            kv_bytes_per_token=kv,
            dense_float_bytes=dense_float,
            expert_float_bytes=expert_float,
            float_itemsize=compute_itemsize,
        )


def engine_float_itemsize() -> int | None:
    """Bytes per floating-point value the engine computes in on this machine: the
    loader's own rule (``default_compute_dtype``: float32 on the CPU backend), or None
    where it keeps the checkpoint's dtype (a GPU)."""
    from .paging.loader import default_compute_dtype

    dtype = default_compute_dtype()
    return None if dtype is None else int(dtype.size)


def is_expert_tensor(name: str) -> bool:
    """Routed expert weights: MLX's stacked ``switch_mlp`` / ``experts`` or per-expert ones."""
    return ".experts." in name or "switch_mlp" in name


def sizes_from_tensors(tensors: dict[str, tuple], config: dict) -> ModelSizes:
    """ModelSizes from ``{name: (nbytes, shape, dtype)}`` of every tensor (``dtype`` as in
    safetensors, "BF16"; without it a tensor counts as not floating point) and the config."""
    expert = {n: v for n, v in tensors.items() if is_expert_tensor(n)}
    dense = {n: v for n, v in tensors.items() if n not in expert}
    expert_bytes = sum(v[0] for v in expert.values())
    total = sum(v[0] for v in tensors.values())
    layers = {_layer_index(n) for n in expert} - {None}
    experts = declared_experts(config)
    if not experts and expert:
        per_expert = {n.split(".experts.")[1].split(".")[0] for n in expert if ".experts." in n}
        digits = {e for e in per_expert if e.isdigit()}
        experts = len(digits) or max(v[1][0] for v in expert.values() if v[1])
    top_k = declared_top_k(config)
    units = len(layers) * experts
    dense_float, dense_values = _floats(dense)
    expert_float, expert_values = _floats(expert)
    itemsizes = [DTYPE_SIZES[v[2]] for v in dense.values() if len(v) > 2 and v[2] in FLOAT_DTYPES]
    return ModelSizes(
        total_bytes=total,
        dense_bytes=total - expert_bytes,
        expert_bytes=expert_bytes,
        one_expert_bytes=expert_bytes // units if units else 0,
        moe_layers=len(layers),
        experts=experts,
        top_k=top_k,
        kv_bytes_per_token=kv_bytes_per_token(config),
        dense_float_bytes=dense_float,
        dense_float_values=dense_values,
        expert_float_bytes=expert_float,
        expert_float_values=expert_values,
        float_itemsize=max(set(itemsizes), key=itemsizes.count) if itemsizes else 2,
    )


def _floats(tensors: dict[str, tuple]) -> tuple[int, int]:
    """(bytes, values) of the floating-point tensors among ``{name: (nbytes, shape, dtype)}``."""
    floats = [v for v in tensors.values() if len(v) > 2 and v[2] in FLOAT_DTYPES]
    return sum(v[0] for v in floats), sum(v[0] // DTYPE_SIZES[v[2]] for v in floats)


def _layer_index(name: str) -> int | None:
    parts = name.split(".")
    for i, part in enumerate(parts[:-1]):
        if part in ("layers", "h", "blocks") and parts[i + 1].isdigit():
            return int(parts[i + 1])
    return None


def local_sizes(folder: str | Path) -> ModelSizes:
    """ModelSizes of a model folder (a cached snapshot or any local folder)."""
    folder = Path(folder)
    config = json.loads((folder / "config.json").read_text())
    headers = index_checkpoint(folder)  # validated, shards included, no weights read
    tensors = {name: (t.nbytes, list(t.shape), t.dtype) for name, t in headers.items()}
    return sizes_from_tensors(tensors, config)


# Share of routed-expert activations a cache holding ``fraction`` of all (layer, expert)
# pairs serves, from docs/field-notes.md: on Qwen3 35B-A3B over a coding session the top 1% of
# experts took 20% of activations, the top 5% took 50%, the top 20% took 85%; on
# Qwen3-30B-A3B a 16 GB Mac with an 8 GB budget (about 40% of experts cached) measured
# 89-92% hits. Interpolated linearly in log(fraction) between these points.
HIT_CURVE = [(0.01, 0.20), (0.05, 0.50), (0.20, 0.85), (0.40, 0.90), (1.0, 1.0)]


def hit_rate_estimate(fraction: float, experts_per_layer: int = 0) -> float:
    """Expected cache hit rate when ``fraction`` of the routed experts fit in the cache.

    Models with few, large experts (8 per layer, Mixtral) use them nearly uniformly:
    docs/field-notes.md reports LRU/LFU barely beating random eviction there, so the hit rate is
    taken as the fraction held.
    """

    if fraction <= 0:
        return 0.0
    if fraction >= 1:
        return 1.0
    if 0 < experts_per_layer <= 8:
        return fraction
    x0, y0 = 0.0, 0.0
    for x1, y1 in HIT_CURVE:
        if fraction <= x1:
            if x0 == 0.0:  # below 1%: proportional to the share held
                return y1 * fraction / x1
            t = (math.log(fraction) - math.log(x0)) / (math.log(x1) - math.log(x0))
            return y0 + t * (y1 - y0)
        x0, y0 = x1, y1
    return 1.0


@dataclass(frozen=True)
class Verdict:
    verdict: str  # "fits" | "paged" | "too_large"
    reason: str
    plan: BudgetPlan
    hit_rate: float | None = None  # estimated, paged only
    tokens_per_second: float | None = None  # estimated; None when too large or no constants
    speed_source: str = ""  # where the machine's constants come from (MachineConstants.source)
    speed_basis: str = ""  # short: "measured here", "M4 Air table", "estimate pending"


def verdict(
    sizes: ModelSizes,
    budget_bytes: int,
    context_length: int,
    *,
    compute_itemsize: int | None | str = "auto",
    machine: MachineConstants | None = None,
) -> Verdict:
    """Fits / runs paged / too large for a memory budget, with an estimated decode speed,
    from sizes read before a download (the Hub's headers, the catalogue).

    The budget is planned the way the engine plans it (``budget.plan_budget``) for the
    sizes the engine will hold: floats widened to ``compute_itemsize`` ("auto": the
    loader's rule on this machine, see ``ModelSizes.in_memory``). For a model on disk,
    ``local_verdict`` asks the engine's own ``inspect_model``; the two agree. The speed
    is ``judge_plan``'s for ``machine`` (none without it); misses read the checkpoint's
    bytes of an expert.
    """
    if not (sizes.num_experts and sizes.top_k and sizes.one_expert_bytes):
        raise ValueError("The expert sizes of this model are unknown: no verdict.")
    if compute_itemsize == "auto":
        compute_itemsize = engine_float_itemsize()
    memory = sizes.in_memory(compute_itemsize)  # type: ignore[arg-type]
    plan = plan_budget(
        budget_bytes,
        resident_bytes=memory.dense_bytes,
        kv_bytes=memory.kv_bytes_per_token * context_length,
        expert_bytes=memory.one_expert_bytes,
        num_experts=memory.num_experts,
        top_k=memory.top_k,
    )
    return judge_plan(
        plan,
        memory.moe_layers,
        memory.experts,
        machine=machine,
        read_bytes_per_expert=sizes.one_expert_bytes,
    )


def inspect_local(folder: str | Path, context_length: int) -> ModelLayout:
    """The engine's own layout of a model on disk (the loader's ``inspect_model``: built
    lazily, no weights read): what its budget plans are made from."""
    from .paging.loader import inspect_model

    return inspect_model(Path(folder), context_length)


def local_verdict(
    folder: str | Path,
    budget_bytes: int,
    context_length: int,
    machine: MachineConstants | None = None,
) -> Verdict:
    """The verdict for a model on disk, planned by the engine itself
    (``paging.loader.inspect_model(...).plan``: no weights read). Raises what inspect_model
    raises (ValueError for a broken or unsupported checkpoint)."""
    from .paging.loader import inspect_model

    layout = inspect_model(Path(folder), context_length)
    try:  # misses read the stored bytes of an expert, as ``verdict`` counts them
        read = local_sizes(folder).one_expert_bytes or None
    except (OSError, ValueError, KeyError):
        read = None
    return judge_plan(layout.plan(budget_bytes), layout.moe_layers, layout.experts_per_layer,
                      machine=machine, read_bytes_per_expert=read)  # fmt: skip


def plan_costs(
    plan: BudgetPlan,
    moe_layers: int,
    hit_rate: float,
    read_bytes_per_expert: int | None = None,
) -> TokenCosts:
    """One decoded token of a budget plan: ``moe_layers * top_k * (1 - hit)`` misses of
    ``read_bytes_per_expert`` (the checkpoint's; default the plan's in-memory size), the
    resident part and every routed expert computed, one host sync per MoE layer. The
    resident part includes the embedding table, which a token only indexes: a small
    overcount on the compute side."""
    misses = moe_layers * plan.top_k * (1 - hit_rate)
    read = read_bytes_per_expert or plan.expert_bytes
    return TokenCosts(
        misses=misses,
        disk_bytes=misses * read,
        moe_layers=moe_layers,
        active_bytes=plan.resident_bytes + moe_layers * plan.top_k * plan.expert_bytes,
        host_syncs=moe_layers,
    )


def judge_plan(
    plan: BudgetPlan,
    moe_layers: int,
    experts_per_layer: int,
    *,
    machine: MachineConstants | None = None,
    read_bytes_per_expert: int | None = None,
) -> Verdict:
    """The verdict of a budget plan, with an estimated decode speed on ``machine``.

    The speed is an estimate, not a measurement: ``speed.project_decode`` of the plan's
    token costs (``plan_costs``, the hit rate from ``hit_rate_estimate``) with the
    machine's constants (calibrated here, or a Mac's table row: ``speed.machine_constants``).
    Without constants there is no speed: the verdict says the estimate is pending.
    """
    if plan.verdict == "too_large":
        return Verdict("too_large", plan.explain(), plan)
    hit = hit_rate_estimate(plan.expert_fraction, experts_per_layer)
    reason = plan.explain()
    if machine is None:
        return Verdict(plan.verdict, reason, plan, hit, speed_basis="estimate pending")
    costs = plan_costs(plan, moe_layers, hit, read_bytes_per_expert)
    seconds = project_decode(costs, machine)
    tps = 1 / seconds if seconds > 0 else None
    if plan.verdict == "paged" and tps is not None:
        reason += f" Estimated hit rate {hit:.0%}, about {tps:.1f} tokens/s ({machine.basis})."
    return Verdict(plan.verdict, reason, plan, hit, tps, machine.source, machine.basis)
