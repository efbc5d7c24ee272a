"""Paged output equals stock mlx-lm's, for every architecture, under a budget that evicts."""

from __future__ import annotations

import pytest
from checkpoints import compare_with_mlx_lm, open_paged

from mlx_pager.loader import TESTED_ARCHITECTURES
from mlx_pager.synthetic import PER_EXPERT_ARCHS, make_checkpoint


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


@pytest.mark.parametrize("bits", [None, 4], ids=["float32", "4bit"])
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


def test_minimum_budget_computes_in_rounds(tmp_path):
    """Top-k slots, the minimum: a 32-token prompt runs each layer in many rounds, exactly."""
    _check(make_checkpoint(tmp_path / "m", "mixtral"), slots=2)


def test_bf16_checkpoint_is_cast_like_the_reference(tmp_path):
    """A bf16 checkpoint computes in float32 on the CPU, dense core and experts alike."""
    import mlx.core as mx

    path = make_checkpoint(tmp_path / "bf16", "olmoe", dtype=mx.bfloat16)
    paged = open_paged(path, 3)
    try:
        assert all(a.dtype in (mx.float32, mx.uint32) for a in paged.cache.pools.values())
        assert paged.model.model.embed_tokens.weight.dtype == mx.float32
    finally:
        paged.close()


@pytest.mark.parametrize("arch", ["qwen3_moe", "deepseek_v2", "gpt_oss"])
def test_prefetch_leaves_output_unchanged(tmp_path, arch):
    """Three router kinds: Linear, DeepSeek's MoEGate, gpt-oss's biased router."""
    _check(make_checkpoint(tmp_path / arch, arch, quantize_bits=4), prefetch=True)
