"""Building and comparing small checkpoints, shared by the engine tests."""

from __future__ import annotations

from pathlib import Path

import mlx.core as mx
import numpy as np
from mlx_lm import load
from mlx_lm.models.cache import make_prompt_cache

from mlx_pager.paging.loader import (
    PagedModel,
    cast_floating,
    default_compute_dtype,
    inspect_model,
    load_paged,
)


def budget_for_slots(path: Path, slots: int, context_length: int = 256) -> int:
    """The budget that leaves exactly ``slots`` expert slots after the fixed parts."""
    layout = inspect_model(path, context_length)
    return layout.plan(0).fixed_bytes + slots * layout.expert_bytes


def open_paged(path: Path, slots: int, **kwargs) -> PagedModel:
    context = kwargs.pop("context_length", 256)
    return load_paged(path, budget_for_slots(path, slots, context), context, **kwargs)


def compare_with_mlx_lm(
    path: Path,
    paged: PagedModel,
    prompt_len: int = 32,
    steps: int = 32,
    compute_dtype: mx.Dtype | None | str = "auto",
):
    """Logits of a prompt and of greedy decode steps, stock mlx-lm against the paged model.

    ``compute_dtype`` is the one the paged model was opened with ("auto": the engine's
    default, float32 on the CPU, applied to the reference too; None: stock mlx-lm as it
    loads, the path a Mac runs). Returns the largest absolute difference seen and whether
    every step was bitwise equal; asserts the greedy tokens agree.
    """
    reference, _ = load(str(path))
    if compute_dtype == "auto":
        compute_dtype = default_compute_dtype()
    if compute_dtype is not None:  # the engine's CPU cast, applied to both
        reference.update(cast_floating(reference.parameters(), compute_dtype))
    tokens = mx.array(np.random.RandomState(0).randint(0, 300, (1, prompt_len)))
    ref_cache, paged_cache = make_prompt_cache(reference), make_prompt_cache(paged.model)
    a = reference(tokens, cache=ref_cache)
    b = paged.model(tokens, cache=paged_cache)
    worst, bitwise = mx.abs(a - b).max().item(), mx.array_equal(a, b).item()
    for _ in range(steps):
        next_a, next_b = mx.argmax(a[:, -1:], -1), mx.argmax(b[:, -1:], -1)
        assert next_a.item() == next_b.item(), "greedy tokens differ"
        a = reference(next_a, cache=ref_cache)
        b = paged.model(next_b, cache=paged_cache)
        worst = max(worst, mx.abs(a - b).max().item())
        bitwise = bitwise and mx.array_equal(a, b).item()
    return worst, bitwise
