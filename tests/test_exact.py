"""Paged output equals stock mlx-lm's, for every architecture, under a budget that evicts."""

from __future__ import annotations

import json

import pytest
from checkpoints import compare_with_mlx_lm, open_paged

from mlx_pager.paging.expert_cache import ExpertCache
from mlx_pager.paging.loader import TESTED_ARCHITECTURES, default_compute_dtype
from mlx_pager.paging.paged_switch import PagedSwitch
from mlx_pager.sim.synthetic import PER_EXPERT_ARCHS, make_checkpoint


def _check(path, slots=None, **kwargs):
    paged = open_paged(path, slots or 3, **kwargs)  # top-k is 2 in every tiny config
    try:
        worst, bitwise = compare_with_mlx_lm(path, paged)
        stats = paged.stats
        assert paged.plan.slots < paged.plan.num_experts
        assert stats.misses > paged.plan.slots, "the budget must force evictions"
        assert bitwise, f"logits differ by up to {worst}"
    finally:
        paged.close()


# 8-bit for every architecture: under 0.5 s each, ~5 s for the file on a 2-core CPU.
@pytest.mark.parametrize("bits", [None, 4, 8], ids=["float32", "4bit", "8bit"])
@pytest.mark.parametrize("arch", TESTED_ARCHITECTURES)
def test_stacked_layout_matches_mlx_lm(tmp_path, arch, bits):
    _check(make_checkpoint(tmp_path / arch, arch, quantize_bits=bits))


@pytest.mark.parametrize("arch", PER_EXPERT_ARCHS)
def test_per_expert_layout_matches_mlx_lm(tmp_path, arch):
    _check(make_checkpoint(tmp_path / arch, arch, per_expert=True))


def test_sharded_checkpoint_with_mmap_reads(tmp_path):
    path = make_checkpoint(tmp_path / "sharded", "qwen3_moe", shards=3, quantize_bits=4)
    assert (path / "model.safetensors.index.json").exists()
    _check(path, read_path="mmap")


def test_minimum_budget_computes_in_rounds(tmp_path, monkeypatch):
    """Top-k slots, the minimum: a 32-token prompt runs each layer in many rounds, exactly."""
    rounds = []
    original = PagedSwitch._compute_in_rounds

    def counting(self, x, routed, plan, requests):
        rounds.append(len(plan))
        return original(self, x, routed, plan, requests)

    monkeypatch.setattr(PagedSwitch, "_compute_in_rounds", counting)
    _check(make_checkpoint(tmp_path / "m", "mixtral"), slots=2)
    assert rounds and max(rounds) > 1, "the prompt never computed in rounds"


def test_bf16_checkpoint_is_cast_like_the_reference(tmp_path):
    """A bf16 checkpoint computes in the compute dtype (float32 on the CPU), dense core and
    experts alike, and its logits equal mlx-lm's with the same cast, bit for bit."""
    import mlx.core as mx

    path = make_checkpoint(tmp_path / "bf16", "olmoe", dtype=mx.bfloat16)
    paged = open_paged(path, 3)
    try:
        if default_compute_dtype() == mx.float32:
            assert all(a.dtype in (mx.float32, mx.uint32) for a in paged.cache.pools.values())
            assert paged.model.model.embed_tokens.weight.dtype == mx.float32
        worst, bitwise = compare_with_mlx_lm(path, paged)
        assert paged.stats.misses > paged.plan.slots, "the budget must force evictions"
        assert bitwise, f"logits differ by up to {worst}"
    finally:
        paged.close()


def test_mxfp4_experts_as_gpt_oss_ships_them(tmp_path):
    """mlx-community's gpt-oss: MXFP4 experts (uint8 scales, no biases), 8-bit the rest."""
    path = make_checkpoint(tmp_path / "gpt_oss", "gpt_oss", quantize_bits=8, quantize_mode="mxfp4")
    config = json.loads((path / "config.json").read_text())["quantization"]
    assert config["model.layers.0.mlp.experts.up_proj"]["mode"] == "mxfp4"
    _check(path)


@pytest.mark.parametrize("arch", ["qwen3_moe", "gpt_oss"])
def test_uncast_bf16_4bit_matches_stock_mlx_lm(tmp_path, arch):
    """The path a Mac runs: no cast at all, 4-bit experts with bfloat16 scales and a
    bfloat16 dense core (as mlx-community checkpoints are), against mlx-lm as it loads."""
    import mlx.core as mx

    path = make_checkpoint(tmp_path / arch, arch, quantize_bits=4, dtype=mx.bfloat16)
    paged = open_paged(path, 3, compute_dtype=None)
    try:
        assert paged.model.model.embed_tokens.scales.dtype == mx.bfloat16
        assert paged.cache.pools["down_proj.scales"].dtype == mx.bfloat16
        worst, bitwise = compare_with_mlx_lm(path, paged, compute_dtype=None)
        assert paged.stats.misses > paged.plan.slots, "the budget must force evictions"
        assert bitwise, f"logits differ by up to {worst}"
    finally:
        paged.close()


@pytest.mark.parametrize("cast", [True, False], ids=["cast", "uncast"])
def test_per_module_quantisation_as_the_embedded_model_ships(tmp_path, cast):
    """config.json's per-layer entries: an 8-bit embedding (the tied lm_head), 4-bit
    attention and experts in groups of 32, a float router, float16 scales; cast to the
    compute dtype or not (the path a Mac runs)."""
    import mlx.core as mx

    path = make_checkpoint(
        tmp_path / "mixed", "mixtral", quantize_bits=4, quantize_mode="mixed", dtype=mx.float16
    )
    config = json.loads((path / "config.json").read_text())["quantization"]
    assert config["model.embed_tokens"]["bits"] == 8
    assert config["model.layers.0.block_sparse_moe.switch_mlp.down_proj"]["group_size"] == 32
    assert "model.layers.0.block_sparse_moe.gate.scales" not in mx.load(
        str(path / "model.safetensors")
    )
    dtype = "auto" if cast else None
    paged = open_paged(path, 3, compute_dtype=dtype)
    try:
        assert paged.cache.projections["down_proj"].group_size == 32
        assert paged.model.model.embed_tokens.bits == 8
        worst, bitwise = compare_with_mlx_lm(path, paged, compute_dtype=dtype)
        assert paged.stats.misses > paged.plan.slots, "the budget must force evictions"
        assert bitwise, f"logits differ by up to {worst}"
    finally:
        paged.close()


@pytest.mark.parametrize("arch", ["qwen3_moe", "deepseek_v2", "gpt_oss"])
def test_prefetch_leaves_output_unchanged(tmp_path, arch):
    """Three router kinds: Linear, DeepSeek's MoEGate, gpt-oss's biased router."""
    _check(make_checkpoint(tmp_path / arch, arch, quantize_bits=4), prefetch=True)


def test_speculated_steps_are_kept_on_hits_and_thrown_away_on_misses(tmp_path, monkeypatch):
    """A decode step's computation starts before the host knows its experts; it is kept
    only when they were all resident. Under a budget that evicts, both happen, exactly."""
    flags = []  # MLX's answer to "were they all resident?", one per speculated step
    original = ExpertCache.device_slots

    def recording(self, layer, experts):
        slots, resident = original(self, layer, experts)
        flags.append(resident)
        return slots, resident

    monkeypatch.setattr(ExpertCache, "device_slots", recording)
    # 10 slots for 2 layers of 16 experts: steps that speculate, and some of them miss
    _check(make_checkpoint(tmp_path / "m", "qwen3_moe", quantize_bits=4), slots=10)
    outcomes = {flag.item() for flag in flags}
    assert outcomes == {True, False}
