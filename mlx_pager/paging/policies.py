"""Eviction policies for the expert cache, shared by the live engine and the trace simulator.

A policy only ranks keys; the cache owns the slots. Keys are ``(layer, expert)`` pairs.
The cache calls ``access`` for every request (hit or miss, after a miss is loaded), or
``access_many`` for several requests of one key served at once (a prefill chunk),
``admit`` for a key made resident without a request (a task preload), ``remove`` when it
evicts, and ``victim`` to choose what to evict; ``pinned`` keys (the experts the current
computation needs) are never chosen. ``next_token`` marks token boundaries for policies
that age by tokens rather than by requests.
"""

from __future__ import annotations

import heapq
import math
from collections import OrderedDict
from collections.abc import Collection, Hashable

import numpy as np

Key = Hashable


class Policy:
    name = "base"

    def access(self, key: Key, weight: float = 1.0) -> None:
        raise NotImplementedError

    def access_many(self, key: Key, requests: int, weight: float | None = None) -> None:
        """``requests`` requests of ``key`` served together, ``weight`` their summed weight
        (default: one each). One call of the summed weight is the same as ``requests``
        calls for a policy that only adds weights or orders keys; one that counts requests
        overrides it."""
        self.access(key, float(requests) if weight is None else weight)

    def access_layer(self, layer: int, experts: np.ndarray, requests: np.ndarray | None) -> None:
        """One layer's fetch: ``access_many((layer, e), r)`` for each expert in order, ``r``
        its requests (one each when None). A policy may do it at once, the same way."""
        counts = [1] * len(experts) if requests is None else np.rint(requests).astype(int).tolist()
        for expert, count in zip(experts.tolist(), counts, strict=True):
            self.access_many((layer, expert), count)

    def tell(self, events: list) -> None:
        """What happened since the policy was last told, in order: ``(layer, experts,
        requests)`` is ``access_layer``, an int ``n`` is ``n`` token ends. A policy may
        learn a batch at once, the same way (the cache tells it in batches: ``_tell``)."""
        for item in events:
            if isinstance(item, int):
                for _ in range(item):
                    self.next_token()
            else:
                self.access_layer(*item)

    def admit(self, key: Key) -> None:
        """``key`` became resident without being requested (preloaded): make it evictable,
        learn nothing. A request of weight zero does that for a policy whose history is
        weights or order; one that learns from requests themselves overrides it."""
        self.access(key, 0.0)

    def remove(self, key: Key) -> None:
        raise NotImplementedError

    def victim(self, pinned: Collection[Key] = ()) -> Key:
        raise NotImplementedError

    def next_token(self) -> None:
        """A token boundary; most policies ignore it."""


class LRU(Policy):
    """Least recently used."""

    name = "lru"

    def __init__(self) -> None:
        self._order: OrderedDict[Key, None] = OrderedDict()

    def access(self, key: Key, weight: float = 1.0) -> None:
        self._order[key] = None
        self._order.move_to_end(key)

    def remove(self, key: Key) -> None:
        self._order.pop(key, None)

    def victim(self, pinned: Collection[Key] = ()) -> Key:
        for key in self._order:
            if key not in pinned:
                return key
        raise LookupError("every resident expert is pinned; the cache is too small")


class _Ranked(Policy):
    """A policy that evicts the resident key of lowest score, through a lazy min-heap.

    Scores only grow while a key is resident, so a key's newest heap entry is its true
    one and older entries are skipped when popped: O(log n) per access and eviction.
    """

    def __init__(self) -> None:
        self._score: dict[Key, tuple] = {}  # resident key -> its current heap entry
        self._heap: list[tuple] = []

    def _push(self, key: Key, entry: tuple) -> None:
        self._score[key] = entry
        heapq.heappush(self._heap, entry)
        if len(self._heap) > 4 * len(self._score) + 64:  # drop stale entries
            self._heap = list(self._score.values())
            heapq.heapify(self._heap)

    def remove(self, key: Key) -> None:
        self._score.pop(key, None)

    def victim(self, pinned: Collection[Key] = ()) -> Key:
        heap, kept = self._heap, []
        try:
            while heap:
                entry = heapq.heappop(heap)
                key = entry[-1]
                if self._score.get(key) is not entry:
                    continue
                kept.append(entry)
                if key not in pinned:
                    return key
        finally:
            for entry in kept:
                heapq.heappush(heap, entry)
        raise LookupError("every resident expert is pinned; the cache is too small")


