"""Build an mlx-lm model with only its dense core in memory and its experts paged.

mlx-lm builds the model lazily (``load_model(lazy=True)``: no tensor data read), every
``SwitchGLU`` / ``SwitchMLP`` is swapped for a ``PagedSwitch`` before anything is
evaluated, and only then is the dense core loaded. The full expert tensors are never
materialised.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass
from pathlib import Path

import mlx.core as mx
import mlx.nn as nn
from mlx.utils import tree_flatten, tree_map, tree_unflatten
from mlx_lm.models.cache import ArraysCache, KVCache, RotatingKVCache
from mlx_lm.utils import load_config, load_model, load_tokenizer

from ..budget import BudgetPlan, check_budget, plan_budget
from ..stats import Stats
from ..storage.checkpoint import declared_experts, declared_top_k, index_checkpoint
from ..storage.expert_map import ExpertMap, build_expert_map
from ..storage.readers import DEFAULT_READ_THREADS, make_reader
from .cache_routing import enable_cache_routing
from .cold_tier import LowBitFormat, cold_eligible, precision_bits, slot_bytes
from .expert_cache import ExpertCache, StoredFormat
from .kv_cache import kv_cache_bytes
from .paged_switch import SWITCH_TYPES, PagedSwitch, describe_projections, expert_param_shapes
from .policies import DEFAULT_POLICY, make_policy
from .prefetch import Prefetcher
from .router import find_router
from .run import PagingRun

# Architectures tested end to end with tiny checkpoints (tests/test_exact.py).
TESTED_ARCHITECTURES = (
    "qwen3_moe",
    "qwen2_moe",
    "mixtral",
    "olmoe",
    "deepseek_v2",
    "gpt_oss",
    "qwen3_5_moe",
)

# Module names and class-name words that mark an MoE block in any mlx-lm model file.
EXPERT_MODULE_NAMES = ("experts", "moe", "block_sparse_moe")
EXPERT_CLASS_WORDS = ("moe", "expert")


def default_compute_dtype() -> mx.Dtype | None:
    """float32 on the CPU backend (half-precision matmuls are very slow there); on a GPU
    the checkpoint's own dtype (None)."""
    return None if mx.default_device() == mx.gpu else mx.float32


@dataclass
class PagedModel:
    model: nn.Module
    tokenizer: object
    config: dict
    path: Path
    plan: BudgetPlan
    cache: ExpertCache | None  # None: a model without routed experts, fully resident
    stats: Stats
    run: PagingRun | None = None  # what the current reply did with the paged layers
    cold: ExpertCache | None = None  # the cold tier's 4-bit slots (cold_precision = "4bit")

    @property
    def paged(self) -> bool:
        return self.cache is not None

    def reset_cache(self) -> None:
        """Evict everything, policies afresh: runs compared from the same state."""
        for cache in (self.cache, self.cold):
            if cache is not None:
                cache.reset()

    def close(self) -> None:
        if self.cache is not None:
            self.cache.close()


def _layer_sort_key(path: str) -> list:
    return [int(t) if t.isdigit() else t for t in re.split(r"(\d+)", path)]


def find_switch_layers(model: nn.Module) -> list[tuple[str, nn.Module]]:
    found = [(p, m) for p, m in model.named_modules() if isinstance(m, SWITCH_TYPES)]
    return sorted(found, key=lambda pm: _layer_sort_key(pm[0]))


def _module(model: nn.Module, path: str):
    owner = model
    for part in path.split("."):
        owner = owner[int(part)] if isinstance(owner, list) else owner[part]
    return owner


def _set_module(model: nn.Module, path: str, module: nn.Module) -> None:
    parent, _, last = path.rpartition(".")
    owner = _module(model, parent)
    if isinstance(owner, list):
        owner[int(last)] = module
    else:
        setattr(owner, last, module)


def find_unpageable_moe(model: nn.Module) -> tuple[str, str] | None:
    """The first module that looks like an MoE block (by name or class), as (path, class):
    without a Switch layer it means experts mlx-pager cannot page."""
    for path, module in sorted(model.named_modules(), key=lambda pm: _layer_sort_key(pm[0])):
        kind = type(module).__name__
        names = path.lower().split(".")
        if any(n in EXPERT_MODULE_NAMES for n in names) or any(
            w in kind.lower() for w in EXPERT_CLASS_WORDS
        ):
            return path, kind
    return None


