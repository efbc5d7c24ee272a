"""Reading expert bytes straight from the safetensors files: pread or mmap, measured.

Both readers return each piece as a fresh uint8 array and never write to the files, and
both turn readahead off (``POSIX_FADV_RANDOM`` / ``MADV_RANDOM``): measured here, buffered
readahead read 44% more than the experts needed, mmap's default 5x.
Once a piece is copied into the expert cache its pages are dropped from the page cache
(``posix_fadvise(DONTNEED)`` on Linux, ``F_NOCACHE`` on macOS) and, for mmap, from the
process (``MADV_DONTNEED``, whole 2 MiB blocks: a fault maps its neighbours too), so the
same bytes are not held twice outside the budget; and glibc is told to return freed read
buffers to the system rather than keep them in its arenas (``return_freed_buffers``).
"""

from __future__ import annotations

import contextlib
import ctypes
import ctypes.util
import hashlib
import itertools
import mmap
import os
import struct
import sys
import threading
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np

from .expert_map import NUMPY_DTYPES, Piece

PAGE = mmap.PAGESIZE
MMAP_CHUNK = 256 * 1024  # mmap path: pages mapped into the process at once, per thread
# A fault maps pages around it too (fault-around, large page-cache folios), never past
# its PMD (2 MiB with 4 KiB pages): drop whole 2 MiB blocks, or neighbours' pages stay
# mapped (measured: ~40 KiB more per group read, growing over a reply).
FOLIO = 2 * 2**20
M_MMAP_THRESHOLD = -3  # glibc mallopt
F_NOCACHE = 48  # macOS fcntl: bypass the unified buffer cache for this descriptor


class ExpertReadError(OSError):
    """A weight file changed or vanished under the open model; the message names it and
    says what to do. The reply fails, the process and the cache go on."""


def read_failed(path: Path, what: str) -> ExpertReadError:
    target = Path(path).resolve()
    where = f"{path} (the file behind it: {target})" if target != Path(path).absolute() else path
    return ExpertReadError(
        f"Could not read experts from {where}: {what}. The file changed or was removed while "
        "the model was open (another download, a disk cleaner?). Restore it (`mlx-pager "
        "download ID` completes a Hub model) and send the message again; if a different "
        "version replaced it, open the model again."
    )


def _identity(fd: int) -> tuple[int, int, int]:
    st = os.fstat(fd)
    return st.st_dev, st.st_ino, st.st_size


def _header_digest(fd: int) -> bytes:
    """The safetensors header's hash: a replaced file with the same header holds the
    same tensors at the same offsets, so the open model can read it."""
    head = os.pread(fd, 8, 0)
    if len(head) < 8:
        return b""
    (length,) = struct.unpack("<Q", head)
    return hashlib.sha256(head + os.pread(fd, min(length, 100 * 2**20), 8)).digest()


def _page_range(offset: int, nbytes: int) -> tuple[int, int]:
    start = offset - offset % PAGE
    return start, offset + nbytes - start


