"""The learned policy (``mlx_pager/paging/learned.py``) replayed compiled, hit for hit.

``LearnedUse`` is transcribed here operation for operation: the same features, the same
additions in the same order, the same ``ln`` series, the same ties (lowest score, then
lowest layer, then lowest expert). Two differences that change no decision: a layer's
state is learned as soon as its service ends (the policy learns it when the next layer
starts, and nothing reads it in between), and scores are computed only for the experts
that can be evicted before the layer's next service (its residents and the set served).

The same loop records training samples for ``mlx_pager/sim/learn.py``: at some eviction
events, every candidate's features and how many tokens until its layer uses it again.
"""

from __future__ import annotations

import numpy as np
from llvmlite import ir
from numba import njit, types
from numba.extending import intrinsic

from ..paging.learned import (
    CHUNK,
    FEATURES,
    HALF_LIVES,
    LN2,
    MANTISSA,
    NEVER,
    ONE,
    RECENCY_EDGES,
    RESCALE,
    LayerState,
)
from .fast import _missed

NF = len(FEATURES)
H = len(HALF_LIVES)
GROWTH = LayerState(1).growth  # numpy's powers, passed in (the compiled pow may round apart)


@intrinsic
def _bits(typingctx, x):
    """A float64's bits as an int64 (numpy's ``view``), compiled to nothing."""

    def codegen(context, builder, signature, args):
        return builder.bitcast(args[0], ir.IntType(64))

    return types.int64(types.float64), codegen


@intrinsic
def _float(typingctx, i):
    """An int64's bits as a float64."""

    def codegen(context, builder, signature, args):
        return builder.bitcast(args[0], ir.DoubleType())

    return types.float64(types.int64), codegen


@njit(cache=True, inline="always")
def ln(x: float) -> float:
    """``learned.ln`` for one number: the same operations in the same order (no call, so
    loops of it vectorise)."""
    bits = _bits(x)
    z = _float((bits & MANTISSA) | ONE) - 1.0
    s = z / (z + 2.0)
    s2 = s * s
    p = (((s2 * (1.0 / 9.0) + 1.0 / 7.0) * s2 + 1.0 / 5.0) * s2 + 1.0 / 3.0) * s2 + 1.0
    return float((bits >> 52) - 1023) * LN2 + 2.0 * s * p


@njit(cache=True, inline="always")
def _dense_set(s, base, inv_base, trans, layer, rows, n, inv_seen, weight, product, logs,
               lifts) -> None:  # fmt: skip
    """``_set_logs`` for every expert of the layer at once, its weighted sum added to
    ``s``; with ``lifts`` (not empty), the summed lifts into it."""
    E = s.shape[0]
    logs[:] = 0.0
    product[:] = 1.0
    for j in range(n):
        row = trans[layer, rows[j]]
        iv = inv_seen[j]
        for e in range(E):
            lift = (row[e] + base[e]) * iv * inv_base[e]
            product[e] = product[e] * lift
        if len(lifts):
            for e in range(E):
                lifts[e] = lifts[e] + (row[e] + base[e]) * iv * inv_base[e]
        if j % CHUNK == CHUNK - 1 or j == n - 1:
            for e in range(E):
                logs[e] = logs[e] + ln(product[e])
                product[e] = 1.0
    c = weight / n
    for e in range(E):
        s[e] = s[e] + c * logs[e]


@njit(cache=True, inline="always")
def _score_layer(out, w, layer, in_now, now, n_now, prev, n_prev, above, n_above, inv, popular,
                 st, tmp) -> None:  # fmt: skip
    """``_score`` of every expert of the layer at once, into ``out``: the same operations
    per expert, in loops over experts that compile to vector instructions."""
    (services, requests, last, pop, dec, tot, follows, fseen, follows2, f2seen, below,
     bseen, seen_count, edges) = st  # fmt: skip
    E = out.shape[0]
    base, inv_base, product, logs, lifts = tmp[0], tmp[1], tmp[2], tmp[3], tmp[4]
    n_served = services[layer] + 1.0
    for e in range(E):
        r = 0 if in_now[e] else services[layer] - last[layer, e]
        b = 0
        for edge in edges:
            if r >= edge:
                b += 1
        out[e] = w[b]
        base[e] = (pop[layer, e] + 0.5) / n_served
        inv_base[e] = 1.0 / base[e]
    for h in range(H):
        row = dec[layer, h]
        c = inv[3, h]
        for e in range(E):
            out[e] = out[e] + w[9 + h] * ln(row[e] * c * inv_base[e] + 0.01)
    for e in range(E):
        out[e] = out[e] + w[14] * ln(base[e] * popular)
    lifts[:] = 0.0
    _dense_set(out, base, inv_base, follows, layer, now, n_now, inv[0], w[15], product, logs,
               lifts)  # fmt: skip
    if n_prev:
        _dense_set(out, base, inv_base, follows2, layer, prev, n_prev, inv[1], w[17], product,
                   logs, lifts[:0])  # fmt: skip
    if n_above:
        _dense_set(out, base, inv_base, below, layer, above, n_above, inv[2], w[18], product,
                   logs, lifts[:0])  # fmt: skip
    c = w[16] / n_now
    for e in range(E):
        out[e] = out[e] + c * lifts[e] + w[20]


