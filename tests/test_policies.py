"""Cache policies: hand-computed orders for each, and the contract the live cache relies on."""

from __future__ import annotations

import random

import numpy as np
import pytest

from mlx_pager.paging.policies import (
    DEFAULT_POLICY,
    LFU,
    LRU,
    POLICIES,
    SLRU,
    DecayedLFU,
    Policy,
    PredictedUse,
    make_policy,
)


def feed(policy, tokens):
    """Access each token's keys, then mark the token boundary."""
    for keys in tokens:
        for key in keys:
            policy.access(key)
        policy.next_token()


def test_lru_order_and_pinning():
    p = LRU()
    feed(p, [["a"], ["b"], ["c"], ["a"]])
    assert p.victim() == "b"
    assert p.victim({"b"}) == "c"


def test_lfu_counts_every_request_ties_to_oldest():
    p = LFU()
    feed(p, [["a"], ["a"], ["b"], ["c"], ["c"]])
    assert p.victim() == "b"
    p.remove("b")
    p.access("d")
    assert p.victim() == "d"  # one request: below a and c
    assert p.victim({"d"}) == "a"  # a and c tie at 2; a is older
    p.remove("a")
    p.access("a")  # evicted and back: its count goes on from 2 to 3
    assert p.victim({"d"}) == "c"


def test_lfu_counts_requests_served_together_not_weight():
    """The live cache serves a prefill chunk's requests of one expert in one call."""
    p, q = LFU(), LFU()
    p.access_many("a", 3)  # three tokens of a chunk routed to a
    p.access_many("b", 2, weight=0.1)  # a weight is not a count
    feed(q, [["a"], ["a"], ["b"], ["a"], ["b"]])  # the same requests, one at a time
    assert p._counts == q._counts == {"a": 3, "b": 2}
    assert p.victim() == q.victim() == "b"
    p.access("b", weight=5.0)
    p.access("b", weight=0.2)
    assert p.victim() == "a"  # b at 4 requests


def test_admit_makes_a_key_evictable_without_a_request():
    p = LFU()
    feed(p, [["a"], ["b"], ["b"]])
    p.admit("c")  # preloaded: resident, never requested
    assert p._counts == {"a": 1, "b": 2} and p.victim() == "c"
    p.access("c")
    assert p.victim() == "a"  # a and c tie at 1; a is older
    p.remove("c")
    p.admit("c")  # back again: ranked by the request it had
    assert p.victim({"a"}) == "c" and p._counts["c"] == 1


@pytest.mark.parametrize("name", list(POLICIES))
def test_every_policy_can_evict_an_admitted_key(name):
    policy = make_policy(name)
    feed(policy, [[(0, 1)], [(0, 2)]])
    policy.admit((0, 7))
    assert policy.victim({(0, 1), (0, 2)}) == (0, 7)
    policy.remove((0, 7))
    with pytest.raises(LookupError):
        policy.victim({(0, 1), (0, 2)})


def test_predicted_use_learns_nothing_from_admitted_keys():
    tokens = [[(0, 1)], [(0, 2)]] * 5
    p, q = PredictedUse(), PredictedUse()
    feed(p, tokens)
    feed(q, tokens)
    for expert in (5, 6, 70):  # 70: beyond what the layer's model has seen
        p.admit((0, expert))
    feed(p, tokens)
    feed(q, tokens)
    a, b = p._layers[0], q._layers[0]
    assert a.follows.sum() == b.follows.sum() and a.decayed_total == b.decayed_total
    assert np.array_equal(a.follows[: b.size, : b.size], b.follows)
    assert p.victim({(0, 1)}) in {(0, 5), (0, 6), (0, 70)}  # never requested: first out


def test_access_many_is_repeated_access_for_weight_policies():
    p, q = DecayedLFU(), DecayedLFU()
    feed(p, [["b"]])
    feed(q, [["b"]])
    p.access_many("a", 3)
    for _ in range(3):
        q.access("a")
    assert p._history == q._history and p.victim() == q.victim() == "b"


def test_slru_protects_keys_asked_for_twice():
    p = SLRU()
    feed(p, [["a"], ["b"], ["a"], ["c"], ["d"]])
    # a is protected; b, c, d are on probation, oldest first
    assert p.victim() == "b"
    assert p.victim({"b", "c", "d"}) == "a"
    p.remove("b")
    p.remove("c")
    p.remove("d")
    assert p.victim() == "a"


def test_decayed_lfu_mixes_recency_frequency_and_weight():
    p = DecayedLFU(half_life=1.0)
    feed(p, [["a", "a", "a"], ["b", "b"], [], ["c"]])
    # a: 3 * 1/8 = 0.375, b: 2 * 1/4 = 0.5, c: 1 * 1/2 after the last boundary
    assert p.victim() == "a"
    q = DecayedLFU(half_life=1000.0)
    q.access("light", weight=0.1)
    q.access("heavy", weight=0.9)
    assert q.victim() == "light"
    q.remove("heavy")
    q.access("heavy", weight=0.05)  # its history survived the eviction
    assert q.victim() == "light"


