"""Replaying a routing trace against the cache policies, and Belady's optimum.

Semantics (those of the reference figures in ``docs/trace-format.md``): a token's requests
at one layer are served together: every one of them is pinned while the misses are
loaded, a request already resident is a hit, ``-1`` is skipped. A miss is always loaded
into a slot; a policy can only choose what to evict. Two modes: one cache of
``capacity`` experts per layer, or one global budget of ``capacity * layers`` experts
shared by all layers (hot layers may hold more). Belady's offline optimum (evict the
resident expert whose next use is furthest away) bounds every policy in both modes.
"""

from __future__ import annotations

import heapq
import os
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, replace

import numpy as np

from ..paging.policies import DecayedLFU, PredictedUse, make_policy
from . import fast, learned_replay
from .trace import Trace


@dataclass
class Result:
    policy: str
    hits: int
    misses: int
    tokens: int
    held_out: tuple[int, int] | None = None  # (hits, misses) from ``split`` on

    @property
    def held_out_hit_rate(self) -> float | None:
        if not self.held_out or not sum(self.held_out):
            return None
        return self.held_out[0] / sum(self.held_out)

    @property
    def hit_rate(self) -> float:
        total = self.hits + self.misses
        return self.hits / total if total else 0.0

    @property
    def misses_per_token(self) -> float:
        return self.misses / self.tokens if self.tokens else 0.0


def parse_capacity(text: str | float, num_experts: int) -> int:
    """``16`` experts per layer, or ``0.25`` of them."""
    value = float(text)
    if value <= 0:
        raise ValueError(f"capacity must be positive, got {text}")
    if value < 1 or (isinstance(text, str) and "." in text and value <= 1):
        value = round(value * num_experts)
    if value != int(value):
        raise ValueError(f"capacity {text} is neither a whole number of experts nor a fraction")
    return min(int(value), num_experts)


def _requests(trace: Trace) -> tuple[np.ndarray, np.ndarray]:
    """Keys ``layer * E + expert`` per [T, L, K] (-1 kept) and weights (1.0 when unknown)."""
    ids = trace.expert_ids.astype(np.int64)
    keys = np.where(ids >= 0, ids + trace.num_experts * np.arange(trace.num_layers)[:, None], -1)
    weights = trace.weights if trace.weights is not None else np.ones(ids.shape, np.float32)
    return keys, weights


def _check_capacity(trace: Trace, capacity: int) -> None:
    per_token = (trace.expert_ids >= 0).sum(-1).max(initial=0)
    if capacity < per_token:
        raise ValueError(
            f"capacity {capacity} is below the {per_token} experts one token needs at a layer"
        )


def replay_reference(
    trace: Trace, capacity: int, policy: str, shared: bool = False, split: int | None = None
) -> Result:
    """Hits and misses of ``policy`` with ``capacity`` experts per layer, driving the policy
    objects themselves (the live engine's code): the reference that ``replay`` matches.

    ``shared``: one cache of ``capacity * layers`` experts for all layers, one policy
    instance ranking every (layer, expert), as the live engine runs it. ``split``: also
    count hits and misses from that token on (a held-out part, with a warm cache).
    """
    _check_capacity(trace, capacity)
    n_layers = trace.num_layers
    groups = 1 if shared else n_layers
    policies = [make_policy(policy) for _ in range(groups)]
    residents: list[set[tuple[int, int]]] = [set() for _ in range(groups)]
    limit = capacity * n_layers if shared else capacity
    ones = [[1.0] * trace.top_k] * n_layers
    hits = misses = 0
    before = None
    for t in range(trace.num_tokens):
        if t == split:
            before = (hits, misses)
        id_rows = trace.expert_ids[t].tolist()
        weight_rows = ones if trace.weights is None else trace.weights[t].tolist()
        for layer in range(n_layers):
            g = 0 if shared else layer
            pol, resident = policies[g], residents[g]
            want = [(layer, e) for e in id_rows[layer] if e >= 0]
            missed = [k for k in want if k not in resident]
            if missed:
                missed = list(dict.fromkeys(missed))
                misses += len(missed)
                over = len(resident) + len(missed) - limit
                if over > 0:
                    pinned = set(want)
                    for _ in range(over):
                        victim = pol.victim(pinned)
                        pol.remove(victim)
                        resident.remove(victim)
                resident.update(missed)
            hits += len(want) - len(missed)
            for e, w in zip(id_rows[layer], weight_rows[layer], strict=True):
                if e >= 0:
                    pol.access((layer, e), w)
        for pol in policies:
            pol.next_token()
    held = None if before is None else (hits - before[0], misses - before[1])
    return Result(policy, hits, misses, trace.num_tokens, held)


