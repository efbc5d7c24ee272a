"""Resident slots for routed experts, sized by the budget; a miss is read from disk.

One pool array per expert parameter (``gate_proj.weight``, ``gate_proj.scales``, ...) of
shape ``[slots, ...]`` is shared by every MoE layer, so hot layers can hold more experts
than cold ones. A hit costs nothing: the layer indexes the pool with the expert's slot.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor

import mlx.core as mx
import numpy as np

from ..storage.expert_map import NUMPY_DTYPES, ExpertMap, Piece
from ..storage.readers import Reader, widen_into
from .policies import Policy


def check_readable(expert_map: ExpertMap) -> None:
    """Refuse, at open, experts stored in a dtype the pager cannot page (FP8 checkpoints:
    mlx-lm dequantises them as it loads, the pager reads the bytes as stored)."""
    stored = {pc.dtype for layer in expert_map.pieces for ps in layer.values() for pc in ps}
    unreadable = sorted(stored - NUMPY_DTYPES.keys())
    if unreadable:
        raise ValueError(
            f"The routed experts are stored as {', '.join(unreadable)}, which mlx-pager "
            "cannot page. Convert the model first (`mlx_lm.convert --hf-path MODEL "
            "--mlx-path FOLDER -q`, or pick its mlx-community version) and open the result."
        )


def piece_to_mx(buf: np.ndarray, piece: Piece, shape: tuple[int, ...], dtype: mx.Dtype):
    """Bytes read from disk -> an MLX array of the pool's shape and dtype."""
    if piece.dtype not in NUMPY_DTYPES:
        raise ValueError(f"Expert tensors of dtype {piece.dtype} are not supported.")
    array = mx.array(buf.view(NUMPY_DTYPES[piece.dtype]).reshape(shape))
    if piece.dtype == "BF16":
        array = array.view(mx.bfloat16)
    return array if array.dtype == dtype else array.astype(dtype)


# Stored dtype -> pool dtype conversions the host does exactly (widening), besides a copy.
_WIDEN = {("BF16", np.float32), ("F16", np.float32)}


def host_views(pools: dict[str, mx.array]) -> dict[str, np.ndarray] | None:
    """Writable numpy views of the pools' own memory, or None where MLX's buffers cannot be
    written from the host. Checked, not assumed: a value written through each view must be
    what MLX then reads from the pool. With them a miss is read straight into its slot:
    no staging buffer, no copy into an MLX array, no graph to evaluate."""
    views = {}
    for name, pool in pools.items():
        # bfloat16 has no buffer format: write its bits through a uint16 view of the pool.
        source = pool.view(mx.uint16) if pool.dtype == mx.bfloat16 else pool
        try:
            mx.eval(source)
            view = np.asarray(memoryview(source))
        except (TypeError, ValueError, BufferError, RuntimeError):
            return None
        if not (view.flags.writeable and view.flags.c_contiguous and view.nbytes == pool.nbytes):
            return None
        first = view.reshape(-1)[:1]
        first[:] = 1
        written = mx.any(pool.reshape(-1)[:1] != 0).item()
        first[:] = 0
        cleared = not mx.any(pool.reshape(-1)[:1] != 0).item()
        if not (written and cleared):
            return None
        views[name] = view
    return views


def host_writable(pieces: dict[str, Piece], views: dict[str, np.ndarray]) -> bool:
    """Every parameter either has the pool's bytes on disk or widens exactly on the host."""
    for param, piece in pieces.items():
        stored = NUMPY_DTYPES.get(piece.dtype)
        target = views[param].dtype
        if stored is None:
            return False
        if np.dtype(stored) != target and (piece.dtype, target.type) not in _WIDEN:
            return False
    return True


