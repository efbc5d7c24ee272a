"""Compiled replays: every policy and Belady, hit for hit the same as ``replay_reference``.

The Python replay drives the policy objects one request at a time (minutes per policy on
a trace of 100k tokens); these loops run the same rules compiled with numba. Each
policy's ranking is kept as the key it evicts by: LRU the last access, LFU (requests,
last access), lfu-decay (faded weight, key), Belady (next use, key), SLRU two segments
in access order, so the victim is the least key among the unpinned residents, taken
from an indexed min-heap. ``predict`` is transcribed line by line, floating-point
operations in the same order, and visits sets in CPython's order (``pyset``) where its
ties depend on it. ``tests/test_fast_replay.py`` checks every policy in both modes.
"""

from __future__ import annotations

import numpy as np
from numba import njit

from . import pyset

# -- an indexed min-heap per group, ordered by (primary, secondary) -----------------------


@njit(cache=True)
def _less(pa, pb, x, y) -> bool:
    return pa[x] < pa[y] or (pa[x] == pa[y] and pb[x] < pb[y])


@njit(cache=True)
def _up(heap, pos, pa, pb, i) -> None:
    key = heap[i]
    while i > 0:
        parent = (i - 1) >> 1
        other = heap[parent]
        if not _less(pa, pb, key, other):
            break
        heap[i] = other
        pos[other] = i
        i = parent
    heap[i] = key
    pos[key] = i


@njit(cache=True)
def _down(heap, n, pos, pa, pb, i) -> None:
    key = heap[i]
    while True:
        child = 2 * i + 1
        if child >= n:
            break
        if child + 1 < n and _less(pa, pb, heap[child + 1], heap[child]):
            child += 1
        if not _less(pa, pb, heap[child], key):
            break
        heap[i] = heap[child]
        pos[heap[i]] = i
        i = child
    heap[i] = key
    pos[key] = i


@njit(cache=True)
def _push(heap, size, g, pos, pa, pb, key) -> None:
    n = size[g]
    heap[g, n] = key
    size[g] = n + 1
    _up(heap[g], pos, pa, pb, n)


@njit(cache=True)
def _drop(heap, size, g, pos, pa, pb, key) -> None:
    i = pos[key]
    n = size[g] - 1
    size[g] = n
    pos[key] = -1
    if i == n:
        return
    last = heap[g, n]
    heap[g, i] = last
    pos[last] = i
    _up(heap[g], pos, pa, pb, i)
    _down(heap[g], n, pos, pa, pb, pos[last])


@njit(cache=True)
def _pinned(key, row) -> bool:
    for k in row:
        if k == key:
            return True
    return False


@njit(cache=True)
def _least_unpinned(heap, size, g, pos, pa, pb, row, stash) -> int:
    """The least key of group ``g``'s heap not in ``row``, or -1; the heap is unchanged."""
    found = -1
    n = 0
    while size[g] > 0:
        key = heap[g, 0]
        if not _pinned(key, row):
            found = key
            break
        _drop(heap, size, g, pos, pa, pb, key)
        stash[n] = key
        n += 1
    for j in range(n):
        _push(heap, size, g, pos, pa, pb, stash[j])
    return found


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

LRU, LFU, DECAY, BELADY = 0, 1, 2, 3


@njit(cache=True)
def _ranked(keys, weights, nxt, n_keys, groups, n_groups, limit, kind, growth, split):
    T, L, K = keys.shape
    resident = np.zeros(n_keys, np.bool_)
    count = np.zeros(n_groups, np.int64)
    heap = np.empty((n_groups, limit + K + 1), np.int64)
    size = np.zeros(n_groups, np.int64)
    pos = np.full(n_keys, -1, np.int64)
    pa = np.zeros(n_keys)
    pb = np.zeros(n_keys, np.int64)
    history = np.zeros(n_keys)  # LFU: requests; lfu-decay: faded weight (kept when evicted)
    missed = np.empty(K, np.int64)
    stash = np.empty(K, np.int64)
    clock = 0
    unit = 1.0
    hits = misses = 0
    held = np.zeros(2, np.int64)
    for t in range(T):
        if t == split:
            held[0], held[1] = hits, misses
        for layer in range(L):
            g = groups[layer]
            row = keys[t, layer]
            m = _missed(row, resident, missed)
            want = 0
            for key in row:
                if key >= 0:
                    want += 1
            misses += m
            hits += want - m
            over = count[g] + m - limit
            for _ in range(over):
                victim = _least_unpinned(heap, size, g, pos, pa, pb, row, stash)
                _drop(heap, size, g, pos, pa, pb, victim)
                resident[victim] = False
                count[g] -= 1
            for j in range(m):
                resident[missed[j]] = True
                count[g] += 1
            for k in range(K):
                key = row[k]
                if key < 0:
                    continue
                if pos[key] >= 0:
                    _drop(heap, size, g, pos, pa, pb, key)
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
                _push(heap, size, g, pos, pa, pb, key)
        if kind == DECAY:
            unit *= growth
            if unit > 1e100:  # as DecayedLFU.next_token: every count rescaled, order kept
                scale = 1.0 / unit
                unit = 1.0
                for key in range(n_keys):
                    history[key] = history[key] * scale
                    if pos[key] >= 0:
                        pa[key] = history[key]
                for g in range(n_groups):
                    members = heap[g, : size[g]].copy()
                    size[g] = 0
                    for key in members:
                        _push(heap, size, g, pos, pa, pb, key)
    if split < 0 or split >= T:
        held[0], held[1] = hits, misses
    return hits, misses, held[0], held[1]


