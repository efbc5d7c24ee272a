"""Next-layer prefetch: guess layer L+1's experts from layer L's input, read them early.

Layer L+1's router applied to layer L's MoE input recovers most of L+1's choices
(docs/field-notes.md: 98% of Qwen3-30B's top-8 within a top-12 window). The guesses are read on a
thread of their own while layer L computes, into buffers bounded by a byte budget (part
of the headroom), never into cache slots: a wrong guess costs bandwidth, not memory or
evictions. Demand reads use the reader's own pool, so they never queue behind guesses: a
demanded expert whose speculative read has not started is cancelled and read on demand,
and one already under way is collected only after the demand reads are done. No kernel
readahead hint (``WILLNEED``) is given: it would start every guess at once, competing
with demand reads, uncounted, and leave the pages of dropped guesses in the page cache.

Whether guessing pays depends on the machine: where compute leaves the CPU and the disk
idle (a Mac's GPU computes), reads hide behind it; on a 2-core CPU that computes too, the
guesses' host work and reads compete with the computation (measured here: 70 -> 56 tok/s
at 25% of the embedded model's experts). So decoding measures it (``PrefetchGate``): runs
of tokens with guesses and without alternate, and guessing goes on only while the tokens
with it are the faster ones.
"""

from __future__ import annotations

import statistics
import threading
from collections import deque
from concurrent.futures import Future, ThreadPoolExecutor

import numpy as np

from ..storage.expert_map import ExpertMap, Piece
from ..storage.readers import Reader

Key = tuple[int, int]


class PrefetchGate:
    """Guess or not, decided by decode speed measured both ways, side by side in time.

    Decode tokens come in windows of ``WINDOW``; until each way has ``TRIALS`` windows they
    alternate, then guessing runs only if its median window (of token times' medians) is
    ``MARGIN`` faster than without (a tie goes to the way that costs nothing), and every
    ``PROBE``-th window tries the other way, so a change in the machine's load or the text
    is seen. Medians, because a token now and then waits on something else. Measured here
    (embedded model, one process, paired rounds of 128 tokens): this gate 0.99x of never
    guessing at 25% of the experts (20 rounds) and 1.02x at 100% (16 rounds); guessing on
    every token 0.90-0.99x in other runs."""

    WINDOW = 8  # decode tokens a window
    TRIALS = 3  # windows of each way before deciding
    PROBE = 16  # once decided, one window in this many tries the other way
    KEEP = 3  # windows remembered per way: two probes turn a decision round
    MARGIN = 0.03  # guessing must be this much faster: noise does not turn it on

    def __init__(self, always: bool = False) -> None:
        self.always = always  # hold ``on`` as set, unmeasured (tests of the guesses)
        self.on = False  # guessing in this window: trials start without (a short run costs nothing)
        self.windows: dict[bool, deque[float]] = {w: deque(maxlen=self.KEEP) for w in (True, False)}
        self._times: list[float] = []
        self._count = 0  # windows so far
        self._last: float | None = None

    @property
    def decided(self) -> bool | None:
        """The faster way so far (True: guessing), None while still trying both."""
        if min(len(w) for w in self.windows.values()) < self.TRIALS:
            return None
        guessing, plain = (statistics.median(self.windows[w]) for w in (True, False))
        return guessing < plain * (1 - self.MARGIN)

    def passed(self, now: float, decode: bool) -> None:
        """A forward pass ended at ``now`` (perf_counter); decode passes are timed from the
        one before, any other pass (a prompt's) breaks the chain."""
        if self.always:
            return
        if not decode:
            self._last = None
            return
        if self._last is not None:
            self._times.append(now - self._last)
        self._last = now
        if len(self._times) < self.WINDOW:
            return
        self.windows[self.on].append(statistics.median(self._times))
        self._times.clear()
        self._count += 1
        best = self.decided
        if best is None:
            self.on = not self.on
        else:
            self.on = (not best) if self._count % self.PROBE == 0 else best


class Prefetcher:
    def __init__(self, expert_map: ExpertMap, reader: Reader, max_bytes: int, width: int):
        self.gate = PrefetchGate()
        self.map = expert_map
        self.reader = reader
        self.max_bytes = max_bytes  # speculative buffers in flight
        self.width = width  # guesses per token: top-k plus a margin
        self.pool = ThreadPoolExecutor(1, thread_name_prefix="prefetch")
        self.pending: dict[Key, Future] = {}
        self.lock = threading.Lock()
        self.predicted = self.correct = self.routed = 0  # prediction accuracy
        self.issued = self.used = 0  # speculative reads, and those a layer then needed
        self.wasted = 0  # speculative reads completed but never needed
        self.guesses: dict[int, set[int]] = {}

    def predict(self, scores: np.ndarray) -> np.ndarray:
        """Experts in any token's top-``width``, most-chosen first."""
        flat = scores.reshape(-1, scores.shape[-1])
        top = np.argpartition(-flat, self.width - 1, axis=-1)[:, : self.width]
        experts, counts = np.unique(top, return_counts=True)
        return experts[np.argsort(-counts, kind="stable")]

    def issue(self, layer: int, experts: np.ndarray, resident) -> None:
        """Start reading the guessed experts of ``layer`` that are not resident."""
        self.guesses[layer] = {int(e) for e in experts}
        budget = self.max_bytes
        for expert in experts:
            key = (layer, int(expert))
            if resident(*key) or key in self.pending:
                continue
            size = self.map.expert_disk_bytes(*key)
            if size > budget:
                break
            budget -= size
            pieces = list(self.map.expert_pieces(*key).values())
            with self.lock:
                self.pending[key] = self.pool.submit(self._read, pieces)
                self.issued += 1

    def _read(self, pieces: list[Piece]) -> list[np.ndarray]:
        return [self.reader.read_piece(p) for p in pieces]

    def claim(self, key: Key) -> Future | None:
        """The speculative read of a demanded expert if it has started; one not started
        yet is cancelled and None returned, so the caller reads it on demand."""
        with self.lock:
            future = self.pending.pop(key, None)
        if future is None or future.cancel():
            return None
        return future

    def collect(self, future: Future) -> list[np.ndarray]:
        """A claimed read's buffers, waiting for it: call after issuing the demand reads."""
        buffers = future.result()
        self.used += 1
        self.reader.count(sum(b.nbytes for b in buffers))
        return buffers

    def reset_counts(self) -> None:
        """Start a new run's counts, so its recall and precision are its own."""
        self.predicted = self.correct = self.routed = 0
        self.issued = self.used = self.wasted = 0

    def finish(self, layer: int, routed: np.ndarray) -> None:
        """After ``layer`` ran: score its guesses, drop the unused ones."""
        guesses = self.guesses.pop(layer, None)
        if guesses is not None:
            actual = {int(e) for e in np.unique(routed)}
            self.predicted += len(guesses)
            self.correct += len(guesses & actual)
            self.routed += len(actual)
        with self.lock:
            stale = [k for k in self.pending if k[0] == layer]
            for key in stale:
                future = self.pending.pop(key)
                if not future.cancel():  # already read: the bytes were spent all the same
                    self.wasted += 1
                    self.reader.count(self.map.expert_disk_bytes(*key))

    @property
    def precision(self) -> float:
        return self.correct / self.predicted if self.predicted else 0.0

    @property
    def recall(self) -> float:
        return self.correct / self.routed if self.routed else 0.0

    def close(self) -> None:
        self.pool.shutdown(wait=True, cancel_futures=True)
