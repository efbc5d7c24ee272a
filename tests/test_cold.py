"""Cold experts at 4 bits: only unimportant misses, inside the budget, close to exact."""

from __future__ import annotations

import mlx.core as mx
import numpy as np
from checkpoints import budget_for_slots
from mlx_lm import load

from mlx_pager.paging.loader import load_paged
from mlx_pager.sim.synthetic import make_checkpoint


def _decode(model, prompt, steps=24):
    """Logits of a prompt, then of greedy decode steps (the reference's tokens fed back)."""
    from mlx_lm.models.cache import make_prompt_cache

    cache = make_prompt_cache(model)
    out = [model(mx.array(prompt), cache=cache)[:, -1:]]
    for token in range(steps):
        out.append(model(mx.array([[token * 7 % 300]]), cache=cache))
    return mx.concatenate(out, axis=1)


def test_cold_pool_serves_unimportant_misses(tmp_path):
    path = make_checkpoint(tmp_path / "m", "qwen3_moe", num_experts=16, num_experts_per_tok=4)
    budget = budget_for_slots(path, 12)
    full = load_paged(path, budget, 256)
    cold = load_paged(path, budget, 256, cold_precision="4bit")
    try:
        assert full.cold is None
        assert cold.cache.slots == 9 and cold.cold.slots > 3 * 4  # 6x denser slots
        used = cold.cache.slots * cold.cache.slot_bytes + cold.cold.slots * cold.cold.slot_bytes
        assert used <= full.cache.slots * full.cache.slot_bytes

        tokens = np.random.RandomState(1).randint(0, 300, (1, 16))
        reference, _ = load(str(path))
        want = _decode(reference, tokens)
        got_full, got_cold = _decode(full.model, tokens), _decode(cold.model, tokens)
        assert mx.array_equal(want, got_full)  # off: exact
        stats = cold.stats
        assert stats.cold_misses > 0 and stats.misses > 0
        # Approximate but close: 4-bit copies of low-weight experts only.
        error = (mx.abs(got_cold - want).max() / mx.abs(want).max()).item()
        assert 0 < error < 0.05, error
        agree = (mx.argmax(got_cold, -1) == mx.argmax(want, -1)).mean().item()
        print(
            f"cold 4-bit: {stats.cold_misses} cold misses, {stats.cold_hits} cold hits, "
            f"max logit error {error:.4f} of the largest, greedy agreement {agree:.0%}"
        )
        assert agree > 0.9, agree
    finally:
        full.close()
        cold.close()


def test_cold_precision_is_a_no_op_for_4bit_checkpoints(tmp_path):
    path = make_checkpoint(tmp_path / "q", "olmoe", quantize_bits=4)
    paged = load_paged(path, budget_for_slots(path, 8), 256, cold_precision="4bit")
    try:
        assert paged.cold is None and paged.stats.cold_slots == 0
    finally:
        paged.close()
