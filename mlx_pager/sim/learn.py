"""Fitting the learned policy's weights on a routing trace.

Imitation with the policy in the loop (DAgger): replay the training trace with one cache
for all layers (as the live engine runs) under the current weights, record the served
layer's candidates' features at some evictions with the tokens until their layer next
uses them, fit a logistic model of "used again within ``horizon`` tokens" to them, and
replay again with the new weights, a few rounds. Then two weights no such sample can
teach are chosen on the same trace by hit rate: how much an expert its layer is serving
counts against other layers' residents (``recency_0``) and how much sooner a layer's
turn comes (``turn``). Everything is measured on the training trace alone; held-out
figures are the caller's business.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from dataclasses import dataclass, field

import numpy as np

from ..paging.learned import FEATURES
from . import learned_replay
from .trace import Trace

TURN = FEATURES.index("turn")
SERVING = FEATURES.index("recency_0")


def seed_weights() -> np.ndarray:
    """Where training starts: LRU's order (recency alone)."""
    w = np.zeros(len(FEATURES))
    w[:9] = -np.arange(9, dtype=float)
    return w


def _ids(trace: Trace) -> np.ndarray:
    return trace.expert_ids.astype(np.int64)


def hit_rate(trace: Trace, capacity: int, weights: np.ndarray, shared: bool) -> float:
    """The learned policy's hit rate with these weights (compiled replay)."""
    none = np.zeros(1, np.int64)
    limit = capacity * trace.num_layers if shared else capacity
    hits, misses, *_ = learned_replay.run(
        _ids(trace), trace.num_experts, weights, learned_replay.GROWTH, shared, limit, -1, 0, 0,
        none, none)  # fmt: skip
    return hits / max(hits + misses, 1)


def samples(
    trace: Trace,
    capacity: int,
    weights: np.ndarray,
    every: int,
    seed: int = 0,
    shared: bool = True,
) -> tuple[float, np.ndarray, np.ndarray]:
    """(hit rate, features, tokens to next use) of the served layer's candidates at about
    one eviction in ``every``, the policy running on ``weights`` with ``capacity`` experts
    per layer (one cache for all layers when ``shared``, as the live engine runs it: the
    layer above's routing is a feature there only)."""
    ids = _ids(trace)
    uses, starts = learned_replay.uses_of(ids, trace.num_experts)
    limit = capacity * trace.num_layers if shared else capacity
    hits, misses, _, _, x, y = learned_replay.run(
        ids, trace.num_experts, weights, learned_replay.GROWTH, shared, limit,
        trace.num_tokens, every, seed, uses, starts)  # fmt: skip
    return hits / max(hits + misses, 1), x.astype(np.float64), y.astype(np.float64)


def fit_logistic(x: np.ndarray, y: np.ndarray, l2: float = 1e-5, steps: int = 15) -> np.ndarray:
    """Weights of P(y) = sigmoid(x @ w) by Newton's method, a little L2 for the features
    that never vary in the sample (they keep weight 0)."""
    w = np.zeros(x.shape[1])
    for _ in range(steps):
        p = 1.0 / (1.0 + np.exp(-np.clip(x @ w, -30, 30)))
        grad = x.T @ (p - y) / len(y) + l2 * w
        hess = (x * (p * (1 - p))[:, None]).T @ x / len(y) + l2 * np.eye(len(w))
        w -= np.linalg.solve(hess, grad)
    return w


@dataclass
class Fit:
    weights: np.ndarray
    log: list[str] = field(default_factory=list)


# Feature families, for measuring what each buys (``train(features=...)``).
FAMILIES: dict[str, tuple[str, ...]] = {
    "recency": tuple(f for f in FEATURES if f.startswith("recency")),
    "frequency": tuple(f for f in FEATURES if f.startswith("rate")) + ("popularity",),
    "follows": ("follows_current", "follows_current_mean"),
    "follows_previous": ("follows_previous",),
    "layer_above": ("follows_layer_above",),
}


def train(
    trace: Trace,
    capacities: Iterable[int] = (16,),
    horizons: Iterable[int] = (2, 4, 8),
    rounds: int = 3,
    every: int = 8,
    serving: Iterable[float] = (1.0, 2.0, 4.0),
    turns: Iterable[float] = (-1.0, -2.0, -3.0),
    features: Iterable[str] = FEATURES,
    say: Callable[[str], None] = lambda text: print(text, flush=True),
) -> Fit:
    """Weights for ``LearnedUse`` from ``trace`` alone (see the module's doc): samples
    pooled over caches of each of ``capacities`` experts per layer, the horizon kept
    whose weights hit most (the mean over capacities); ``features`` not listed keep
    weight 0."""
    capacities = list(capacities)
    keep = np.isin(np.array(FEATURES), list(features) + ["bias"]).astype(float)
    start = (2.0, -2.0) if keep[SERVING] else (0.0, 0.0)  # for the policy in the loop
    fit = Fit(seed_weights())

    def note(text: str) -> None:
        fit.log.append(text)
        say(text)

    best = (-1.0, fit.weights)
    for horizon in horizons:
        weights = seed_weights() * keep
        for r in range(rounds):
            xs, ys = [], []
            for capacity in capacities:
                rate, x, y = samples(trace, capacity, weights, every, seed=r)
                note(f"horizon {horizon} round {r} capacity {capacity}: hit rate "
                     f"{rate:.4f} with the weights in, {len(y)} samples")  # fmt: skip
                xs.append(x * keep)
                ys.append(y)
            weights = fit_logistic(np.concatenate(xs), (np.concatenate(ys) <= horizon) * 1.0)
            weights[SERVING], weights[TURN] = start  # not in the samples: chosen below
        rate = float(np.mean([hit_rate(trace, c, weights, shared=True) for c in capacities]))
        note(f"horizon {horizon}: global hit rate {rate:.4f}")
        if rate > best[0]:
            best = (rate, weights)
    weights = best[1].copy()
    for index, grid in ((SERVING, serving), (TURN, turns)):  # one weight, then the other
        best_value = (-1.0, weights[index])
        for value in grid:
            trial = weights.copy()
            trial[index] = value
            rate = float(np.mean([hit_rate(trace, c, trial, shared=True) for c in capacities]))
            note(f"{FEATURES[index]} {value}: global hit rate {rate:.4f}")
            if rate > best_value[0]:
                best_value = (rate, value)
        weights[index] = best_value[1]
    fit.weights = weights
    return fit
