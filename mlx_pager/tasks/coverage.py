"""What the access profiler's counts say: how skewed routing is, per layer and per task.

``counts`` is always an int array [moe layers, experts]: how many tokens each (layer,
expert) pair served (``Stats.expert_counts``).
"""

from __future__ import annotations

import numpy as np

SHARES = (0.01, 0.05, 0.10, 0.20)


def predicted_hit_rate(counts: np.ndarray, slots: int) -> float | None:
    """Share of activations that the ``slots`` most used (layer, expert) pairs took.

    The hit rate a cache pinned to those experts would have had on the profiled run: an
    estimate for similar prompts. None when there is no profile yet.
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


def coverage_curve(counts: np.ndarray, shares=SHARES) -> dict[float, float]:
    """{0.01: share of activations by the top 1% of pairs, 0.05: ..., ...}."""
    return {s: top_share(counts, s) or 0.0 for s in shares}


def layer_skew(counts: np.ndarray, fraction: float = 0.25) -> np.ndarray:
    """Per layer, the share of its activations its top ``fraction`` of experts took."""
    return np.array([top_share(row, fraction) or 0.0 for row in np.asarray(counts)])


def top_sets(counts: np.ndarray, fraction: float = 0.25) -> list[np.ndarray]:
    """Per layer, the indices of its top ``fraction`` of experts."""
    counts = np.asarray(counts)
    n = max(1, round(fraction * counts.shape[1]))
    return [np.argsort(-row, kind="stable")[:n] for row in counts]


def task_coverage(by_task: dict[str, np.ndarray], fraction: float = 0.25):
    """``matrix[a][b]``: share of task b's activations that task a's per-layer top-25%
    expert sets cover, averaged over layers (the OLMoE specialisation measure)."""
    tasks = sorted(by_task)
    matrix = np.zeros((len(tasks), len(tasks)))
    for i, a in enumerate(tasks):
        sets = top_sets(by_task[a], fraction)
        for j, b in enumerate(tasks):
            rows = np.asarray(by_task[b])
            covered = [row[s].sum() / max(1, row.sum()) for row, s in zip(rows, sets, strict=True)]
            matrix[i, j] = float(np.mean(covered))
    return tasks, matrix
