"""One budget across layers, divided by measured skew: per-layer capacities from a profile.

A layer whose experts are reused more (a steeper miss curve) earns more slots. The
profile is each layer's own hit curve: its routing replayed alone at a range of
capacities with the policy that will run (per-layer caches are independent, so one
layer's curve does not depend on the others). ``allocate`` then divides ``capacity x
layers`` slots to maximise the profile's hits, exactly (a knapsack over layers), and
``replay_partitioned`` replays a trace with those fixed shares. Compared with one cache
per layer of equal size, and with one global cache where the policy moves slots between
layers as it goes, in ``scripts/policy_table.py``.
"""

from __future__ import annotations

from dataclasses import replace

import numpy as np

from .replay import Result, belady, replay
from .trace import Trace


def layer_trace(trace: Trace, layer: int) -> Trace:
    """One layer's routing as a trace of its own."""
    ids = trace.expert_ids[:, layer : layer + 1]
    weights = None if trace.weights is None else trace.weights[:, layer : layer + 1]
    return replace(trace, expert_ids=ids, weights=weights)


def capacity_grid(top_k: int, num_experts: int) -> list[int]:
    """Capacities a profile measures: every one up to 2x top-k, then coarser."""
    grid = set(range(top_k, min(2 * top_k, num_experts) + 1))
    c = 2 * top_k
    while c < num_experts:
        c = int(c * 1.25) + 1
        grid.add(min(c, num_experts))
    grid.add(num_experts)
    return sorted(grid)


def _run(trace: Trace, capacity: int, policy: str, split: int | None) -> Result:
    if policy == "belady":
        return belady(trace, capacity, split=split)
    return replay(trace, capacity, policy, split=split)


def curves(trace: Trace, policy: str, grid: list[int]) -> np.ndarray:
    """Hits [capacity, layer] of each layer replayed alone at each capacity of ``grid``."""
    out = np.zeros((len(grid), trace.num_layers))
    for layer in range(trace.num_layers):
        alone = layer_trace(trace, layer)
        for i, capacity in enumerate(grid):
            out[i, layer] = _run(alone, capacity, policy, None).hits
    return out


def allocate(grid: list[int], hits: np.ndarray, budget: int) -> np.ndarray:
    """Per-layer capacities (each within ``grid``'s range) summing to ``budget`` that
    maximise the hits of ``hits`` [capacity, layer], interpolated between its capacities."""
    lo, hi = grid[0], grid[-1]
    layers = hits.shape[1]
    if not lo * layers <= budget <= hi * layers:
        raise ValueError(f"a budget of {budget} cannot give {layers} layers {lo} to {hi} each")
    sizes = np.arange(lo, hi + 1)
    gain = np.stack([np.interp(sizes, grid, hits[:, layer]) for layer in range(layers)])
    best = np.full(budget + 1, -np.inf)
    best[0] = 0.0
    choice = np.zeros((layers, budget + 1), np.int64)
    for layer in range(layers):
        new = np.full(budget + 1, -np.inf)
        for size, value in zip(sizes, gain[layer], strict=True):
            if size > budget:
                break
            candidate = np.full(budget + 1, -np.inf)
            candidate[size:] = best[: budget + 1 - size] + value
            better = candidate > new
            new[better] = candidate[better]
            choice[layer, better] = size
        best = new
    out = np.zeros(layers, np.int64)
    left = budget
    for layer in range(layers - 1, -1, -1):
        out[layer] = choice[layer, left]
        left -= out[layer]
    return out


def replay_partitioned(
    trace: Trace, capacities: np.ndarray, policy: str, split: int | None = None
) -> Result:
    """Per-layer caches of the given sizes (``belady`` for the offline optimum)."""
    hits = misses = held_hits = held_misses = 0
    for layer, capacity in enumerate(capacities.tolist()):
        r = _run(layer_trace(trace, layer), int(capacity), policy, split)
        hits, misses = hits + r.hits, misses + r.misses
        if r.held_out:
            held_hits, held_misses = held_hits + r.held_out[0], held_misses + r.held_out[1]
    held = None if split is None else (held_hits, held_misses)
    return Result(policy, hits, misses, trace.num_tokens, held)
