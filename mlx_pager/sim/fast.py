"""Compiled replays: every policy and Belady, hit for hit the same as ``replay_reference``.

The Python replay drives the policy objects one request at a time (minutes per policy on
a trace of 100k tokens); these loops run the same rules compiled with numba. Each
policy's ranking is kept as the key it evicts by: LRU the last access, LFU (requests,
last access), lfu-decay (faded weight, key), Belady (next use, key), SLRU two segments
in access order, so the victim is the least key among the unpinned residents: a scan
of the served layer's residents, against each other layer's least (cached) when one
cache serves all layers. ``predict`` is transcribed line by line, floating-point
operations in the same order, and visits sets in CPython's order (``pyset``) where its
ties depend on it. ``tests/test_fast_replay.py`` checks every policy in both modes.
"""

from __future__ import annotations

import numpy as np
from numba import njit

from . import pyset


@njit(cache=True)
def _pinned(key, row) -> bool:
    for k in row:
        if k == key:
            return True
    return False


@njit(cache=True)
def _missed(row, resident, out) -> int:
    """This request group's distinct non-resident keys, in order, into ``out``."""
    n = 0
    for key in row:
        if key < 0 or resident[key]:
            continue
        seen = False
        for j in range(n):
            if out[j] == key:
                seen = True
        if not seen:
            out[n] = key
            n += 1
    return n


# -- LRU, LFU, lfu-decay, Belady: evict the least (primary, secondary) ---------------------
#
# Residents are kept per layer in a dense list; with one cache for all layers, each
# layer's least resident is cached, so a victim is the served layer's least unpinned
# resident against 25 cached ones. Scores change only on access (and all at once when
# lfu-decay rescales), so only the served layer and a victim's layer are rescanned.

LRU, LFU, DECAY, BELADY = 0, 1, 2, 3


@njit(cache=True)
def _least(members, n, pa, pb, pin, skip) -> int:
    """The least of ``members[:n]`` by (pa, pb), skipping keys ``pin`` marks if ``skip``."""
    best = -1
    for j in range(n):
        key = members[j]
        if skip and pin[key]:
            continue
        if best < 0 or pa[key] < pa[best] or (pa[key] == pa[best] and pb[key] < pb[best]):
            best = key
    return best


@njit(cache=True)
def _evict(layer_of, members, n_members, index, key) -> None:
    d = layer_of[key]
    i = index[key]
    last = members[d, n_members[d] - 1]
    members[d, i] = last
    index[last] = i
    n_members[d] -= 1
    index[key] = -1


@njit(cache=True, nogil=True, error_model="numpy")
def _ranked(keys, weights, nxt, n_experts, shared, limit, kind, growth, split):
    T, L, K = keys.shape
    n_keys = L * n_experts
    layer_of = np.arange(n_keys) // n_experts
    members = np.empty((L, n_experts), np.int64)
    n_members = np.zeros(L, np.int64)
    index = np.full(n_keys, -1, np.int64)
    least = np.full(L, -1, np.int64)  # shared: each layer's least resident
    pin = np.zeros(n_keys, np.bool_)
    pa = np.zeros(n_keys)
    pb = np.zeros(n_keys, np.int64)
    history = np.zeros(n_keys)  # LFU: requests; lfu-decay: faded weight (kept when evicted)
    missed = np.empty(K, np.int64)
    resident = np.zeros(n_keys, np.bool_)
    count = 0
    clock = 0
    unit = 1.0
    hits = misses = 0
    held = np.zeros(2, np.int64)
    for t in range(T):
        if t == split:
            held[0], held[1] = hits, misses
        for layer in range(L):
            row = keys[t, layer]
            m = _missed(row, resident, missed)
            want = 0
            for key in row:
                if key >= 0:
                    want += 1
                    pin[key] = True
            misses += m
            hits += want - m
            used = count if shared else n_members[layer]
            for _ in range(used + m - limit):
                victim = _least(members[layer], n_members[layer], pa, pb, pin, True)
                if shared:
                    for d in range(L):
                        other = least[d]
                        if d == layer or other < 0:
                            continue
                        if (
                            victim < 0
                            or pa[other] < pa[victim]
                            or (pa[other] == pa[victim] and pb[other] < pb[victim])
                        ):
                            victim = other
                _evict(layer_of, members, n_members, index, victim)
                resident[victim] = False
                count -= 1
                d = layer_of[victim]
                if shared and d != layer:
                    least[d] = _least(members[d], n_members[d], pa, pb, pin, False)
            for j in range(m):
                key = missed[j]
                resident[key] = True
                index[key] = n_members[layer]
                members[layer, n_members[layer]] = key
                n_members[layer] += 1
                count += 1
            for k in range(K):
                key = row[k]
                if key < 0:
                    continue
                pin[key] = False
                if kind == LRU:
                    clock += 1
                    pa[key] = clock
                elif kind == LFU:
                    clock += 1
                    history[key] += 1
                    pa[key], pb[key] = history[key], clock
                elif kind == DECAY:
                    history[key] = history[key] + weights[t, layer, k] * unit
                    pa[key], pb[key] = history[key], key
                else:
                    pa[key], pb[key] = -nxt[t, layer, k], key
            if shared:
                least[layer] = _least(members[layer], n_members[layer], pa, pb, pin, False)
        if kind == DECAY:
            unit *= growth
            if unit > 1e100:  # as DecayedLFU.next_token: every count rescaled
                scale = 1.0 / unit
                unit = 1.0
                for key in range(n_keys):
                    history[key] = history[key] * scale
                    pa[key] = history[key]
                if shared:
                    for d in range(L):
                        least[d] = _least(members[d], n_members[d], pa, pb, pin, False)
    if split < 0 or split >= T:
        held[0], held[1] = hits, misses
    return hits, misses, held[0], held[1]


