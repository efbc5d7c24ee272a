"""scripts/mlx_affine.py: GGUF blocks into MLX's quantised format without moving a weight."""

import mlx.core as mx
import numpy as np
import pytest
from script_loader import load_script

A = load_script("mlx_affine")


def q4_1_blocks(rows: int, cols: int, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """Weights as llama.cpp's Q4_1 dequantises them (w = d * q + m per block of 32, d and
    m float16, every block using q = 0 and q = 15), and their q."""
    rng = np.random.default_rng(seed)
    d = rng.uniform(0.001, 0.05, (rows, cols // 32, 1)).astype(np.float16).astype(np.float32)
    m = rng.uniform(-0.4, -0.01, (rows, cols // 32, 1)).astype(np.float16).astype(np.float32)
    q = rng.integers(0, 16, (rows, cols // 32, 32))
    q[..., 0], q[..., 1] = 0, 15
    return (d * q + m).reshape(rows, cols).astype(np.float32), q.reshape(rows, cols)


def test_min_max_rule_gives_q4_1_blocks_back_bit_for_bit():
    w, q = q4_1_blocks(64, 576)
    got_q, scales, biases = A.quantize(w, 4, 32)
    assert np.array_equal(got_q, q)
    assert np.array_equal(A.dequantize(got_q, scales, biases), w)
    # mx.quantize puts zero on the grid instead, so it moves these weights.
    mq, ms, mb = mx.quantize(mx.array(w), group_size=32, bits=4)
    assert not np.array_equal(np.array(mx.dequantize(mq, ms, mb, group_size=32, bits=4)), w)


def test_symmetric_rule_gives_q8_0_blocks_back():
    rng = np.random.default_rng(1)
    d = rng.uniform(1e-4, 1e-2, (32, 18, 1)).astype(np.float16).astype(np.float32)
    q = rng.integers(-127, 128, (32, 18, 32))
    q[..., 0] = 127  # Q8_0's scale is max |w| / 127
    w = (d * q).reshape(32, 576).astype(np.float32)
    got_q, scales, biases = A.quantize(w, 8, 32, symmetric=True)
    assert np.array_equal(A.dequantize(got_q, scales, biases), w)


@pytest.mark.parametrize("bits", [4, 8])
def test_packing_is_what_mlx_dequantizes(bits):
    w = np.random.default_rng(2).normal(size=(3, 16, 96)).astype(np.float32)
    q, scales, biases = A.quantize(w, bits, 32)
    got = mx.dequantize(
        mx.array(A.pack(q, bits)),
        mx.array(scales).astype(mx.float32),
        mx.array(biases).astype(mx.float32),
        group_size=32,
        bits=bits,
    )
    assert np.array_equal(np.array(got), A.dequantize(q, scales, biases))
    assert np.abs(A.dequantize(q, scales, biases) - w).max() < np.ptp(w) / (1 << bits)


def test_fake_quant_is_the_shipped_weight_with_a_straight_through_gradient():
    torch = pytest.importorskip("torch")
    w = np.random.default_rng(3).normal(size=(8, 64)).astype(np.float32)
    t = torch.tensor(w, requires_grad=True)
    out = A.fake_quant(t, 4, 32)
    assert np.array_equal(out.detach().numpy(), A.dequantize(*A.quantize(w, 4, 32)))
    out.sum().backward()
    assert torch.equal(t.grad, torch.ones_like(t))
