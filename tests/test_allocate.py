"""One budget divided across layers by their measured hit curves."""

from __future__ import annotations

import itertools

import numpy as np
import pytest
from test_fast_replay import random_trace

from mlx_pager.sim import allocate
from mlx_pager.sim.replay import belady, replay
from mlx_pager.sim.trace import Trace


def test_allocation_is_the_best_split():
    grid = [2, 3, 5, 6]
    rng = np.random.default_rng(0)
    hits = np.sort(rng.random((4, 3)) * 100, axis=0)  # [capacity, layer], rising
    sizes = range(2, 7)
    gain = [np.interp(sizes, grid, hits[:, layer]) for layer in range(3)]
    for budget in (6, 9, 12, 18):
        best = max(
            (sum(gain[layer][c - 2] for layer, c in enumerate(split)), split)
            for split in itertools.product(sizes, repeat=3)
            if sum(split) == budget
        )
        shares = allocate.allocate(grid, hits, budget)
        assert shares.sum() == budget
        assert sum(gain[layer][c - 2] for layer, c in enumerate(shares)) == pytest.approx(best[0])
    with pytest.raises(ValueError, match="cannot give"):
        allocate.allocate(grid, hits, 5)


@pytest.mark.parametrize("name", ["lru", "learned", "belady"])
def test_equal_shares_are_the_per_layer_replay(name):
    trace = random_trace(1)
    shares = np.full(trace.num_layers, 5)
    r = allocate.replay_partitioned(trace, shares, name, split=75)
    same = belady(trace, 5, split=75) if name == "belady" else replay(trace, 5, name, split=75)
    assert (r.hits, r.misses, r.held_out) == (same.hits, same.misses, same.held_out)


def test_grid():
    assert allocate.capacity_grid(6, 64)[:7] == [6, 7, 8, 9, 10, 11, 12]
    grid = allocate.capacity_grid(4, 32)
    assert grid == sorted(set(grid)) and grid[0] == 4 and grid[-1] == 32


def test_a_layer_that_reuses_its_experts_gets_the_slots():
    """Layer 0 cycles through 8 experts (8 slots hold them all), layer 1 draws at random
    from 32: the profile gives layer 0 its 8 and the rest to layer 1."""
    rng = np.random.default_rng(0)
    tokens = 400
    ids = np.empty((tokens, 2, 2), np.int16)
    for t in range(tokens):
        ids[t, 0] = [(2 * t) % 8, (2 * t + 1) % 8]
        ids[t, 1] = rng.choice(32, 2, replace=False)
    trace = Trace(ids, np.array([0, tokens]), 32, "decode", "skewed")
    grid = allocate.capacity_grid(2, 32)
    shares = allocate.allocate(grid, allocate.curves(trace, "lru", grid), 12)
    assert shares.tolist() == [8, 4]
    even = replay(trace, 6, "lru").hit_rate
    assert allocate.replay_partitioned(trace, shares, "lru").hit_rate > even + 0.3