@njit(cache=True, inline="always")
def _set_logs(x, slot, base, inv_base, rows, n, inv_seen, trans, layer, e, mean):
    """A set's summed log lift (``LayerState.score``: products of up to ``CHUNK`` lifts,
    one log each) into ``x[slot]`` as its mean; with ``mean``, its summed lift into
    ``x[16]`` too."""
    logs = 0.0
    product = 1.0
    lifts = 0.0
    for j in range(n):
        lift = (trans[layer, rows[j], e] + base) * inv_seen[j] * inv_base
        if mean:
            lifts = lifts + lift
        product = product * lift
        if j % CHUNK == CHUNK - 1 or j == n - 1:
            logs = logs + ln(product)
            product = 1.0
    x[slot] = logs / n
    if mean:
        x[16] = lifts / n
    return logs, lifts


@njit(cache=True, inline="always")
def _score(x, w, e, layer, in_now, now, n_now, prev, n_prev, above, n_above, inv, popular,
           st) -> float:  # fmt: skip
    """``LayerState.score`` of expert ``e``, its operations in the same order; its
    features (the means of the log rows) into ``x``, for training. ``inv``: the inverses
    the service shares (each set's seen counts, the layer's decayed totals);
    ``popular``: seen experts over the mean set size."""
    (services, requests, last, pop, dec, tot, follows, fseen, follows2, f2seen, below,
     bseen, seen_count, edges) = st  # fmt: skip
    x[:] = 0.0
    r = 0 if in_now[e] else services[layer] - last[layer, e]
    b = 0
    for edge in edges:
        if r >= edge:
            b += 1
    x[b] = 1.0
    s = w[b]
    base = (pop[layer, e] + 0.5) / (services[layer] + 1.0)
    inv_base = 1.0 / base
    for h in range(H):
        v = ln(dec[layer, h, e] * inv[3, h] * inv_base + 0.01)
        x[9 + h] = v
        s = s + w[9 + h] * v
    v = ln(base * popular)
    x[14] = v
    s = s + w[14] * v
    logs, lifts = _set_logs(x, 15, base, inv_base, now, n_now, inv[0], follows, layer, e, True)
    s = s + (w[15] / n_now) * logs
    if n_prev:
        logs, _ = _set_logs(x, 17, base, inv_base, prev, n_prev, inv[1], follows2, layer, e,
                            False)  # fmt: skip
        s = s + (w[17] / n_prev) * logs
    if n_above:
        logs, _ = _set_logs(x, 18, base, inv_base, above, n_above, inv[2], below, layer, e,
                            False)  # fmt: skip
        s = s + (w[18] / n_above) * logs
    s = s + (w[16] / n_now) * lifts
    x[20] = 1.0
    return s + w[20]


@njit(cache=True, inline="always")
def _shared_inverses(inv, layer, now, n_now, prev, n_prev, above, n_above, st) -> float:
    """What every candidate's score of one service divides by, inverted once (``inv``
    rows: the current, previous and above sets' seen counts, the decayed totals); returns
    the popularity factor, seen experts over the mean set size."""
    (services, requests, last, pop, dec, tot, follows, fseen, follows2, f2seen, below,
     bseen, seen_count, edges) = st  # fmt: skip
    for j in range(n_now):
        inv[0, j] = 1.0 / (fseen[layer, now[j]] + 1.0)
    for j in range(n_prev):
        inv[1, j] = 1.0 / (f2seen[layer, prev[j]] + 1.0)
    for j in range(n_above):
        inv[2, j] = 1.0 / (bseen[layer, above[j]] + 1.0)
    for h in range(H):
        inv[3, h] = 1.0 / max(tot[layer, h], 1e-300)
    k_mean = max(requests[layer] / max(services[layer], 1), 1.0)
    return max(seen_count[layer], 1) / k_mean


@njit(cache=True)
def _least(scores, resident, E):
    best = -1
    for e in range(E):
        if resident[e] and (best < 0 or scores[e] < scores[best]):
            best = e
    return best


