"""Reads from the Hugging Face cache: exactly the expert's bytes, and the files untouched."""

from __future__ import annotations

import hashlib
import os
import shutil
from pathlib import Path

import numpy as np
import pytest
from checkpoints import budget_for_slots

from mlx_pager.engine import Engine
from mlx_pager.paging.loader import load_paged
from mlx_pager.sim.synthetic import make_checkpoint


def proc_io() -> dict[str, int]:
    lines = Path("/proc/self/io").read_text().splitlines()
    return {k: int(v) for k, v in (line.split(": ") for line in lines)}


def hf_cache_layout(src: Path, cache: Path, repo: str = "test/tiny-moe") -> Path:
    """Lay a checkpoint out as huggingface_hub does: blobs, and snapshot symlinks to them."""
    root = cache / f"models--{repo.replace('/', '--')}"
    snapshot = root / "snapshots" / ("a" * 40)
    (root / "blobs").mkdir(parents=True)
    snapshot.mkdir(parents=True)
    (root / "refs").mkdir()
    (root / "refs" / "main").write_text("a" * 40)
    for file in src.iterdir():
        blob = root / "blobs" / hashlib.sha256(file.read_bytes()).hexdigest()
        shutil.copy(file, blob)
        (snapshot / file.name).symlink_to(os.path.relpath(blob, snapshot))
    os.sync()  # dirty pages cannot be dropped from the page cache: write them back first
    return snapshot


def digest(folder: Path) -> dict[str, tuple[str, float]]:
    return {
        p.name: (hashlib.sha256(p.read_bytes()).hexdigest(), p.stat().st_mtime)
        for p in sorted(folder.rglob("*"))
        if p.is_file()
    }


@pytest.fixture(scope="module")
def snapshot(tmp_path_factory):
    src = make_checkpoint(
        tmp_path_factory.mktemp("src") / "m", "qwen3_moe", num_experts=16,
        hidden_size=128, moe_intermediate_size=128, num_experts_per_tok=2,
    )  # fmt: skip
    return hf_cache_layout(src, tmp_path_factory.mktemp("hub"))


@pytest.mark.skipif(not Path("/proc/self/io").exists(), reason="needs Linux /proc/self/io")
@pytest.mark.parametrize("read_path", ["pread", "mmap", "direct"])
def test_bytes_read_per_miss_equal_expert_bytes(snapshot, read_path):
    paged = load_paged(snapshot, budget_for_slots(snapshot, 3), 256, read_path=read_path)
    engine = Engine(paged, "test", 256)
    expert_bytes = paged.cache.map.expert_disk_bytes()
    paged.cache.reader.drop()  # cold: every miss must come from storage
    io_before = proc_io()
    for _ in engine.generate("Experts are paged from disk.", max_tokens=16, chat_template=False):
        pass
    io_after = proc_io()
    stats = engine.stats
    engine.close()

    assert stats.misses > 20
    assert stats.bytes_read == stats.misses * expert_bytes
    # What the kernel actually read from storage for this process: no readahead waste.
    storage = io_after["read_bytes"] - io_before["read_bytes"]
    if storage == 0:
        pytest.skip("this filesystem reports no storage reads (tmpfs?)")
    # O_DIRECT reads whole 4 KiB blocks around each piece: at most a block more a piece.
    slack = 2 * 4096 * stats.misses * len(paged.cache.map.params) if read_path == "direct" else 0
    assert abs(storage - stats.bytes_read) <= 0.1 * stats.bytes_read + slack, (
        storage,
        stats.bytes_read,
    )


def test_hf_cache_files_unchanged_after_a_run(snapshot):
    """Both read paths leave the cached blobs byte for byte (and mtime) as they were."""
    blobs = snapshot.parent.parent / "blobs"
    before = digest(blobs)
    for read_path in ("pread", "mmap", "direct"):
        paged = load_paged(snapshot, budget_for_slots(snapshot, 3), 256, read_path=read_path)
        engine = Engine(paged, "test", 256)
        try:
            for _ in engine.generate("Experts are paged.", max_tokens=8, chat_template=False):
                pass
            assert engine.stats.misses > 0
        finally:
            engine.close()
    assert digest(blobs) == before, "the Hugging Face cache files changed"


