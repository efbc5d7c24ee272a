"""A cache policy learned from routing traces: evict the resident expert a small linear
model rates least likely to be needed at its layer within the next few tokens.

Each time a layer is served, it scores every expert of that layer from what the layer
did so far: how recently each expert was used (one-hot bins), how often (frequency at
five decay rates, and over the whole run), and what tends to follow the experts just
chosen (this layer's transitions from the current set and from the previous one, and
from the previous layer's current set). Probabilities enter as lifts over the expert's
own base rate, so one set of weights serves models of any size. The weights were fitted
offline (``mlx_pager/sim/learn.py``, ``scripts/train_policy.py``) on the training half of
the shared DeepSeek-V2-Lite trace and ship as ``learned_policy.json``.

A layer's scores are computed once per service, from its state before that service is
learned, and kept until it is served again: with one cache for all layers, other layers'
residents compete by the scores of their last service, plus a learned term for how soon
their layer comes round again. The arithmetic is plain IEEE operations in a fixed order
(``ln`` is a short series, not the platform's log), so the compiled replay
(``mlx_pager/sim/learned_replay.py``) reproduces every score bit for bit.
"""

from __future__ import annotations

import json
from collections.abc import Collection
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from .policies import Key, Policy

PARAMS_FILE = Path(__file__).with_name("learned_policy.json")
# recency r (services since last use) -> bin: 0 (in the set being served), 1, 2, 3, 4-5,
# 6-8, 9-16, 17-32, 33 and more (or never)
RECENCY_EDGES = np.array([1, 2, 3, 4, 6, 9, 17, 33])
HALF_LIVES = (2.0, 8.0, 32.0, 128.0, 512.0)  # services
FEATURES = (
    *(f"recency_{i}" for i in range(9)),
    *(f"rate_{int(h)}" for h in HALF_LIVES),
    "popularity",
    "follows_current",
    "follows_current_mean",
    "follows_previous",
    "follows_layer_above",
    "turn",
    "bias",
)
NEVER = -(2**40)
LN2 = 0.6931471805599453
RESCALE = 1e100  # decay units are divided out past this
# Lifts multiplied before one log: a lift lies between 1 / (uses + 1) and 2 x (services + 1),
# so 8 of them stay inside float64's range for any run shorter than 10^30 services.
CHUNK = 8
FOLLOWS, FOLLOWS2, BELOW = 0, 1, 2  # kinds of transition counts
_NONE = np.zeros(0, np.int64)


def ln(x: np.ndarray) -> np.ndarray:
    """Natural log of positive normal ``x`` to about 1e-6: the exponent and mantissa read
    from the bits (``frexp``'s, exactly; numpy's ``frexp`` is slow), then the atanh
    series. Only exact IEEE operations in a fixed order, so compiled code gets the same
    bits (numpy's SIMD log and the C library's differ in the last place)."""
    bits = x.view(np.int64)
    mantissa = ((bits & MANTISSA) | ONE).view(np.float64)  # in [1, 2): 2 x frexp's
    z = mantissa - 1.0
    s = z / (z + 2.0)
    s2 = s * s
    p = (((s2 * (1.0 / 9.0) + 1.0 / 7.0) * s2 + 1.0 / 5.0) * s2 + 1.0 / 3.0) * s2 + 1.0
    return ((bits >> 52) - 1023).astype(np.float64) * LN2 + 2.0 * s * p


MANTISSA = np.int64((1 << 52) - 1)
ONE = np.int64(1023 << 52)


@dataclass(frozen=True)
class Params:
    """The fitted weights, one per feature (``FEATURES``), and where they came from."""

    weights: np.ndarray
    source: str = ""

    @property
    def recency(self) -> np.ndarray:
        return self.weights[:9]


def load_params(path: str | Path = PARAMS_FILE) -> Params:
    data = json.loads(Path(path).read_text())
    if tuple(data["features"]) != FEATURES:
        raise ValueError(f"{path}: features {data['features']} are not this policy's {FEATURES}")
    return Params(np.asarray(data["weights"], np.float64), data.get("source", ""))


def save_params(path: str | Path, weights: np.ndarray, source: str, **extra) -> None:
    data = {"features": list(FEATURES), "weights": [float(w) for w in weights]}
    Path(path).write_text(json.dumps({**data, "source": source, **extra}, indent=1) + "\n")


