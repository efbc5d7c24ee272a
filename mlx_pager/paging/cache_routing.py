"""Cache-aware routing (opt-in, lossy): a routed expert that is not resident gives way to a
resident one whose router logit is within a margin of it.

The "cache prior" of arXiv 2412.00099: each resident expert's logit is raised by
``margin`` times the token's logit range (largest minus smallest) before the top-k, so a
token keeps every expert it routed to that is resident, and a missing one is replaced
only by a resident expert that came close. The margin is the quality knob: 0 is exact
routing, 1 lets any resident expert stand in for any missing one.

Where: mlx-lm's MoE blocks compute the router's scores and top-k indices, call the switch
layer with the indices, and weight its outputs by the scores of the experts *routed to*.
The substitution happens between the two (``CacheAwareSwitch`` wraps the paged switch),
so each replaced output is rescaled by new score / old score: the block's combine then
weighs every expert actually computed by the score the model's own rule gives it over
the set actually used (``combine_rule``). Only single-token steps (decode) are rerouted:
a prompt's prefill reads most experts anyway, and stays exact.
"""

from __future__ import annotations

import mlx.core as mx
import mlx.nn as nn
import numpy as np

from .router import router_scores

# How each mlx-lm MoE block turns router logits into its combine weights:
# "chosen": a softmax over the k chosen experts (their scores sum to 1);
# "all": a softmax over every expert, the chosen ones' taken as they are.
_RULES = {
    "MixtralSparseMoeBlock": "chosen",
    "MLPBlock": "chosen",  # gpt-oss: softmax of the top-k logits
    "Qwen2MoeSparseMoeBlock": "all",
}
_NORM_TOPK_BLOCKS = ("Qwen3MoeSparseMoeBlock", "OlmoeSparseMoeBlock", "Qwen3NextSparseMoeBlock")


def combine_rule(block: nn.Module) -> str | None:
    """The rule ("chosen" or "all") of a block whose scoring is known; else None."""
    name = type(block).__name__
    if name in _NORM_TOPK_BLOCKS:
        return "chosen" if block.norm_topk_prob else "all"
    if name == "DeepseekV2MoE":  # softmax over all, times a constant that cancels
        greedy = getattr(block.gate, "topk_method", "") == "greedy"
        return "all" if greedy else None  # group-limited: a substitute may be out of bounds
    return _RULES.get(name)


def substitute(
    logits: np.ndarray, routed: np.ndarray, resident: np.ndarray, margin: float
) -> np.ndarray:
    """The routing after the cache prior: ``routed`` [tokens, k] with each missing expert
    replaced, weakest first, by the strongest resident expert not routed whose logit plus
    ``margin`` x the token's logit range beats it. A substitute takes its slot's place."""
    new = routed.copy()
    if margin <= 0:
        return new
    for row, z in enumerate(logits):
        chosen = routed[row]
        missing = chosen[~resident[chosen]]
        if missing.size == 0:
            continue
        spare = np.flatnonzero(resident)
        spare = spare[~np.isin(spare, chosen)]
        if spare.size == 0:
            continue
        boost = margin * float(z.max() - z.min())
        missing = missing[np.argsort(z[missing], kind="stable")]  # weakest first
        spare = spare[np.argsort(-z[spare], kind="stable")]  # strongest first
        for expert, stand_in in zip(missing, spare, strict=False):
            if z[stand_in] + boost <= z[expert]:
                break
            new[row][chosen == expert] = stand_in
    return new


def combine_scale(logits: np.ndarray, routed: np.ndarray, new: np.ndarray, rule: str):
    """Per (token, slot), the new combine weight over the old: what the switch output of
    each slot is multiplied by so that the block's combine uses the new set's weights."""
    old_z = np.take_along_axis(logits, routed, -1).astype(np.float64)
    new_z = np.take_along_axis(logits, new, -1).astype(np.float64)
    scale = np.exp(new_z - old_z)
    if rule == "chosen":  # both sets renormalised: the ratio of their partition functions
        top = np.maximum(old_z.max(-1, keepdims=True), new_z.max(-1, keepdims=True))
        old_sum = np.exp(old_z - top).sum(-1, keepdims=True)
        new_sum = np.exp(new_z - top).sum(-1, keepdims=True)
        scale *= old_sum / new_sum
    return scale


class CacheAwareSwitch(nn.Module):
    """Wraps a ``PagedSwitch``: reroutes a decode step towards resident experts, then lets
    the paged switch run on the new routing and rescales its outputs."""

    def __init__(self, switch: nn.Module, margin: float, rule: str):
        super().__init__()
        self.switch = switch
        self.margin = margin
        self.rule = rule

    def __call__(self, x: mx.array, indices: mx.array) -> mx.array:
        switch = self.switch
        if x.size != x.shape[-1]:  # more than one token: a prefill, exact
            return switch(x, indices)
        logits = router_scores(switch.router, x).astype(mx.float32)
        mx.eval(indices, logits)
        routed = np.array(indices).reshape(1, -1)
        z = np.array(logits).reshape(1, -1)
        resident = switch.cache.slot_table[switch.layer] >= 0
        new = substitute(z, routed, resident, self.margin)
        changed = int((new != routed).sum())
        if not changed:
            return switch(x, indices)
        stats = switch.run.stats
        with stats.lock:
            stats.rerouted += changed
        scale = combine_scale(z, routed, new, self.rule).reshape(*indices.shape, 1)
        y = switch(x, mx.array(new.reshape(indices.shape)).astype(indices.dtype))
        return y * mx.array(scale).astype(y.dtype)


def enable_cache_routing(blocks: list[tuple[nn.Module, str]], margin: float) -> str:
    """Wrap each MoE block's paged switch (``block[name]``) for cache-aware routing.

    Returns how routing runs, for the stats: "cache-aware" when every block's combine
    rule is known, else "exact" with why (no block is wrapped then)."""
    if not margin >= 0:
        raise ValueError(f"route_margin must be 0 or more, not {margin!r}.")
    rules = [combine_rule(block) for block, _ in blocks]
    unknown = {type(b).__name__ for (b, _), r in zip(blocks, rules, strict=True) if r is None}
    if unknown or any(block[name].router is None for block, name in blocks):
        what = ", ".join(sorted(unknown)) or "a block without a router"
        return f"exact: cache-aware routing does not know how {what} weighs its experts"
    for (block, name), rule in zip(blocks, rules, strict=True):
        setattr(block, name, CacheAwareSwitch(block[name], margin, rule))
    return "cache-aware"