# -- SLRU: probation and protected segments, each in access order --------------------------


@njit(cache=True)
def _slru(keys, n_keys, groups, n_groups, limit, share, split):
    T, L, K = keys.shape
    resident = np.zeros(n_keys, np.bool_)
    count = np.zeros(n_groups, np.int64)
    cap = limit + K + 1
    prob, prot = np.empty((n_groups, cap), np.int64), np.empty((n_groups, cap), np.int64)
    n_prob, n_prot = np.zeros(n_groups, np.int64), np.zeros(n_groups, np.int64)
    pos_prob, pos_prot = np.full(n_keys, -1, np.int64), np.full(n_keys, -1, np.int64)
    stamp = np.zeros(n_keys)
    ties = np.zeros(n_keys, np.int64)
    missed = np.empty(K, np.int64)
    stash = np.empty(K, np.int64)
    clock = 0
    hits = misses = 0
    held = np.zeros(2, np.int64)
    for t in range(T):
        if t == split:
            held[0], held[1] = hits, misses
        for layer in range(L):
            g = groups[layer]
            row = keys[t, layer]
            m = _missed(row, resident, missed)
            want = 0
            for key in row:
                if key >= 0:
                    want += 1
            misses += m
            hits += want - m
            for _ in range(count[g] + m - limit):
                victim = _least_unpinned(prob, n_prob, g, pos_prob, stamp, ties, row, stash)
                if victim >= 0:
                    _drop(prob, n_prob, g, pos_prob, stamp, ties, victim)
                else:
                    victim = _least_unpinned(prot, n_prot, g, pos_prot, stamp, ties, row, stash)
                    _drop(prot, n_prot, g, pos_prot, stamp, ties, victim)
                resident[victim] = False
                count[g] -= 1
            for j in range(m):
                resident[missed[j]] = True
                count[g] += 1
            for key in row:
                if key < 0:
                    continue
                clock += 1
                if pos_prot[key] >= 0:  # move to the protected end
                    _drop(prot, n_prot, g, pos_prot, stamp, ties, key)
                    stamp[key] = clock
                    _push(prot, n_prot, g, pos_prot, stamp, ties, key)
                elif pos_prob[key] < 0:  # new: probation's end
                    stamp[key] = clock
                    _push(prob, n_prob, g, pos_prob, stamp, ties, key)
                else:  # a second request: protected
                    _drop(prob, n_prob, g, pos_prob, stamp, ties, key)
                    stamp[key] = clock
                    _push(prot, n_prot, g, pos_prot, stamp, ties, key)
                    room = max(1, int(share * (n_prob[g] + n_prot[g])))
                    while n_prot[g] > room:
                        demoted = prot[g, 0]
                        _drop(prot, n_prot, g, pos_prot, stamp, ties, demoted)
                        clock += 1
                        stamp[demoted] = clock
                        _push(prob, n_prob, g, pos_prob, stamp, ties, demoted)
    if split < 0 or split >= T:
        held[0], held[1] = hits, misses
    return hits, misses, held[0], held[1]


# -- predict (PredictedUse), transcribed -----------------------------------------------------


@njit(cache=True)
def _forecast(out, chance, decayed, total, basis, n_basis, mix) -> None:
    """``_LayerModel.predict``: numpy's row sum (in ``basis`` order), then the mix."""
    n = max(n_basis, 1)
    size = out.shape[0]
    out[:] = 0.0
    if n_basis > 0:
        out[:] = chance[basis[0]]
        for j in range(1, n_basis):
            for e in range(size):
                out[e] = out[e] + chance[basis[j], e]
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
def _finish(layer, follows, seen, chance, current, n_current, previous, n_previous, valid):
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
        for i in range(p):
            a = previous[layer, i]
            for e in range(follows.shape[2]):
                chance[layer, a, e] = follows[layer, a, e] / seen[layer, a]
    previous[layer, :m] = cur[:m]
    n_previous[layer] = m
    n_current[layer] = 0
    valid[layer] = False
    return True


@njit(cache=True)
def _predict(keys, weights, tuple_hash, n_experts, shared, limit, mix, growth, own, split):
    T, L, K = keys.shape
    E = n_experts
    follows = np.zeros((L, E, E))
    seen = np.zeros((L, E))
    chance = np.zeros((L, E, E))
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
                        _finish(open_layer, follows, seen, chance, current, n_current,
                                previous, n_previous, valid)  # fmt: skip
                        pyset.add(dirty_keys[0], dirty_hashes[0], dirty_meta[0], open_layer,
                                  np.uint64(open_layer))  # fmt: skip
                        open_layer = -1
                in_orders = exists[layer]
                if in_orders:
                    _forecast(served, chance[layer], decayed[layer], total[layer],
                              held_experts, n_held, mix)  # fmt: skip
                for _ in range(over):
                    if shared:  # refresh the cheapest resident of each changed layer
                        for d in pyset.members(dirty_keys[0], dirty_meta[0]):
                            if not valid[d]:
                                _forecast(forecast[d], chance[d], decayed[d], total[d],
                                          previous[d], n_previous[d], mix)  # fmt: skip
                                valid[d] = True
                            best_e = -1
                            best_v = 0.0
                            for e in pyset.members(res_keys[d], res_meta[d]):
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
                        _finish(open_layer, follows, seen, chance, current, n_current,
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
                _finish(open_layer, follows, seen, chance, current, n_current, previous,
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
                    _finish(d, follows, seen, chance, current, n_current, previous,
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
