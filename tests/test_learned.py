"""The learned policy: its shipped weights, its arithmetic (the same bits compiled), what
it learns, and the training that made it."""

from __future__ import annotations

import json

import numpy as np
import pytest
from numba import njit
from test_fast_replay import random_trace

from mlx_pager.paging import learned
from mlx_pager.paging.learned import FEATURES, LearnedUse, load_params
from mlx_pager.paging.policies import make_policy
from mlx_pager.sim import learn, learned_replay
from mlx_pager.sim.replay import replay


@njit(cache=True)
def compiled_ln(x):
    out = np.empty_like(x)
    for i in range(len(x)):
        out[i] = learned_replay.ln(x[i])
    return out


def test_ln_is_a_log_with_the_same_bits_compiled():
    rng = np.random.default_rng(0)
    x = np.concatenate([np.exp(rng.uniform(-700, 700, 200_000)), rng.random(200_000), [1.0]])
    y = learned.ln(x)
    assert np.abs(y - np.log(x)).max() < 2e-6
    assert np.array_equal(y, compiled_ln(x))  # bit for bit, unlike numpy's log and libm's


def test_the_shipped_weights_load():
    params = load_params()
    assert params.weights.shape == (len(FEATURES),)
    assert np.isfinite(params.weights).all() and params.weights.any()
    assert "deepseek" in params.source.lower()  # trained on the shared trace's first half
    policy = make_policy("learned")
    assert isinstance(policy, LearnedUse)
    assert np.array_equal(policy.params.weights, params.weights)


def test_weights_for_other_features_are_refused(tmp_path):
    path = tmp_path / "w.json"
    path.write_text(json.dumps({"features": ["bias"], "weights": [0.0]}))
    with pytest.raises(ValueError, match="not this policy's"):
        load_params(path)


def feed(policy, tokens):
    for keys in tokens:
        for key in keys:
            policy.access(key)
        policy.next_token()


def test_it_keeps_what_follows_the_experts_being_served():
    p = LearnedUse()
    feed(p, [[(0, 1)], [(0, 2)], [(0, 5)], [(0, 6)]] * 20)  # 2 always follows 1
    feed(p, [[(0, 3)]])  # the most recent
    assert p.victim({(0, 1)}) != (0, 2)  # serving 1: 2 comes next, whatever LRU says
    p.remove(p.victim({(0, 1)}))
    assert p.victim({(0, 1)}) != (0, 2)


def test_one_cache_for_all_layers_ranks_every_layer():
    p = LearnedUse()
    for t in range(30):
        for layer in range(3):
            p.access((layer, t % 2 if layer == 0 else t % 9))
        p.next_token()
    victim = p.victim({(1, 0)})
    assert victim[0] in (1, 2) and victim != (1, 0)  # layer 0 alternates: both stay


def test_fit_logistic_recovers_known_weights():
    rng = np.random.default_rng(1)
    x = np.c_[rng.normal(size=(20_000, 2)), np.ones(20_000)]
    true = np.array([1.5, -2.0, 0.3])
    y = (rng.random(20_000) < 1 / (1 + np.exp(-(x @ true)))).astype(float)
    assert np.abs(learn.fit_logistic(x, y, l2=0.0) - true).max() < 0.1


def test_uses_of_lists_each_keys_tokens():
    trace = random_trace(2)
    ids = trace.expert_ids.astype(np.int64)
    uses, starts = learned_replay.uses_of(ids, trace.num_experts)
    for layer in range(trace.num_layers):
        for e in range(trace.num_experts):
            key = layer * trace.num_experts + e
            expected = np.flatnonzero((ids[:, layer] == e).any(-1))
            assert uses[starts[key] : starts[key + 1]].tolist() == expected.tolist()


def test_samples_carry_the_tokens_to_next_use():
    trace = random_trace(3, tokens=300)
    rate, x, y = learn.samples(trace, 4, learn.seed_weights(), every=1, shared=False)
    assert len(x) == len(y) > 100 and x.shape[1] == len(FEATURES)
    assert (y >= 1).all()  # a candidate is not in the set being served
    assert (x[:, 0] == 0).all() and (x[:, 9:].sum(1) != 0).all()
    assert rate == pytest.approx(replay(trace, 4, "lru").hit_rate, abs=0.05)  # LRU's order


def test_training_beats_its_lru_start_on_the_trace_it_saw():
    trace = random_trace(4, tokens=600, experts=16)
    fit = learn.train(trace, capacities=(5,), horizons=(2,), rounds=2, every=1,
                      serving=(0.0, 2.0), turns=(0.0, -2.0), say=lambda _: None)  # fmt: skip
    assert len(fit.weights) == len(FEATURES) and fit.log
    start = learn.hit_rate(trace, 5, learn.seed_weights(), shared=False)
    assert learn.hit_rate(trace, 5, fit.weights, shared=False) > start


def test_a_family_left_out_keeps_weight_zero():
    trace = random_trace(5, tokens=400, experts=16)
    only = learn.FAMILIES["recency"] + learn.FAMILIES["frequency"]
    fit = learn.train(trace, capacities=(5,), horizons=(2,), rounds=1, every=1, serving=(0.0,),
                      turns=(0.0,), features=only, say=lambda _: None)  # fmt: skip
    left_out = [i for i, name in enumerate(FEATURES) if name not in only and name != "bias"]
    assert not fit.weights[left_out].any() and fit.weights[9:15].any()


def test_a_preload_pins_several_layers_and_ranks_what_it_admits():
    """``ExpertCache.preload`` pins keys of many layers at once and admits what it loads."""
    p = LearnedUse()
    feed(p, [[(0, t % 4), (1, t % 3)] for t in range(20)])
    p.admit((1, 9))  # never requested: ranked as the layer's last service would rank it
    assert np.isfinite(p._layers[1].scores[9])
    pinned = {(0, 0), (0, 1), (1, 0), (1, 9)}
    resident = {(0, e) for e in range(4)} | {(1, e) for e in range(3)} | {(1, 9)}
    for _ in range(len(resident) - len(pinned)):
        victim = p.victim(pinned)
        assert victim in resident and victim not in pinned
        p.remove(victim)
        resident.remove(victim)
    with pytest.raises(LookupError):
        p.victim(pinned)


@pytest.mark.parametrize("shared", [False, True], ids=["layer", "global"])
def test_scoring_one_expert_or_the_whole_layer_gives_the_same_hits(shared):
    """The replay scores a whole layer at once (vector loops) and, while it records
    training samples, one candidate at a time: both must make the same decisions."""
    trace = random_trace(6, tokens=400, experts=16)
    ids = trace.expert_ids.astype(np.int64)
    uses, starts = learned_replay.uses_of(ids, trace.num_experts)
    weights = make_policy("learned").params.weights
    limit = 5 * trace.num_layers if shared else 5
    growth = learned_replay.GROWTH
    args = (ids, trace.num_experts, weights, growth, shared, limit, len(ids))
    layer_at_once = learned_replay.run(*args, 0, 0, uses, starts)
    one_by_one = learned_replay.run(*args, 1, 0, uses, starts)  # every eviction sampled
    assert len(one_by_one[4]) > 100
    assert layer_at_once[:4] == one_by_one[:4]
