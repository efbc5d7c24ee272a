"""A decode step's misses read in compiled code: each piece ``pread`` straight into its
slot (or, bf16 into a float32 slot, into scratch and widened), no Python between pieces.

Why: a decode group is small (the embedded model's: 12 pieces of 32 KiB), and the Python
read loop around each piece (the lane's queue, ``preadv`` through a memoryview, the
widening's ufunc call) cost more than the disk did. Profiled with the pages already
cached, so that only the host work is left: 270 µs a group through ``Reader.read``,
66 µs here. Large groups (a prefill's) keep the threaded Python lanes, where the reads
dominate and several run at once.
"""

from __future__ import annotations

import numpy as np
from numba import njit, types

# ``ssize_t pread(int fd, void *buf, size_t count, off_t offset)``, linked by name from
# the C library the process already has (Linux and macOS alike; off_t is 64-bit on both).
_pread = types.ExternalFunction(
    "pread", types.intp(types.intc, types.uintp, types.uintp, types.int64)
)


def widen_bf16(stored: np.ndarray, out: np.ndarray) -> None:
    """bf16 bytes into float32 bytes, exactly: each value's 16 bits shifted up."""
    np.left_shift(stored.view(np.uint16), 16, out=out.view(np.uint32), dtype=np.uint32)


@njit(nogil=True, cache=True)
def _read_rows(
    rows: tuple,
    fds: np.ndarray,
    offsets: np.ndarray,
    sizes: np.ndarray,
    row_index: np.ndarray,
    slot_index: np.ndarray,
    widen: np.ndarray,
    scratch: np.ndarray,
) -> int:
    for j in range(fds.shape[0]):
        row = rows[row_index[j]][slot_index[j]]
        size = sizes[j]
        target = scratch if widen[j] else row
        # compiled code checks no bounds: a piece that would not fit is Python's to refuse
        if size > target.shape[0] or (widen[j] and 2 * size > row.shape[0]):
            return j
        address, done = target.ctypes.data, 0
        while done < size:
            got = _pread(fds[j], address + done, size - done, offsets[j] + done)
            if got <= 0:  # an error (errno is left to the caller's retry) or the file's end
                return j
            done += got
        if widen[j]:
            stored = scratch[:size].view(np.uint16)
            out = row.view(np.uint32)
            for i in range(size // 2):
                out[i] = np.uint32(stored[i]) << 16
    return -1


def read_rows(
    rows: tuple[np.ndarray, ...],
    fds: np.ndarray,
    offsets: np.ndarray,
    sizes: np.ndarray,
    row_index: np.ndarray,
    slot_index: np.ndarray,
    widen: np.ndarray,
    scratch: np.ndarray,
) -> int:
    """Read piece ``j`` (``fds[j]`` at ``offsets[j]``, ``sizes[j]`` bytes) into
    ``rows[row_index[j]][slot_index[j]]``: every row a C-contiguous uint8 array, one per
    slot pool, one row per slot. Where ``widen[j]``, the piece is bf16 read into
    ``scratch`` and widened into the row (twice its size). Returns -1 when every piece is
    read, else the first piece a read failed on or found short; the caller retries it in
    Python, which says why."""
    return _read_rows(rows, fds, offsets, sizes, row_index, slot_index, widen, scratch)


def warm(rows: tuple[np.ndarray, ...]) -> None:
    """Compile (or load from numba's cache) the reader for these rows' types now, at open,
    not on a decode step's first miss: about 1.4 s the first time on a machine, 0.3 s a
    process after that."""
    fds, none, widen = np.zeros(0, np.int32), np.zeros(0, np.int64), np.zeros(0, np.bool_)
    _read_rows(rows, fds, none, none, none, none, widen, rows[0][0])
