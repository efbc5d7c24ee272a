"""scripts/foresight_bound.py: no foresight is the real policy, full foresight is Belady."""

from __future__ import annotations

import pytest
from script_loader import load_script
from test_simulate import random_trace

from mlx_pager.sim.replay import belady, replay


@pytest.mark.parametrize("policy", ["lru", "lfu-decay"])
def test_no_foresight_is_the_policy_and_full_foresight_is_belady(policy):
    bound = load_script("foresight_bound").foresight_hit_rate
    for seed in range(3):
        trace = random_trace(seed, tokens=300, experts=12)
        assert bound(trace, 4, 0, policy) == pytest.approx(replay(trace, 4, policy).hit_rate)
        rates = [bound(trace, 4, h, policy) for h in (0, 1, 4, trace.num_tokens)]
        assert rates[-1] == pytest.approx(belady(trace, 4).hit_rate)
        assert rates[0] < rates[-1]
