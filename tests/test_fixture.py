"""Real-shaped fixtures: mlx-community's layout, written layer by layer, routing fitted."""

import json

import mlx.core as mx
import numpy as np
import pytest
from checkpoints import compare_with_mlx_lm, open_paged

from mlx_pager.benchmark.fixture import ARCHITECTURES, coverage_of, make_model, target_shares
from mlx_pager.benchmark.shapes import SHAPES, TARGET_COVERAGE, shape_config


def test_shares_follow_the_curve_under_the_top_k_cap():
    shares = target_shares(128, 8, TARGET_COVERAGE)
    assert shares.max() <= 1 / 8 + 1e-9 and abs(shares.sum() - 1) < 1e-9
    cov = coverage_of(shares * 1e6, TARGET_COVERAGE)
    assert abs(cov[0.2] - 0.85) < 0.02 and abs(cov[0.1] - 0.70) < 0.02


def test_headline_shape_is_the_published_size():
    config = shape_config("qwen3-30b-a3b")
    expert = 3 * config["hidden_size"] * config["moe_intermediate_size"]
    assert abs(expert * (0.5 + 4 / 64) / 1e6 - 2.65) < 0.01
    with pytest.raises(ValueError, match="choose one of"):
        shape_config("qwen4")


def test_small_fixture_loads_in_mlx_lm_and_routes_skewed(tmp_path):
    from mlx_lm import load

    report = make_model("small", tmp_path / "m")
    assert json.loads((tmp_path / "m" / "fixture.json").read_text())["bytes"] == report["bytes"]
    config = json.loads((tmp_path / "m" / "config.json").read_text())
    assert config["quantization"]["bits"] == 4 and config["quantization"]["group_size"] == 64
    assert config["quantization"]["model.layers.0.mlp.gate"]["bits"] == 8
    model, _ = load(str(tmp_path / "m"))
    logits = model(mx.array([[1, 2, 3, 4, 5]]))
    assert np.isfinite(np.array(logits.astype(mx.float32))).all()
    uniform = 0.2
    assert report["coverage"]["0.2"] > uniform + 0.3
    assert report["overlap"] > report["uniform_overlap"]
    again = make_model("small", tmp_path / "n")
    a = (tmp_path / "m" / "model-00001-of-00001.safetensors").read_bytes()
    assert a == (tmp_path / "n" / "model-00001-of-00001.safetensors").read_bytes()
    assert again["coverage"] == report["coverage"]
    assert set(SHAPES) >= {"qwen3-30b-a3b", "olmoe-1b-7b", "deepseek-v2-lite", "small"}


@pytest.mark.parametrize("shape", ["small-olmoe", "small-deepseek"])
def test_every_architecture_writes_and_pages_exactly(tmp_path, shape):
    """The writer's other architectures: olmoe's 4-bit router, deepseek's bfloat16 MoEGate,
    its dense first layer and shared expert; mlx-lm loads them and the paged engine at a
    quarter of the experts gives its logits bit for bit."""
    config = shape_config(shape)
    assert config["model_type"] in ARCHITECTURES
    report = make_model(shape, tmp_path / "m")
    moe_layers = config["num_hidden_layers"] - config.get("first_k_dense_replace", 0)
    assert report["moe_layers"] == moe_layers
    assert report["coverage"]["0.2"] > 0.2 + 0.3 and report["overlap"] > report["uniform_overlap"]
    experts = config.get("num_experts") or config["n_routed_experts"]
    paged = open_paged(tmp_path / "m", experts * moe_layers // 4)
    try:
        worst, bitwise = compare_with_mlx_lm(tmp_path / "m", paged)
        assert paged.stats.misses > paged.plan.slots, "the budget must force evictions"
        assert bitwise, f"logits differ by up to {worst}"
    finally:
        paged.close()
