"""The live cache drives a policy exactly as the simulator does, so the policy measured
on replayed traces is the policy users run."""

from __future__ import annotations

import pytest
from checkpoints import open_paged

from mlx_pager.engine import Engine
from mlx_pager.policies import POLICIES
from mlx_pager.simulate import replay
from mlx_pager.synthetic import make_checkpoint
from mlx_pager.trace import attach_recorder


@pytest.fixture(scope="module")
def model(tmp_path_factory):
    return make_checkpoint(
        tmp_path_factory.mktemp("m") / "m", "qwen3_moe", num_experts=16, num_hidden_layers=3
    )


@pytest.mark.parametrize("policy", sorted(POLICIES))
def test_live_hits_equal_simulated_hits(model, policy):
    per_layer = 4
    paged = open_paged(model, per_layer * 3, policy=policy)  # one shared cache, 3 layers
    engine = Engine(paged, "m", 256)
    recorder = attach_recorder(engine)
    try:
        # One-token prompt: every forward pass is one token, as the simulator steps.
        for _ in engine.generate("a", max_tokens=40, chat_template=False):
            pass
        live = (engine.stats.hits, engine.stats.misses)
    finally:
        engine.close()
    trace = recorder.to_trace()
    assert trace.num_tokens >= 40  # mlx-lm computes one token ahead of what it yields
    simulated = replay(trace, per_layer, policy, shared=True)
    assert live == (simulated.hits, simulated.misses)