class StoredFormat:
    """Slots that hold an expert as the checkpoint stores it (the default format)."""

    def __init__(
        self,
        params: list[str],
        shapes: dict[str, tuple[int, ...]],
        dtypes: dict[str, mx.Dtype],
        projections: dict,
    ):
        self.params = params
        self.shapes = shapes
        self.dtypes = dtypes
        self.projections = projections  # name -> paged_switch.Projection, for compute

    def layout(self) -> dict[str, tuple[tuple[int, ...], mx.Dtype]]:
        """Shape and dtype of one slot of each pool."""
        return {p: (self.shapes[p], self.dtypes[p]) for p in self.params}

    def write(
        self, pools: dict[str, mx.array], slot: int, pieces: dict[str, Piece], buffers: list
    ) -> None:
        """One expert's bytes into its slot of every pool."""
        for param, buf in zip(self.params, buffers, strict=True):
            pool = pools[param]
            pool[slot] = piece_to_mx(buf, pieces[param], self.shapes[param], pool.dtype)


# Requests queued for the policy before it is told them anyway: a few hundred layer
# calls, one batch every few dozen tokens.
QUEUE_LIMIT = 512
# Tokens whose hits' books may wait (``defer_hit``): written in one batch, a reply's
# stats behind by at most this many tokens until it ends (``write_hits``)
HIT_TOKENS = 16