@njit(cache=True)
def _next_use(uses, starts, cursor, key, after):
    """The first token after ``after`` that uses ``key`` (``uses`` sorted per key)."""
    i = cursor[key]
    end = starts[key + 1]
    while i < end and uses[i] <= after:
        i += 1
    cursor[key] = i
    return uses[i] if i < end else 1 << 40


# error_model="numpy": no zero-division branch (no divisor here can be zero), so the
# loops over a layer's experts compile to vector instructions.
@njit(cache=True, nogil=True, error_model="numpy")
def run(ids, n_experts, w, growth, shared, limit, split, sample_every, seed, uses, starts):
    """Hits and misses of ``LearnedUse`` (per-layer caches of ``limit``, or one of
    ``limit`` for all layers when ``shared``), counted also from token ``split`` on; and,
    when ``sample_every`` > 0, the features of every candidate at one eviction in about
    ``sample_every`` before ``split`` (the served layer's) with the tokens until its next
    use (``uses``/``starts``: each (layer, expert)'s tokens, sorted)."""
    T, L, K = ids.shape
    E = n_experts
    services = np.zeros(L, np.int64)
    requests = np.zeros(L, np.int64)
    last = np.full((L, E), NEVER, np.int64)
    pop = np.zeros((L, E))
    seen_count = np.zeros(L, np.int64)
    dec = np.zeros((L, H, E))
    tot = np.zeros((L, H))
    unit = np.ones((L, H))
    follows = np.zeros((L, E, E))
    fseen = np.zeros((L, E))
    follows2 = np.zeros((L, E, E))
    f2seen = np.zeros((L, E))
    below = np.zeros((L, E, E))
    bseen = np.zeros((L, E))
    latest = np.zeros((L, K), np.int64)
    n_latest = np.zeros(L, np.int64)
    previous = np.zeros((L, K), np.int64)
    n_previous = np.zeros(L, np.int64)
    scores = np.zeros((L, E))
    resident = np.zeros((L, E), np.bool_)
    count = np.zeros(L, np.int64)
    total = 0
    created = np.zeros(L, np.bool_)
    layer_count = 0
    least = np.full(L, -1, np.int64)
    dirty = np.zeros(L, np.bool_)
    st = (services, requests, last, pop, dec, tot, follows, fseen, follows2, f2seen, below,
          bseen, seen_count, RECENCY_EDGES)  # fmt: skip
    x = np.zeros(NF)
    inv = np.zeros((4, max(K, H)))
    tmp = np.zeros((5, E))
    now = np.zeros(K, np.int64)
    in_now = np.zeros(E, np.bool_)
    missed = np.zeros(K, np.int64)
    empty = np.zeros(0, np.int64)
    cap = 1
    if sample_every > 0:
        cap = min(split * L * min(limit, E) // sample_every + 1000, 4_000_000)
    X = np.zeros((cap, NF), np.float32)
    Y = np.zeros(cap, np.float32)
    cursor = starts[:-1].copy() if sample_every > 0 else np.zeros(0, np.int64)
    n_samples = 0
    np.random.seed(seed)
    hits = misses = 0
    held = np.zeros(2, np.int64)
    for t in range(T):
        if t == split:
            held[0], held[1] = hits, misses
        for layer in range(L):
            row = ids[t, layer]
            n_now = 0  # the distinct experts, sorted
            want = 0
            for k in range(K):
                e = row[k]
                if e < 0:
                    continue
                want += 1
                dup = False
                for j in range(n_now):
                    if now[j] == e:
                        dup = True
                if not dup:
                    now[n_now] = e
                    n_now += 1
            if n_now == 0:
                continue
            now[:n_now].sort()
            m = _missed(row, resident[layer], missed)  # the misses, in request order
            misses += m
            hits += want - m
            created[layer] = True
            layer_count = max(layer_count, layer + 1)
            # this service's scores, from the state before it
            has_above = shared and layer > 0 and created[layer - 1] and n_latest[layer - 1] > 0
            above = latest[layer - 1, : n_latest[layer - 1]] if has_above else empty
            prev = latest[layer, : n_latest[layer]]
            sample = (sample_every > 0 and t < split and n_samples < cap
                      and (count[layer] if not shared else total) + m > limit
                      and np.random.randint(sample_every) == 0)  # fmt: skip
            for j in range(n_now):
                in_now[now[j]] = True
            over = (total if shared else count[layer]) + m - limit
            if sample:  # one candidate at a time, its features kept
                popular = _shared_inverses(inv, layer, now, n_now, prev, len(prev), above,
                                           len(above), st)  # fmt: skip
                for e in range(E):
                    if not (resident[layer, e] or in_now[e]):
                        continue
                    scores[layer, e] = _score(x, w, e, layer, in_now, now, n_now, prev,
                                              len(prev), above, len(above), inv, popular,
                                              st)  # fmt: skip
                    if resident[layer, e] and not in_now[e] and n_samples < cap:
                        X[n_samples] = x
                        X[n_samples, 19] = 0.0  # the turn is the same for every candidate
                        Y[n_samples] = _next_use(uses, starts, cursor, layer * E + e, t) - t
                        n_samples += 1
            elif shared or over > 0:
                # With one cache for all layers every resident's score may be read later;
                # with one per layer, only when this service evicts. Every expert's is
                # computed (the same bits; only residents' and the set's are ever read).
                popular = _shared_inverses(inv, layer, now, n_now, prev, len(prev), above,
                                           len(above), st)  # fmt: skip
                _score_layer(scores[layer], w, layer, in_now, now, n_now, prev, len(prev),
                             above, len(above), inv, popular, st, tmp)  # fmt: skip
            dirty[layer] = True
            for _ in range(over):
                best = -1  # the served layer: its least resident not being served
                for e in range(E):
                    if resident[layer, e] and not in_now[e]:
                        if best < 0 or scores[layer, e] < scores[layer, best]:
                            best = e
                victim_layer, victim = layer, best
                if shared:
                    best_value = 0.0
                    victim_layer = -1
                    for d in range(layer_count):
                        bias = w[19] * (((d - layer - 1) % layer_count + 1) / float(layer_count))
                        if d == layer:
                            e = best
                        else:
                            if dirty[d]:
                                least[d] = _least(scores[d], resident[d], E)
                                dirty[d] = False
                            e = least[d]
                        if e < 0:
                            continue
                        value = scores[d, e] + bias
                        if victim_layer < 0 or value < best_value:
                            victim_layer, victim, best_value = d, e, value
                if victim_layer < 0 or victim < 0:
                    raise LookupError("every resident expert is pinned")
                resident[victim_layer, victim] = False
                count[victim_layer] -= 1
                total -= 1
                dirty[victim_layer] = True
            for j in range(m):
                resident[layer, missed[j]] = True
            count[layer] += m
            total += m
            for j in range(n_now):
                in_now[now[j]] = False
            # the service is learned (``LayerState.learn``)
            n = services[layer]
            for j in range(n_now):
                e = now[j]
                last[layer, e] = n
                if pop[layer, e] == 0.0:
                    seen_count[layer] += 1
                pop[layer, e] += 1.0
            requests[layer] += n_now
            services[layer] += 1
            for h in range(H):
                u = unit[layer, h]
                for j in range(n_now):
                    dec[layer, h, now[j]] += u
                tot[layer, h] += u
                unit[layer, h] = u * growth[h]
                if unit[layer, h] > RESCALE:
                    u = unit[layer, h]
                    for e in range(E):
                        dec[layer, h, e] /= u
                    tot[layer, h] /= u
                    unit[layer, h] = 1.0
            for i in range(n_latest[layer]):
                a = latest[layer, i]
                for j in range(n_now):
                    follows[layer, a, now[j]] += 1.0
                fseen[layer, a] += 1.0
            for i in range(n_previous[layer]):
                a = previous[layer, i]
                for j in range(n_now):
                    follows2[layer, a, now[j]] += 1.0
                f2seen[layer, a] += 1.0
            if shared and layer > 0 and created[layer - 1]:
                for i in range(n_previous[layer - 1]):
                    a = previous[layer - 1, i]
                    for j in range(n_now):
                        below[layer, a, now[j]] += 1.0
                    bseen[layer, a] += 1.0
            n_previous[layer] = n_latest[layer]
            previous[layer, : n_latest[layer]] = latest[layer, : n_latest[layer]]
            n_latest[layer] = n_now
            latest[layer, :n_now] = now[:n_now]
    if split < 0 or split >= T:
        held[0], held[1] = hits, misses
    return hits, misses, held[0], held[1], X[:n_samples], Y[:n_samples]


def uses_of(ids: np.ndarray, n_experts: int) -> tuple[np.ndarray, np.ndarray]:
    """Each (layer, expert)'s tokens, sorted, as one array and its row starts."""
    T, L, K = ids.shape
    t = np.broadcast_to(np.arange(T)[:, None, None], ids.shape)
    key = np.where(ids >= 0, ids + n_experts * np.arange(L)[:, None], -1)
    valid = key >= 0
    key, t = key[valid], t[valid]
    order = np.lexsort((t, key))
    key, t = key[order], t[order]
    keep = np.r_[True, (key[1:] != key[:-1]) | (t[1:] != t[:-1])]
    key, t = key[keep], t[keep]
    starts = np.searchsorted(key, np.arange(L * n_experts + 1))
    return t.astype(np.int64), starts.astype(np.int64)
