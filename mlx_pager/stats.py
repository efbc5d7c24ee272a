"""Counters of one engine run: what the cache did, what the disk did, how fast, how big."""

from __future__ import annotations

import resource
import sys
import threading
from dataclasses import dataclass, field

import numpy as np
import psutil


def current_rss() -> int:
    return psutil.Process().memory_info().rss


def peak_rss() -> int:
    """Peak resident set size of this process.

    On Linux, VmHWM: ru_maxrss carries the parent's high-water mark across fork and exec,
    so a process started from a large one (pytest, an IDE) reported the parent's peak."""
    try:
        with open("/proc/self/status") as f:
            return next(int(ln.split()[1]) * 1024 for ln in f if ln.startswith("VmHWM:"))
    except (OSError, StopIteration):
        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss  # KiB on Linux, bytes on macOS
        return int(peak if sys.platform == "darwin" else peak * 1024)


@dataclass
class Stats:
    budget_bytes: int = 0
    resident_bytes: int = 0
    cache_bytes: int = 0
    kv_bytes: int = 0  # reserved: the KV cache at the context length
    kv_used_bytes: int = 0  # what this reply's KV cache holds now
    headroom_bytes: int = 0
    slots: int = 0
    hits: int = 0
    misses: int = 0
    decode_hits: int = 0  # after the prompt: what the cache does token by token
    decode_misses: int = 0
    preloaded: int = 0  # experts loaded ahead for the detected task
    cold_precision: str = "full"  # lossy when not "full": unimportant misses at low bits
    cold_slots: int = 0  # low-bit slots for unimportant misses
    cold_hits: int = 0
    cold_misses: int = 0
    routing: str = "exact"  # "cache-aware" (lossy), or "exact" and why not the other
    route_margin: float = 0.0  # cache-aware routing's margin; 0 with exact routing
    rerouted: int = 0  # routes cache-aware routing changed to a resident expert
    bytes_read: int = 0
    read_seconds: float = 0.0  # time the forward pass waited on expert reads
    prefetch_issued: int = 0  # experts read ahead on a guess
    prefetch_used: int = 0  # ... that the next layer then needed
    prefetch_recall: float = 0.0  # share of routed experts the guesses contained
    prefetch_precision: float = 0.0  # share of guesses that were routed
    # decode measured faster with guesses (True), without (False: paused), None: measuring
    prefetch_pays: bool | None = None
    read_ahead_issued: int = 0  # prefill: the next layer's likely experts read into slots
    read_ahead_used: int = 0  # ... that a layer then asked for
    prompt_tokens: int = 0  # fed through the model this reply
    prompt_reused_tokens: int = 0  # ... and those the kept KV cache already held
    prompt_tps: float = 0.0
    generation_tokens: int = 0
    decode_tps: float = 0.0
    ttft_seconds: float = 0.0  # from the request to the first token, and its parts:
    ttft_wait_seconds: float = 0.0  # ... before the first forward pass (a preload finishing)
    ttft_read_seconds: float = 0.0  # ... blocked on expert reads (the rest: computing)
    peak_rss_bytes: int = 0
    peak_mlx_bytes: int = 0
    task: str = ""
    expert_counts: np.ndarray = field(default_factory=lambda: np.zeros((0, 0), np.int64))
    lock: threading.Lock = field(default_factory=threading.Lock, repr=False, compare=False)

    @property
    def hit_rate(self) -> float:
        total = self.hits + self.misses
        return self.hits / total if total else 0.0

    @property
    def decode_hit_rate(self) -> float:
        total = self.decode_hits + self.decode_misses
        return self.decode_hits / total if total else 0.0

    @property
    def lossy(self) -> list[str]:
        """The modes on that change the output from exact mlx-lm's, as the UI says them."""
        modes = []
        if self.routing == "cache-aware":
            modes.append(f"cache-aware routing, margin {self.route_margin:g}")
        if self.cold_slots:
            modes.append(f"cold experts at {self.cold_precision}")
        return modes

    @property
    def ttft_compute_seconds(self) -> float:
        """The first token's time neither waiting nor reading: the model's computation
        and the pager's own work."""
        return max(0.0, self.ttft_seconds - self.ttft_wait_seconds - self.ttft_read_seconds)

    @property
    def bytes_per_token(self) -> float:
        tokens = self.prompt_tokens + self.generation_tokens
        return self.bytes_read / tokens if tokens else 0.0

    def reset_run(self) -> None:
        """Zero the per-run counters; sizes and the expert profile stay."""
        with self.lock:
            self.hits = self.misses = self.bytes_read = 0
            self.decode_hits = self.decode_misses = self.preloaded = 0
            self.cold_hits = self.cold_misses = self.rerouted = 0
            self.read_seconds = 0.0
            self.prefetch_issued = self.prefetch_used = 0
            self.prefetch_recall = self.prefetch_precision = 0.0
            self.read_ahead_issued = self.read_ahead_used = 0
            self.prompt_tokens = self.generation_tokens = self.kv_used_bytes = 0
            self.prompt_reused_tokens = 0
            self.prompt_tps = self.decode_tps = self.ttft_seconds = 0.0
            self.ttft_wait_seconds = self.ttft_read_seconds = 0.0

    def snapshot(self) -> Stats:
        """A consistent copy another thread may read while generation goes on."""
        with self.lock:
            copy = Stats(**{k: v for k, v in self.__dict__.items() if k != "lock"})
            copy.expert_counts = self.expert_counts.copy()
        return copy

    def to_dict(self) -> dict:
        """JSON-ready; ``expert_counts`` as nested lists [layer][expert], counted since the
        model was opened (one run for ``mlx-pager generate``)."""
        snap = self.snapshot()
        data = {k: v for k, v in snap.__dict__.items() if k not in ("lock", "expert_counts")}
        data["hit_rate"] = snap.hit_rate
        data["decode_hit_rate"] = snap.decode_hit_rate
        data["bytes_per_token"] = snap.bytes_per_token
        data["lossy"] = snap.lossy
        data["ttft_compute_seconds"] = snap.ttft_compute_seconds
        data["expert_counts"] = snap.expert_counts.tolist()
        return data

    def summary(self) -> str:
        from .units import format_bytes

        lossy = ""
        if self.lossy:
            changed = f", {self.rerouted} routes changed" if self.routing == "cache-aware" else ""
            lossy = f" | lossy: {'; '.join(self.lossy)}{changed}"
        return (
            f"prompt {self.prompt_tokens} tok @ {self.prompt_tps:.1f} tok/s"
            f"{f' (+{self.prompt_reused_tokens} kept)' if self.prompt_reused_tokens else ''} | "
            f"decode {self.generation_tokens} tok @ {self.decode_tps:.1f} tok/s | "
            f"hit {self.hit_rate:.1%} ({self.hits}/{self.hits + self.misses}) | "
            f"read {format_bytes(self.bytes_read)} | "
            f"resident {format_bytes(self.resident_bytes)} + cache "
            f"{format_bytes(self.cache_bytes)} ({self.slots} slots) of budget "
            f"{format_bytes(self.budget_bytes)} | peak RSS {format_bytes(self.peak_rss_bytes)}"
            f"{lossy}"
        )