def test_predicted_use_learns_what_follows():
    p = PredictedUse()
    feed(p, [[(0, 1)], [(0, 2)]] * 20)  # at this layer, 2 always follows 1
    feed(p, [[(0, 3)]])  # 3 is the most recent, seen once
    # serving a token that needs expert 1: keep 2, which comes next
    assert p.victim({(0, 1)}) == (0, 3)
    assert lru_victim([[1], [2]] * 20 + [[3]], pinned={1}) == 2  # LRU would drop 2


def lru_victim(tokens, pinned):
    p = LRU()
    feed(p, tokens)
    return p.victim(pinned)


def test_predicted_use_plain_ids_and_global_layers():
    p = PredictedUse()
    feed(p, [[5, 6], [5, 7]])
    assert p.victim({5, 7}) == 6  # bare expert ids in, bare ids out
    g = PredictedUse()
    # layer 0 is skewed (always expert 0), layer 1 spreads over many experts
    feed(g, [[(0, 0), (1, t % 8)] for t in range(40)])
    assert g.victim({(1, 3)})[0] == 1  # a flat layer's expert goes before the hot one


@pytest.mark.parametrize("name", list(POLICIES))
def test_contract_as_the_live_cache_uses_it(name):
    """Random requests through a global cache of (layer, expert) keys, evicting before
    accessing as ExpertCache._fetch does: a victim is always resident and never pinned."""
    rng = random.Random(name)
    policy = make_policy(name)
    resident: set = set()
    slots = 12
    for step in range(300):
        for layer in range(3):
            experts = range(10) if step < 200 else range(300)  # new ids, pinned first
            keys = [(layer, e) for e in rng.sample(experts, 3)]
            pinned = set(keys)
            for _ in [k for k in keys if k not in resident]:
                if len(resident) >= slots:
                    victim = policy.victim(pinned)
                    assert victim in resident and victim not in pinned
                    policy.remove(victim)
                    resident.remove(victim)
            resident.update(keys)
            for key in keys:
                policy.access(key, rng.random())
        policy.next_token()
    with pytest.raises(LookupError):
        policy.victim(resident)


def test_registry():
    assert DEFAULT_POLICY in POLICIES
    assert all(make_policy(n).name == n for n in POLICIES)
    with pytest.raises(ValueError, match="Unknown cache policy 'mru'"):
        make_policy("mru")


def _events(rng: random.Random, tokens: int, layers: int = 3) -> list:
    """Decode steps (k experts, no requests), prefill chunks (varied sizes, requests),
    token ends of one or more tokens, and now and then an expert beyond 64 (the
    model grows)."""
    events = []
    for _ in range(tokens):
        for layer in range(layers):
            if rng.random() < 0.3:  # a prefill chunk
                experts = rng.sample(range(70 if rng.random() < 0.05 else 64), rng.randint(1, 9))
                requests = np.array([rng.randint(1, 5) for _ in experts], float)
            else:
                experts, requests = rng.sample(range(64), 4), None
            events.append((layer, np.array(experts), requests))
        events.append(rng.choice([1, 1, 1, 3]))
    return events


def same_state(one: PredictedUse, batch: PredictedUse) -> None:
    """Every array bit for bit (the same additions in the same order), every list equal."""
    assert one._unit == batch._unit and one._layers.keys() == batch._layers.keys()
    for layer, a in one._layers.items():
        b = batch._layers[layer]
        assert a.size == b.size and a.decayed_total == b.decayed_total
        assert np.array_equal(a.follows, b.follows) and np.array_equal(a.seen, b.seen)
        assert np.array_equal(a.decayed, b.decayed)
        assert a.previous == b.previous and a.current == b.current


@pytest.mark.parametrize("name", list(POLICIES))
def test_told_in_a_batch_as_one_by_one(name):
    """The cache tells a policy its requests in batches (``tell``): the same state and the
    same victims as told one request and one token at a time (``Policy.tell``'s loop)."""
    rng = random.Random(7)
    one, batch = make_policy(name), make_policy(name)
    for _ in range(6):
        events = _events(rng, rng.randint(1, 40))
        Policy.tell(one, events)
        batch.tell(events)
        pinned = {(0, int(e)) for e in events[0][1]}
        assert one.victim(pinned) == batch.victim(pinned)
    if isinstance(one, PredictedUse):
        same_state(one, batch)


def test_predicted_use_batch_across_a_renormalisation():
    """Past 1e100 the weights' unit is divided out: a batch that would cross it is told
    one by one, so the arrays stay equal there too."""
    one, batch = PredictedUse(), PredictedUse()
    one._unit = batch._unit = 1e100 / one._growth**5  # five tokens from the division
    events = _events(random.Random(3), 12)
    Policy.tell(one, events)
    batch.tell(events)
    assert batch._unit < 1e100
    same_state(one, batch)


def test_predicted_use_told_thousands_of_token_ends_at_once():
    """A long prompt whose experts are all resident queues its chunks' token ends until
    the queue is long: one batch can end 10,000 tokens (2 ** (10000 / 8) overflows a
    float). It is told as one by one, weights renormalised on the way."""
    events = [(0, np.array([1, 2]), np.array([3.0, 1.0])), 10_000, (0, np.array([2]), None)]
    one, batch = PredictedUse(), PredictedUse()
    Policy.tell(one, events)
    batch.tell(events)
    same_state(one, batch)
