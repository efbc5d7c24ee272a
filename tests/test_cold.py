"""Cold experts at low precision: off by default, only unimportant misses (rarely used
experts, or low router weight), inside the budget, close to exact."""

from __future__ import annotations

import mlx.core as mx
import numpy as np
import pytest
from checkpoints import budget_for_slots
from mlx_lm import load

from mlx_pager.engine import Engine
from mlx_pager.paging.cold_tier import precision_bits, unimportant
from mlx_pager.paging.loader import load_paged
from mlx_pager.settings import Settings
from mlx_pager.sim.synthetic import make_checkpoint


def _decode(model, prompt, steps=24):
    """Logits of a prompt, then of greedy decode steps (the reference's tokens fed back)."""
    from mlx_lm.models.cache import make_prompt_cache

    cache = make_prompt_cache(model)
    out = [model(mx.array(prompt), cache=cache)[:, -1:]]
    for token in range(steps):
        out.append(model(mx.array([[token * 7 % 300]]), cache=cache))
    return mx.concatenate(out, axis=1)


def _rare_half(layers: int, experts: int) -> np.ndarray:
    """A profile in which the odd experts of every layer fire a tenth as often."""
    counts = np.full((layers, experts), 100)
    counts[:, 1::2] = 10
    return counts


@pytest.fixture
def model_path(tmp_path):
    return make_checkpoint(tmp_path / "m", "qwen3_moe", num_experts=16, num_experts_per_tok=4)


def test_off_by_default_and_exact(model_path):
    assert Settings().cold_precision == "full"
    full = load_paged(model_path, budget_for_slots(model_path, 12), 256)
    try:
        assert full.cold is None and full.stats.lossy == []
        tokens = np.random.RandomState(1).randint(0, 300, (1, 16))
        reference, _ = load(str(model_path))
        assert mx.array_equal(_decode(reference, tokens), _decode(full.model, tokens))
    finally:
        full.close()


def test_cold_pool_serves_the_misses_of_rarely_used_experts(model_path):
    budget = budget_for_slots(model_path, 12)
    cold = load_paged(model_path, budget, 256, cold_precision="4bit")
    try:
        assert cold.cache.slots == 9 and cold.cold.slots > 3 * 4  # 6x denser slots
        used = cold.cache.slots * cold.cache.slot_bytes + cold.cold.slots * cold.cold.slot_bytes
        assert used <= budget_for_slots(model_path, 12) - budget_for_slots(model_path, 0)
        assert cold.stats.lossy == ["cold experts at 4bit"]
        tokens = np.random.RandomState(1).randint(0, 300, (1, 16))
        reference, _ = load(str(model_path))
        want = _decode(reference, tokens)
        # No profile yet: nothing is known to be rare, every miss is read in full.
        assert mx.array_equal(_decode(cold.model, tokens), want)
        assert cold.stats.cold_misses == 0

        cold.cold.format.set_profile(_rare_half(2, 16))
        counted = cold.stats.expert_counts.sum()
        got = _decode(cold.model, tokens)
        stats = cold.stats
        assert stats.cold_misses > 0 and stats.misses > 0
        # The access profiler counts every routed choice, cold-served ones too.
        assert stats.expert_counts.sum() - counted == (16 + 24) * 2 * 4
        assert all(expert % 2 == 1 for _, expert in cold.cold.slot_of)  # only rare ones
        error = (mx.abs(got - want).max() / mx.abs(want).max()).item()
        agree = (mx.argmax(got, -1) == mx.argmax(want, -1)).mean().item()
        print(
            f"cold 4-bit: {stats.cold_misses} cold misses, {stats.cold_hits} cold hits, "
            f"logit error up to {error:.4f} of the largest, top-1 agreement {agree:.0%}"
        )
        assert 0 < error < 0.1, error  # half the experts of a random model, at 4 bits
        assert agree > 0.9, agree
    finally:
        cold.close()


def test_router_weight_importance_still_selects_low_weight_misses():
    routed = np.array([[0, 1], [0, 2]])
    probs = np.array([[0.6, 0.05, 0.0, 0.35], [0.5, 0.0, 0.45, 0.05]])
    experts = np.array([0, 1, 2])
    # Expert 1 has weight 0.05 / 0.65 < 1/4 for its only token; 0 and 2 carry theirs.
    assert unimportant(routed, experts, probs, "weight").tolist() == [False, True, False]
    shares = np.array([0.5, 0.1, 0.1, 0.3])  # 1 and 2 below an even share (0.25)
    assert unimportant(routed, experts, probs, "frequency", shares).tolist() == [
        False, True, True,
    ]  # fmt: skip
    assert unimportant(routed, experts, probs, "both", shares).tolist() == [False, True, False]
    assert not unimportant(routed, experts, probs, "frequency", None).any()


@pytest.mark.parametrize("precision", ["3bit", "2bit"])
def test_lower_precisions_pack_more_slots(model_path, precision):
    budget = budget_for_slots(model_path, 12)
    four = load_paged(model_path, budget, 256, cold_precision="4bit")
    lower = load_paged(model_path, budget, 256, cold_precision=precision)
    try:
        assert lower.cold.slots > four.cold.slots
        assert lower.cold.projections["gate_proj"].bits == precision_bits(precision)
        lower.cold.format.set_profile(_rare_half(2, 16))
        _decode(lower.model, np.random.RandomState(1).randint(0, 300, (1, 16)))
        assert lower.stats.cold_misses > 0
    finally:
        four.close()
        lower.close()
    with pytest.raises(ValueError, match="full, 4bit, 3bit or 2bit"):
        precision_bits("1bit")


def test_engine_profiles_the_cold_tier(model_path):
    engine = Engine(
        load_paged(model_path, budget_for_slots(model_path, 12), 256, cold_precision="4bit"),
        "m", 256,
    )  # fmt: skip
    try:
        for prompt in ("a b c", "d e f"):
            for _ in engine.generate(prompt, max_tokens=8, chat_template=False):
                pass
            shares = engine.paged.cold.format.shares
            assert shares is not None and np.allclose(shares.sum(-1), 1)
        # The second reply started from the first's counts: the rarely used are known.
        first = engine.profiles.counts[engine.stats.task or ""]
        assert (shares < 1 / 16).any() and first.sum() > 0
        assert engine.stats.to_dict()["lossy"] == ["cold experts at 4bit"]
    finally:
        engine.close()


def test_cold_precision_is_a_no_op_at_or_below_the_stored_bits(tmp_path):
    path = make_checkpoint(tmp_path / "q", "olmoe", quantize_bits=4)
    paged = load_paged(path, budget_for_slots(path, 8), 256, cold_precision="4bit")
    lower = load_paged(path, budget_for_slots(path, 8), 256, cold_precision="3bit")
    try:
        assert paged.cold is None and paged.stats.cold_slots == 0
        assert paged.stats.lossy == [] and paged.stats.cold_precision == "full"
        assert lower.cold is not None and lower.stats.cold_precision == "3bit"
    finally:
        paged.close()
        lower.close()
