"""What an expert-activation profile predicts about a cache of a given size."""

from __future__ import annotations

import numpy as np


def predicted_hit_rate(counts: np.ndarray, slots: int) -> float | None:
    """Share of activations that the ``slots`` most used (layer, expert) pairs took.

    That is the hit rate a cache pinned to those experts would have had on the profiled
    run: an upper bound for LRU/LFU on similar prompts. None when there is no profile.
    """
    flat = np.asarray(counts, dtype=np.int64).ravel()
    total = int(flat.sum())
    if total <= 0:
        return None
    if slots >= flat.size:
        return 1.0
    if slots <= 0:
        return 0.0
    top = np.partition(flat, flat.size - slots)[flat.size - slots :]
    return float(top.sum()) / total


def top_share(counts: np.ndarray, fraction: float) -> float | None:
    """Share of activations taken by the top ``fraction`` of (layer, expert) pairs."""
    flat = np.asarray(counts).ravel()
    if flat.size == 0:
        return None
    return predicted_hit_rate(counts, max(1, round(fraction * flat.size)))
