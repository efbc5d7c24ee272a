"""What a reply did with the paged layers: hits and misses, bytes read, which phase the
tokens are in, and the routing hook a trace recorder listens on.

The expert cache holds slots and chooses evictions; it reports each fetch here and knows
nothing of replies, phases or traces. One ``PagingRun`` per open model, restarted by the
engine at the start of every reply (``start``).
"""

from __future__ import annotations

import time
from collections.abc import Callable

import numpy as np

from ..stats import Stats
from ..storage.readers import Reader

# (layer, routed expert ids [..., k]) -> None: called for every MoE layer of every pass
RoutingHook = Callable[[int, np.ndarray], None]


class PagingRun:
    def __init__(self, stats: Stats, reader: Reader, layers: int, experts: int):
        self.stats = stats
        self.reader = reader
        self.prefetcher = None  # the Prefetcher, when one reads ahead: its counters
        self.cache = None  # the ExpertCache: its read-ahead counters
        self.on_tokens: RoutingHook | None = None  # e.g. sim.trace.attach_recorder
        self.prompt_tokens = 0  # this reply's first tokens: the prefill
        self.tokens = 0  # tokens that went through every layer this reply
        self.prefill_counts: tuple[int, int] | None = (0, 0)  # (hits, misses) after it
        self.prefill_read_seconds = 0.0  # the read stall by then
        self._bytes_at_start = 0
        # Decode layers that read nothing: the pager's CPU time outside MLX (the bench's),
        # all of it and the part before the experts' computation is dispatched.
        self.host_layers, self.host_seconds, self._waited = 0, 0.0, 0.0
        self.host_ahead_seconds = 0.0
        stats.expert_counts = np.zeros((layers, experts), np.int64)

    def start(self, prompt_tokens: int = 0) -> None:
        """A new reply (the stats were reset): its first ``prompt_tokens`` tokens are the
        prefill; bytes, tokens and prefetch counts start from zero."""
        self.books_done()  # hits a failed pass left unwritten: counted from here
        self._bytes_at_start = self.reader.bytes_read
        self.prompt_tokens, self.tokens = prompt_tokens, 0
        self.prefill_counts = None if prompt_tokens else (0, 0)
        self.prefill_read_seconds = 0.0
        self.host_layers, self.host_seconds, self._waited = 0, 0.0, 0.0
        self.host_ahead_seconds = 0.0
        if self.prefetcher is not None:
            self.prefetcher.reset_counts()
        if self.cache is not None:
            self.cache.ahead_issued = self.cache.ahead_used = 0

    def books_done(self) -> None:
        """Count the hits whose books wait in the cache (``ExpertCache.defer_hit``): a reply
        that ends has its stats, profile and trace complete."""
        if self.cache is None or not self.cache.hits_waiting:
            return
        start = time.thread_time()
        self.cache.write_hits()
        if self.phase == "decode":  # the pager's host time, as the decode layers count it
            self.host_seconds += time.thread_time() - start

    @property
    def phase(self) -> str:
        """Of the tokens going through the layers now: the prompt's, or generated ones.

        Counted in tokens, not taken from mlx-lm's progress callback: it computes the
        first generated token's pass before it reports the prompt done."""
        return "prefill" if self.tokens < self.prompt_tokens else "decode"

    def routed(
        self, layer: int, routed: np.ndarray, experts: np.ndarray, counts: np.ndarray | int
    ) -> None:
        """A layer's routing: the access profiler counts how many tokens each expert
        served, and the hook (a trace recorder) sees the choices."""
        with self.stats.lock:
            self.stats.expert_counts[layer][experts] += counts  # a row: cheaper to index
        if self.on_tokens is not None:
            self.on_tokens(layer, routed)

    def hits_written(self, layers: list[int], routed: np.ndarray) -> None:
        """Decode steps that found every expert resident, their books written now
        (``ExpertCache.defer_hit``): the profiler counts them, the hook sees them, in order."""
        experts = routed.reshape(len(layers), -1)
        rows = np.repeat(layers, experts.shape[1])  # (a layer may come twice: add.at)
        with self.stats.lock:
            np.add.at(self.stats.expert_counts, (rows, experts.reshape(-1)), 1)
        if self.on_tokens is not None:
            for layer, choices in zip(layers, routed, strict=True):
                self.on_tokens(layer, choices)

    def count(self, hits: int, misses: int, waited: float) -> None:
        """A fetch of the full-precision cache (``ExpertCache.on_fetch``)."""
        with self.stats.lock:
            self.stats.hits += hits
            self.stats.misses += misses
            self.stats.read_seconds += waited
        self._waited += waited
        if misses:  # a hit read nothing
            self._copy_counters()

    def count_cold(self, hits: int, misses: int, waited: float) -> None:
        """A fetch of the cold tier's low-precision slots."""
        with self.stats.lock:
            self.stats.cold_hits += hits
            self.stats.cold_misses += misses
            self.stats.read_seconds += waited
        self._waited += waited

    def timed(self, decode: bool, ahead_seconds: float, host_seconds: float) -> None:
        """A layer call spent ``host_seconds`` of its thread's CPU time outside MLX: the
        pager's own work, ``ahead_seconds`` of it before the experts' computation was
        dispatched (the rest runs beside the computation). Counted for decode calls that
        read nothing, the hit path every token pays (a miss's cost is its read, counted
        apart)."""
        if decode and not self._waited:
            self.host_layers += 1
            self.host_seconds += host_seconds
            self.host_ahead_seconds += ahead_seconds
        self._waited = 0.0

    def passed(self, n: int) -> None:
        """``n`` tokens went through every layer; note the counts when the prompt's last
        token is done (decode starts after it)."""
        prompt_done = self.tokens < self.prompt_tokens <= self.tokens + n
        if prompt_done:
            self.books_done()  # the prompt's last hits, counted and traced in its phase
        self.tokens += n
        if prompt_done:
            with self.stats.lock:
                self.prefill_counts = (self.stats.hits, self.stats.misses)
                self.prefill_read_seconds = self.stats.read_seconds

    def sync(self) -> None:
        """The stats complete for whoever reads them now (a run driven outside
        ``Engine.generate``, a benchmark): the hits whose books wait written, the reader's
        and the prefetcher's counters copied."""
        self.books_done()
        self._copy_counters()

    def _copy_counters(self) -> None:
        """Copy the reader's and the prefetcher's counters into the stats."""
        with self.stats.lock:
            self.stats.bytes_read = self.reader.bytes_read - self._bytes_at_start
            if self.cache is not None:
                self.stats.read_ahead_issued = self.cache.ahead_issued
                self.stats.read_ahead_used = self.cache.ahead_used
            p = self.prefetcher
            if p is not None:
                self.stats.prefetch_issued = p.issued
                self.stats.prefetch_used = p.used
                self.stats.prefetch_recall = p.recall
                self.stats.prefetch_precision = p.precision
                self.stats.prefetch_pays = p.gate.decided
