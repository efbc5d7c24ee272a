"""Per model and task, which experts fire: learned from the access profiler as the user
chats, kept in the user's data directory, and used to preload a task's hot set.

The file also keeps the measured value of preloading for this model, after a task switch,
with and without: the hit rate over the first decode tokens, and the time to the reply's
first token. Preloading is on for a model only where that measurement says it pays
(``preload_verdict``): at least ``MIN_PRELOAD_GAIN`` of hit rate, or ``MIN_TTFT_GAIN`` of
the time to first token with fewer reads before it, and neither worse by as much.
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
# Share of the time to first token it must save (5%): below that, a busy machine's noise.
MIN_TTFT_GAIN = 0.05


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
    # "ttft_with"/"ttft_without" -> seconds to the first token; "preload_seconds"
    preload_ttft: dict[str, float] = field(default_factory=dict)

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
                    meta = json.loads(str(data["meta"]))
                    profiles.preload_hit = meta["preload_hit"]
                    profiles.preload_ttft = meta.get("preload_ttft") or {}
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

    @property
    def ttft_gain(self) -> float | None:
        """Share of the time to first token preloading saved (the median of each prompt's
        with / without where measured, else of the medians); None if not measured."""
        t = self.preload_ttft
        if "ttft_ratio" in t:
            return 1 - t["ttft_ratio"]
        if {"ttft_with", "ttft_without"} <= t.keys() and t["ttft_without"] > 0:
            return 1 - t["ttft_with"] / t["ttft_without"]
        return None

    @property
    def reads_saved(self) -> float | None:
        """Share of the reads before the first token preloading saved; None if unknown."""
        t = self.preload_ttft
        if t.get("prompt_misses_without"):
            return 1 - t.get("prompt_misses_with", 0) / t["prompt_misses_without"]
        return None

    def preload_verdict(self) -> tuple[bool, str] | None:
        """Whether preloading pays for this model, and by how much in words; None if not
        measured. A sooner first token counts only where preloading also saved reads
        before it: it can gain no other way, so otherwise the difference is the machine's."""
        hit, ttft = self.preload_gain, self.ttft_gain
        if hit is None:
            return None
        points = round(hit * 100, 1) + 0.0  # no "-0.0"
        hit_words = f"{points:+.1f} hit-rate points"
        if ttft is None:  # measured before the time to first token was
            if round(hit, 9) < MIN_PRELOAD_GAIN:
                return False, (
                    f"measured {hit_words}, below the {MIN_PRELOAD_GAIN * 100:+.0f} it must gain"
                )
            return True, f"{hit_words} after a task switch"
        t, saved = self.preload_ttft, self.reads_saved
        reads = "" if saved is None else f", {round(saved * 100) + 0}% fewer reads before it"
        percent = round(ttft * 100) + 0
        change = f"{percent}% sooner" if percent >= 0 else f"{-percent}% later"
        measured = (
            f"first token {change} after a task switch "
            f"({t['ttft_without']:.2f} -> {t['ttft_with']:.2f} s{reads}), decode {hit_words}"
        )
        sooner = round(ttft, 9) >= MIN_TTFT_GAIN and (saved is None or saved > 0)
        gains = round(hit, 9) >= MIN_PRELOAD_GAIN or sooner
        loses = round(hit, 9) <= -MIN_PRELOAD_GAIN or round(ttft, 9) <= -MIN_TTFT_GAIN
        if gains and not loses:
            return True, measured
        return False, (
            f"measured {measured}; it must gain {MIN_TTFT_GAIN:.0%} (with fewer reads) or "
            f"{MIN_PRELOAD_GAIN * 100:.0f} point and lose neither"
        )

    def save(self) -> None:
        """Atomically: a crash leaves the previous profile whole."""
        buffer = io.BytesIO()
        arrays = {f"counts_{t}": c for t, c in self.counts.items()}
        meta = {"preload_hit": self.preload_hit, "preload_ttft": self.preload_ttft}
        np.savez(buffer, meta=json.dumps(meta), **arrays)
        write_atomic(self.path, buffer.getvalue())
