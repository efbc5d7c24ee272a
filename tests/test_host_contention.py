"""scripts/host_contention.py: the fixed work timed idle and at every hit layer's hand-over."""

from __future__ import annotations

from script_loader import load_script

from mlx_pager.sim.synthetic import make_checkpoint


def test_the_work_is_timed_at_every_deferred_hit(tmp_path):
    script = load_script("host_contention")
    model = make_checkpoint(tmp_path / "m", "qwen3_moe", num_experts=8, num_hidden_layers=2)
    assert script.idle(50) > 0
    lazy, synced = script.sync_round_trip(ops=50, repeats=3)
    assert 0 < lazy < synced  # a sync waits for the work and then hands back
    seconds, calls = script.in_layer(model, 8)
    # every expert resident: decode steps after the first few speculate and hit
    assert seconds > 0 and 2 <= calls <= 2 * 9
