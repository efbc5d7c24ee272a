"""The embedded model through the engine: paged at a small budget, it agrees with an
independent implementation (transformers), and it is the default model, offline."""

from __future__ import annotations

import os
import re
import subprocess
import sys

import mlx.core as mx
import numpy as np
import pytest
from checkpoints import compare_with_mlx_lm, open_paged
from test_embedded_model import GREEDY_PROMPTS, MODEL, MODEL_4BIT, greedy_transformers

from mlx_pager.engine import DEFAULT_MODEL


def greedy_paged(paged, prompt: str, n: int) -> tuple[list[int], np.ndarray]:
    """n greedy tokens from the paged model (full recompute, as greedy_transformers)."""
    ids = paged.tokenizer.encode(prompt, add_special_tokens=False)
    tokens, logits = [], []
    for _ in range(n):
        last = paged.model(mx.array([ids + tokens]))[0, -1]
        logits.append(np.array(last))
        tokens.append(int(mx.argmax(last).item()))
    return tokens, np.stack(logits)


def test_default_model_is_the_embedded_one():
    assert DEFAULT_MODEL == MODEL and (MODEL / "config.json").exists()


def test_paged_engine_agrees_with_transformers():
    pytest.importorskip("torch")
    slots = 6  # top-4 routing: barely more than top-k, so it evicts all the time
    # float32 on every backend (a GPU would otherwise compute in the checkpoint's bf16),
    # as transformers does here.
    paged = open_paged(MODEL, slots, compute_dtype=mx.float32)
    try:
        assert paged.plan.slots == slots < paged.plan.num_experts
        worst = 0.0
        for prompt in GREEDY_PROMPTS:
            want_tokens, want_logits = greedy_transformers(prompt, 12)
            got_tokens, got_logits = greedy_paged(paged, prompt, 12)
            assert got_tokens == want_tokens, prompt
            worst = max(worst, float(np.abs(got_logits - want_logits).max()))
        print(f"paged engine vs transformers: max |logit difference| {worst:.2e}")
        assert worst < 1e-3
        assert paged.stats.misses > paged.plan.slots  # it really paged
    finally:
        paged.close()


def test_4bit_variant_pages_exactly_like_mlx_lm():
    paged = open_paged(MODEL_4BIT, 6)
    try:
        worst, bitwise = compare_with_mlx_lm(MODEL_4BIT, paged)
        assert bitwise, worst
    finally:
        paged.close()


def test_generate_without_model_runs_offline(tmp_path):
    env = {
        **os.environ,
        "HF_HUB_OFFLINE": "1",
        "MLX_PAGER_CONFIG_DIR": str(tmp_path / "c"),
        "MLX_PAGER_DATA_DIR": str(tmp_path / "d"),
        "HF_HOME": str(tmp_path / "hf"),
    }
    out = subprocess.run(
        [
            sys.executable,
            "-m",
            "mlx_pager.cli",
            "generate",
            "--prompt",
            "def fibonacci(n):",
            "--max-tokens",
            "16",
        ],
        capture_output=True,
        text=True,
        env=env,
        timeout=120,
    )
    assert out.returncode == 0, out.stderr
    # A reply may end before 16 tokens (the model was trained to close a chat turn).
    decoded = re.search(r"decode (\d+) tok", out.stderr)
    assert out.stdout.strip() and decoded and 1 <= int(decoded[1]) <= 16, out.stderr
