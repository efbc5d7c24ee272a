"""The routed-expert layer: stands in for mlx-lm's SwitchGLU / SwitchMLP, same call.

The model files stay untouched: ``__call__(x, indices)`` reads the routed experts on the
host (one sync per MoE layer), asks the cache for their slots, then runs mlx-lm's own
computation with the indices remapped to slots. When a layer needs more experts than the
cache holds (a long prompt at a small budget) it computes in rounds of experts, each
(token, expert) pair exactly once, so the result is unchanged. A decode step whose
layer has mostly hit lately is computed speculatively, queued with its routing on slots
MLX looks up itself, and kept only when every expert was resident: on the hit path MLX
never waits for Python, and the pager's bookkeeping runs beside the computation.
"""

from __future__ import annotations

import time
from dataclasses import dataclass

import mlx.core as mx
import mlx.nn as nn
import numpy as np
from mlx_lm.models.switch_layers import (
    QuantizedSwitchLinear,
    SwitchGLU,
    SwitchLinear,
    SwitchMLP,
    _gather_sort,
    _scatter_unsort,
)

from .expert_cache import ExpertCache
from .router import router_scores
from .run import PagingRun

SWITCH_TYPES = (SwitchGLU, SwitchMLP)
# A decode step's computation starts before the host knows its experts where at least
# this share of the layer's recent steps (a moving average over about SPECULATE_OVER
# steps) had every expert resident. Measured on the embedded model, paired runs on this
# noisy 2-core VM: +5% decode speed with every expert resident; guessing after every hit
# lost 2-3% at 50% and 25% of experts, this gate -2% to +6% (within the noise).
SPECULATE_FROM = 0.9
SPECULATE_OVER = 8


@dataclass(frozen=True)
class Projection:
    quantized: bool
    has_bias: bool
    group_size: int = 0
    bits: int = 0
    mode: str = "affine"


def describe_projections(module: nn.Module) -> dict[str, Projection]:
    names = (
        ("gate_proj", "up_proj", "down_proj") if isinstance(module, SwitchGLU) else ("fc1", "fc2")
    )
    out = {}
    for name in names:
        linear = module[name]
        if isinstance(linear, QuantizedSwitchLinear):
            if getattr(linear, "global_scale", None) is not None:
                raise ValueError("Experts quantised with a global scale (nvfp4) are not supported.")
            out[name] = Projection(
                True, "bias" in linear, linear.group_size, linear.bits, linear.mode
            )
        elif isinstance(linear, SwitchLinear):
            out[name] = Projection(False, "bias" in linear)
        else:
            raise ValueError(f"Unsupported expert projection type {type(linear).__name__}.")
    return out


def expert_param_shapes(module: nn.Module) -> dict[str, tuple[int, ...]]:
    """Per-expert shape of every parameter of a switch layer ('gate_proj.weight': (out, in))."""
    shapes = {}
    for name in describe_projections(module):
        for leaf in ("weight", "scales", "biases", "bias"):
            value = module[name].get(leaf) if leaf in module[name] else None
            if value is not None:
                shapes[f"{name}.{leaf}"] = tuple(value.shape[1:])
    return shapes


def likely_experts(scores: np.ndarray, k: int) -> np.ndarray:
    """Experts in any token's top ``k`` of ``scores`` (tokens x experts), the most often
    chosen first: what to read first when not all of them can be."""
    flat = scores.reshape(-1, scores.shape[-1])
    top = np.argpartition(-flat, k - 1, axis=-1)[:, :k]
    experts, counts = np.unique(top, return_counts=True)
    return experts[np.argsort(-counts, kind="stable")]


