"""The conversation's KV cache, kept between replies.

A chat resends its whole history every turn; only the tokens after the longest prefix
they share with what the cache holds need a forward pass. mlx-lm's own utilities do the
trimming (``can_trim_prompt_cache``, ``trim_prompt_cache``), as ``mlx_lm.server`` does.
A new chat or an edited history shares a short prefix or none, so it is prefilled in
full by construction. Caches that cannot be trimmed (linear attention's ``ArraysCache``:
qwen3_5_moe; a sliding window that wrapped) are never kept. The cache stays inside the
KV share the budget reserves: mlx-lm's KVCache grows its buffer in whole steps past what
it holds, so a kept cache off a step boundary can outgrow a fresh one; such a reply
starts fresh.
"""

from __future__ import annotations

import mlx.nn as nn
from mlx_lm.models.cache import (
    KVCache,
    can_trim_prompt_cache,
    make_prompt_cache,
    trim_prompt_cache,
)

PREFILL_STEP = 2048  # stream_generate's prefill_step_size, which the engine leaves as is


def common_prefix(a: list[int], b: list[int]) -> int:
    n = 0
    for x, y in zip(a, b, strict=False):
        if x != y:
            break
        n += 1
    return n


def held_tokens(cache: list) -> int | None:
    """How many tokens a cache holds (every layer's offset), None if they disagree."""
    offsets = {getattr(c, "offset", None) for c in cache}
    return offsets.pop() if len(offsets) == 1 and None not in offsets else None


def feeds(tokens: int) -> list[int]:
    """How mlx-lm's generate_step feeds a prompt: chunks of at most ``PREFILL_STEP``
    while more than one token is left, then the last one."""
    chunks = []
    while tokens > 1:
        chunks.append(min(PREFILL_STEP, tokens - 1))
        tokens -= chunks[-1]
    return chunks + [1] if tokens else chunks


def grown_capacity(capacity: int, offset: int, prompt: int, total: int, step: int) -> int:
    """The tokens a KVCache's buffer holds (``capacity``, ``offset`` of them filled) once
    it has been fed ``prompt`` tokens as mlx-lm feeds them, then decoded to ``total``.
    Past its room mlx-lm adds whole steps, keeping the filled part, or the whole buffer
    when the offset is on a step boundary (KVCache.update_and_fetch)."""
    for size in feeds(prompt):
        if offset + size > capacity:
            base = offset if offset % step else capacity
            capacity = base + -(-size // step) * step
        offset += size
    if total > capacity:  # one token at a time: it grows when full, a step at once
        capacity += -(-(total - capacity) // step) * step
    return capacity


class PromptCache:
    """One conversation's cache and the tokens it holds, handed to one reply at a time."""

    def __init__(self, model: nn.Module, max_kv_size: int):
        self.model = model
        self.max_kv_size = max_kv_size
        self.cache: list | None = None
        self.tokens: list[int] = []  # what ``cache`` holds, token for token

    def take(self, tokens: list[int], max_tokens: int) -> tuple[list, int]:
        """A cache for a reply of up to ``max_tokens`` to ``tokens``, and how many of them
        it holds already: the caller feeds ``tokens[reused:]``. At least the last token is
        fed (its logits start the reply). Until ``keep`` hands it back, no cache is kept:
        a reply that fails leaves nothing half-written for the next."""
        cache, held = self.cache, self.tokens
        self.cache, self.tokens = None, []
        reused = common_prefix(held, tokens[:-1]) if cache is not None else 0
        if reused and not self.fits(cache, reused, len(tokens), len(tokens) + max_tokens):
            reused = 0
        if reused and can_trim_prompt_cache(cache):
            if trim_prompt_cache(cache, len(held) - reused) == len(held) - reused:
                return cache, reused
        return make_prompt_cache(self.model, max_kv_size=self.max_kv_size), 0

    def fits(self, cache: list, reused: int, prompt: int, total: int) -> bool:
        """Whether the reply's KV buffers, grown from this cache, stay within what a fresh
        cache reaches or the context length, whichever is more."""
        for c in cache:
            if type(c) is KVCache and c.keys is not None:
                kept = grown_capacity(c.keys.shape[2], reused, prompt - reused, total, c.step)
                fresh = grown_capacity(0, 0, prompt, total, c.step)
                return kept <= max(fresh, self.max_kv_size)
        return True  # rotating caches stop at their size, fresh or kept

    def keep(self, cache: list, tokens: list[int]) -> None:
        """After a reply: ``tokens`` is its prompt and every token it yielded. mlx-lm has
        fed all or all but the last of them (it runs one step ahead); the offset says which.
        """
        held = held_tokens(cache)
        if held is None or held > len(tokens) or not can_trim_prompt_cache(cache):
            return
        self.cache, self.tokens = cache, tokens[:held]

    def clear(self) -> None:
        self.cache, self.tokens = None, []