def _refuse_unpageable(model: nn.Module, config: dict) -> None:
    """An MoE model whose experts are not SwitchGLU/SwitchMLP would otherwise load as
    "dense, fits" with every expert resident: refuse it with what to do instead."""
    experts = declared_experts(config)
    found = find_unpageable_moe(model)
    if not experts and found is None:
        return
    what = f"{experts} routed experts per layer" if experts else "routed experts"
    where = f" ({found[1]} at {found[0]})" if found else ""
    raise ValueError(
        f"Model type {config.get('model_type')!r} is a mixture of experts ({what}), but "
        f"its MoE layer{where} is not mlx-lm's SwitchGLU/SwitchMLP, so mlx-pager cannot "
        "page its experts. Use a model of a supported architecture: "
        f"{', '.join(TESTED_ARCHITECTURES)}."
    )


def cache_kinds(model: nn.Module) -> list[tuple[str, int]] | None:
    """Each layer's cache as the model makes it: ("full", 0), ("window", size) or
    ("state", 0); None when the model makes plain KV caches for every layer."""
    if not hasattr(model, "make_cache"):
        return None
    kinds = []
    for cache in model.make_cache():
        if isinstance(cache, RotatingKVCache):
            kinds.append(("window", cache.max_size))
        elif isinstance(cache, KVCache):
            kinds.append(("full", 0))
        elif isinstance(cache, ArraysCache):
            kinds.append(("state", 0))
    return kinds


def _is_float(a: mx.array) -> bool:
    return mx.issubdtype(a.dtype, mx.floating)


def cast_floating(params: dict, dtype: mx.Dtype) -> dict:
    """Floating-point parameters to ``dtype``; packed quantised weights stay as they are."""
    return tree_map(lambda a: a.astype(dtype) if _is_float(a) else a, params)


def _dense_parameters(model: nn.Module, switches: list[tuple[str, nn.Module]]) -> dict:
    """The model's parameters minus the routed experts."""
    skip = tuple(f"{path}." for path, _ in switches)
    flat = tree_flatten(model.parameters())
    return tree_unflatten([(k, v) for k, v in flat if not k.startswith(skip)])


def _float_itemsize(params: dict) -> int:
    return next((a.dtype.size for _, a in tree_flatten(params) if _is_float(a)), 2)


def _num_experts(switch: nn.Module) -> int:
    first = next(iter(describe_projections(switch)))
    return int(switch[first].weight.shape[0])


def _build_lazy(model_path: Path, config: dict) -> tuple[nn.Module, dict]:
    """mlx-lm's own model classes and sanitize, no tensor data read."""
    model_type = config.get("model_type", "?")
    try:
        return load_model(model_path, lazy=True)
    except ValueError as e:
        if "not supported" in str(e):
            raise ValueError(
                f"mlx-pager cannot run model type {model_type!r}: the installed mlx-lm does "
                f"not know it ({e}). Tested MoE types: {', '.join(TESTED_ARCHITECTURES)}."
            ) from e
        raise


@dataclass
class ModelLayout:
    """A lazily built model and what it will cost, known before any weight is read."""

    model: nn.Module
    config: dict
    path: Path
    switches: list[tuple[str, nn.Module]]
    expert_map: ExpertMap | None
    shapes: dict[str, tuple[int, ...]]
    pool_dtypes: dict[str, mx.Dtype]
    resident_bytes: int
    kv_bytes: int
    expert_bytes: int  # one expert in memory
    experts_per_layer: int
    top_k: int

    @property
    def moe_layers(self) -> int:
        return len(self.switches)

    def plan(self, budget_bytes: int) -> BudgetPlan:
        return plan_budget(
            budget_bytes,
            self.resident_bytes,
            self.kv_bytes,
            self.expert_bytes,
            self.moe_layers * self.experts_per_layer,
            self.top_k,
        )


def inspect_model(
    model_path: Path, context_length: int = 4096, compute_dtype: mx.Dtype | None | str = "auto"
) -> ModelLayout:
    """Build the model lazily, cast the dense core, locate every expert on disk."""
    model_path = Path(model_path)
    config = load_config(model_path)
    tensors = index_checkpoint(model_path)  # clear errors for broken files, before mlx-lm
    model, config = _build_lazy(model_path, config)
    dtype = default_compute_dtype() if compute_dtype == "auto" else compute_dtype

    switches = find_switch_layers(model)
    if not switches:
        _refuse_unpageable(model, config)
    dense = _dense_parameters(model, switches)
    if dtype is not None:
        dense = cast_floating(dense, dtype)
        model.update(dense)
    resident = sum(a.nbytes for _, a in tree_flatten(dense))
    kv = kv_cache_bytes(config, context_length, _float_itemsize(dense), cache_kinds(model))
    if not switches:
        return ModelLayout(model, config, model_path, [], None, {}, {}, resident, kv, 0, 0, 1)

    first = switches[0][1]
    shapes = expert_param_shapes(first)
    pool_dtypes = {}
    for param in shapes:
        proj, leaf = param.split(".")
        stored = first[proj][leaf].dtype
        floating = mx.issubdtype(stored, mx.floating)
        pool_dtypes[param] = dtype if dtype is not None and floating else stored
    num_experts = _num_experts(first)
    expert_map = build_expert_map(
        [(path, expert_param_shapes(m)) for path, m in switches], num_experts, tensors
    )
    one_expert = sum(math.prod(shapes[p]) * pool_dtypes[p].size for p in shapes)
    return ModelLayout(
        model,
        config,
        model_path,
        switches,
        expert_map,
        shapes,
        pool_dtypes,
        resident,
        kv,
        one_expert,
        num_experts,
        declared_top_k(config) or 1,
    )


