"""Per model and task, which experts fire: learned from the access profiler as the user
chats, kept in the user's data directory, and used to preload a task's hot set.

The file also keeps the measured value of preloading for this model (hit rate over the
first decode tokens after a task switch, with and without): preloading is on for a model
only where that measurement says it pays, by at least ``MIN_PRELOAD_GAIN``.
"""

from __future__ import annotations

import hashlib
import io
import json
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from ..atomic import write_atomic
from ..settings import data_dir

# Hit-rate gain (1 point) preloading must show before it is turned on: a smaller one is
# within what the measurement's few held-out prompts can tell apart, and preloading costs
# reads that a prompt's own prefill may make anyway.
MIN_PRELOAD_GAIN = 0.01


def model_key(model_path: Path) -> str:
    """Stable per checkpoint: its folder name and a hash of its config and resolved path."""
    model_path = Path(model_path).resolve()
    digest = hashlib.sha1(str(model_path).encode())
    config = model_path / "config.json"
    if config.exists():
        digest.update(config.read_bytes())
    return f"{model_path.name}-{digest.hexdigest()[:12]}"


@dataclass
class TaskProfiles:
    path: Path
    shape: tuple[int, int]  # (moe layers, experts per layer)
    counts: dict[str, np.ndarray] = field(default_factory=dict)
    preload_hit: dict[str, float] = field(default_factory=dict)  # "with"/"without" -> hit rate

    @classmethod
    def load(cls, model_path: Path, layers: int, experts: int) -> TaskProfiles:
        path = data_dir() / "profiles" / f"{model_key(model_path)}.npz"
        profiles = cls(path, (layers, experts))
        if path.exists():
            with np.load(path) as data:
                for name in data.files:
                    if name.startswith("counts_") and data[name].shape == (layers, experts):
                        profiles.counts[name.removeprefix("counts_")] = data[name]
                if "meta" in data.files:
                    profiles.preload_hit = json.loads(str(data["meta"]))["preload_hit"]
        return profiles

    def add(self, task: str, counts: np.ndarray) -> None:
        self.counts[task] = self.counts.get(task, np.zeros(self.shape, np.int64)) + counts

    def hot_set(self, task: str, n: int) -> list[tuple[int, int]]:
        """The ``n`` (layer, expert) pairs that fired most for this task."""
        counts = self.counts.get(task)
        if counts is None or n <= 0:
            return []
        order = np.argsort(-counts, axis=None, kind="stable")[:n]
        return [(int(i) // self.shape[1], int(i) % self.shape[1]) for i in order
                if counts.flat[i] > 0]  # fmt: skip

    @property
    def preload_gain(self) -> float | None:
        """Hit-rate points preloading gained after task switches; None if not measured."""
        if {"with", "without"} <= self.preload_hit.keys():
            return self.preload_hit["with"] - self.preload_hit["without"]
        return None

    def save(self) -> None:
        """Atomically: a crash leaves the previous profile whole."""
        buffer = io.BytesIO()
        arrays = {f"counts_{t}": c for t, c in self.counts.items()}
        np.savez(buffer, meta=json.dumps({"preload_hit": self.preload_hit}), **arrays)
        write_atomic(self.path, buffer.getvalue())
