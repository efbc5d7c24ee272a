"""scripts/foresight_bound.py: no foresight is the real policy, full foresight is Belady."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import numpy as np
import pytest

from mlx_pager.simulate import belady, replay
from mlx_pager.trace import Trace

SCRIPT = Path(__file__).parents[1] / "scripts" / "foresight_bound.py"


def load_script():
    spec = importlib.util.spec_from_file_location("foresight_bound", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def skewed_trace(seed: int, tokens: int = 300, layers: int = 3, k: int = 2, experts: int = 12):
    rng = np.random.default_rng(seed)
    skew = rng.dirichlet(np.full(experts, 0.4), size=layers)
    ids = np.array(
        [[rng.choice(experts, k, replace=False, p=skew[layer]) for layer in range(layers)]
         for _ in range(tokens)]
    )  # fmt: skip
    return Trace(ids.astype(np.int16), np.array([0, tokens]), experts, "decode", "random")


@pytest.mark.parametrize("policy", ["lru", "lfu-decay"])
def test_no_foresight_is_the_policy_and_full_foresight_is_belady(policy):
    bound = load_script().foresight_hit_rate
    for seed in range(3):
        trace = skewed_trace(seed)
        assert bound(trace, 4, 0, policy) == pytest.approx(replay(trace, 4, policy).hit_rate)
        rates = [bound(trace, 4, h, policy) for h in (0, 1, 4, trace.num_tokens)]
        assert rates[-1] == pytest.approx(belady(trace, 4).hit_rate)
        assert rates[0] < rates[-1]