@njit(cache=True)
def next_uses(keys, n_keys):
    """``replay.next_uses`` in one backward pass: each request's next step (t * L + l)."""
    T, L, K = keys.shape
    out = np.empty_like(keys)
    last = np.full(n_keys, T * L, np.int64)
    for t in range(T - 1, -1, -1):
        for layer in range(L - 1, -1, -1):
            for k in range(K):
                key = keys[t, layer, k]
                out[t, layer, k] = last[key] if key >= 0 else T * L
            for k in range(K):
                key = keys[t, layer, k]
                if key >= 0:
                    last[key] = t * L + layer
    return out


# -- SLRU: probation and protected segments, each in access order --------------------------


@njit(cache=True)
def _oldest(members, n, stamp, segment, which, pin, skip) -> int:
    best = -1
    for j in range(n):
        key = members[j]
        if segment[key] != which or (skip and pin[key]):
            continue
        if best < 0 or stamp[key] < stamp[best]:
            best = key
    return best


@njit(cache=True, nogil=True, error_model="numpy")
def _slru(keys, n_experts, shared, limit, share, split):
    T, L, K = keys.shape
    n_keys = L * n_experts
    layer_of = np.arange(n_keys) // n_experts
    members = np.empty((L, n_experts), np.int64)
    n_members = np.zeros(L, np.int64)
    index = np.full(n_keys, -1, np.int64)
    segment = np.zeros(n_keys, np.int64)  # 0: not resident, 1: probation, 2: protected
    n_segment = np.zeros((L, 3), np.int64)  # per group (layer, or row 0 when shared)
    stamp = np.zeros(n_keys, np.int64)
    oldest = np.full((L, 3), -1, np.int64)  # shared: each layer's oldest per segment
    pin = np.zeros(n_keys, np.bool_)
    missed = np.empty(K, np.int64)
    resident = np.zeros(n_keys, np.bool_)
    clock = 0
    hits = misses = 0
    held = np.zeros(2, np.int64)
    for t in range(T):
        if t == split:
            held[0], held[1] = hits, misses
        for layer in range(L):
            g = 0 if shared else layer
            row = keys[t, layer]
            m = _missed(row, resident, missed)
            want = 0
            for key in row:
                if key >= 0:
                    want += 1
                    pin[key] = True
            misses += m
            hits += want - m
            used = n_segment[g, 1] + n_segment[g, 2]
            for _ in range(used + m - limit):
                victim = -1
                for which in (1, 2):
                    victim = _oldest(members[layer], n_members[layer], stamp, segment, which,
                                     pin, True)  # fmt: skip
                    if shared:
                        for d in range(L):
                            other = oldest[d, which]
                            if (
                                d != layer
                                and other >= 0
                                and (victim < 0 or stamp[other] < stamp[victim])
                            ):
                                victim = other
                    if victim >= 0:
                        break
                _evict(layer_of, members, n_members, index, victim)
                resident[victim] = False
                n_segment[g, segment[victim]] -= 1
                segment[victim] = 0
                d = layer_of[victim]
                if shared and d != layer:
                    for which in (1, 2):
                        oldest[d, which] = _oldest(members[d], n_members[d], stamp, segment,
                                                   which, pin, False)  # fmt: skip
            for j in range(m):
                key = missed[j]
                resident[key] = True
                index[key] = n_members[layer]
                members[layer, n_members[layer]] = key
                n_members[layer] += 1
            for key in row:
                if key < 0:
                    continue
                pin[key] = False
                clock += 1
                if segment[key] == 2:  # to the protected end
                    stamp[key] = clock
                elif segment[key] == 0:  # new: probation's end
                    segment[key] = 1
                    n_segment[g, 1] += 1
                    stamp[key] = clock
                else:  # a second request: protected
                    segment[key] = 2
                    n_segment[g, 1] -= 1
                    n_segment[g, 2] += 1
                    stamp[key] = clock
                    room = max(1, int(share * (n_segment[g, 1] + n_segment[g, 2])))
                    while n_segment[g, 2] > room:
                        demoted = _oldest(members[layer], n_members[layer], stamp, segment, 2,
                                          pin, False)  # fmt: skip
                        if shared:
                            for d in range(L):
                                other = oldest[d, 2]
                                if (
                                    d != layer
                                    and other >= 0
                                    and (demoted < 0 or stamp[other] < stamp[demoted])
                                ):
                                    demoted = other
                        segment[demoted] = 1
                        n_segment[g, 2] -= 1
                        n_segment[g, 1] += 1
                        clock += 1
                        stamp[demoted] = clock
                        d = layer_of[demoted]
                        if shared and d != layer:
                            for which in (1, 2):
                                oldest[d, which] = _oldest(members[d], n_members[d], stamp,
                                                           segment, which, pin, False)  # fmt: skip
            if shared:
                for which in (1, 2):
                    oldest[layer, which] = _oldest(members[layer], n_members[layer], stamp,
                                                   segment, which, pin, False)  # fmt: skip
    if split < 0 or split >= T:
        held[0], held[1] = hits, misses
    return hits, misses, held[0], held[1]