def load_paged(
    model_path: Path,
    budget_bytes: int,
    context_length: int = 4096,
    policy: str = DEFAULT_POLICY,
    read_path: str = "auto",
    compute_dtype: mx.Dtype | None | str = "auto",
    prefetch: bool = False,
    cold_precision: str = "full",
    read_threads: int = DEFAULT_READ_THREADS,
    page_cache: str = "drop",
    route_margin: float = 0.0,
) -> PagedModel:
    """Open a checkpoint folder under a byte budget; see the module docstring."""
    layout = inspect_model(model_path, context_length, compute_dtype)
    plan = check_budget(layout.plan(budget_bytes))
    model, stats, cache, cold, run = layout.model, Stats(), None, None, None
    if layout.switches:
        keep = page_cache == "keep"  # the OS page cache as a second tier (not dropped)
        reader = make_reader(read_path, layout.expert_map.files(), read_threads, not keep)
        run = PagingRun(stats, reader, layout.moe_layers, layout.experts_per_layer)
        projections = describe_projections(layout.switches[0][1])
        params = layout.expert_map.params
        stored = StoredFormat(params, layout.shapes, layout.pool_dtypes, projections)
        slots, cold_slots = plan.slots, 0
        bits = precision_bits(cold_precision)
        if bits and cold_eligible(projections, bits) and plan.slots > layout.top_k:
            # A quarter of the expert bytes buys low-bit slots for unimportant misses.
            slots = max(layout.top_k, plan.slots * 3 // 4)
            low = LowBitFormat(projections, params, layout.shapes, layout.pool_dtypes, bits)
            cold_slots = (plan.slots - slots) * layout.expert_bytes // slot_bytes(low.layout())
        staging = plan.headroom_bytes // 4
        cache = ExpertCache(layout.expert_map, reader, slots, make_policy(policy), stored,
                            staging, on_fetch=run.count)  # fmt: skip
        run.cache = cache
        cache.on_hits = run.hits_written
        if cold_slots:
            cold = ExpertCache(layout.expert_map, reader, cold_slots, make_policy("lru"), low,
                               staging, on_fetch=run.count_cold)  # fmt: skip
        routers = [
            find_router(_module(model, path.rsplit(".", 1)[0])) for path, _ in layout.switches
        ]
        if prefetch:
            # Guess each token's top-k only: on the bench model a top-1.5k window read 4x
            # the bytes for few extra hits (misses are the unlikely experts, by definition).
            cache.prefetcher = run.prefetcher = Prefetcher(
                layout.expert_map, reader, staging, layout.top_k
            )
        # Swap before anything is evaluated: the stacked expert arrays are dropped unread.
        for layer, (path, original) in enumerate(layout.switches):
            next_router = routers[layer + 1] if layer + 1 < len(routers) else None
            switch = PagedSwitch(original, layer, cache, run, routers[layer], next_router, cold)
            _set_module(model, path, switch)
        if route_margin > 0:  # lossy, opt-in: decode steps rerouted to resident experts
            parents = [path.rsplit(".", 1) for path, _ in layout.switches]
            blocks = [(_module(model, parent), name) for parent, name in parents]
            stats.routing = enable_cache_routing(blocks, route_margin)
            stats.route_margin = route_margin if stats.routing == "cache-aware" else 0.0
    mx.eval(model.parameters())  # the dense core, and nothing else
    mx.set_cache_limit(plan.headroom_bytes // 4)

    stats.budget_bytes = budget_bytes
    stats.resident_bytes = plan.resident_bytes
    stats.kv_bytes = plan.kv_bytes
    stats.headroom_bytes = plan.headroom_bytes
    stats.slots = cache.slots if cache else 0
    stats.cold_slots = cold.slots if cold else 0
    stats.cold_precision = cold_precision if cold else "full"
    stats.cache_bytes = plan.cache_bytes if cache else 0
    tokenizer = load_tokenizer(layout.path, eos_token_ids=layout.config.get("eos_token_id"))
    return PagedModel(model, tokenizer, layout.config, layout.path, plan, cache, stats, run, cold)