def test_readers_return_identical_bytes(snapshot):
    from mlx_pager.paging.loader import inspect_model
    from mlx_pager.storage.readers import READERS

    expert_map = inspect_model(snapshot, 256).expert_map
    # Every expert of the last layer: the last one ends at the file's end, inside a block.
    pieces = [pc for e in range(16) for pc in expert_map.expert_pieces(1, e).values()]
    readers = [READERS[name](expert_map.files()) for name in ("pread", "mmap", "direct")]
    try:
        results = [r.read(pieces) for r in readers]
        outs = [np.zeros(p.nbytes, np.uint8) for p in pieces]  # into the caller's buffers
        readers[2].read(pieces, outs)
        for piece, *got in zip(pieces, *results, outs, strict=True):
            with open(piece.path, "rb") as f:
                f.seek(piece.offset)
                want = f.read(piece.nbytes)
            assert all(len(x) == piece.nbytes and x.tobytes() == want for x in got)
    finally:
        for r in readers:
            r.close()


def test_pieces_land_in_their_slots_as_stored_or_widened(tmp_path):
    """A group read into slots: bf16 pieces widened exactly into float32 slots, others
    copied as stored; the reader hands back the slots themselves."""
    from mlx_pager.storage import readers
    from mlx_pager.storage.expert_map import Piece

    rng = np.random.default_rng(2)
    data = rng.integers(0, 256, 12 * 8192 + 100, np.uint8)
    path = tmp_path / "blob"
    path.write_bytes(data)
    reader = readers.READERS["pread"]([path])
    # Odd offsets: pieces lie anywhere in a safetensors file
    pieces = [
        Piece(path, 100 + i * 8192 + i, 4096, "BF16" if i % 2 else "U8", (4096,)) for i in range(6)
    ]
    outs = [
        np.zeros(2048, np.float32) if pc.dtype == "BF16" else np.zeros(4096, np.uint8)
        for pc in pieces
    ]
    try:
        got = reader.read(pieces, outs)
        assert all(g is out for g, out in zip(got, outs, strict=True))
    finally:
        reader.close()
    for piece, out in zip(pieces, outs, strict=True):
        stored = data[piece.offset : piece.offset + piece.nbytes]
        if piece.dtype == "BF16":
            want = stored.view(np.uint16).astype(np.uint32) << 16
            assert np.array_equal(out.view(np.uint32), want)
        else:
            assert np.array_equal(out, stored)


def test_a_group_read_that_fails_says_why(tmp_path):
    """The file ends inside a piece: the read stops there and the error names the file and
    the byte; the pieces before it are in their slots."""
    from mlx_pager.storage.expert_map import Piece
    from mlx_pager.storage.readers import READERS, ExpertReadError

    path = tmp_path / "blob"
    path.write_bytes(bytes(range(256)) * 64)  # 16 KiB
    reader = READERS["pread"]([path])
    pieces = [Piece(path, i * 4096, 4096, "U8", (4096,)) for i in range(3)]
    pieces.append(Piece(path, 14 * 1024, 4096, "U8", (4096,)))  # runs 2 KiB past the end
    outs = [np.zeros(4096, np.uint8) for _ in pieces]
    try:
        with pytest.raises(ExpertReadError, match="ends at byte 16384, inside an expert"):
            reader.read(pieces, outs)
    finally:
        reader.close()
    assert all(
        np.array_equal(out, np.frombuffer(path.read_bytes()[i * 4096 : (i + 1) * 4096], np.uint8))
        for i, out in enumerate(outs[:3])
    )