class PagedSwitch(nn.Module):
    def __init__(
        self,
        original: nn.Module,
        layer: int,
        cache: ExpertCache,
        run: PagingRun,
        router: nn.Module | None = None,
        next_router: nn.Module | None = None,
        cold: ExpertCache | None = None,
    ):
        super().__init__()
        self.glu = isinstance(original, SwitchGLU)
        self.activation = original.activation
        # Plain attributes, not module children: they hold no parameters.
        object.__setattr__(self, "layer", layer)
        object.__setattr__(self, "cache", cache)
        object.__setattr__(self, "run", run)  # what this reply did: counts, phase, hook
        object.__setattr__(self, "cold", cold)  # the cold tier, when cold_precision is 4bit
        object.__setattr__(self, "router", router)  # this layer's: router weights
        object.__setattr__(self, "next_router", next_router)  # the next layer's: guesses
        object.__setattr__(self, "last", next_router is None)  # ends a pass: tokens done
        # Of its recent steps, the share whose experts were all resident
        object.__setattr__(self, "all_resident_share", 1.0)

    def _linear(
        self, pool: ExpertCache, name: str, x: mx.array, idx: mx.array, sorted_indices: bool
    ) -> mx.array:
        spec, pools = pool.projections[name], pool.pools
        if spec.quantized:
            x = mx.gather_qmm(
                x,
                pools[f"{name}.weight"],
                pools[f"{name}.scales"],
                pools.get(f"{name}.biases"),
                rhs_indices=idx,
                transpose=True,
                group_size=spec.group_size,
                bits=spec.bits,
                mode=spec.mode,
                sorted_indices=sorted_indices,
            )
        else:
            x = mx.gather_mm(
                x,
                pools[f"{name}.weight"].swapaxes(-1, -2),
                rhs_indices=idx,
                sorted_indices=sorted_indices,
            )
        if spec.has_bias:
            x = x + mx.expand_dims(pools[f"{name}.bias"][idx], -2)
        return x

    def _compute(self, x: mx.array, indices: mx.array, pool: ExpertCache) -> mx.array:
        """mlx-lm's SwitchGLU / SwitchMLP body, with slots in place of experts."""
        x = mx.expand_dims(x, (-2, -3))
        do_sort = indices.size >= 64
        idx, inv_order = indices, None
        if do_sort:
            x, idx, inv_order = _gather_sort(x, indices)
        if self.glu:
            x_up = self._linear(pool, "up_proj", x, idx, do_sort)
            x_gate = self._linear(pool, "gate_proj", x, idx, do_sort)
            x = self._linear(pool, "down_proj", self.activation(x_up, x_gate), idx, do_sort)
        else:
            x = self._linear(pool, "fc1", x, idx, do_sort)
            x = self._linear(pool, "fc2", self.activation(x), idx, do_sort)
        if do_sort:
            x = _scatter_unsort(x, inv_order, indices.shape)
        return x.squeeze(-2)

    def __call__(self, x: mx.array, indices: mx.array) -> mx.array:
        # The pager's own cost is this thread's CPU time outside MLX (its syncs and the
        # graph of mlx-lm's computation): on a busy machine wall time counts other work.
        start = time.thread_time()
        cache, run, cold, prefetcher = self.cache, self.run, self.cold, self.cache.prefetcher
        decode = run.phase == "decode"
        guessing = prefetcher is not None and prefetcher.gate.on  # where it measures faster
        # One host sync for this layer's choices, the next layer's guess and the weights:
        # the pager must know the experts before it computes them.
        wanted = {"indices": indices}
        if guessing and self.next_router is not None:
            wanted["guess"] = router_scores(self.next_router, x).astype(mx.float32)
        if cold is not None and self.router is not None:
            wanted["probs"] = mx.softmax(router_scores(self.router, x).astype(mx.float32), -1)
        several = indices.size > indices.shape[-1]  # a prompt's tokens, not one step's
        if several and self.next_router is not None and cache.views is not None:
            # The next layer's router on this layer's input: its likely experts, read
            # into slots while this layer computes.
            wanted["ahead"] = router_scores(self.next_router, x).astype(mx.float32)
        in_mlx, speculative, y, ahead = 0.0, None, None, None
        if cold is None and not several and self.all_resident_share >= SPECULATE_FROM:
            # This step's computation as it is if every expert is resident, started with
            # the routing: MLX goes on to the experts without waiting for the host, which
            # keeps the result if they were all resident. If not it is thrown away (it read
            # slot 0 for the missing ones; misses land in slots only once it is done).
            # Tried where the layer's recent steps mostly hit: a wrong guess costs a
            # layer's computation, worth it only where guesses are rarely wrong.
            slots, wanted["resident"] = cache.device_slots(self.layer, indices)
            before = time.thread_time()
            # The routing computes while the host builds the experts' computation on it
            # (interleaved against building first: 0.876 -> 0.899 and 0.896 -> 0.926x stock,
            # higher in 23 of 32 rounds), which is queued after it.
            mx.async_eval(wanted)
            speculative = self._compute(x, slots, cache)
            mx.async_eval(speculative)
            in_mlx += time.thread_time() - before
            ahead = time.thread_time() - start - in_mlx  # the pager's part before it
        before = time.thread_time()
        mx.eval(wanted)
        in_mlx += time.thread_time() - before
        if speculative is not None:
            hit = wanted["resident"].item()
            self._resident(hit)
            if hit and not (guessing or prefetcher is not None and prefetcher.pending):
                # Every expert resident and no guess to score: computing since the
                # routing, nothing waited for the host, and the books wait (``defer_hit``)
                cache.defer_hit(self.layer, indices)
                if self.last:
                    self._pass_done(speculative, indices.size // indices.shape[-1], decode)
                total = time.thread_time() - start - in_mlx
                run.timed(decode, ahead, total)
                return speculative
        # numpy's own index type: the host's gathers take their short path
        routed = np.array(indices, np.intp)
        flat = routed.reshape(-1)
        if cold is None and not several:
            if speculative is None:
                hit = cache.all_resident(self.layer, flat)
                self._resident(hit)
            elif hit:
                y = speculative  # computing since the routing: nothing waited for the host
        guess = prefetcher.predict(np.array(wanted["guess"])) if "guess" in wanted else None
        if flat.size == routed.shape[-1]:  # one token (decode): its top-k are distinct
            experts, requests, counts = flat, None, 1  # one request each
            counted = flat
        else:
            experts, first, counts = np.unique(flat, return_index=True, return_counts=True)
            requests = np.zeros(int(experts[-1]) + 1)  # tokens routed to each expert
            requests[experts] = counts
            counted = experts  # the profiler counts by expert id, the policy in order
            experts = flat[np.sort(first)]  # routing order: recency policies see what happened
        low = np.zeros(0, experts.dtype)
        if "probs" in wanted:
            low = self._unimportant_misses(routed, experts, np.array(wanted["probs"]))
            experts = experts[~np.isin(experts, low)]
        plan = [(cache, r) for r in cache.plan_rounds(self.layer, experts)]
        if low.size:
            plan += [(cold, r) for r in cold.plan_rounds(self.layer, low)]
        if y is not None:  # every expert resident: the policy's books only
            cache.fetch(self.layer, experts)
        elif len(plan) == 1:
            group = plan[0][1]
            reqs = None if requests is None else requests[group]
            lut = cache.fetch(self.layer, group, reqs, record=False)
            slots = mx.array(lut[routed])
            before = time.thread_time()
            y = self._compute(x, slots, cache)
            mx.async_eval(y)  # the experts compute while the pager keeps its books
            in_mlx += time.thread_time() - before  # mlx-lm's own computation, not the pager's
            ahead = time.thread_time() - start - in_mlx
            cache.record()
        else:
            y, ahead = self._compute_in_rounds(x, routed, plan, requests), None
        run.routed(self.layer, routed, counted, counts)  # beside the computation
        if "ahead" in wanted:
            cache.read_ahead(
                self.layer + 1,
                likely_experts(np.array(wanted["ahead"]), routed.shape[-1]),
                {(self.layer, int(e)) for e in experts},
            )
        if self.last:
            self._pass_done(y, flat.size // routed.shape[-1], decode)
        if prefetcher is not None and (guessing or prefetcher.pending):
            prefetcher.finish(self.layer, routed)
            if guess is not None:  # read while this layer computes
                prefetcher.issue(self.layer + 1, guess, cache.resident)
            run.sync()
        total = time.thread_time() - start - in_mlx
        run.timed(decode, total if ahead is None else ahead, total)
        return y

    def _resident(self, hit: bool) -> None:
        """This step's experts were all resident, or not: the moving share that decides
        whether the next steps speculate."""
        share = self.all_resident_share + (hit - self.all_resident_share) / SPECULATE_OVER
        object.__setattr__(self, "all_resident_share", share)

    def _pass_done(self, y: mx.array, n: int, decode: bool) -> None:
        """The last paged layer: ``n`` tokens went through every layer."""
        cache, cold, run, prefetcher = self.cache, self.cold, self.run, self.cache.prefetcher
        # Forced before a slot it reads is overwritten; in decode the next token's first
        # sync computes it anyway, so nothing waits for it here.
        cache.hold(y)
        if cold is not None:
            cold.hold(y)
        cache.next_tokens(n)
        if cold is not None:
            cold.next_tokens(n)
        run.passed(n)
        if prefetcher is not None:
            prefetcher.gate.passed(time.perf_counter(), decode)

    def _unimportant_misses(
        self, routed: np.ndarray, experts: np.ndarray, probs: np.ndarray
    ) -> np.ndarray:
        """Experts not resident at full precision that the cold tier judges unimportant
        (cold_tier.unimportant: HOBBIT's low router weight, or rarely used)."""
        low = self.cold.format.unimportant(self.layer, routed, experts, probs)
        resident = self.cache.slot_table[self.layer, experts] >= 0
        return experts[low & ~resident]

    def _compute_in_rounds(
        self, x: mx.array, routed: np.ndarray, plan, requests: np.ndarray
    ) -> mx.array:
        """Each (cache, experts) round computes exactly the pairs routed to its experts."""
        k = routed.shape[-1]
        flat = routed.reshape(-1)
        rows = x.reshape(-1, x.shape[-1])
        outputs, order = [], []
        for i, (pool, group) in enumerate(plan):
            lut = pool.fetch(self.layer, group, None if requests is None else requests[group])
            pairs = np.flatnonzero(np.isin(flat, group))
            pairs = pairs[np.argsort(lut[flat[pairs]], kind="stable")]
            slots = mx.array(lut[flat[pairs]][:, None])
            y = self._compute(rows[mx.array(pairs // k)], slots, pool)
            y = y[:, 0, :]
            if i + 1 < len(plan) and plan[i + 1][0] is pool:  # read the next group meanwhile
                pool.read_ahead(self.layer, plan[i + 1][1], {(self.layer, int(e)) for e in group})
            mx.eval(y)  # before the next round overwrites slots this one reads
            outputs.append(y)
            order.append(pairs)
        inverse = np.argsort(np.concatenate(order))
        y = mx.concatenate(outputs)[mx.array(inverse)]
        return y.reshape(*routed.shape, y.shape[-1])