class LFU(_Ranked):
    """Least frequently used: requests counted since the start, kept across evictions
    (the reference figures' LFU); ties go to the least recently used.

    It counts requests, never router weight: the replay's one call per request and the
    live cache's one ``access_many`` per expert and prefill chunk count the same."""

    name = "lfu"

    def __init__(self) -> None:
        super().__init__()
        self._clock = 0
        self._counts: dict[Key, int] = {}

    def access(self, key: Key, weight: float = 1.0) -> None:
        self.access_many(key, 1)

    def access_many(self, key: Key, requests: int, weight: float | None = None) -> None:
        self._clock += 1
        count = self._counts.get(key, 0) + requests
        self._counts[key] = count
        self._push(key, (count, self._clock, key))

    def admit(self, key: Key) -> None:
        """Ranked by the requests it already had (none if new), as the most recent."""
        self._clock += 1
        self._push(key, (self._counts.get(key, 0), self._clock, key))


class DecayedLFU(_Ranked):
    """Frequency that fades: each request adds its router weight, halved every
    ``half_life`` tokens, and the count survives eviction (a returning expert keeps its
    history). Recency and frequency in one number; LRU and LFU are its two limits."""

    name = "lfu-decay"

    def __init__(self, half_life: float = 32.0) -> None:
        super().__init__()
        self._growth = 2.0 ** (1.0 / half_life)
        self._unit = 1.0  # what a request adds now: grows instead of decaying every count
        self._history: dict[Key, float] = {}

    def access(self, key: Key, weight: float = 1.0) -> None:
        value = self._history.get(key, 0.0) + weight * self._unit
        self._history[key] = value
        self._push(key, (value, key))

    def next_token(self) -> None:
        self._unit *= self._growth
        if self._unit > 1e100:  # rescale everything; the order is unchanged
            scale = 1.0 / self._unit
            self._unit = 1.0
            self._history = {k: v * scale for k, v in self._history.items()}
            self._score = {k: (self._history[k], k) for k in self._score}
            self._heap = list(self._score.values())
            heapq.heapify(self._heap)


class SLRU(Policy):
    """Segmented LRU: a second request promotes a key into a protected segment (80% of
    the residents) that one-off requests cannot flush."""

    name = "slru"

    def __init__(self, protected_share: float = 0.8) -> None:
        self._probation: OrderedDict[Key, None] = OrderedDict()
        self._protected: OrderedDict[Key, None] = OrderedDict()
        self.protected_share = protected_share

    def access(self, key: Key, weight: float = 1.0) -> None:
        if key in self._protected:
            self._protected.move_to_end(key)
            return
        if key not in self._probation:
            self._probation[key] = None
            return
        del self._probation[key]
        self._protected[key] = None
        room = max(1, int(self.protected_share * (len(self._probation) + len(self._protected))))
        while len(self._protected) > room:
            demoted, _ = self._protected.popitem(last=False)
            self._probation[demoted] = None

    def remove(self, key: Key) -> None:
        self._probation.pop(key, None)
        self._protected.pop(key, None)

    def victim(self, pinned: Collection[Key] = ()) -> Key:
        for segment in (self._probation, self._protected):
            for key in segment:
                if key not in pinned:
                    return key
        raise LookupError("every resident expert is pinned; the cache is too small")