def test_read_seconds_count_stalls_on_misses_only(snapshot):
    """Room for every expert: the first run misses and waits on reads, the same prompt
    again hits every expert and adds (almost) no read time."""
    paged = load_paged(snapshot, budget_for_slots(snapshot, 32), 256)  # 2 layers x 16
    engine = Engine(paged, "test", 256)
    try:
        prompt = "Experts are paged from disk."
        for _ in engine.generate(prompt, max_tokens=8, chat_template=False):
            pass
        assert engine.stats.misses > 0 and engine.stats.read_seconds > 0
        for _ in engine.generate(prompt, max_tokens=8, chat_template=False):
            pass
        assert engine.stats.misses == 0 and engine.stats.hits > 0
        assert engine.stats.read_seconds < 1e-3, engine.stats.read_seconds
    finally:
        engine.close()


@pytest.mark.skipif(not Path("/proc/self/io").exists(), reason="needs Linux /proc/self/io")
@pytest.mark.parametrize("page_cache", ["drop", "keep"])
def test_page_cache_dropped_or_kept(snapshot, page_cache):
    """Evicted experts read again: from storage when their pages were dropped, from the
    OS page cache (no storage read) when kept."""
    paged = load_paged(snapshot, budget_for_slots(snapshot, 3), 256, page_cache=page_cache)
    engine = Engine(paged, "test", 256)
    try:
        paged.cache.reader.drop()
        for _ in engine.generate("Experts are paged from disk.", max_tokens=8, chat_template=False):
            pass
        before = proc_io()["read_bytes"]
        for _ in engine.generate("Experts are paged from disk.", max_tokens=8, chat_template=False):
            pass
        storage = proc_io()["read_bytes"] - before
        again = engine.stats.bytes_read
    finally:
        engine.close()
    assert again > 0, "the second reply read nothing: the test needs evictions"
    if page_cache == "keep":
        assert storage < 0.1 * again, (storage, again)
    else:
        assert storage > 0.9 * again, (storage, again)


def test_a_small_group_is_read_by_the_caller_alone(tmp_path):
    """Waking a thread costs more than reading a few small pieces: a group gets one lane
    per LANE_BYTES, the caller's own first; a large group still reads on several."""
    from mlx_pager.storage.expert_map import Piece
    from mlx_pager.storage.readers import LANE_BYTES, READERS

    path = tmp_path / "blob"
    path.write_bytes(np.random.default_rng(0).integers(0, 256, 8 * LANE_BYTES, np.uint8))
    reader = READERS["pread"]([path], threads=4)
    helpers = []  # lanes handed to the reader's threads
    submit = reader.pool.submit

    def submitting(fn, *args):
        helpers.append(fn)
        return submit(fn, *args)

    reader.pool.submit = submitting
    try:
        small = [Piece(path, i * 32768, 32768, "U8", (32768,)) for i in range(12)]
        got = reader.read(small)
        assert helpers == []  # 384 KiB: the caller's lane only
        assert b"".join(g.tobytes() for g in got) == path.read_bytes()[: 12 * 32768]
        large = [Piece(path, i * LANE_BYTES, LANE_BYTES, "U8", (LANE_BYTES,)) for i in range(8)]
        got = reader.read(large)
        assert len(helpers) == 3  # 8 MiB: every one of the 4 threads' worth
        assert b"".join(g.tobytes() for g in got) == path.read_bytes()
    finally:
        reader.close()


def test_storage_starts_before_the_victims_are_chosen(snapshot):
    """A fetch's misses are announced to the kernel before the policy picks their slots
    (its work overlaps the disk's), and read() does not announce them a second time."""
    paged = load_paged(snapshot, budget_for_slots(snapshot, 3), 256)
    cache, events = paged.cache, []
    start, announce, victim = cache.reader.start, cache.reader.announce, cache.policy.victim

    def starting(pieces):
        events.append(("start", len(pieces)))
        start(pieces)

    def announcing(pieces):
        events.append(("announce", len(pieces)))
        announce(pieces)

    def choosing(pinned):
        events.append(("victim", 0))
        return victim(pinned)

    cache.reader.start, cache.reader.announce = starting, announcing
    cache.policy.victim = choosing
    try:
        cache.fetch(0, np.array([0, 1, 2]))  # three free slots: no victim yet
        events.clear()
        cache.fetch(0, np.array([3, 4]))  # both evict
    finally:
        paged.close()
    per_expert = len(paged.cache.map.params)
    assert events[:2] == [("start", 2 * per_expert), ("announce", 2 * per_expert)]
    assert [e for e, _ in events[2:]] == ["victim", "victim"]  # nothing announced again


