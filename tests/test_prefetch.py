"""Next-layer prefetch: guesses are scored, used, and every byte read is accounted for."""

from __future__ import annotations

from checkpoints import open_paged

from mlx_pager.engine import Engine
from mlx_pager.synthetic import make_checkpoint


def test_prefetch_accounting(tmp_path):
    path = make_checkpoint(tmp_path / "m", "qwen3_moe", num_experts=16, num_hidden_layers=4)
    paged = open_paged(path, 6, prefetch=True)
    engine = Engine(paged, "m", 256)
    for _ in engine.generate("Experts are paged from disk.", max_tokens=24, chat_template=False):
        pass
    prefetcher, stats = paged.cache.prefetcher, engine.stats
    expert_bytes = paged.cache.map.expert_disk_bytes()
    engine.close()

    assert prefetcher.issued > 0 and 0 < prefetcher.used <= prefetcher.issued
    assert stats.prefetch_used == prefetcher.used
    # Prediction scored against what the next layer really routed: width 3 of 16 per token.
    assert 0 < stats.prediction_precision <= 1 and 0 < stats.prefetch_recall <= 1
    # Demand misses, plus guesses read and never used: nothing else touched the disk.
    assert stats.bytes_read == (stats.misses + prefetcher.wasted) * expert_bytes


def test_prefetch_buffers_stay_within_their_budget(tmp_path):
    path = make_checkpoint(tmp_path / "m", "olmoe", num_experts=16, num_hidden_layers=3)
    paged = open_paged(path, 4, prefetch=True)
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