class _LayerModel:
    """What ``PredictedUse`` learns about one MoE layer."""

    def __init__(self, size: int = 64) -> None:
        self.size = size
        self.follows = np.zeros((size, size))  # [a, b]: times b came one token after a
        self.seen = np.zeros(size)  # times a had a next token; P(b next | a now) = follows / seen
        self.decayed = np.zeros(size)  # router weight, fading (see DecayedLFU)
        self.decayed_total = 0.0
        self.resident: set[int] = set()
        self.current: list[int] = []  # this token's experts so far
        self.previous: list[int] = []  # the last finished token's experts
        self.forecast: list[float] | None = None  # from ``previous``
        self.batch: _Additions | None = None  # while ``PredictedUse.tell`` runs

    def grow(self, expert: int) -> None:
        pad = max(self.size, expert + 1 - self.size)
        self.follows = np.pad(self.follows, ((0, pad), (0, pad)))
        self.seen = np.pad(self.seen, (0, pad))
        self.decayed = np.pad(self.decayed, (0, pad))
        self.size += pad
        self.forecast = None

    def finish_token(self) -> None:
        if not self.current:
            return
        current = list(dict.fromkeys(self.current))
        previous = self.previous
        if previous:
            if self.batch is not None:
                self.batch.follows.append((previous, current))
            else:
                pairs = np.add.outer(np.multiply(previous, self.size), current).ravel()
                self.follows.reshape(-1)[pairs] += 1
                self.seen[previous] += 1
        self.previous, self.current = current, []
        self.forecast = None

    def add_decayed(self, ids: list[int], added: list[float]) -> None:
        """Distinct ``ids``: one addition each."""
        if self.batch is not None:
            self.batch.ids += ids
            self.batch.added += added
        else:
            self.decayed[ids] += added

    def write_batch(self) -> None:
        """The additions ``tell`` gathered, each array's in one ``np.add.at``: additions to
        one element in the order they came, so the same sums as one by one (a count
        adds whole numbers; a weight's additions keep their order)."""
        batch, self.batch = self.batch, None
        if batch is None:
            return
        if batch.ids:
            np.add.at(self.decayed, batch.ids, batch.added)
        if batch.follows:
            previous = [a for p, _ in batch.follows for a in p]
            sizes = {(len(p), len(c)) for p, c in batch.follows}
            # A decode batch (every token as many experts) in one broadcast: 10 against
            # 34 µs for 16 tokens of 8 through the general path's outer products.
            if len(sizes) == 1:
                p = np.array([p for p, _ in batch.follows]) * self.size
                c = np.array([c for _, c in batch.follows])
                pairs = (p[:, :, None] + c[:, None, :]).reshape(-1)
            else:
                pairs = np.concatenate(
                    [np.add.outer(np.multiply(p, self.size), c).ravel() for p, c in batch.follows]
                )
            np.add.at(self.follows.reshape(-1), pairs, 1)
            np.add.at(self.seen, previous, 1)

    def predict(self, basis: list[int], mix: float) -> list[float]:
        """Chance of each expert at this layer's next token, given this token's ``basis``."""
        n = max(len(basis), 1)
        # P(b next | a now) for each a of the basis, divided when asked (on a miss), not
        # on every token: the same quotients (0 for an expert never followed).
        chance = self.follows[basis] / np.maximum(self.seen[basis], 1.0)[:, None]
        if self.decayed_total <= 0:
            return (chance.sum(0) / n).tolist()
        popular = self.decayed * ((1.0 - mix) * n / self.decayed_total)
        if not basis:
            return popular.tolist()
        return (chance.sum(0) * (mix / n) + popular).tolist()


class _Additions:
    """A layer model's additions while ``PredictedUse.tell`` runs: made at its end."""

    __slots__ = ("ids", "added", "follows")

    def __init__(self) -> None:
        self.ids: list[int] = []  # decayed[ids[i]] += added[i], in order
        self.added: list[float] = []
        self.follows: list[tuple[list[int], list[int]]] = []  # (a token's, the next's)


