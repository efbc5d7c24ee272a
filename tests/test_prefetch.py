"""Next-layer prefetch: guesses are scored, used, and every byte read is accounted for."""

from __future__ import annotations

import threading

import numpy as np
import pytest
from checkpoints import open_paged

from mlx_pager.engine import Engine
from mlx_pager.sim.synthetic import make_checkpoint


def guessing(path, slots: int):
    """A pager that guesses on every token: these tests are about the guesses, not about
    the gate that decides whether a machine gets them."""
    paged = open_paged(path, slots, prefetch=True)
    gate = paged.cache.prefetcher.gate
    gate.always, gate.on = True, True
    return paged


def test_prefetch_accounting(tmp_path):
    path = make_checkpoint(tmp_path / "m", "qwen3_moe", num_experts=16, num_hidden_layers=4)
    paged = guessing(path, 6)
    # Kernel readahead of pieces never read would be disk reads outside the counted ones:
    # every piece announced to the kernel must be one that is then read (and counted).
    reader = paged.cache.reader
    hints, read = [], []
    announce, read_piece = reader.announce, reader.read_piece

    def announcing(pieces):
        hints.extend(pieces)
        announce(pieces)

    def reading(piece, *args, **kwargs):
        read.append(piece)
        return read_piece(piece, *args, **kwargs)

    reader.announce, reader.read_piece = announcing, reading
    engine = Engine(paged, "m", 256)
    for _ in engine.generate("Experts are paged from disk.", max_tokens=24, chat_template=False):
        pass
    for _, future in list(paged.cache.ahead.values()):  # prefill's read-aheads, all done
        future.result()
    paged.run.sync()
    prefetcher, stats = paged.cache.prefetcher, engine.stats
    expert_bytes = paged.cache.map.expert_disk_bytes()
    engine.close()

    assert prefetcher.issued > 0 and 0 < prefetcher.used <= prefetcher.issued
    assert stats.prefetch_used == prefetcher.used
    # Prediction scored against what the next layer really routed: width 3 of 16 per token.
    assert 0 < stats.prefetch_precision <= 1 and 0 < stats.prefetch_recall <= 1
    # Demand misses, plus guesses read and never used (the decode prefetcher's, and the
    # prefill's read-aheads into slots): nothing else touched the disk.
    unused_ahead = stats.read_ahead_issued - stats.read_ahead_used
    assert stats.bytes_read == (stats.misses + prefetcher.wasted + unused_ahead) * expert_bytes
    assert hints and set(hints) <= set(read)


def test_prefetch_buffers_stay_within_their_budget(tmp_path):
    path = make_checkpoint(tmp_path / "m", "olmoe", num_experts=16, num_hidden_layers=3)
    paged = guessing(path, 4)
    prefetcher = paged.cache.prefetcher
    prefetcher.max_bytes = 2 * paged.cache.map.expert_disk_bytes()  # room for two guesses
    in_flight = []
    original_issue = prefetcher.issue

    def issue(layer, experts, resident):
        original_issue(layer, experts, resident)
        in_flight.append(sum(1 for k in prefetcher.pending if k[0] == layer))

    prefetcher.issue = issue
    engine = Engine(paged, "m", 256)
    for _ in engine.generate("A long enough prompt to route widely.", max_tokens=8,
                             chat_template=False):  # fmt: skip
        pass
    engine.close()
    assert in_flight and max(in_flight) <= 2