# -- predict (PredictedUse), transcribed -----------------------------------------------------


@njit(cache=True, error_model="numpy")  # no zero-division branch: loops vectorise
def _forecast(out, follows, seen, decayed, total, basis, n_basis, mix) -> None:
    """``_LayerModel.predict``: numpy's row sum (in ``basis`` order), then the mix. A row
    of ``chance`` is ``follows / seen`` whenever either changes, so it is divided here."""
    n = max(n_basis, 1)
    size = out.shape[0]
    out[:] = 0.0
    for j in range(n_basis):
        b = basis[j]
        if seen[b] == 0:
            continue  # a row never updated: zeros
        for e in range(size):
            c = follows[b, e] / seen[b]
            out[e] = c if j == 0 else out[e] + c
    if total <= 0:
        for e in range(size):
            out[e] = out[e] / n
        return
    c = (1.0 - mix) * n / total
    if n_basis == 0:
        for e in range(size):
            out[e] = decayed[e] * c
        return
    w = mix / n
    for e in range(size):
        out[e] = out[e] * w + decayed[e] * c


@njit(cache=True)
def _finish(layer, follows, seen, current, n_current, previous, n_previous, valid):
    """``_LayerModel.finish_token``; False if the layer had no requests this token."""
    n = n_current[layer]
    if n == 0:
        return False
    cur = np.empty(n, np.int64)
    m = 0
    for j in range(n):
        e = current[layer, j]
        dup = False
        for i in range(m):
            if cur[i] == e:
                dup = True
        if not dup:
            cur[m] = e
            m += 1
    p = n_previous[layer]
    if p > 0:
        for i in range(p):
            a = previous[layer, i]
            for j in range(m):
                follows[layer, a, cur[j]] += 1.0
            seen[layer, a] += 1.0
    previous[layer, :m] = cur[:m]
    n_previous[layer] = m
    n_current[layer] = 0
    valid[layer] = False
    return True


