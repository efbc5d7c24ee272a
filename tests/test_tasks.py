"""Task classifier, per-task hot sets, and preloading them into the cache."""

from __future__ import annotations

import numpy as np
import pytest
from checkpoints import open_paged

from mlx_pager.engine import Engine
from mlx_pager.sim.synthetic import make_checkpoint
from mlx_pager.tasks.classifier import TASKS, TaskClassifier, load_calibration, split_held_out
from mlx_pager.tasks.profiles import TaskProfiles


def test_calibration_prompts_cover_every_task():
    pairs = load_calibration()
    for task in TASKS:
        assert sum(t == task for t, _ in pairs) >= 50, task


def test_classifier_held_out_accuracy():
    train, held = split_held_out(load_calibration())
    classifier = TaskClassifier.fit(train)
    accuracy = classifier.accuracy(held)
    print(f"held-out task accuracy: {accuracy:.1%} on {len(held)} prompts")
    assert accuracy >= 0.9


def test_classifier_on_small_corpus():
    pairs = [
        ("code", "def f(x): return x + 1"),
        ("code", "for (int i = 0; i < n; i++) {}"),
        ("math", "Solve 3x + 2 = 11 for x."),
        ("math", "What is the integral of x^2?"),
        ("chat", "Hi! How are you today?"),
        ("chat", "Can you help me plan a trip?"),
    ]
    classifier = TaskClassifier.fit(pairs)
    assert classifier.predict("def g(y): return y * 2") == "code"
    assert classifier.predict("Solve 5x + 1 = 6 for x.") == "math"
    assert classifier.predict("Hi! Can you help me today?") == "chat"


def test_profiles_persist_and_rank(tmp_path):
    profiles = TaskProfiles.load(tmp_path, 2, 4)
    profiles.add("code", np.array([[5, 0, 1, 0], [0, 9, 0, 2]]))
    profiles.add("code", np.array([[1, 0, 0, 0], [0, 0, 0, 0]]))
    profiles.preload_hit = {"with": 0.8, "without": 0.7}
    profiles.save()
    again = TaskProfiles.load(tmp_path, 2, 4)
    assert again.hot_set("code", 3) == [(1, 1), (0, 0), (1, 3)]
    assert again.hot_set("prose", 3) == []
    assert abs(again.preload_gain - 0.1) < 1e-9
    assert TaskProfiles.load(tmp_path, 3, 4).counts == {}  # another shape: not this model's


def test_preload_fills_the_cache_without_counting_hits(tmp_path):
    path = make_checkpoint(tmp_path / "m", "qwen3_moe", num_experts=16)
    paged = open_paged(path, 8)
    engine = Engine(paged, "m", 256)
    try:
        hot = [(0, 3), (0, 5), (1, 7), (1, 2)]
        engine.profiles.counts["code"] = np.zeros((2, 16), np.int64)
        for rank, (layer, expert) in enumerate(hot):
            engine.profiles.counts["code"][layer, expert] = 10 - rank
        assert engine.preload_status.startswith("off: not measured")
        engine.prepare("def f(): pass", preload=True, task="code")
        engine.wait_preload()
        assert all(paged.cache.resident(*key) for key in hot)
        assert engine.stats.hits == engine.stats.misses == 0
        assert engine.stats.preloaded == 4
        # The same task again: nothing to preload.
        engine.prepare("def g(): pass", preload=True, task="code")
        assert engine._preload is None
    finally:
        engine.close()


@pytest.mark.parametrize("policy", ["lfu", "predict"])
def test_preload_teaches_the_policy_no_requests(tmp_path, policy):
    """Preloaded experts are residents the policy can evict, not requests it learns from:
    no counts for LFU, no token transitions or weight for predict."""
    path = make_checkpoint(tmp_path / "m", "qwen3_moe", num_experts=16)
    paged = open_paged(path, 4, policy=policy)
    cache = paged.cache
    try:
        hot = [(0, 3), (0, 5), (1, 7), (1, 2)]
        assert cache.preload(hot) == 4
        if policy == "lfu":
            assert cache.policy._counts == {}
        else:
            layers = cache.policy._layers.values()
            assert all(m.decayed_total == 0 and not m.follows.any() for m in layers)
            assert all(not m.current and not m.previous for m in layers)
        cache.fetch(0, [8, 9])  # every slot holds a preloaded expert: two must go
        assert cache.resident(0, 8) and cache.resident(0, 9)
        assert sum(cache.resident(*key) for key in hot) == 2
    finally:
        paged.close()


def test_generation_learns_the_task_profile(tmp_path):
    path = make_checkpoint(tmp_path / "m", "olmoe")
    engine = Engine(open_paged(path, 4), "m", 256)
    try:
        for _ in engine.generate("1 + 1 =", max_tokens=4, chat_template=False, task="math"):
            pass
        learned = TaskProfiles.load(path, 2, 8).counts["math"]
        assert learned.sum() == engine.stats.expert_counts.sum() > 0
        assert engine.stats.task == "math"
        assert engine.stats.decode_hits + engine.stats.decode_misses > 0
    finally:
        engine.close()