class LayerState:
    """What the policy knows of one layer, grown as expert ids appear."""

    def __init__(self, size: int = 64) -> None:
        self.size = size
        self.services = 0
        self.requests = 0  # experts over all services (their mean is the layer's top-k)
        self.last = np.full(size, NEVER, np.int64)  # service of last use
        self.pop = np.zeros(size)  # services that used each expert
        self.decayed = np.zeros((len(HALF_LIVES), size))  # uses, weighted by ``unit``
        self.total = np.zeros(len(HALF_LIVES))  # services, the same way
        self.unit = np.ones(len(HALF_LIVES))  # grows each service instead of decaying all
        self.growth = 2.0 ** (1.0 / np.array(HALF_LIVES))
        # Transition counts [kind, a, b], and how often a had a successor [kind, a]; kinds:
        # FOLLOWS (b used one service after a), FOLLOWS2 (two services after; applied to
        # the latest set, it speaks of the service after the coming one), BELOW (a at the
        # layer above, b here one token later).
        self.trans = np.zeros((3, size, size))
        self.trans_seen = np.zeros((3, size))
        self.latest = np.zeros(0, np.int64)  # the set of the last service
        self.previous = np.zeros(0, np.int64)  # and of the one before
        self.scores = np.zeros(size)  # from the last service (``scored``)
        self.scored: np.ndarray | None = None  # the set those scores were computed for
        self.resident = np.zeros(size, bool)

    def grow(self, expert: int) -> None:
        pad = max(self.size, expert + 1 - self.size)
        self.size += pad
        self.last = np.pad(self.last, (0, pad), constant_values=NEVER)
        for name in ("pop", "scores", "resident"):
            setattr(self, name, np.pad(getattr(self, name), (0, pad)))
        for name in ("decayed", "trans_seen"):
            setattr(self, name, np.pad(getattr(self, name), ((0, 0), (0, pad))))
        self.trans = np.pad(self.trans, ((0, 0), (0, pad), (0, pad)))

    def score(
        self, now: np.ndarray, above: np.ndarray | None, params: Params, cols: np.ndarray
    ) -> np.ndarray:
        """The scores of experts ``cols`` for a service of the set ``now`` (sorted,
        distinct), from the state before it; ``above``: the layer above's latest set.

        A set's mean log lift is taken as the log of products of up to ``CHUNK`` lifts
        (one log per chunk, not per expert in the set: the replay's cost is its logs)."""
        w = params.weights
        r = self.services - self.last[cols]
        serving = np.zeros(self.size, bool)
        serving[now] = True
        r[serving[cols]] = 0
        base = (self.pop[cols] + 0.5) / (self.services + 1.0)
        inv_base = 1.0 / base
        k_mean = max(self.requests / max(self.services, 1), 1.0)
        seen = max(int(np.count_nonzero(self.pop)), 1)
        inv_total = 1.0 / np.maximum(self.total, 1e-300)
        # Every lift at once (one gather), then each set's products of up to CHUNK rows,
        # row after row as the replay multiplies them, and one ``ln`` for all of it.
        sets = (now, self.latest, _NONE if above is None else above)  # FOLLOWS, FOLLOWS2, BELOW
        sizes = [len(x) for x in sets]
        kinds = np.repeat([FOLLOWS, FOLLOWS2, BELOW], sizes)
        rows = np.concatenate(sets)
        inv_seen = 1.0 / (self.trans_seen[kinds, rows] + 1.0)
        lift = (self.trans[kinds[:, None], rows[:, None], cols] + base) * inv_seen[:, None]
        lift = lift * inv_base
        chunks, owner, start = [], [], 0
        for index, n in enumerate(sizes):
            for first in range(start, start + n, CHUNK):
                last = min(first + CHUNK, start + n)
                chunks.append(np.multiply.accumulate(lift[first:last], axis=0)[-1])
                owner.append(index)
            start += n
        rates = self.decayed[:, cols] * inv_total[:, None] * inv_base + 0.01
        popularity = base * (seen / k_mean)
        logs = ln(np.concatenate([rates, popularity[None], *[c[None] for c in chunks]]))
        # The sum, in this order (the compiled replay adds in the same one): recency, each
        # rate's log, popularity's, each set's summed log lift times its weight over the
        # set's size, the summed lift of the current set the same way, then the bias.
        s = params.recency[np.searchsorted(RECENCY_EDGES, r, side="right")]
        for h in range(len(HALF_LIVES)):
            s = s + w[9 + h] * logs[h]
        s = s + w[14] * logs[len(HALF_LIVES)]
        chunk_logs = logs[len(HALF_LIVES) + 1 :]
        for index, feature in enumerate((15, 17, 18)):
            if sizes[index]:
                total = 0.0
                for j in (j for j, o in enumerate(owner) if o == index):
                    total = total + chunk_logs[j]
                s = s + (w[feature] / sizes[index]) * total
        lifts = np.add.accumulate(lift[: sizes[0]], axis=0)[-1]  # row after row, as replayed
        s = s + (w[16] / len(now)) * lifts
        return s + w[20]

    def learn(self, now: np.ndarray, above_previous: np.ndarray | None) -> None:
        """The service of ``now`` happened: every count and decay moves on."""
        self.last[now] = self.services
        self.pop[now] += 1.0
        self.requests += len(now)
        self.services += 1
        self.decayed[:, now] += self.unit[:, None]
        self.total += self.unit
        self.unit *= self.growth
        if (self.unit > RESCALE).any():
            for h in np.flatnonzero(self.unit > RESCALE):
                self.decayed[h] /= self.unit[h]
                self.total[h] /= self.unit[h]
                self.unit[h] = 1.0
        sets = (self.latest, self.previous, _NONE if above_previous is None else above_previous)
        kinds = np.repeat([FOLLOWS, FOLLOWS2, BELOW], [len(x) for x in sets])
        rows = np.concatenate(sets)
        self.trans[kinds[:, None], rows[:, None], now] += 1.0  # distinct: one addition each
        self.trans_seen[kinds, rows] += 1.0
        self.previous, self.latest = self.latest, now


