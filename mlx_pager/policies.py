"""Eviction policies for the expert cache, shared by the live engine and the trace simulator.

A policy only ranks keys; the cache owns the slots. Keys are ``(layer, expert)`` pairs.
The cache calls ``access`` for every request (hit or miss, after a miss is loaded),
``remove`` when it evicts, and ``victim`` to choose what to evict; ``pinned`` keys (the
experts the current computation needs) are never chosen. ``next_token`` marks token
boundaries for policies that age by tokens rather than by requests.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Collection, Hashable

Key = Hashable


class Policy:
    name = "base"

    def access(self, key: Key, weight: float = 1.0) -> None:
        raise NotImplementedError

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


POLICIES: dict[str, type[Policy]] = {"lru": LRU}


def make_policy(name: str) -> Policy:
    try:
        return POLICIES[name]()
    except KeyError:
        raise ValueError(
            f"Unknown cache policy {name!r}; choose one of {', '.join(POLICIES)}."
        ) from None