@njit(cache=True, nogil=True, error_model="numpy")
def _predict(keys, weights, tuple_hash, n_experts, shared, limit, mix, growth, own, split):
    T, L, K = keys.shape
    E = n_experts
    follows = np.zeros((L, E, E))
    seen = np.zeros((L, E))
    decayed = np.zeros((L, E))
    total = np.zeros(L)
    exists = np.zeros(L, np.bool_)
    current = np.empty((L, 4 * K + 1), np.int64)
    n_current = np.zeros(L, np.int64)
    previous = np.empty((L, 4 * K + 1), np.int64)
    n_previous = np.zeros(L, np.int64)
    forecast = np.zeros((L, E))
    valid = np.zeros(L, np.bool_)
    served = np.zeros(E)
    resident = np.zeros((L, E), np.bool_)
    count = 0
    model_resident = np.zeros((L, E), np.bool_)  # PredictedUse's own view
    counts = np.zeros(L, np.int64)
    # shared mode only: one policy for all layers, its sets and its dict of cheapest
    res_keys, res_hashes, res_meta = pyset.new_sets(L, E)
    dirty_keys, dirty_hashes, dirty_meta = pyset.new_sets(1, L)
    cheap_value = np.zeros(L)
    cheap_expert = np.zeros(L, np.int64)
    cheap_seq = np.full(L, -1, np.int64)
    seq = 0
    pin_keys, pin_hashes, pin_meta = pyset.new_sets(1, K)
    held_experts = np.empty(K, np.int64)
    missed = np.empty(K, np.int64)
    units = np.ones(L)  # per-layer mode: each layer's policy has its own (equal) unit
    unit = 1.0
    open_layer = -1  # shared mode; per layer, each policy's open layer is its own or none
    open_of = np.zeros(L, np.bool_)
    hits = misses = 0
    held = np.zeros(2, np.int64)
    for t in range(T):
        if t == split:
            held[0], held[1] = hits, misses
        for layer in range(L):
            row = keys[t, layer]
            m = _missed(row, resident[layer], missed)
            want = 0
            for e in row:
                if e >= 0:
                    want += 1
            misses += m
            hits += want - m
            over = (count if shared else counts[layer]) + m - limit
            if over > 0:
                # _orders: the pinned set's order, then close the open layer
                pyset.clear(pin_keys[0], pin_hashes[0], pin_meta[0])
                for e in row:
                    if e >= 0:
                        pyset.add(pin_keys[0], pin_hashes[0], pin_meta[0], e, tuple_hash[layer, e])
                n_held = 0
                for j in range(pin_meta[0, 0] + 1):
                    if pin_keys[0, j] >= 0:
                        held_experts[n_held] = pin_keys[0, j]
                        n_held += 1
                if shared:
                    if open_layer >= 0 and open_layer != layer:
                        _finish(open_layer, follows, seen, current, n_current,
                                previous, n_previous, valid)  # fmt: skip
                        pyset.add(dirty_keys[0], dirty_hashes[0], dirty_meta[0], open_layer,
                                  np.uint64(open_layer))  # fmt: skip
                        open_layer = -1
                in_orders = exists[layer]
                if in_orders:
                    _forecast(served, follows[layer], seen[layer], decayed[layer], total[layer],
                              held_experts, n_held, mix)  # fmt: skip
                for _ in range(over):
                    if shared:  # refresh the cheapest resident of each changed layer
                        for slot in range(dirty_meta[0, 0] + 1):
                            d = dirty_keys[0, slot]
                            if d < 0:
                                continue
                            if not valid[d]:
                                _forecast(forecast[d], follows[d], seen[d], decayed[d], total[d],
                                          previous[d], n_previous[d], mix)  # fmt: skip
                                valid[d] = True
                            best_e = -1
                            best_v = 0.0
                            for slot_e in range(res_meta[d, 0] + 1):
                                e = res_keys[d, slot_e]
                                if e < 0:
                                    continue
                                if best_e < 0 or forecast[d, e] < best_v:
                                    best_e, best_v = e, forecast[d, e]
                            if best_e < 0:
                                cheap_seq[d] = -1
                            else:
                                if cheap_seq[d] < 0:
                                    cheap_seq[d] = seq
                                    seq += 1
                                cheap_value[d], cheap_expert[d] = best_v, best_e
                        pyset.clear(dirty_keys[0], dirty_hashes[0], dirty_meta[0])
                    best_layer = -1
                    best_e = -1
                    best_v = 0.0
                    best_seq = 0
                    if shared:
                        for d in range(L):
                            if cheap_seq[d] < 0 or (d == layer and in_orders):
                                continue
                            v = cheap_value[d] * own
                            if (best_layer < 0 or v < best_v
                                    or (v == best_v and cheap_seq[d] < best_seq)):  # fmt: skip
                                best_layer, best_e, best_v, best_seq = (
                                    d,
                                    cheap_expert[d],
                                    v,
                                    cheap_seq[d],
                                )
                    if in_orders:
                        own_e = -1
                        own_v = 0.0
                        for e in range(E):
                            if not resident[layer, e] or _pinned(e, row):
                                continue
                            if own_e < 0 or served[e] < own_v:
                                own_e, own_v = e, served[e]
                        if own_e >= 0 and (best_layer < 0 or own_v < best_v):
                            best_layer, best_e = layer, own_e
                    if best_layer < 0:
                        raise LookupError("every resident expert is pinned")
                    resident[best_layer, best_e] = False
                    model_resident[best_layer, best_e] = False
                    if shared:
                        count -= 1
                        pyset.discard(res_keys[best_layer], res_hashes[best_layer],
                                      res_meta[best_layer], best_e, np.uint64(best_e))  # fmt: skip
                        pyset.add(dirty_keys[0], dirty_hashes[0], dirty_meta[0], best_layer,
                                  np.uint64(best_layer))  # fmt: skip
                    else:
                        counts[layer] -= 1
            for j in range(m):
                resident[layer, missed[j]] = True
            if shared:
                count += m
            else:
                counts[layer] += m
            # access, in request order
            u = unit if shared else units[layer]
            for k in range(K):
                e = row[k]
                if e < 0:
                    continue
                if shared and open_layer != layer:
                    if open_layer >= 0:
                        _finish(open_layer, follows, seen, current, n_current,
                                previous, n_previous, valid)  # fmt: skip
                        pyset.add(dirty_keys[0], dirty_hashes[0], dirty_meta[0], open_layer,
                                  np.uint64(open_layer))  # fmt: skip
                    open_layer = layer
                if not shared:
                    open_of[layer] = True
                exists[layer] = True
                current[layer, n_current[layer]] = e
                n_current[layer] += 1
                decayed[layer, e] += weights[t, layer, k] * u
                total[layer] += weights[t, layer, k] * u
                if not model_resident[layer, e]:
                    model_resident[layer, e] = True
                    if shared:
                        pyset.add(res_keys[layer], res_hashes[layer], res_meta[layer], e,
                                  np.uint64(e))  # fmt: skip
                        pyset.add(dirty_keys[0], dirty_hashes[0], dirty_meta[0], layer,
                                  np.uint64(layer))  # fmt: skip
        # next_token
        if shared:
            if open_layer >= 0:
                _finish(open_layer, follows, seen, current, n_current, previous,
                        n_previous, valid)  # fmt: skip
                pyset.add(dirty_keys[0], dirty_hashes[0], dirty_meta[0], open_layer,
                          np.uint64(open_layer))  # fmt: skip
                open_layer = -1
            unit *= growth
            if unit > 1e100:
                for d in range(L):
                    if exists[d]:
                        for e in range(E):
                            decayed[d, e] = decayed[d, e] / unit
                        total[d] = total[d] / unit
                unit = 1.0
        else:
            for d in range(L):
                if open_of[d]:
                    _finish(d, follows, seen, current, n_current, previous,
                            n_previous, valid)  # fmt: skip
                    open_of[d] = False
                units[d] *= growth
                if units[d] > 1e100:
                    if exists[d]:
                        for e in range(E):
                            decayed[d, e] = decayed[d, e] / units[d]
                        total[d] = total[d] / units[d]
                    units[d] = 1.0
    if split < 0 or split >= T:
        held[0], held[1] = hits, misses
    return hits, misses, held[0], held[1]
