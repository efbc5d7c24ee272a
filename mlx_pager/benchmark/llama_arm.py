"""The llama.cpp arm of the benchmark: load a GGUF, prefill a prompt, decode greedily.

Runs inside a child process the harness starts (one engine per process, inside a memory
cap); importing it has no side effects and loads nothing heavy.
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any


@contextlib.contextmanager
def _default_params(model: dict[str, Any], context: dict[str, Any]) -> Iterator[None]:
    """llama_cpp.Llama builds its params from these defaults and exposes no hook for
    ``use_extra_bufts`` or ``cb_eval``; override the defaults only while it is built."""
    import llama_cpp.llama as high

    low = high.llama_cpp
    model_defaults, context_defaults = (
        low.llama_model_default_params,
        low.llama_context_default_params,
    )

    def model_params():
        p = model_defaults()
        for k, v in model.items():
            setattr(p, k, v)
        return p

    def context_params():
        p = context_defaults()
        for k, v in context.items():
            setattr(p, k, v)
        return p

    low.llama_model_default_params, low.llama_context_default_params = model_params, context_params
    try:
        yield
    finally:
        low.llama_model_default_params = model_defaults
        low.llama_context_default_params = context_defaults


def open_llama(
    gguf: Path,
    *,
    n_ctx: int,
    threads: int = 2,
    use_mmap: bool = True,
    logits_all: bool = False,
    extra_buffers: bool = False,
    cb_eval: Callable | None = None,
):
    """A llama_cpp.Llama on ``gguf``.

    ``extra_buffers`` (llama.cpp's AMX / repacked weight buffers) is off by default: on this
    project's x86 machines it crashes in the first Q4_1 matrix product. ``cb_eval`` (a
    ``ggml_backend_sched_eval_callback``) sees every graph tensor, for routing capture."""
    import llama_cpp

    context = {} if cb_eval is None else {"cb_eval": cb_eval}
    with _default_params({"use_extra_bufts": extra_buffers}, context):
        return llama_cpp.Llama(
            str(gguf),
            n_ctx=n_ctx,
            n_batch=min(n_ctx, 2048),
            n_threads=threads,
            n_threads_batch=threads,
            use_mmap=use_mmap,
            logits_all=logits_all,
            verbose=False,
        )


def run_llama_cpp(
    gguf: Path,
    prompt_tokens: list[int],
    max_tokens: int,
    *,
    threads: int = 2,
    use_mmap: bool = True,
    extra_buffers: bool = False,
) -> dict:
    """Greedy generation of exactly ``max_tokens`` ids (no stop at EOS), timed per phase."""
    if not prompt_tokens or max_tokens < 1:
        raise ValueError("need a non-empty prompt and max_tokens >= 1")
    n_ctx = len(prompt_tokens) + max_tokens + 8
    start = time.perf_counter()
    llm = open_llama(
        gguf, n_ctx=n_ctx, threads=threads, use_mmap=use_mmap, extra_buffers=extra_buffers
    )
    load_s = time.perf_counter() - start

    steps = greedy_steps(llm, prompt_tokens)
    start = time.perf_counter()
    generated = [next(steps)]
    ttft_s = time.perf_counter() - start
    start = time.perf_counter()
    generated += [next(steps) for _ in range(max_tokens - 1)]
    decode_s = time.perf_counter() - start
    llm.close()
    return {
        "load_s": load_s,
        "ttft_s": ttft_s,
        "prefill_tps": len(prompt_tokens) / ttft_s,
        "decode_tps": (max_tokens - 1) / decode_s if max_tokens > 1 else None,
        "tokens": generated,
        "prompt_tokens": len(prompt_tokens),
    }


def greedy_steps(llm, prompt_tokens: list[int]) -> Iterator[int]:
    """Greedy tokens after ``prompt_tokens`` from a fresh context (no stop at EOS): the
    prompt's pass, then one token at a time, for as long as the caller pulls."""
    llm.reset()
    llm.eval(prompt_tokens)
    token = _greedy(llm)
    while True:
        yield token
        llm.eval([token])
        token = _greedy(llm)


def last_logits(llm):
    """The logits of the last evaluated token (Llama.scores is filled only with logits_all)."""
    import llama_cpp
    import numpy as np

    ptr = llama_cpp.llama_get_logits_ith(llm.ctx, -1)
    return np.ctypeslib.as_array(ptr, shape=(llm.n_vocab(),))


def _greedy(llm) -> int:
    import numpy as np

    return int(np.argmax(last_logits(llm)))