def test_demand_reads_do_not_wait_for_a_guess_under_way(tmp_path):
    """A layer needs a guessed expert whose speculative read is stuck, and another expert:
    the other one's demand read is made, and done, while the guess is still reading."""
    path = make_checkpoint(tmp_path / "m", "qwen3_moe", num_experts=16)
    paged = guessing(path, 6)
    cache, prefetcher = paged.cache, paged.cache.prefetcher
    started, release, demand_done = threading.Event(), threading.Event(), threading.Event()
    slow_read = prefetcher._read

    def stuck_read(pieces):  # the speculative read, on the prefetch thread
        started.set()
        release.wait(10)
        return slow_read(pieces)

    demand_read = cache.reader.read
    speculative_reading = []

    def read(pieces, outs=None):  # demand reads, on the calling thread
        out = demand_read(pieces, outs)
        speculative_reading.append(not release.is_set())
        demand_done.set()
        return out

    prefetcher._read, cache.reader.read = stuck_read, read
    fetched = []
    layer = threading.Thread(target=lambda: fetched.append(cache.fetch(0, [3, 5])))
    try:
        prefetcher.issue(0, np.array([3]), cache.resident)
        assert started.wait(10)
        layer.start()
        made_in_time = demand_done.wait(5)
    finally:
        release.set()
        if layer.is_alive():
            layer.join(10)
    assert made_in_time and speculative_reading == [True]
    assert fetched and cache.resident(0, 3) and cache.resident(0, 5)
    assert prefetcher.used == 1 and paged.stats.misses == 2
    paged.close()


def test_prediction_counts_are_per_run(tmp_path):
    """Recall and precision of a run are its own, not mixed with the runs before it."""
    path = make_checkpoint(tmp_path / "m", "qwen3_moe", num_experts=16, num_hidden_layers=4)
    results = []
    for prompts in (["A first prompt about disks.", "Then another one."], ["Then another one."]):
        paged = guessing(path, 6)  # held on: the gate's own state would span the runs
        engine = Engine(paged, "m", 256)
        try:
            for prompt in prompts:
                for _ in engine.generate(prompt, max_tokens=6, chat_template=False):
                    pass
            p, s = paged.cache.prefetcher, engine.stats
            results.append(
                (p.predicted, p.correct, p.routed, s.prefetch_recall, s.prefetch_precision)
            )
        finally:
            engine.close()
    assert results[0][0] > 0
    assert results[0] == results[1]  # the second run after another == that run alone


def test_prefill_reads_the_next_layers_experts_ahead(tmp_path):
    """A prompt's pass reads the next layer's likely experts into slots while a layer
    computes: they are asked for, counted as misses (read for this need), every byte
    accounted for, and the output is unchanged (tests/test_exact.py: bit for bit)."""
    path = make_checkpoint(tmp_path / "m", "qwen3_moe", num_experts=16, num_hidden_layers=4)
    paged = open_paged(path, 40)
    engine = Engine(paged, "m", 256)
    for _ in engine.generate("A prompt long enough to route to most experts of each layer.",
                             max_tokens=4, chat_template=False):  # fmt: skip
        pass
    cache, stats = paged.cache, engine.stats
    for _, read in list(cache.ahead.values()):
        read.result()
    paged.run.sync()
    expert_bytes = cache.map.expert_disk_bytes()
    engine.close()
    assert stats.read_ahead_issued > 0 and 0 < stats.read_ahead_used <= stats.read_ahead_issued
    unused = stats.read_ahead_issued - stats.read_ahead_used
    assert stats.bytes_read == (stats.misses + unused) * expert_bytes
    assert len(cache.slot_of) <= cache.slots


def test_demand_reads_do_not_wait_for_a_read_ahead(tmp_path):
    """A read-ahead stuck on the disk: a layer that needs another expert reads it at once,
    and the stuck one is waited for only when asked for."""
    path = make_checkpoint(tmp_path / "m", "qwen3_moe", num_experts=16)
    paged = open_paged(path, 8)
    cache = paged.cache
    started, release = threading.Event(), threading.Event()
    original = cache._read_ahead

    def stuck(key, slot):
        started.set()
        release.wait(10)
        original(key, slot)

    cache._read_ahead = stuck
    try:
        assert cache.read_ahead(1, np.array([3]), keep=set()) == 1
        assert started.wait(10)
        done = threading.Event()
        worker = threading.Thread(target=lambda: (cache.fetch(1, np.array([5])), done.set()))
        worker.start()
        assert done.wait(5), "the demand read waited behind the read-ahead"
        assert not release.is_set() and (1, 3) in cache.ahead
        release.set()
        worker.join(10)
        cache.fetch(1, np.array([3, 5]))
        assert cache.resident(1, 3) and cache.resident(1, 5)
        assert cache.ahead_used == 1
    finally:
        release.set()
        paged.close()


