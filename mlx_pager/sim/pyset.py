"""CPython's set table, in arrays, for compiled replays that must visit keys in a set's order.

``PredictedUse`` breaks ties between equal forecasts by the order in which it iterates
Python sets (``set(want)``, a layer's residents, the layers to refresh). A compiled replay
that is to hit and miss exactly as the Python one must visit keys in that same order: the
slot order of CPython's open-addressing table (Objects/setobject.c: linear probes of 9,
then perturbed jumps; a dummy marks a discarded key; the table grows to hold four times
the keys once it is three fifths full; ``clear`` returns to the 8-slot table).
``tests/test_fast_replay.py`` checks this against real sets.

A set is three arrays: ``keys`` (``EMPTY``, ``DUMMY`` or the key), ``hashes`` (uint64,
the key's Python hash) and ``meta`` (mask, fill, used); ``capacity(n)`` slots hold ``n``.
"""

from __future__ import annotations

import numpy as np
from numba import njit

EMPTY = -1
DUMMY = -2
LINEAR_PROBES = 9
PERTURB_SHIFT = 5
MIN_SIZE = 8


@njit(cache=True)
def capacity(n: int) -> int:
    """Slots enough for a set that holds at most ``n`` keys at once."""
    size = MIN_SIZE
    while size <= 4 * n + MIN_SIZE:
        size <<= 1
    return size


@njit(cache=True)
def new_sets(count: int, n: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """``count`` empty sets of up to ``n`` keys."""
    size = capacity(n)
    keys = np.full((count, size), EMPTY, np.int64)
    meta = np.zeros((count, 3), np.int64)
    meta[:, 0] = MIN_SIZE - 1
    return keys, np.zeros((count, size), np.uint64), meta


@njit(cache=True)
def clear(keys, hashes, meta) -> None:
    keys[:] = EMPTY
    meta[0], meta[1], meta[2] = MIN_SIZE - 1, 0, 0


@njit(cache=True)
def _insert_clean(keys, hashes, mask, key, h) -> None:
    perturb = h
    i = h & np.uint64(mask)
    while True:
        j = np.int64(i)
        if keys[j] == EMPTY:
            keys[j], hashes[j] = key, h
            return
        if j + LINEAR_PROBES <= mask:
            for _ in range(LINEAR_PROBES):
                j += 1
                if keys[j] == EMPTY:
                    keys[j], hashes[j] = key, h
                    return
        perturb >>= np.uint64(PERTURB_SHIFT)
        i = (i * np.uint64(5) + np.uint64(1) + perturb) & np.uint64(mask)


@njit(cache=True)
def _resize(keys, hashes, meta, minused) -> None:
    size = MIN_SIZE
    while size <= minused:
        size <<= 1
    old_mask = meta[0]
    old_keys = keys[: old_mask + 1].copy()
    old_hashes = hashes[: old_mask + 1].copy()
    keys[:size] = EMPTY
    for j in range(old_mask + 1):
        if old_keys[j] >= 0:
            _insert_clean(keys, hashes, size - 1, old_keys[j], old_hashes[j])
    meta[0], meta[1] = size - 1, meta[2]


@njit(cache=True)
def add(keys, hashes, meta, key, h) -> None:
    """``set.add``: ``key`` (>= 0) with Python hash ``h``."""
    mask = meta[0]
    perturb = h
    i = h & np.uint64(mask)
    free = -1
    while True:
        j = np.int64(i)
        probes = LINEAR_PROBES if j + LINEAR_PROBES <= mask else 0
        while True:
            k = keys[j]
            if k == EMPTY:
                if free >= 0:
                    keys[free], hashes[free] = key, h
                    meta[2] += 1
                    return
                keys[j], hashes[j] = key, h
                meta[1] += 1
                meta[2] += 1
                if meta[1] * 5 >= mask * 3:
                    _resize(keys, hashes, meta, meta[2] * 2 if meta[2] > 50000 else meta[2] * 4)
                return
            if k == key:
                return
            if k == DUMMY:  # CPython 3.11 keeps the last dummy on the way
                free = j
            if probes == 0:
                break
            probes -= 1
            j += 1
        perturb >>= np.uint64(PERTURB_SHIFT)
        i = (i * np.uint64(5) + np.uint64(1) + perturb) & np.uint64(mask)


@njit(cache=True)
def discard(keys, hashes, meta, key, h) -> None:
    """``set.discard``."""
    mask = meta[0]
    perturb = h
    i = h & np.uint64(mask)
    while True:
        j = np.int64(i)
        probes = LINEAR_PROBES if j + LINEAR_PROBES <= mask else 0
        while True:
            k = keys[j]
            if k == EMPTY:
                return
            if k == key:
                keys[j] = DUMMY
                meta[2] -= 1
                return
            if probes == 0:
                break
            probes -= 1
            j += 1
        perturb >>= np.uint64(PERTURB_SHIFT)
        i = (i * np.uint64(5) + np.uint64(1) + perturb) & np.uint64(mask)


@njit(cache=True)
def members(keys, meta) -> np.ndarray:
    """The keys in iteration order."""
    out = np.empty(meta[2], np.int64)
    n = 0
    for j in range(meta[0] + 1):
        if keys[j] >= 0:
            out[n] = keys[j]
            n += 1
    return out