class ExpertCache:
    """Slots and eviction. What a fetch found (hits, misses, time waited on reads) goes to
    ``on_fetch``; replies, phases and traces are the ``PagingRun``'s business. The slot
    format says what a slot holds: the expert as stored, or a low-bit copy (cold tier)."""

    def __init__(
        self,
        expert_map: ExpertMap,
        reader: Reader,
        slots: int,
        policy: Policy,
        slot_format: StoredFormat,
        staging_bytes: int = 16 * 2**20,
        on_fetch: Callable[[int, int, float], None] | None = None,
    ):
        if slots < 1:
            raise ValueError("The expert cache needs at least one slot.")
        check_readable(expert_map)
        self.map = expert_map
        self.reader = reader
        self.slots = slots
        self._policy = policy
        # Requests (layer, experts, requests) and token ends (an int) the policy has not
        # been told yet: told in order when a decision needs them (``policy``)
        self._queued: list = []
        self.format = slot_format
        self.projections = slot_format.projections
        self.staging_bytes = staging_bytes  # read buffers in flight, part of the headroom
        self.on_fetch = on_fetch
        self.pools = {
            name: mx.zeros((slots, *shape), dtype)
            for name, (shape, dtype) in slot_format.layout().items()
        }
        mx.eval(list(self.pools.values()))
        # Misses are read straight into their slots where the host can write MLX's memory
        # and the stored bytes are the slot's (or widen exactly); else through MLX arrays.
        self.views = host_views(self.pools) if isinstance(slot_format, StoredFormat) else None
        if self.views is not None and not host_writable(expert_map.expert_pieces(0, 0), self.views):
            self.views = None
        self.slot_of: dict[tuple[int, int], int] = {}
        self.key_in: list[tuple[int, int] | None] = [None] * slots
        # [layer, expert] -> slot, -1 when not resident: a hit is a numpy gather
        self.slot_table = np.full(
            (len(expert_map.layer_paths), expert_map.num_experts), -1, np.int32
        )
        self._device_rows: dict[int, mx.array] = {}  # layer -> its row for MLX, when asked
        self.free = list(range(slots - 1, -1, -1))
        self.prefetcher = None  # optional Prefetcher: guessed experts read ahead
        self.lock = threading.Lock()  # fetches and background preloads take turns
        # Read ahead into slots (prefill): key -> (slot, its read), not resident yet; and
        # keys read ahead, resident, not yet asked for (their first use counts as a miss).
        self.ahead: dict[tuple[int, int], tuple[int, Future]] = {}
        self.fresh: set[tuple[int, int]] = set()
        self.ahead_issued = self.ahead_used = 0
        self.reads_ahead = True  # benchmarks turn it off to measure what it buys
        self._ahead_pool: ThreadPoolExecutor | None = None
        # The last fetch, until the policy and on_fetch are told (fetch(record=False))
        self._unrecorded: tuple | None = None
        # Decode steps that found every expert resident, their books not written yet
        # (``defer_hit``), and the token ends between them (an int: tokens that ended);
        # ``on_hits(layers, routing)`` hears them when they are.
        self._hits: list[tuple[int, mx.array] | int] = []
        self._hit_tokens = 0  # token ends in _hits
        self.on_hits: Callable[[list[int], np.ndarray], None] | None = None
        # A computation that reads slots and may not have run yet (``hold``)
        self._pending: mx.array | None = None
        self._computing = 0.0  # this fetch's wait for MLX before writing slots, not reading

    @property
    def policy(self) -> Policy:
        """The eviction policy, told every request so far. A hit tells it nothing at once:
        requests wait in a queue and are told in order when a decision needs them (an
        eviction, an admission) or the queue is long. The same decisions; on the hit path
        the policy's code runs in batches instead of once per layer, cold each time."""
        self._tell()
        return self._policy

    @policy.setter
    def policy(self, policy: Policy) -> None:
        """A fresh policy learns nothing of the requests before it; hits still waiting are
        counted first."""
        self._write_hits()
        self._policy, self._queued = policy, []

    def _tell(self) -> None:
        self._write_hits()
        queued, self._queued = self._queued, []
        if queued:
            self._policy.tell(queued)

    @property
    def slot_bytes(self) -> int:
        return sum(int(a.nbytes) // self.slots for a in self.pools.values())

    def device_slots(self, layer: int, experts: mx.array) -> tuple[mx.array, mx.array]:
        """The slots of ``experts`` computed by MLX from the slot table as it is now, so a
        computation can be built on them before the host knows the experts, and whether
        they were all resident (an MLX boolean the host reads with the routing, instead of
        looking the experts up itself). An expert not resident gets slot 0: such a result
        is wrong, and thrown away."""
        row = self._device_rows.get(layer)
        if row is None:
            row = self._device_rows[layer] = mx.array(self.slot_table[layer])
        found = row[experts]
        return mx.maximum(found, 0), found.min() >= 0

    def all_resident(self, layer: int, experts: np.ndarray) -> bool:
        return bool(self.slot_table[layer][experts].min() >= 0)

    def resident(self, layer: int, expert: int) -> bool:
        return bool(self.slot_table[layer, expert] >= 0)

    def plan_rounds(self, layer: int, experts: np.ndarray) -> list[np.ndarray]:
        """Split a layer's experts into groups that fit; resident ones go first. Where
        misses are read straight into slots, groups take half the slots: the next group
        is read into the other half while one computes (double buffering)."""
        if len(experts) <= self.slots:
            return [experts]
        hit = self.slot_table[layer, experts] >= 0
        ordered = np.concatenate([experts[hit], experts[~hit]])
        size = max(1, self.slots // 2) if self.views is not None else self.slots
        return [ordered[i : i + size] for i in range(0, len(ordered), size)]

    def fetch(
        self,
        layer: int,
        experts: np.ndarray,
        requests: np.ndarray | None = None,
        record: bool = True,
    ) -> np.ndarray:
        """Make these (distinct) experts resident; returns the layer's lookup table expert -> slot
        (valid until the next fetch).

        ``requests``: how many requests each expert serves here (tokens routed to it), so
        the policy counts a prefill chunk as the simulator counts its tokens' requests;
        None: one each (a decode step). ``record=False`` leaves telling the policy and the
        counters to ``record()``, once the computation is under way: the bookkeeping then
        runs beside it instead of before it. The next fetch records first if nobody did.
        """
        experts = np.asarray(experts)
        if len(experts) > self.slots:
            raise ValueError(f"{len(experts)} experts requested, {self.slots} slots")
        with self.lock:
            self._record()
            table, misses, waited = self._make_resident(layer, experts)
            self._unrecorded = (layer, experts, requests, misses, waited)
            if record:
                self._record()
            return table

    def defer_hit(self, layer: int, indices: mx.array) -> None:
        """A decode step of ``layer`` found every expert resident (``indices``: its routing,
        as MLX computed it). Its books (the policy's requests, the hit counts, the
        profiler's) are written later, for up to ``HIT_TOKENS`` tokens of such steps at
        once, in order: before the cache decides anything (a victim, an admission),
        records another fetch, or a reply ends (``write_hits``). On the hit path the layer
        then converts nothing to numpy and looks nothing up: right after MLX computes, the
        first touch of each of those had cost the host 25-30 µs (thread CPU time,
        measured per step); written a token at a time, the books still cost 17-27 µs a
        layer (their numpy calls cold each time). A miss writes them once its reads have
        started (sooner if it settles a finished read-ahead, or read-aheads still wait for
        their first use)."""
        self._hits.append((layer, indices))

    @property
    def hits_waiting(self) -> bool:
        return bool(self._hits)

    def write_hits(self) -> None:
        """Write the books ``defer_hit`` kept (a reply's end: its counts complete)."""
        with self.lock:
            self._write_hits()

    def _write_hits(self) -> None:
        """``defer_hit``'s books, as ``fetch`` would have written them layer by layer, the
        token ends between them told to the policy in their places. An expert read ahead
        and asked for now for the first time counts a miss, as there (one still being read
        was not resident: its step was no hit)."""
        # Taken by count, not by swapping the list: ``defer_hit`` appends without the
        # lock (the layer's thread), and an append that comes meanwhile waits for the next
        # call instead of landing in a list already written.
        count = len(self._hits)
        if not count:
            return
        items = self._hits[:count]
        del self._hits[:count]
        self._hit_tokens = 0
        hits = [item for item in items if not isinstance(item, int)]
        layers = [layer for layer, _ in hits]
        routed = np.array([indices for _, indices in hits], np.intp)  # one conversion
        experts = routed.reshape(len(hits), -1)  # a step's top-k: distinct
        rows = iter(experts)
        self._queued.extend(
            item if isinstance(item, int) else (item[0], next(rows), None) for item in items
        )
        # Not through _make_resident: that reaps read-aheads, and this can run inside a
        # reap's own admission (which tells the policy, and so writes these first).
        first = self._first_uses(layers, experts)
        if self.on_fetch is not None:
            self.on_fetch(experts.size - first, first, 0.0)
        if self.on_hits is not None:
            self.on_hits(layers, routed)
        if len(self._queued) > QUEUE_LIMIT:  # last: it writes hits that came meanwhile
            self._tell()

    def record(self) -> None:
        """Tell the policy and ``on_fetch`` what the last ``fetch(record=False)`` did."""
        with self.lock:
            self._record()

    def next_tokens(self, n: int) -> None:
        """``n`` tokens went through every layer: age the policies that count tokens."""
        with self.lock:
            self._record()
            if not self._hits:
                self._queued.append(n)
                return
            self._hits.append(n)  # after the hits it follows, before those to come
            self._hit_tokens += 1
            if self._hit_tokens >= HIT_TOKENS:
                self._write_hits()

    def _make_resident(self, layer: int, experts: np.ndarray) -> tuple[np.ndarray, int, float]:
        """Read what is missing into slots: (the layer's table, misses, seconds waited)."""
        table = self.slot_table[layer]
        if self.ahead:
            self._reap()
        found = table[experts]
        if self._hits and self.fresh:  # hits that came first may be first uses too
            self._write_hits()
        already_read = self._first_uses([layer], [experts])
        if not already_read and (found.size == 0 or found.min() >= 0):  # all hits: one gather
            return table, 0, 0.0
        missing = experts[found < 0]
        waited = 0.0
        if missing.size:  # a hit touches nothing but the table
            pinned = {(layer, int(e)) for e in experts}
            keys = [(layer, int(e)) for e in missing]
            coming = [k for k in keys if k in self.ahead]
            misses = [k for k in keys if k not in self.ahead]
            start = time.perf_counter()
            # Storage starts on the misses before the victims are chosen: the policy's
            # work and the wait for computations reading the victims' slots overlap it.
            self.reader.start([pc for k in misses for pc in self.map.expert_pieces(*k).values()])
            waited = time.perf_counter() - start
            slots = [self._claim(pinned) for _ in misses]  # not reading: not counted
            start, self._computing = time.perf_counter(), 0.0
            self._load(misses, slots)  # demand reads first, on the reader's own threads
            self._collect(coming, pinned)
            # not counted either: waiting for MLX to finish computations that read slots
            waited += time.perf_counter() - start - self._computing
            self.ahead_used += len(coming)
        return table, missing.size + already_read, waited

    def _first_uses(self, layers: list[int], experts) -> int:
        """Of the requests ``experts[i]`` in ``layers[i]``, the experts read ahead and
        asked for now the first time: each counts a miss though it reads nothing (its read
        came earlier). A few read-aheads nobody asks for can wait in ``fresh`` for long."""
        if not self.fresh:
            return 0
        done = 0
        for layer, row in zip(layers, experts, strict=True):
            for e in row.tolist():
                if (layer, e) in self.fresh:  # once: deferred hits may ask for it again
                    self.fresh.discard((layer, e))
                    done += 1
        self.ahead_used += done
        return done

    def _record(self) -> None:
        """The policy learns the last fetch's requests; ``on_fetch`` counts it."""
        self.reader.forget()  # the last reads' cached pages, once the computation is under way
        if self._unrecorded is None:
            return
        self._write_hits()  # they came first
        layer, experts, requests, misses, waited = self._unrecorded
        self._unrecorded = None
        self._queued.append((layer, experts, requests))
        if len(self._queued) > QUEUE_LIMIT:
            self._tell()
        if self.on_fetch is not None:
            self.on_fetch(len(experts) - misses, misses, waited)

    # -- reading ahead into slots (prefill) --------------------------------------------------

    def read_ahead(self, layer: int, experts: np.ndarray, keep: set[tuple[int, int]]) -> int:
        """Start reading guessed ``experts`` of ``layer`` straight into slots, on threads
        of their own, while the layer before computes. ``keep``: the keys a pending
        computation reads (never evicted for a guess). At most half the slots are in
        flight; a guess never delays a demand read (it is collected only after the demand
        reads of its layer). Returns how many reads started."""
        if self.views is None or not self.reads_ahead:
            return 0
        with self.lock:
            self._record()
            self._reap()
            room = min(self.slots // 2 - len(self.ahead), self.slots - len(keep) - len(self.ahead))
            table = self.slot_table[layer]
            keys = [
                (layer, int(e))
                for e in experts
                if table[e] < 0 and (layer, int(e)) not in self.ahead
            ][: max(0, room)]
            if not keys:
                return 0
            if self._ahead_pool is None:
                self._ahead_pool = ThreadPoolExecutor(4, thread_name_prefix="read-ahead")
            pinned = set(keep) | set(keys)
            for key in keys:
                slot = self._claim(pinned)
                self.key_in[slot] = None
                self.ahead[key] = (slot, self._ahead_pool.submit(self._read_ahead, key, slot))
            self.ahead_issued += len(keys)
            return len(keys)

    def _read_ahead(self, key: tuple[int, int], slot: int) -> None:
        """On a read-ahead thread: one expert's pieces straight into its claimed slot."""
        pieces = self.map.expert_pieces(*key)
        for param, piece in pieces.items():
            view = self.views[param][slot]
            if np.dtype(NUMPY_DTYPES[piece.dtype]) == view.dtype:
                self.reader.read_piece(piece, view.reshape(-1).view(np.uint8))
            else:
                widen_into(view, self.reader.read_piece(piece), piece.dtype)
        self.reader.count(sum(p.nbytes for p in pieces.values()))

    def _reap(self) -> None:
        """Read-aheads that finished become resident (and evictable); failed ones give
        their slot back (a demand read of the expert will say what went wrong)."""
        for key, (slot, future) in list(self.ahead.items()):
            if future.done():
                del self.ahead[key]
                self._settle(key, slot, future)

    def _collect(self, keys: list[tuple[int, int]], pinned: set[tuple[int, int]]) -> None:
        """Wait for these keys' read-aheads (after the demand reads): resident, or, where
        the read failed, read again on demand, which raises what went wrong."""
        for key in keys:
            slot, future = self.ahead.pop(key)
            self._settle(key, slot, future, pinned)

    def _settle(
        self, key, slot: int, future: Future, needed: set[tuple[int, int]] | None = None
    ) -> None:
        """A finished read-ahead: resident (``needed``: by the fetch under way, pinned with
        these keys; else admitted to the policy, and its first use counted a miss)."""
        try:
            future.result()
        except Exception:
            self.free.append(slot)
            if needed is not None:
                self._load([key], [self._claim(needed)])
            return
        self._mark(key, slot)
        if needed is None:
            self.policy.admit(key)
            self.fresh.add(key)

    def _drop_ahead(self) -> None:
        """Wait out every read-ahead and forget it (the cache is being emptied)."""
        for _, future in self.ahead.values():
            try:
                future.result()
            except Exception:
                pass
        self.ahead.clear()
        self.fresh.clear()

    def preload(self, keys: list[tuple[int, int]], cancel: threading.Event | None = None) -> int:
        """Make ``keys`` resident, most important first, without counting hits or misses.

        Runs between generations (the engine waits for it before a forward pass), in
        groups so that ``cancel`` stops it quickly. The policy is told the new residents
        (``admit``) but learns no requests from them: none were made. Returns how many
        experts it loaded.
        """
        keys = keys[: self.slots]
        pinned = set(keys)
        loaded = 0
        for start in range(0, len(keys), 8):
            if cancel is not None and cancel.is_set():
                break
            with self.lock:
                self._record()
                group = [k for k in keys[start : start + 8] if k not in self.slot_of]
                if group:
                    self._load(group, [self._claim(pinned) for _ in group])
                for key in group:
                    self.policy.admit(key)
            loaded += len(group)
        with self.lock:
            self.reader.forget()
        return loaded

    def clear(self) -> None:
        """Evict everything (benchmarks that need a cold cache)."""
        with self.lock:
            self._record()
            self._write_hits()
            self._settle_pending()
            self._drop_ahead()
            for key in list(self.slot_of):
                self.policy.remove(key)
            self.slot_of.clear()
            self.slot_table.fill(-1)
            self._device_rows.clear()
            self.key_in = [None] * self.slots
            self.free = list(range(self.slots - 1, -1, -1))

    def reset(self) -> None:
        """Evict everything and start the policy afresh: runs compared from the same state."""
        self.clear()
        with self.lock:
            self.policy = type(self.policy)()

    def hold(self, output: mx.array) -> None:
        """``output`` reads slots and may still be lazy when this returns (the last
        layer's, which a caller may hold across passes): it is computed before any slot
        is overwritten from the host, behind MLX's back. The layers before it are forced
        by the syncs of the layers after them."""
        if self.views is not None:
            self._pending = output

    def _settle_pending(self) -> None:
        if self._pending is not None:
            mx.eval(self._pending)
            self._pending = None

    def _claim(self, pinned: set[tuple[int, int]]) -> int:
        if self.free:
            return self.free.pop()
        self._settle_pending()  # the victim's slot may still be read
        victim = self.policy.victim(pinned)
        self.policy.remove(victim)
        self.fresh.discard(victim)
        slot = self.slot_of.pop(victim)
        self._set_slot(victim, -1)
        self.key_in[slot] = None
        return slot

    def _load(self, keys: list[tuple[int, int]], slots: list[int]) -> None:
        """``_read_into``; when a read fails (a file changed under the model), every slot
        claimed for ``keys`` goes back to the free list before the error propagates."""
        try:
            self._read_into(keys, slots)
        except BaseException:
            for key, slot in zip(keys, slots, strict=True):
                if self.key_in[slot] == key:
                    del self.slot_of[key]
                    self._set_slot(key, -1)
                self.key_in[slot] = None
                self.free.append(slot)
            raise

    def _read_into(self, keys: list[tuple[int, int]], slots: list[int]) -> None:
        """Read misses in groups of at most ``staging_bytes``, writing each into its slot.

        Demand reads go first; speculative reads already under way are waited for only
        after them, so a demand read never queues behind a guess."""
        under_way = {}
        if self.prefetcher is not None:
            for key in keys:
                future = self.prefetcher.claim(key)
                if future is not None:
                    under_way[key] = future
        group: list[tuple[tuple[int, int], int]] = []
        size = 0
        for key, slot in zip(keys, slots, strict=True):
            if key in under_way:
                continue
            expert_size = self._buffer_bytes(key)
            if group and size + expert_size > self.staging_bytes:
                self._load_group(group)
                group, size = [], 0
            group.append((key, slot))
            size += expert_size
        if group:
            self._load_group(group)
        for key, slot in zip(keys, slots, strict=True):
            if key in under_way:
                self._place(key, slot, self.prefetcher.collect(under_way[key]))
        if under_way and self.views is None:
            mx.eval(list(self.pools.values()))

    def _buffer_bytes(self, key: tuple[int, int]) -> int:
        """Read buffers an expert's load holds: all its bytes, or, read straight into its
        slot, only the pieces that widen on the way (bf16 scales into float32 slots)."""
        pieces = self.map.expert_pieces(*key)
        if self.views is None:
            return sum(p.nbytes for p in pieces.values())
        return sum(
            p.nbytes
            for param, p in pieces.items()
            if np.dtype(NUMPY_DTYPES[p.dtype]) != self.views[param].dtype
        )

    def _load_group(self, group: list[tuple[tuple[int, int], int]]) -> None:
        if self.views is not None:
            self._read_direct(group)
            return
        pieces = [pc for key, _ in group for pc in self.map.expert_pieces(*key).values()]
        read = iter(self.reader.read(pieces))
        for key, slot in group:
            self._place(key, slot, [next(read) for _ in self.map.params])
        # Evaluate now: frees the read buffers, and a later write to a pool still
        # referenced by a pending computation would make MLX copy the whole pool.
        mx.eval(list(self.pools.values()))

    def _read_direct(self, group: list[tuple[tuple[int, int], int]]) -> None:
        """Every piece of the group in one parallel read, each straight into its slot
        (widened on the way where the slot holds float32 and the piece bf16)."""
        pieces, outs = [], []
        for key, slot in group:
            for param, piece in self.map.expert_pieces(*key).items():
                pieces.append(piece)
                outs.append(self.views[param][slot])
        self._wait_for_readers()
        self.reader.read(pieces, outs)
        for key, slot in group:
            self._mark(key, slot)

    def _wait_for_readers(self) -> None:
        """Before the host writes slots: nothing still queued may read one about to be
        overwritten (a decode step's speculated computation, thrown away on this miss,
        among them). The wait is computing, not reading: kept out of the read clock."""
        before = time.perf_counter()
        mx.synchronize()
        self._computing += time.perf_counter() - before

    def _place(self, key: tuple[int, int], slot: int, buffers: list[np.ndarray]) -> None:
        pieces = self.map.expert_pieces(*key)
        if self.views is not None:
            self._wait_for_readers()
            for (param, piece), buf in zip(pieces.items(), buffers, strict=True):
                view = self.views[param][slot]
                if np.dtype(NUMPY_DTYPES[piece.dtype]) == view.dtype:
                    view.reshape(-1).view(np.uint8)[:] = buf
                else:
                    widen_into(view, buf, piece.dtype)
        else:
            self.format.write(self.pools, slot, pieces, buffers)
        self._mark(key, slot)

    def _mark(self, key: tuple[int, int], slot: int) -> None:
        self.slot_of[key] = slot
        self._set_slot(key, slot)
        self.key_in[slot] = key

    def _set_slot(self, key: tuple[int, int], slot: int) -> None:
        """The one place a key's slot (-1: none) is written: MLX's copy of the layer's row
        (``device_slots``) is dropped with it."""
        self.slot_table[key] = slot
        self._device_rows.pop(key[0], None)

    def close(self) -> None:
        """Stop the prefetcher and the read-aheads, close the files (the model's reader)."""
        if self.prefetcher is not None:
            self.prefetcher.close()
        with self.lock:
            self._record()
            self._write_hits()
            self._drop_ahead()
        if self._ahead_pool is not None:
            self._ahead_pool.shutdown(wait=True)
        self.reader.close()