def next_uses(keys: np.ndarray) -> np.ndarray:
    """For each request [T, L, K], the step (t * L + l) of the next request of its key."""
    T, L, K = keys.shape
    flat = keys.reshape(-1)
    step = np.repeat(np.arange(T * L, dtype=np.int64), K)
    order = np.argsort(flat, kind="stable")  # by key, then by step
    k_sorted, s_sorted = flat[order], step[order]
    nxt_sorted = np.full(len(flat), T * L, np.int64)
    same = k_sorted[1:] == k_sorted[:-1]
    nxt_sorted[:-1][same] = s_sorted[1:][same]
    for _ in range(K):  # a key twice in one request group: take the later copy's next use
        dup = nxt_sorted[:-1] == s_sorted[:-1]
        if not dup.any():
            break
        nxt_sorted[:-1][dup] = nxt_sorted[1:][dup]
    nxt = np.empty_like(nxt_sorted)
    nxt[order] = nxt_sorted
    return nxt.reshape(T, L, K)


def belady_reference(
    trace: Trace, capacity: int, shared: bool = False, split: int | None = None
) -> Result:
    """Belady's offline optimum under the same rules (misses loaded, a token's set pinned),
    in plain Python: the reference that ``belady`` matches."""
    _check_capacity(trace, capacity)
    keys, _ = _requests(trace)
    nxt = next_uses(keys)
    n_layers = trace.num_layers
    groups = 1 if shared else n_layers
    limit = capacity * n_layers if shared else capacity
    next_of: list[dict[int, int]] = [{} for _ in range(groups)]
    heaps: list[list[tuple[int, int]]] = [[] for _ in range(groups)]
    hits = misses = 0
    before = None
    for t in range(trace.num_tokens):
        if t == split:
            before = (hits, misses)
        key_rows = keys[t].tolist()
        next_rows = nxt[t].tolist()
        for layer in range(n_layers):
            g = 0 if shared else layer
            resident, heap = next_of[g], heaps[g]
            want = [k for k in key_rows[layer] if k >= 0]
            missed = list(dict.fromkeys(k for k in want if k not in resident))
            misses += len(missed)
            hits += len(want) - len(missed)
            over = len(resident) + len(missed) - limit
            if over > 0:
                pinned = set(want)
                kept = []
                while over > 0:
                    neg, k = heapq.heappop(heap)
                    if resident.get(k) != -neg:
                        continue  # stale entry
                    if k in pinned:
                        kept.append((neg, k))
                        continue
                    del resident[k]
                    over -= 1
                for item in kept:
                    heapq.heappush(heap, item)
            for k, n in zip(key_rows[layer], next_rows[layer], strict=True):
                if k >= 0:
                    resident[k] = n
                    heapq.heappush(heap, (-n, k))
            if len(heap) > 4 * limit + 64:  # drop stale entries
                heap[:] = [(-n, k) for k, n in resident.items()]
                heapq.heapify(heap)
    held = None if before is None else (hits - before[0], misses - before[1])
    return Result("belady", hits, misses, trace.num_tokens, held)


# The policies with a compiled replay; ``replay`` runs any other through the Python one.
COMPILED = ("lru", "lfu", "slru", "lfu-decay", "predict", "learned", "belady")