def _folio_range(offset: int, nbytes: int, size: int) -> tuple[int, int]:
    start = offset - offset % FOLIO
    end = min(size, -(-(offset + nbytes) // FOLIO) * FOLIO)
    return start, end - start


def widen_bf16(stored: np.ndarray, out: np.ndarray) -> None:
    """bf16 bytes into float32 bytes, exactly: each value's 16 bits shifted up."""
    if out.nbytes != 2 * stored.nbytes:
        raise ValueError(
            f"{stored.nbytes} bytes of bf16 widen into {2 * stored.nbytes}, not {out.nbytes}"
        )
    # Two unbuffered passes, each a plain vector loop: 5.8 µs a 32 KiB piece, against
    # 8.8 for one left_shift that casts as it goes (through buffers)
    wide = out.view(np.uint32)
    wide[:] = stored.view(np.uint16)
    wide <<= 16


def widen_into(out: np.ndarray, buf: np.ndarray, dtype: str) -> None:
    """A piece's bytes (safetensors ``dtype``, read into ``buf``), converted into the
    float32 array ``out`` (a slot): bf16 and f16 widen exactly."""
    if dtype == "BF16":  # the bits, shifted up
        widen_bf16(buf, out.reshape(-1))
    else:
        out.reshape(-1)[:] = buf.view(NUMPY_DTYPES[dtype])


def drop_page_cache(fd: int, offset: int = 0, nbytes: int = 0) -> None:
    """Ask the kernel to forget cached pages of a file range (a hint; Linux only)."""
    if hasattr(os, "posix_fadvise"):
        os.posix_fadvise(fd, offset, nbytes, os.POSIX_FADV_DONTNEED)


def return_freed_buffers() -> None:
    """Make glibc give every read buffer back to the system when it is freed.

    By default glibc raises its mmap threshold to the size of the last large block freed,
    so after the first expert, read buffers come from the heap and its per-thread arenas,
    which keep the freed pages: measured, 14 MB (pread) to 30 MB (mmap) past the budget's
    headroom. A fixed threshold (128 KiB, glibc's default) turns that off."""
    if not sys.platform.startswith("linux"):
        return
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        libc.mallopt(M_MMAP_THRESHOLD, 128 * 1024)
    except (OSError, AttributeError):  # not glibc (musl has no mallopt): nothing to tune
        pass


# How far ahead of the piece being read a group is announced to the kernel: enough for
# every reader thread to find its next pieces in flight, little enough that a tight
# memory cap does not reclaim announced pages before they are read.
ANNOUNCE_BYTES = 32 << 20
# Bytes a read lane must have to be worth waking a thread for: a group of misses gets at
# most one lane per this many bytes, the caller's own first. Measured by `mlx-pager
# bench` (a layer's misses, cold): the embedded model's 0.4 MB groups of 32 KiB pieces read
# at 312 / 238 / 263 MB/s with 1 / 4 / 8 threads (an earlier run 274 / 205 / 137), a
# Qwen3-shaped layer's 21 MB at 426 / 573 / 746.
LANE_BYTES = 1 << 20


class Reader:
    """Common part: one descriptor per file, a small thread pool, a byte counter."""

    name = "base"

    def __init__(self, files: list[Path], threads: int = 4, drop_cache: bool = True):
        if threads < 1:
            raise ValueError("A reader needs at least one thread.")
        return_freed_buffers()
        self.drop_cache = drop_cache
        # Keyed by the caller's own Path objects: the pieces carry the same ones, and a
        # lookup that finds its key by identity skips Path's slow equality (90 µs a group).
        paths = [f if isinstance(f, Path) else Path(f) for f in files]
        self.fds = {p: self._open(p) for p in paths}
        self.opened = {p: (_identity(fd), _header_digest(fd)) for p, fd in self.fds.items()}
        self.threads = threads
        self.pool = ThreadPoolExecutor(threads, thread_name_prefix=f"{self.name}-read")
        self.bytes_read = 0
        self._lock = threading.Lock()
        self._started: set[Piece] = set()  # announced by ``start``, not read yet
        self._unforgotten: list[Piece] = []  # read, their pages cached until ``forget``

    def _open(self, path: Path) -> int:
        fd = os.open(path, os.O_RDONLY)
        if hasattr(os, "POSIX_FADV_RANDOM"):  # no readahead: experts are scattered reads
            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_RANDOM)
        if sys.platform == "darwin" and self.drop_cache:
            import fcntl

            fcntl.fcntl(fd, F_NOCACHE, 1)
        return fd

    def refresh(self) -> list[Path]:
        """Reopen files replaced since they were opened (a new inode at the same path),
        when the replacement has the same size and header; call between replies. A file
        with a different header raises ExpertReadError: the open model's offsets no
        longer hold. A file truncated in place, or deleted, is left: reads fail cleanly
        until it is restored. Returns the reopened paths."""
        reopened = []
        for path, fd in list(self.fds.items()):
            try:
                st = os.stat(path)
            except OSError:
                continue  # gone: the next read of it fails with the message
            try:
                if (st.st_dev, st.st_ino) == _identity(fd)[:2]:
                    continue
                (dev, ino, size), digest = self.opened[path]
                new = self._open(path)
                same = os.fstat(new).st_size == size and _header_digest(new) == digest
            except OSError as e:
                raise read_failed(path, e.strerror or str(e)) from None
            if not same:
                os.close(new)
                raise read_failed(path, "it was replaced by a file with other tensors")
            self._swap(path, new)
            reopened.append(path)
        return reopened

    def _swap(self, path: Path, fd: int) -> None:
        old, self.fds[path] = self.fds[path], fd
        os.close(old)

    def read_piece(
        self, piece: Piece, out: np.ndarray | None = None, drop: bool = True
    ) -> np.ndarray:
        """The piece's bytes, into ``out`` (a writable uint8 array of ``piece.nbytes``: an
        expert cache slot) or a fresh buffer; returns the array written. ``drop``: forget
        its cached pages now (``drop_cache``), else the caller does."""
        raise NotImplementedError

    def start(self, pieces: list[Piece]) -> None:
        """Announce the pieces about to be ``read`` (up to ``ANNOUNCE_BYTES``) now, so the
        storage works while the caller gets their slots ready (the policy's choice of
        victims, the wait for computations reading those slots)."""
        first, total = [], 0
        for piece in pieces:
            if total >= ANNOUNCE_BYTES:
                break
            first.append(piece)
            total += piece.nbytes
        self.announce(first)
        self._started.update(first)

    def read(
        self, pieces: list[Piece], outs: list[np.ndarray | None] | None = None
    ) -> list[np.ndarray]:
        """Read pieces in parallel; the result keeps their order. Each goes into its
        ``outs`` entry: None, a fresh uint8 buffer; else an array its values go into (an
        expert cache slot), as stored, or widened exactly where the array is float32 and
        the piece bf16 or f16 (a CPU computes in float32).

        The pages of the group's first ``ANNOUNCE_BYTES`` (a decode step's whole group)
        stay in the page cache until ``forget``: dropping them costs a syscall a piece
        (measured: about 6 µs on the embedded model's 32 KiB pieces, 65 µs on 768 KiB
        ones), which the cache makes once the computation is under way. Pieces past that
        are dropped as they are read, so a prefill's large group never piles up pages."""
        self.forget()  # a previous group's, if its reader's owner did not
        outs = outs if outs is not None else [None] * len(pieces)
        ends = list(itertools.accumulate(p.nbytes for p in pieces))
        small = not pieces or ends[-1] <= min(LANE_BYTES, ANNOUNCE_BYTES)
        try:
            if small:
                result = self._read_small(pieces, outs)
            else:
                result = self._read_lanes(pieces, outs, ends)
        finally:
            self._started.clear()
            if self.drop_cache:
                self._unforgotten.extend(pieces)
        self.count(sum(p.nbytes for p in pieces))
        return result

    def _read_one(self, piece: Piece, out: np.ndarray | None) -> np.ndarray:
        """One piece of ``read``, its pages left cached: into ``out`` as ``read`` says."""
        if out is None:
            return self.read_piece(piece, drop=False)
        flat = out.reshape(-1)
        if flat.nbytes == piece.nbytes:
            self.read_piece(piece, flat.view(np.uint8), drop=False)
        else:
            widen_into(flat, self.read_piece(piece, drop=False), piece.dtype)
        return out

    def _read_small(self, pieces: list[Piece], outs: list[np.ndarray | None]) -> list[np.ndarray]:
        """A group that fits one lane and one announcement (every decode step's): the
        caller's plain loop. A decode group is small (the embedded model's: 12 pieces of
        32 KiB), and the lanes' queue, lock and look-ahead around each piece had cost more
        than the reads: profiled with the pages cached, 270 µs a group through the lanes,
        about 160 µs this way."""
        fresh = [p for p in pieces if p not in self._started]
        if len(fresh) > 1:  # a lone piece's read asks for it soon enough
            self.announce(fresh)
        return [self._read_one(piece, out) for piece, out in zip(pieces, outs, strict=True)]

    def _read_lanes(
        self, pieces: list[Piece], outs: list[np.ndarray | None], ends: list[int]
    ) -> list[np.ndarray]:
        """A large group (a prefill's): a few lanes pull pieces from one queue, so its
        dozens of pieces cost a few thread hand-offs, not one each; ``ends``: each piece's
        end, in bytes from the group's start."""
        result: list = [None] * len(pieces)
        order = iter(range(len(pieces)))
        lock = threading.Lock()
        ahead = [0]  # pieces announced so far
        started = self._started

        def lane() -> None:
            """Read pieces until none is left; the pieces within ``ANNOUNCE_BYTES`` of the
            one taken are announced first."""
            while True:
                with lock:
                    j = next(order, None)
                    if j is None:
                        return
                    start, stop = ahead[0], ahead[0]
                    while stop < len(pieces) and ends[stop] - ends[j] < ANNOUNCE_BYTES:
                        stop += 1
                    ahead[0] = max(stop, j + 1)
                if stop > start and len(pieces) > 1:
                    fresh = [p for p in pieces[start:stop] if p not in started]
                    if fresh:
                        self.announce(fresh)
                result[j] = self._read_one(pieces[j], outs[j])
                if self.drop_cache and ends[j] > ANNOUNCE_BYTES:
                    self._drop_inside(pieces[j])  # its neighbours' pages with the rest

        count = min(self.threads, len(pieces), -(-ends[-1] // LANE_BYTES))
        lanes = [self.pool.submit(lane) for _ in range(count - 1)]
        try:
            lane()  # the caller reads too, instead of sleeping until the others are done
        finally:
            errors = [e for e in (f.exception() for f in lanes) if e is not None]
        if errors:
            raise errors[0]
        return result

    def forget(self) -> None:
        """Drop the cached pages of the pieces ``read`` left cached (``drop_cache``)."""
        pieces, self._unforgotten = self._unforgotten, []
        with contextlib.suppress(OSError):  # a hint, as the announcement
            for piece in pieces:
                fd = self.fds.get(piece.path)
                if fd is not None:
                    drop_page_cache(fd, piece.offset, piece.nbytes)

    def _drop_inside(self, piece: Piece) -> None:
        """Forget the cached pages that lie wholly inside ``piece``."""
        start = -(-piece.offset // PAGE) * PAGE
        end = (piece.offset + piece.nbytes) // PAGE * PAGE
        if end > start:
            with contextlib.suppress(OSError):
                drop_page_cache(self.fds[piece.path], start, end - start)

    def announce(self, pieces: list[Piece]) -> None:
        """Tell the kernel every piece of a group before the first is read, so it has them
        all in flight at once (a read per thread is fewer, and waking threads is slow)."""

    def count(self, nbytes: int) -> None:
        """Add to the bytes-read counter (reads made outside ``read``, e.g. prefetch)."""
        with self._lock:
            self.bytes_read += nbytes

    def drop(self, paths: list[Path] | None = None) -> None:
        """Evict whole files from the page cache: makes the next reads cold (benchmarks)."""
        for path, fd in self.fds.items():
            if paths is None or path in paths:
                drop_page_cache(fd)

    def close(self) -> None:
        self.pool.shutdown(wait=True)
        self.forget()
        for fd in self.fds.values():
            os.close(fd)
        self.fds = {}


class PreadReader(Reader):
    """``pread`` into a fresh buffer: one syscall per piece, no page faults."""

    name = "pread"

    def announce(self, pieces: list[Piece]) -> None:
        """``POSIX_FADV_WILLNEED`` on each piece: the kernel starts reading them all. Measured
        on the embedded model (12 pieces of 32 KB, cold): 0.69 ms read one after another,
        0.41 ms announced first, as fast as fio with 4-8 reads in flight."""
        if not hasattr(os, "posix_fadvise"):
            return
        try:
            for piece in pieces:
                fd = self.fds.get(piece.path)
                if fd is not None:
                    os.posix_fadvise(fd, piece.offset, piece.nbytes, os.POSIX_FADV_WILLNEED)
        except OSError:  # a hint: the read that follows says what is wrong
            return

    def read_piece(
        self, piece: Piece, out: np.ndarray | None = None, drop: bool = True
    ) -> np.ndarray:
        fd = self.fds[piece.path]
        buf = np.empty(piece.nbytes, np.uint8) if out is None else out
        view, done = memoryview(buf).cast("B"), 0
        while done < piece.nbytes:
            try:
                if hasattr(os, "preadv"):  # straight into the buffer
                    n = os.preadv(fd, [view[done:]], piece.offset + done)
                else:  # some macOS Python builds lack preadv
                    chunk = os.pread(fd, piece.nbytes - done, piece.offset + done)
                    n = len(chunk)
                    view[done : done + n] = chunk
            except OSError as e:
                raise read_failed(piece.path, e.strerror or str(e)) from None
            if n == 0:
                raise read_failed(
                    piece.path, f"it ends at byte {piece.offset + done}, inside an expert"
                )
            done += n
        if self.drop_cache and drop:
            drop_page_cache(fd, piece.offset, piece.nbytes)
        return buf


class MmapReader(Reader):
    """One read-only mapping per file; ``MADV_RANDOM`` so a fault reads no neighbours."""

    name = "mmap"

    def __init__(self, files: list[Path], threads: int = 4, drop_cache: bool = True):
        super().__init__(files, threads, drop_cache)
        self.maps = {path: self._map(fd) for path, fd in self.fds.items()}

    def _swap(self, path: Path, fd: int) -> None:
        super()._swap(path, fd)
        self.maps.pop(path).close()
        self.maps[path] = self._map(fd)

    @staticmethod
    def _map(fd: int) -> mmap.mmap:
        m = mmap.mmap(fd, 0, prot=mmap.PROT_READ)
        if hasattr(mmap, "MADV_RANDOM"):
            m.madvise(mmap.MADV_RANDOM)
        return m

    def read_piece(
        self, piece: Piece, out: np.ndarray | None = None, drop: bool = True
    ) -> np.ndarray:
        m = self.maps[piece.path]
        # A page of the map past the file's end faults with SIGBUS, which kills the
        # process: look at the file's size first, and refuse a piece it no longer holds.
        try:
            size = os.fstat(self.fds[piece.path]).st_size
        except OSError as e:
            raise read_failed(piece.path, e.strerror or str(e)) from None
        if size < piece.offset + piece.nbytes:
            raise read_failed(
                piece.path,
                f"it is now {size} bytes, shorter than the expert at byte {piece.offset}",
            )
        # Copied a chunk at a time, each chunk's pages unmapped once copied: the mapped
        # pages of a read are one chunk per thread, not the whole group.
        buf = np.empty(piece.nbytes, np.uint8) if out is None else out
        for done in range(0, piece.nbytes, MMAP_CHUNK):
            n = min(MMAP_CHUNK, piece.nbytes - done)
            buf[done : done + n] = np.frombuffer(m, np.uint8, n, piece.offset + done)
            if self.drop_cache and hasattr(mmap, "MADV_DONTNEED"):
                m.madvise(mmap.MADV_DONTNEED, *_folio_range(piece.offset + done, n, len(m)))
        if self.drop_cache and drop:
            drop_page_cache(self.fds[piece.path], piece.offset, piece.nbytes)
        return buf

    def announce(self, pieces: list[Piece]) -> None:
        """``MADV_WILLNEED`` on exactly the pieces about to be read (and counted): the
        kernel reads every piece at once rather than one page fault after another."""
        if not hasattr(mmap, "MADV_WILLNEED"):
            return
        for piece in pieces:
            start, length = _page_range(piece.offset, piece.nbytes)
            self.maps[piece.path].madvise(mmap.MADV_WILLNEED, start, length)

    def close(self) -> None:
        for m in self.maps.values():
            m.close()
        self.maps = {}
        super().close()


class DirectReader(PreadReader):
    """``O_DIRECT`` reads (Linux): storage writes straight into an aligned buffer, the page
    cache is neither filled nor dropped, and the CPU copies each byte once. Pieces lie at
    any offset, so the aligned range around a piece is read into a per-thread bounce
    buffer and the piece copied out of it. A file system that refuses ``O_DIRECT`` (tmpfs)
    is read through ``pread`` as before. macOS has no ``O_DIRECT``: ``F_NOCACHE`` on the
    ``pread`` path is its counterpart there."""

    name = "direct"
    ALIGN = 4096

    def __init__(self, files: list[Path], threads: int = 4, drop_cache: bool = True):
        super().__init__(files, threads, drop_cache)
        self._local = threading.local()
        self.direct_fds: dict[Path, int] = {}
        for path in self.fds:
            self._open_direct(path)

    def _open_direct(self, path: Path) -> None:
        flag = getattr(os, "O_DIRECT", 0)
        if not flag:
            return
        try:
            self.direct_fds[path] = os.open(path, os.O_RDONLY | flag)
        except OSError:  # EINVAL: this file system does not do direct I/O
            self.direct_fds.pop(path, None)

    def _swap(self, path: Path, fd: int) -> None:
        super()._swap(path, fd)
        old = self.direct_fds.pop(path, None)
        if old is not None:
            os.close(old)
        self._open_direct(path)

    def announce(self, pieces: list[Piece]) -> None:
        """Only the pieces of files read through ``pread`` (O_DIRECT skips the page cache)."""
        super().announce([p for p in pieces if p.path not in self.direct_fds])

    def _bounce(self, nbytes: int) -> np.ndarray:
        """This thread's aligned buffer of at least ``nbytes``, kept between reads."""
        buf = getattr(self._local, "buf", None)
        if buf is None or buf.nbytes < nbytes:
            raw = np.empty(nbytes + self.ALIGN, np.uint8)
            start = -raw.ctypes.data % self.ALIGN
            buf = raw[start : start + nbytes]
            self._local.buf = buf
        return buf

    def read_piece(
        self, piece: Piece, out: np.ndarray | None = None, drop: bool = True
    ) -> np.ndarray:
        fd = self.direct_fds.get(piece.path)
        if fd is None:
            return super().read_piece(piece, out, drop)
        start = piece.offset - piece.offset % self.ALIGN
        end = -(-(piece.offset + piece.nbytes) // self.ALIGN) * self.ALIGN
        bounce = self._bounce(end - start)
        view, done = memoryview(bounce), 0
        want = piece.offset + piece.nbytes - start  # the file may end inside the last block
        while done < want:
            try:
                n = os.preadv(fd, [view[done : end - start]], start + done)
            except OSError as e:
                raise read_failed(piece.path, e.strerror or str(e)) from None
            if n == 0:
                raise read_failed(piece.path, f"it ends at byte {start + done}, inside an expert")
            done += n
            if done % self.ALIGN:  # a short read not on a block: the file's end
                break
        if done < want:
            raise read_failed(piece.path, f"it ends at byte {start + done}, inside an expert")
        buf = np.empty(piece.nbytes, np.uint8) if out is None else out
        skip = piece.offset - start
        buf[:] = bounce[skip : skip + piece.nbytes]
        return buf

    def close(self) -> None:
        for fd in self.direct_fds.values():
            os.close(fd)
        self.direct_fds = {}
        super().close()


READERS: dict[str, type[Reader]] = {
    "pread": PreadReader,
    "mmap": MmapReader,
    "direct": DirectReader,
}

# Measured by `mlx-pager bench` on Linux (1.47 MB experts): cold, pread 1.6 ms against
# 13.2 ms through mmap page faults; warm (page cache), mmap 0.55 ms against 0.64 ms. A pager
# waits on cold reads, and docs/field-notes.md reports the same order on macOS (2.8 ms vs 9.9 ms).
DEFAULT_READ_PATH = "pread"


# Reads in flight per reader: a layer's misses are many pieces (9 an expert in a 4-bit
# mlx-community checkpoint), and storage serves parallel reads faster than one at a time
# (`mlx-pager bench`'s layer-miss bandwidth, by thread count, measured it).
DEFAULT_READ_THREADS = 8


def make_reader(
    name: str, files: list[Path], threads: int = DEFAULT_READ_THREADS, drop_cache: bool = True
):
    name = DEFAULT_READ_PATH if name == "auto" else name
    if name not in READERS:
        raise ValueError(f"Unknown read path {name!r}; choose one of auto, {', '.join(READERS)}.")
    return READERS[name](files, threads, drop_cache)