def test_a_read_ahead_counts_as_a_miss_on_its_first_use_only(tmp_path):
    """An expert read ahead and not yet asked for: hits on other experts stay hits (its
    waiting leaves them the one-gather path), its own first use is counted a miss."""
    path = make_checkpoint(tmp_path / "m", "qwen3_moe", num_experts=16)
    paged = open_paged(path, 8)
    cache, seen = paged.cache, []
    cache.on_fetch = lambda hits, misses, waited: seen.append((hits, misses))
    try:
        assert cache.read_ahead(1, np.array([3]), keep=set()) == 1
        for _, read in list(cache.ahead.values()):
            read.result()
        cache.fetch(1, np.array([5]))  # a demand read; the finished read-ahead settles
        assert (1, 3) in cache.fresh and cache.resident(1, 3)
        cache.fetch(1, np.array([5]))
        cache.fetch(1, np.array([3, 5]))
        cache.fetch(1, np.array([3, 5]))
        assert seen == [(0, 1), (1, 0), (1, 1), (2, 0)]
        assert not cache.fresh and cache.ahead_used == 1
    finally:
        paged.close()


def _decode(gate, tokens: int, guessing_s: float, plain_s: float, start: float = 0.0):
    """Feed the gate ``tokens`` decode passes, each as long as its way takes; the ways used."""
    now, ways = start, []
    for _ in range(tokens):
        ways.append(gate.on)
        now += guessing_s if gate.on else plain_s
        gate.passed(now, decode=True)
    return ways, now


def test_the_gate_guesses_only_where_guessing_decodes_faster():
    """Both ways tried in turn, then the faster one kept, the other probed one window in
    PROBE: a change of machine or text turns it round."""
    from mlx_pager.paging.prefetch import PrefetchGate

    gate, window = PrefetchGate(), PrefetchGate.WINDOW
    # the first pass starts the clock: a window is WINDOW tokens after it
    trials, now = _decode(gate, 2 * PrefetchGate.TRIALS * window + 1, 0.02, 0.01)
    assert sum(trials) == PrefetchGate.TRIALS * window  # half and half while trying
    assert gate.decided is False
    ways, now = _decode(gate, 32 * window, 0.02, 0.01, now)
    assert 0 < sum(ways) <= 32 * window / PrefetchGate.PROBE + window  # probes only
    ways, now = _decode(gate, 48 * window, 0.005, 0.01, now)  # now guessing pays
    assert gate.decided is True
    assert sum(ways[-16 * window :]) >= 16 * window * (1 - 1 / PrefetchGate.PROBE) - window


def test_the_gate_times_decode_tokens_only():
    """A prompt's pass (and the user's pause before it) is no decode token's time."""
    from mlx_pager.paging.prefetch import PrefetchGate

    gate = PrefetchGate()
    _, now = _decode(gate, 5, 0.01, 0.01)  # 4 token times
    gate.passed(now + 100.0, decode=False)  # the next reply's prefill, after a pause
    _, now = _decode(gate, 4, 0.01, 0.01, now + 101.0)  # 3 more: the gap is not one
    assert not any(gate.windows.values())  # 7 of the window's 8 token times
    _decode(gate, 1, 0.01, 0.01, now)
    assert list(gate.windows[False]) == [pytest.approx(0.01)]


def test_a_gate_that_measured_guessing_slower_stops_its_work(tmp_path):
    """Gated off, no guess is computed, read or scored, and the tokens are the same."""
    path = make_checkpoint(tmp_path / "m", "qwen3_moe", num_experts=16, num_hidden_layers=4)
    replies = []
    for on in (True, False):
        paged = open_paged(path, 6, prefetch=True)
        prefetcher = paged.cache.prefetcher
        prefetcher.gate.always, prefetcher.gate.on = True, on  # held in one way
        engine = Engine(paged, "m", 256)
        try:
            replies.append(list(engine.generate("Experts are paged.", 12, chat_template=False)))
        finally:
            engine.close()
        assert (prefetcher.issued > 0 and prefetcher.predicted > 0) is on
    assert replies[0] == replies[1]