def fast_counts(
    trace: Trace, capacity: int, policy: str, shared: bool, split: int | None
) -> tuple[int, int, int, int]:
    """(hits, misses, hits before ``split``, misses before it) from the compiled loops."""
    keys, weights = _requests(trace)
    weights = weights.astype(np.float64)
    L, E = trace.num_layers, trace.num_experts
    limit = capacity * L if shared else capacity
    at = -1 if split is None else split
    if policy == "predict":
        defaults = PredictedUse()
        tuple_hash = np.array(
            [[hash((layer, e)) % 2**64 for e in range(E)] for layer in range(L)], np.uint64
        )
        ids = trace.expert_ids.astype(np.int64)
        return fast._predict(ids, weights, tuple_hash, E, shared, limit, defaults.mix,
                             defaults._growth, defaults.own_layer, at)  # fmt: skip
    if policy == "learned":
        ids = trace.expert_ids.astype(np.int64)
        params = make_policy("learned").params.weights
        none = np.zeros(1, np.int64)
        hits, misses, before_hits, before_misses, _, _ = learned_replay.run(
            ids, E, params, learned_replay.GROWTH, shared, limit, at, 0, 0, none, none
        )
        return hits, misses, before_hits, before_misses
    if policy == "slru":
        share = make_policy("slru").protected_share
        return fast._slru(keys, E, shared, limit, share, at)
    kind = {"lru": fast.LRU, "lfu": fast.LFU, "lfu-decay": fast.DECAY, "belady": fast.BELADY}
    if policy not in kind:
        raise ValueError(f"No compiled replay of {policy!r}; use replay_reference.")
    nxt = fast.next_uses(keys, L * E) if policy == "belady" else np.zeros((0, 0, 0), np.int64)
    growth = DecayedLFU()._growth
    return fast._ranked(keys, weights, nxt, E, shared, limit, kind[policy], growth, at)


def replay(
    trace: Trace, capacity: int, policy: str, shared: bool = False, split: int | None = None
) -> Result:
    """Hits and misses of ``policy`` with ``capacity`` experts per layer, compiled
    (``fast``): the same counts as ``replay_reference``, in seconds rather than minutes.

    ``shared``: one cache of ``capacity * layers`` experts for all layers, one policy
    ranking every (layer, expert), as the live engine runs it. ``split``: also count hits
    and misses from that token on (a held-out part, with a warm cache).
    """
    _check_capacity(trace, capacity)
    if policy not in COMPILED:
        make_policy(policy)  # the error that names the choices
        return replay_reference(trace, capacity, policy, shared, split)  # not compiled (yet)
    hits, misses, before_hits, before_misses = fast_counts(trace, capacity, policy, shared, split)
    held = None if split is None or split >= trace.num_tokens else (
        hits - before_hits, misses - before_misses)  # fmt: skip
    return Result(policy, hits, misses, trace.num_tokens, held)


def belady(trace: Trace, capacity: int, shared: bool = False, split: int | None = None) -> Result:
    """Belady's offline optimum under the same rules (misses loaded, a token's set
    pinned), compiled: the same counts as ``belady_reference``."""
    return replace(replay(trace, capacity, "belady", shared, split), policy="belady")


def simulate(
    trace: Trace,
    capacity: int,
    policies: list[str],
    modes: tuple[str, ...] = ("layer",),
    workers: int | None = None,
) -> dict[str, dict]:
    """Per mode ("layer": a cache per layer, "global": one for all), the hit rate and
    misses per token of each policy and of Belady, as plain data. The replays run side by
    side on ``workers`` threads (default: one per core): the compiled loops release the GIL."""
    jobs = [(mode, name) for mode in modes for name in [*policies, "belady"]]
    with ThreadPoolExecutor(workers or os.cpu_count() or 1) as pool:
        counted = pool.map(lambda job: replay(trace, capacity, job[1], job[0] == "global"), jobs)
        done = dict(zip(jobs, counted, strict=True))
    out = {}
    for mode in modes:
        results = [done[mode, name] for name in policies]
        best = done[mode, "belady"]
        out[mode] = {
            "belady": best.hit_rate,
            "policies": {r.policy: r.hit_rate for r in results},
            "misses_per_token": {
                **{r.policy: r.misses_per_token for r in results},
                "belady": best.misses_per_token,
            },
        }
    return out