def test_pages_dropped_once_the_computation_is_under_way(tmp_path, monkeypatch):
    """A group's first ANNOUNCE_BYTES keep their pages until ``forget`` (the cache calls
    it beside the computation); pieces past that are dropped as they are read, so a large
    group never piles up pages."""
    from mlx_pager.storage import readers
    from mlx_pager.storage.expert_map import Piece

    size = 64 * 1024
    monkeypatch.setattr(readers, "ANNOUNCE_BYTES", 4 * size)
    dropped = []
    monkeypatch.setattr(
        readers, "drop_page_cache", lambda fd, offset=0, nbytes=0: dropped.append(offset)
    )
    path = tmp_path / "blob"
    data = np.random.default_rng(1).integers(0, 256, 12 * size, np.uint8)
    path.write_bytes(data)
    reader = readers.READERS["pread"]([path], threads=1)
    outs = [np.zeros(size, np.uint8) for _ in range(3)]
    try:
        small = [Piece(path, i * size, size, "U8", (size,)) for i in range(3)]
        reader.read(small, outs)
        assert dropped == []  # kept until the cache says
        assert [out.tobytes() for out in outs] == [
            data[j * size : (j + 1) * size].tobytes() for j in range(3)
        ]
        reader.forget()
        assert sorted(dropped) == [0, size, 2 * size]
        dropped.clear()
        large = [Piece(path, i * size, size, "U8", (size,)) for i in range(12)]
        reader.read(large)
        assert sorted(dropped) == [i * size for i in range(4, 12)]  # past the first window
        reader.forget()
        assert sorted(set(dropped)) == [i * size for i in range(12)]
    finally:
        reader.close()


def test_read_seconds_leave_out_the_wait_for_computations(snapshot):
    """A miss waits for MLX's queued work before it writes slots (a speculated step among
    it): that wait is computing, not reading, and the read clock leaves it out."""
    import time

    import mlx.core as mx

    paged = load_paged(snapshot, budget_for_slots(snapshot, 3), 256)
    cache, waits = paged.cache, []
    cache.on_fetch = lambda hits, misses, waited: waits.append(waited)
    try:
        assert cache.views is not None, "this machine's MLX buffers are host-writable"
        cache.fetch(0, np.array([0, 1, 2]))
        a = mx.random.normal((512, 512))
        mx.eval(a)

        def chain(n: int) -> mx.array:
            busy = a
            for _ in range(n):
                busy = busy @ a / 23.0
            return busy

        n = 24  # as many products as take this machine a few hundred ms (a GPU: more)
        while n < 100_000:
            start = time.perf_counter()
            mx.eval(chain(n))
            if time.perf_counter() - start > 0.3:
                break
            n *= 2
        mx.async_eval(chain(n))  # queued, not waited for
        start = time.perf_counter()
        cache.fetch(0, np.array([3]))  # a miss: waits for the queue, then reads
        wall = time.perf_counter() - start
    finally:
        paged.close()
    assert wall > 0.1, "the queued computation was too short to tell"
    assert waits[-1] < 0.5 * wall, (waits[-1], wall)


@pytest.mark.parametrize("values", [1, 3, 4, 5, 8, 4099])
def test_bf16_widens_exactly_whatever_its_length(values):
    """Every value becomes the float32 with the same bits shifted up, whatever the
    piece's length; a slot of the wrong size is refused, not overrun."""
    from mlx_pager.storage.readers import widen_bf16

    stored = np.random.default_rng(values).integers(0, 2**16, values, np.uint16)
    out = np.full(values, np.nan, np.float32)
    widen_bf16(stored.view(np.uint8), out)
    assert np.array_equal(out.view(np.uint32), stored.astype(np.uint32) << 16)
    with pytest.raises(ValueError, match="widen into"):
        widen_bf16(stored.view(np.uint8), np.zeros(values + 1, np.float32))