_DEFAULT: Params | None = None


def default_params() -> Params:
    """The shipped weights, read once."""
    global _DEFAULT
    if _DEFAULT is None:
        _DEFAULT = load_params()
    return _DEFAULT


class LearnedUse(Policy):
    """Evict the resident expert with the lowest learned score (see the module's doc).

    Keys are ``(layer, expert)``, or bare expert ids for one layer. A layer's service is
    the requests between two other layers' (or a token boundary); its scores are
    computed when a victim is first needed during it, or when it closes. ``turn``: with
    one cache for all layers, a resident of a layer whose turn comes sooner is worth
    more; the served layer's turn is a whole token away.
    """

    name = "learned"

    def __init__(self, params: Params | None = None) -> None:
        self.params = params or default_params()
        self._layers: dict[int, LayerState] = {}
        self._open: int | None = None  # the layer being served
        self._open_set: dict[int, None] = {}  # its experts so far, in order
        self._layer_count = 0
        self._last_served = 0
        self._plain_keys = False
        self._least = np.zeros(0)  # per layer: lowest score among its residents
        self._least_expert = np.zeros(0, np.int64)
        self._dirty: set[int] = set()  # layers whose least must be found again
        self._version = 0  # anything but a removal since: a fetch's victim orders are stale
        self._group: tuple | None = None  # (pinned, version, bias, orders) of one fetch
        self._bias: dict[tuple[int, int], np.ndarray] = {}  # (served, layers) -> turn term

    def _split(self, key: Key) -> tuple[int, int]:
        if isinstance(key, tuple):
            return key
        self._plain_keys = True
        return 0, key

    def _key(self, layer: int, expert: int) -> Key:
        return expert if self._plain_keys else (layer, expert)

    def _layer(self, layer: int, expert: int) -> LayerState:
        state = self._layers.get(layer)
        if state is None:
            state = self._layers[layer] = LayerState()
            if layer >= self._layer_count:
                grow = layer + 1 - self._layer_count
                self._least = np.concatenate([self._least, np.full(grow, np.inf)])
                self._least_expert = np.concatenate([self._least_expert, np.full(grow, -1)])
                self._layer_count = layer + 1
        if expert >= state.size:
            state.grow(expert)
        return state

    def _serve(self, layer: int) -> None:
        self._version += 1
        if layer != self._open:
            self._close()
            self._open = layer

    def access(self, key: Key, weight: float = 1.0) -> None:
        layer, expert = self._split(key)
        self._serve(layer)
        state = self._layer(layer, expert)
        self._open_set[expert] = None
        if not state.resident[expert]:
            state.resident[expert] = True
            self._dirty.add(layer)

    def access_layer(self, layer: int, experts: np.ndarray, requests: np.ndarray | None) -> None:
        """All of one layer's experts at once (weights and counts are not features)."""
        self._serve(layer)
        ids = experts.tolist()
        state = self._layer(layer, max(ids, default=0))
        self._open_set.update(dict.fromkeys(ids))
        if not state.resident[experts].all():
            state.resident[experts] = True
            self._dirty.add(layer)

    def admit(self, key: Key) -> None:
        """Resident, ranked as the layer's last service would rank it now; nothing is
        learned."""
        self._version += 1
        layer, expert = self._split(key)
        state = self._layer(layer, expert)
        if not state.resident[expert]:
            state.resident[expert] = True
            self._dirty.add(layer)
            if state.services:
                above = self._above(layer)
                latest = None if above is None else above.latest
                if above is not None:
                    self._layer(layer, above.size - 1)
                cols = np.array([expert])
                state.scores[expert] = state.score(state.latest, latest, self.params, cols)[0]

    def remove(self, key: Key) -> None:
        layer, expert = self._split(key)
        state = self._layers.get(layer)
        if state is not None and expert < state.size and state.resident[expert]:
            state.resident[expert] = False
            self._dirty.add(layer)

    def next_token(self) -> None:
        self._version += 1
        self._close()

    def _above(self, layer: int) -> LayerState | None:
        return self._layers.get(layer - 1)

    def _scored(self, layer: int, now: np.ndarray) -> LayerState:
        """The layer's scores for a service of ``now``, computed once."""
        state = self._layers[layer]
        if state.scored is None or not np.array_equal(state.scored, now):
            above = self._above(layer)
            if above is not None:  # its experts index this layer's ``below`` rows
                self._layer(layer, above.size - 1)
            wanted = state.resident.copy()
            wanted[now] = True
            cols = np.flatnonzero(wanted)  # what can be evicted before the next service
            latest = None if above is None else above.latest
            state.scores[cols] = state.score(now, latest, self.params, cols)
            state.scored = now
            self._dirty.add(layer)
        return state

    def _close(self) -> None:
        if self._open is None:
            return
        layer, self._open = self._open, None
        now = np.array(sorted(self._open_set), np.int64)
        self._open_set = {}
        if not len(now):
            return
        state = self._scored(layer, now)
        above = self._above(layer)
        state.learn(now, None if above is None else above.previous)
        state.scored = None  # the scores stay, for the other layers' evictions
        self._last_served = layer

    def _refresh(self) -> None:
        for layer in self._dirty:
            state = self._layers[layer]
            masked = np.where(state.resident, state.scores, np.inf)
            i = int(np.argmin(masked))
            self._least[layer] = masked[i]
            self._least_expert[layer] = i if masked[i] < np.inf else -1
        self._dirty.clear()

    def victim(self, pinned: Collection[Key] = ()) -> Key:
        group = self._group
        if group is None or group[0] is not pinned or group[1] != self._version:
            group = self._group = (pinned, self._version, *self._prepare(pinned))
        _, _, bias, orders = group
        self._refresh()
        values = self._least + bias
        for layer, order in orders.items():  # layers with pinned experts: their own order
            state = self._layers[layer]
            while order and not state.resident[order[-1]]:
                order.pop()
            values[layer] = state.scores[order[-1]] + bias[layer] if order else np.inf
        layer = int(np.argmin(values))
        expert = orders[layer][-1] if layer in orders and orders[layer] else None
        if expert is None:
            expert = int(self._least_expert[layer])
        if values[layer] == np.inf or expert < 0:
            raise LookupError("every resident expert is pinned; the cache is too small")
        return self._key(layer, expert)

    def _prepare(self, pinned: Collection[Key]) -> tuple[np.ndarray, dict[int, list[int]]]:
        """For the victims of one fetch: each layer's turn bias, and for the layers with
        pinned experts their other residents, last out first (lowest score, then expert)."""
        by_layer: dict[int, list[int]] = {}
        for key in pinned:
            layer, expert = self._split(key)
            by_layer.setdefault(layer, []).append(expert)
        served = None
        if len(by_layer) == 1:  # a layer being served: its scores for the pinned set
            served, held = next(iter(by_layer.items()))
            if served != self._open:
                self._close()
            self._layer(served, max(held))
            self._scored(served, np.array(sorted(set(held)), np.int64))
        turn = served if served is not None else self._last_served
        count = self._layer_count
        bias = self._bias.get((turn, count))
        if bias is None:
            steps = ((np.arange(count) - turn - 1) % count + 1) / count  # to each layer's turn
            bias = self._bias[turn, count] = self.params.weights[19] * steps
        orders = {}
        for layer, held in by_layer.items():
            state = self._layers.get(layer)
            if state is not None:
                free = state.resident.copy()
                free[[e for e in held if e < state.size]] = False
                candidates = np.flatnonzero(free)
                ranked = candidates[np.lexsort((candidates, state.scores[candidates]))]
                orders[layer] = ranked[::-1].tolist()
        return bias, orders