class PredictedUse(Policy):
    """Evict the expert least likely to be needed at its layer's next token.

    Per layer, it learns online how often expert b is chosen one token after expert a
    (routing is sticky within a text, and not only for the same expert) and mixes that
    forecast with a fading, router-weighted frequency (``DecayedLFU``). With one cache for
    every layer, scores are chances, so they compare across layers: a skewed layer keeps
    more experts than a flat one. Keys are ``(layer, expert)``. A miss that the forecast
    rates lowest is the next victim, which is admission control without refusing a load.

    ``own_layer``: with one cache for all layers, the layer being served gives up its own
    expert unless another layer holds one this many times less likely. Measured: evicting
    by raw chance across layers lost 10 points to LRU on synthetic decode traces (forecasts
    made from a token that just arrived look sharper than the others), this bias won
    them back and gained on the DeepSeek trace too; hot layers still grow.
    """

    name = "predict"

    def __init__(self, mix: float = 0.7, half_life: float = 8.0, own_layer: float = 10.0) -> None:
        self.mix = mix
        self.own_layer = own_layer
        self._growth = 2.0 ** (1.0 / half_life)
        self._unit = 1.0
        self._layers: dict[int, _LayerModel] = {}
        self._open: int | None = None  # the layer whose token set is being gathered
        self._plain_keys = False
        self._accesses = 0  # victim orders stay valid until the next access
        self._group: tuple | None = None  # (pinned, accesses, {layer: order}) being served
        self._cheapest: dict[int, tuple[float, int]] = {}  # layer -> (chance, expert)
        self._dirty: set[int] = set()  # layers whose cheapest must be found again
        self._batching = False  # inside ``tell``: array additions wait for its end

    def _split(self, key: Key) -> tuple[int, int]:
        if isinstance(key, tuple):
            return key
        self._plain_keys = True  # bare expert ids: one layer
        return 0, key

    def _layer(self, layer: int) -> _LayerModel:
        model = self._layers.get(layer)
        if model is None:
            model = self._layers[layer] = _LayerModel()
            if self._batching:
                model.batch = _Additions()
        return model

    def _close(self) -> None:
        if self._open is None:
            return
        layer, self._open = self._open, None
        self._layers[layer].finish_token()
        self._dirty.add(layer)

    def access(self, key: Key, weight: float = 1.0) -> None:
        self._accesses += 1
        layer, expert = self._split(key)
        if layer != self._open:
            self._close()
            self._open = layer
        model = self._layer(layer)
        if expert >= model.size:
            model.grow(expert)
        model.current.append(expert)
        model.decayed[expert] += weight * self._unit
        model.decayed_total += weight * self._unit
        if expert not in model.resident:
            model.resident.add(expert)
            self._dirty.add(layer)

    def access_layer(self, layer: int, experts: np.ndarray, requests: np.ndarray | None) -> None:
        """``access`` of each expert in order, at once: the same sums in the same order."""
        self._accesses += len(experts)
        if layer != self._open:
            self._close()
            self._open = layer
        model = self._layer(layer)
        ids = experts.tolist()
        for expert in ids:
            if expert >= model.size:
                model.grow(expert)
        weights = [1.0] * len(ids) if requests is None else np.rint(requests).tolist()
        model.current.extend(ids)
        added = [weight * self._unit for weight in weights]
        model.add_decayed(ids, added)  # distinct experts: one addition each, as one by one
        total = model.decayed_total
        for value in added:  # summed in order, as one by one
            total += value
        model.decayed_total = total
        if not model.resident.issuperset(ids):
            model.resident.update(ids)
            self._dirty.add(layer)

    def admit(self, key: Key) -> None:
        """Resident, ranked by what was learned so far; no token, no weight is learned."""
        self._accesses += 1  # the residents changed: cached victim orders are stale
        layer, expert = self._split(key)
        model = self._layer(layer)
        if expert >= model.size:
            model.grow(expert)
        if expert not in model.resident:
            model.resident.add(expert)
            self._dirty.add(layer)

    def remove(self, key: Key) -> None:
        layer, expert = self._split(key)
        model = self._layers.get(layer)
        if model is not None and expert in model.resident:
            model.resident.discard(expert)
            self._dirty.add(layer)

    def tell(self, events: list) -> None:
        """As one by one, each layer's array additions made at the end in one call each:
        told one by one, a layer's request had cost 12 µs on the hit path, most of it
        numpy calls made cold each time."""
        tokens = sum(item for item in events if isinstance(item, int))
        # log space: a long prompt's chunks can end thousands of tokens in one batch
        if math.log(self._unit) + (tokens + 1) * math.log(self._growth) > math.log(1e99):
            super().tell(events)  # the weights renormalise on the way: one by one
            return
        self._batching = True
        for model in self._layers.values():
            model.batch = _Additions()
        try:
            super().tell(events)
        finally:
            self._batching = False
            for model in self._layers.values():
                model.write_batch()

    def next_token(self) -> None:
        self._close()
        self._unit *= self._growth
        if self._unit > 1e100:
            for model in self._layers.values():
                model.decayed /= self._unit
                model.decayed_total /= self._unit
            self._unit = 1.0

    def victim(self, pinned: Collection[Key] = ()) -> Key:
        group = self._group
        if group is None or group[0] is not pinned or group[1] != self._accesses:
            group = self._group = (pinned, self._accesses, self._orders(pinned))
        orders: dict[int, list[tuple[float, int]]] = group[2]
        for layer in self._dirty:  # other layers: cached until they change
            model = self._layers[layer]
            if model.forecast is None:
                model.forecast = model.predict(model.previous, self.mix)
            found = _cheapest(model.resident, model.forecast, ())
            if found is None:
                self._cheapest.pop(layer, None)
            else:
                self._cheapest[layer] = found
        self._dirty.clear()
        best: tuple[float, int, int] | None = None
        for layer, (chance, expert) in self._cheapest.items():
            chance *= self.own_layer
            if layer not in orders and (best is None or chance < best[0]):
                best = (chance, layer, expert)
        for layer, order in orders.items():
            resident = self._layers[layer].resident
            while order and order[-1][1] not in resident:
                order.pop()
            if order and (best is None or order[-1][0] < best[0]):
                best = (order[-1][0], layer, order[-1][1])
        if best is None:
            raise LookupError("every resident expert is pinned; the cache is too small")
        if best[1] in orders:
            orders[best[1]].pop()
        return self._key(best[1], best[2])

    def _orders(self, pinned: Collection[Key]) -> dict[int, list[tuple[float, int]]]:
        """For each layer being served, its other residents, likeliest first: the forecast
        comes from the token it serves now."""
        by_layer: dict[int, list[int]] = {}
        for key in pinned:
            layer, expert = self._split(key)
            by_layer.setdefault(layer, []).append(expert)
        if self._open is not None and self._open not in by_layer:
            self._close()  # serving another layer: the open one is done for this token
        orders = {}
        for layer, held in by_layer.items():
            model = self._layers.get(layer)
            if model is not None:
                if max(held) >= model.size:  # pinned before its first access
                    model.grow(max(held))
                    self._dirty.add(layer)
                forecast = model.predict(held, self.mix)
                orders[layer] = sorted(
                    ((forecast[e], e) for e in model.resident if e not in held), reverse=True
                )
        return orders

    def _key(self, layer: int, expert: int) -> Key:
        return expert if self._plain_keys else (layer, expert)


def _cheapest(
    resident: set[int], forecast: list[float], pinned: Collection[int]
) -> tuple[float, int] | None:
    best = None
    for expert in resident:
        if expert not in pinned and (best is None or forecast[expert] < best[0]):
            best = (forecast[expert], expert)
    return best


# The learned policy subclasses ``Policy``: imported once everything above is defined
# (``mlx_pager/paging/__init__.py`` imports this module first, whichever is asked for).
from .learned import LearnedUse  # noqa: E402

POLICIES: dict[str, type[Policy]] = {
    "lru": LRU,
    "lfu": LFU,
    "slru": SLRU,
    "lfu-decay": DecayedLFU,
    "predict": PredictedUse,
    "learned": LearnedUse,
}
# The best measured on replayed traces (scripts/bench_policies.py).
DEFAULT_POLICY = "predict"


def make_policy(name: str) -> Policy:
    try:
        return POLICIES[name]()
    except KeyError:
        raise ValueError(
            f"Unknown cache policy {name!r}; choose one of {', '.join(POLICIES)}."
        ) from None
