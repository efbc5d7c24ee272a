"""The compiled replay counts exactly what the Python replay counts: every policy and
Belady, per-layer and global, on random traces and on the shared DeepSeek trace."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pytest

from mlx_pager.paging.policies import POLICIES
from mlx_pager.sim import fast, pyset
from mlx_pager.sim.replay import belady, belady_reference, next_uses, replay, replay_reference
from mlx_pager.sim.trace import Trace, load_trace

SHARED = os.environ.get("MLX_PAGER_SHARED")
SHARED_TRACE = Path(SHARED or "/nonexistent") / "traces" / "deepseek-v2-lite-prefill-dev.npz"
NAMES = [*POLICIES, "belady"]


def counts(trace, capacity, name, shared, split, reference):
    if name == "belady":
        run = belady_reference if reference else belady
        r = run(trace, capacity, shared, split=split)
    else:
        run = replay_reference if reference else replay
        r = run(trace, capacity, name, shared, split=split)
    return r.hits, r.misses, r.held_out


def random_trace(seed: int, tokens=150, layers=3, k=3, experts=12, weights=True, holes=True):
    """Skewed, sticky routing with unrecorded (-1) choices and, sometimes, a repeat."""
    rng = np.random.default_rng(seed)
    skew = rng.dirichlet(np.full(experts, 0.4), size=layers)
    ids = np.empty((tokens, layers, k), np.int16)
    for t in range(tokens):
        for layer in range(layers):
            if t and rng.random() < 0.4:
                ids[t, layer] = ids[t - 1, layer]
            else:
                ids[t, layer] = rng.choice(experts, k, replace=False, p=skew[layer])
    if holes:
        ids[rng.random(ids.shape) < 0.05] = -1
        repeat = rng.random(ids.shape[:2]) < 0.03  # one expert twice in a request group
        ids[repeat, 0] = ids[repeat, 1]
    w = rng.dirichlet(np.ones(k), size=(tokens, layers)).astype(np.float32) if weights else None
    return Trace(ids, np.array([0, tokens // 3, tokens]), experts, "decode", "random", weights=w)


@pytest.mark.parametrize("shared", [False, True], ids=["layer", "global"])
@pytest.mark.parametrize("name", NAMES)
def test_random_traces_hit_for_hit(name, shared):
    for seed in range(4):
        trace = random_trace(seed, weights=seed % 2 == 0)
        for capacity in (3, 5, 8):
            split = 75
            assert counts(trace, capacity, name, shared, split, False) == counts(
                trace, capacity, name, shared, split, True
            ), (seed, capacity)


@pytest.mark.skipif(not SHARED_TRACE.exists(), reason="set MLX_PAGER_SHARED to the shared folder")
@pytest.mark.parametrize("shared", [False, True], ids=["layer", "global"])
@pytest.mark.parametrize("name", NAMES)
def test_shared_trace_hit_for_hit(name, shared):
    """The first prompts of the DeepSeek trace (no router weights, 26 layers)."""
    trace = load_trace(SHARED_TRACE).sequences(0, 8)
    for capacity in (6, 16):
        split = int(trace.offsets[4])
        assert counts(trace, capacity, name, shared, split, False) == counts(
            trace, capacity, name, shared, split, True
        ), capacity


def test_next_uses_backward_pass():
    trace = random_trace(5)
    keys = np.where(trace.expert_ids >= 0, trace.expert_ids + 12 * np.arange(3)[:, None], -1)
    keys = keys.astype(np.int64)
    valid = keys >= 0
    assert (fast.next_uses(keys, 36)[valid] == next_uses(keys)[valid]).all()


@pytest.mark.parametrize("tuples", [False, True], ids=["ints", "pairs"])
def test_set_order_is_cpythons(tuples):
    """``pyset`` visits keys in the order this interpreter's sets do, through adds,
    discards (dummies), growth and clears."""
    rng = np.random.default_rng(int(tuples))
    for _ in range(60):
        n = int(rng.integers(2, 70))
        keys, hashes, meta = pyset.new_sets(1, n)
        real: set = set()
        for _ in range(300):
            k = int(rng.integers(0, n))
            item = (k // 64, k % 64) if tuples else k
            h = np.uint64(hash(item) % 2**64)
            r = rng.random()
            if r < 0.55:
                real.add(item)
                pyset.add(keys[0], hashes[0], meta[0], k, h)
            elif r < 0.98:
                real.discard(item)
                pyset.discard(keys[0], hashes[0], meta[0], k, h)
            else:
                real.clear()
                pyset.clear(keys[0], hashes[0], meta[0])
            order = [a * 64 + b for a, b in real] if tuples else list(real)
            assert pyset.members(keys[0], meta[0]).tolist() == order


def test_a_policy_without_compiled_replay_runs_through_python(monkeypatch):
    from mlx_pager.paging import policies

    monkeypatch.setitem(policies.POLICIES, "lru-copy", policies.LRU)
    trace = random_trace(1)
    assert counts(trace, 4, "lru-copy", True, 75, False) == counts(trace, 4, "lru", True, 75, False)
    with pytest.raises(ValueError, match="Unknown cache policy"):
        replay(trace, 4, "mru")
