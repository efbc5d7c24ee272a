"""The lossy modes' yardstick: held-out text a token at a time, scored against exact."""

from __future__ import annotations

import mlx.core as mx
import numpy as np
import pytest
from checkpoints import open_paged
from mlx_lm import load

from mlx_pager.benchmark.quality import heldout_windows, teacher_forced
from mlx_pager.paging.loader import cast_floating
from mlx_pager.sim.synthetic import make_checkpoint


def _windows(n=3, seq=12):
    rng = np.random.default_rng(0)
    return [rng.integers(3, 300, seq).tolist() for _ in range(n)]


def test_exact_pass_scores_the_text_as_mlx_lm_does(tmp_path):
    """Fed a token at a time through the paged model, each next token's log-probability
    is the one stock mlx-lm gives the whole window at once."""
    path = make_checkpoint(tmp_path / "m", "qwen3_moe", num_experts=16, num_experts_per_tok=4)
    windows = _windows()
    paged = open_paged(path, 6)
    try:
        result = teacher_forced(paged, windows)
    finally:
        paged.close()
    reference, _ = load(str(path))
    reference.update(cast_floating(reference.parameters(), mx.float32))
    want, guesses = [], []
    for window in windows:
        logits = reference(mx.array([window]))[0, :-1]
        logp = logits - mx.logsumexp(logits, axis=-1, keepdims=True)
        want.extend(np.take_along_axis(np.array(logp), np.array(window[1:])[:, None], 1)[:, 0])
        guesses.extend(np.array(mx.argmax(logits, -1)).tolist())
    np.testing.assert_allclose(result.logprobs, want, atol=1e-4)
    assert (result.top1 == np.array(guesses)).all()
    assert result.tokens == 36 and result.misses > 6  # the cache paged
    row = result.row(result)
    assert row["top1_agreement"] == 1.0 and row["perplexity_change"] == 0.0
    assert row["misses_per_token"] == result.misses / 36


def test_lossy_pass_is_scored_against_exact(tmp_path):
    path = make_checkpoint(tmp_path / "m", "qwen3_moe", num_experts=16, num_experts_per_tok=4)
    windows = _windows(4, 16)
    passes = {}
    for margin in (0.0, 0.5):
        paged = open_paged(path, 8, route_margin=margin)
        try:
            passes[margin] = teacher_forced(paged, windows)
        finally:
            paged.close()
    row = passes[0.5].row(passes[0.0])
    assert row["miss_reduction"] > 0 and row["rerouted_per_token"] > 0
    assert 0 < row["top1_agreement"] < 1
    with pytest.raises(ValueError, match="same windows"):
        passes[0.5].row(teacher_forced_short(path))


def teacher_forced_short(path):
    paged = open_paged(path, 8)
    try:
        return teacher_forced(paged, _windows(1, 4))
    finally:
        paged.close()


class _Tokenizer:
    def encode(self, text, add_special_tokens=False):
        return [len(word) for word in text.split()]


def test_heldout_windows_interleave_domains_and_refuse_short_text():
    docs = {"code": ["a bb ccc"] * 20, "web": ["dddd"] * 40}
    windows = heldout_windows(_Tokenizer(), docs, 2, 8)
    assert [len(w) for w in windows] == [8] * 4
    assert windows[0][:3] == [1, 2, 3] and windows[1] == [4] * 8  # code, web, code, web
    with pytest.raises(ValueError, match="fewer than 3 windows of 20"):
        heldout_windows(_Tokenizer(), docs, 3, 20)
