"""What a lossy mode costs and saves: held-out text fed a token at a time through the paged
model (decode conditions, so cache-aware routing and the cold tier act on every token),
the next token's log-probability and the top-1 guess at every position, and what the
cache did meanwhile.

Quality is a paired comparison on the same tokens: perplexity against the exact run's,
and top-1 agreement with the exact run's guesses. The KV cache starts afresh at each
window (a new document); the expert cache carries over from window to window, as in a
session.
"""

from __future__ import annotations

import time
from dataclasses import dataclass

import mlx.core as mx
import numpy as np
from mlx_lm.models.cache import make_prompt_cache

from ..paging.loader import PagedModel, inspect_model


@dataclass
class Pass:
    """One run over the windows: per predicted position, the log-probability of the true
    next token and the model's top-1 token; the cache's counts over the whole run."""

    logprobs: np.ndarray
    top1: np.ndarray
    misses: int
    cold_misses: int
    cold_hits: int
    rerouted: int
    bytes_read: int
    tokens: int  # fed through the model (every position, the last of each window too)
    seconds: float

    @property
    def perplexity(self) -> float:
        return float(np.exp(-self.logprobs.mean()))

    @property
    def misses_per_token(self) -> float:
        """Reads from disk per token: full-precision misses and cold-tier misses alike."""
        return (self.misses + self.cold_misses) / self.tokens

    def row(self, exact: Pass | None = None) -> dict:
        """The figures of a table row; against ``exact`` (the same windows, exact
        routing and precision) the relative perplexity and top-1 agreement too."""
        out = {
            "perplexity": self.perplexity,
            "misses_per_token": self.misses_per_token,
            "bytes_per_token": self.bytes_read / self.tokens,
            "rerouted_per_token": self.rerouted / self.tokens,
            "cold_per_token": (self.cold_hits + self.cold_misses) / self.tokens,
            "ms_per_token": 1e3 * self.seconds / self.tokens,
        }
        if exact is not None:
            if exact.top1.shape != self.top1.shape:
                raise ValueError("Compare passes over the same windows.")
            out["perplexity_change"] = self.perplexity / exact.perplexity - 1
            out["top1_agreement"] = float((self.top1 == exact.top1).mean())
            out["miss_reduction"] = 1 - self.misses_per_token / exact.misses_per_token
        return out


def heldout_windows(tokenizer, documents: dict[str, list[str]], n: int, seq: int):
    """Per domain, ``n`` windows of ``seq`` tokens spread evenly over its held-out
    documents (joined by blank lines), interleaved across domains: a session that moves
    between topics, as a chat does."""
    by_domain = []
    for domain, docs in documents.items():
        stream = tokenizer.encode("\n\n".join(docs), add_special_tokens=False)
        if len(stream) < n * seq:
            raise ValueError(
                f"The held-out {domain} text has {len(stream)} tokens, fewer than {n} windows "
                f"of {seq}: ask for fewer or shorter windows."
            )
        starts = np.linspace(0, len(stream) - seq, n).astype(int)
        by_domain.append([stream[i : i + seq] for i in starts])
    return [w for group in zip(*by_domain, strict=True) for w in group]


def slots_budget(path, fraction: float, context_length: int) -> int:
    """The budget that holds ``fraction`` of the model's routed experts (at least top-k)."""
    return inspect_model(path, context_length).plan(0).share_budget_bytes(fraction)


def teacher_forced(paged: PagedModel, windows: list[list[int]]) -> Pass:
    """Feed each window one token at a time from an empty cache of experts; see the
    module docstring."""
    paged.reset_cache()
    paged.stats.reset_run()
    paged.run.start(prompt_tokens=0)  # every token a decode step
    logprobs, top1 = [], []
    start = time.perf_counter()
    for window in windows:
        if len(window) < 2:
            raise ValueError("Each window needs at least two tokens: one to predict.")
        kv = make_prompt_cache(paged.model)
        for position, token in enumerate(window):
            logits = paged.model(mx.array([[token]]), cache=kv)[0, -1].astype(mx.float32)
            if position + 1 < len(window):
                logp = logits - mx.logsumexp(logits)
                pair = mx.stack([logp[window[position + 1]], mx.argmax(logits).astype(mx.float32)])
                mx.eval(pair)
                value, guess = pair.tolist()
                logprobs.append(value)
                top1.append(int(guess))
            else:
                mx.eval(logits)
    seconds = time.perf_counter() - start
    paged.run.sync()
    s = paged.stats
    return Pass(
        logprobs=np.array(logprobs),
        top1=np.array(top1),
        misses=s.misses,
        cold_misses=s.cold_misses,
        cold_hits=s.cold_hits,
        rerouted=s.rerouted,
        bytes_read=s.bytes_read,
        tokens=sum(len(w) for w in windows),
        seconds=seconds,
    )
