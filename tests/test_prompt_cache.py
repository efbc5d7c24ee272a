"""A chat keeps its KV cache between replies: the same greedy tokens as a prefill from
scratch, with the shared prefix really reused, on every architecture whose cache trims;
one that cannot (linear attention) or a sliding window that wrapped refuses cleanly."""

from __future__ import annotations

import pytest
from checkpoints import open_paged
from mlx_lm.models.cache import KVCache

from mlx_pager.engine import Engine
from mlx_pager.paging.loader import TESTED_ARCHITECTURES
from mlx_pager.paging.prompt_cache import common_prefix
from mlx_pager.sim.synthetic import make_checkpoint

TURNS = ["hello, how are you", "tell me more about the experts", "and once again, briefly"]
UNTRIMMABLE = {"qwen3_5_moe"}  # ArraysCache: linear attention's state cannot be trimmed


def _engine(path) -> Engine:
    return Engine(open_paged(path, 3), str(path), 256)  # 3 slots: it pages as it goes


def _chat(engine: Engine, turns=TURNS, max_tokens=6):
    """Each turn's reply tokens, prompt tokens and reused count; the whole history is
    sent every turn, as the app's chat screen does."""
    messages, out = [], []
    for text in turns:
        messages.append({"role": "user", "content": text})
        chunks = list(engine.generate(messages, max_tokens=max_tokens, ignore_eos=True))
        reply = "".join(c.text for c in chunks)
        out.append(([c.token for c in chunks], engine.encode(messages), engine.stats.snapshot()))
        messages.append({"role": "assistant", "content": reply})
    return out


def _conversation(tmp_path, arch, **overrides):
    path = make_checkpoint(tmp_path / arch, arch, **overrides)
    kept, fresh = _engine(path), _engine(path)
    fresh.keep_prompt_cache = False
    try:
        return _chat(kept), _chat(fresh)
    finally:
        kept.close()
        fresh.close()


@pytest.mark.parametrize("arch", [a for a in TESTED_ARCHITECTURES if a not in UNTRIMMABLE])
def test_kept_cache_replies_equal_a_fresh_prefill(tmp_path, arch):
    # gpt-oss's sliding window larger than the chat, so that its cache stays trimmable.
    overrides = {"sliding_window": 128} if arch == "gpt_oss" else {}
    kept, fresh = _conversation(tmp_path, arch, **overrides)
    held: list[int] = []
    for turn, ((tokens, prompt, stats), (want, want_prompt, want_stats)) in enumerate(
        zip(kept, fresh, strict=True)
    ):
        assert prompt == want_prompt
        assert tokens == want, f"turn {turn + 1}: kept cache changed the reply"
        expected = common_prefix(held, prompt[:-1])
        assert stats.prompt_reused_tokens == expected
        assert stats.prompt_tokens == len(prompt) - expected  # only the rest was fed
        assert want_stats.prompt_reused_tokens == 0
        assert want_stats.prompt_tokens == len(prompt)
        if turn:  # the previous turn's prompt at least, minus nothing
            assert expected >= len(kept[turn - 1][1]), "the history was not reused"
        held = prompt + tokens  # mlx-lm fed every token it yielded


def test_linear_attention_refuses_and_prefills_in_full(tmp_path):
    kept, fresh = _conversation(tmp_path, "qwen3_5_moe")
    for (tokens, prompt, stats), (want, _, _) in zip(kept, fresh, strict=True):
        assert tokens == want
        assert stats.prompt_reused_tokens == 0 and stats.prompt_tokens == len(prompt)


def test_wrapped_sliding_window_refuses(tmp_path):
    """gpt-oss with an 8-token window: after the first reply the window has wrapped."""
    kept, fresh = _conversation(tmp_path, "gpt_oss")
    for (tokens, prompt, stats), (want, _, _) in zip(kept, fresh, strict=True):
        assert tokens == want
        assert stats.prompt_reused_tokens == 0 and stats.prompt_tokens == len(prompt)


def test_edited_history_keeps_only_the_common_prefix(tmp_path):
    path = make_checkpoint(tmp_path / "m", "qwen3_moe")
    engine = _engine(path)
    try:
        first = [{"role": "user", "content": "the first question of a long chat"}]
        list(engine.generate(first, max_tokens=4, ignore_eos=True))
        edited = [{"role": "user", "content": "the first answer, edited"}]
        tokens = list(engine.generate(edited, max_tokens=4, ignore_eos=True))
        shared = common_prefix(engine.encode(first), engine.encode(edited))
        assert 0 < shared < len(engine.encode(edited)) - 1
        assert engine.stats.prompt_reused_tokens == shared
        engine.keep_prompt_cache = False
        again = list(engine.generate(edited, max_tokens=4, ignore_eos=True))
        assert [c.token for c in again] == [c.token for c in tokens]
        # The same prompt twice: everything but the last token is reused.
        engine.keep_prompt_cache = True
        list(engine.generate(edited, max_tokens=4, ignore_eos=True))
        list(engine.generate(edited, max_tokens=4, ignore_eos=True))
        assert engine.stats.prompt_reused_tokens == len(engine.encode(edited)) - 1
        assert engine.stats.prompt_tokens == 1
    finally:
        engine.close()


@pytest.mark.parametrize(
    "held,reused,prompt,total",
    [(20, 20, 300, 512), (256, 256, 300, 700), (300, 100, 2100, 2600), (0, 0, 5, 300)],
)
def test_grown_capacity_is_what_mlx_lm_allocates(held, reused, prompt, total):
    """The model of KVCache's growth, against a real KVCache fed the same way."""
    import mlx.core as mx

    from mlx_pager.paging.prompt_cache import feeds, grown_capacity

    cache = KVCache()

    def feed(n):
        kv = mx.zeros((1, 1, n, 4))
        cache.update_and_fetch(kv, kv)

    for size in feeds(held):
        feed(size)
    capacity = cache.keys.shape[2] if cache.keys is not None else 0
    cache.trim(held - reused)
    want = grown_capacity(capacity, reused, prompt - reused, total, cache.step)
    for size in feeds(prompt - reused):
        feed(size)
    while cache.offset < total:
        feed(1)
    assert cache.keys.shape[2] == want


def test_a_reuse_that_would_outgrow_the_kv_share_starts_fresh(tmp_path):
    """gpt-oss's full-attention layer uses a plain KVCache: a 20-token kept cache fed 280
    more at once grows to 20 + 512 tokens, past a fresh cache's 512 and the context."""
    path = make_checkpoint(tmp_path / "g", "gpt_oss", sliding_window=1024)
    engine = Engine(open_paged(path, 3, context_length=512), str(path), 512)
    try:
        first = [{"role": "user", "content": "hi"}]
        list(engine.generate(first, max_tokens=4, ignore_eos=True))
        long = [{"role": "user", "content": "hi " + "and more words " * 25}]
        n = len(engine.encode(long))
        assert 256 < n < 512 and engine.encode(first)[:3] == engine.encode(long)[:3]
        list(engine.generate(long, max_tokens=512 - n, ignore_eos=True))
        assert engine.stats.prompt_reused_tokens == 0, "reuse would outgrow the KV share"
        full = [c for c in engine.prompt_cache.cache if type(c) is KVCache]
        assert full and all(c.keys.shape[2] <= 512 for c in full)
        # A short follow-up fits: reused.
        list(engine.generate(long, max_tokens=1, ignore_eos=True))
        assert engine.stats.prompt_reused_tokens == n - 1
    finally:
        engine.close()
