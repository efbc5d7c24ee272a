"""How fast a paged decode runs on a machine: its constants, and one formula over a
token's costs.

One model for every speed figure: the verdicts of `mlx-pager models` and the app's
Models screen (``estimate.judge_plan``), and the benchmark's projection to a Mac
(``benchmark.projection``). A machine is described by ``MachineConstants``: measured here
by ``calibrate`` (cached for 30 days), or on a Mac the ``MAC_CONSTANTS`` row of its chip,
each with where its numbers come from.
"""

from __future__ import annotations

import json
import mmap
import os
import platform
import random
import subprocess
import tempfile
import threading
import time
from dataclasses import asdict, dataclass
from datetime import date, datetime
from pathlib import Path

from .atomic import write_atomic

# Fixed cost of one MoE layer per decoded token, whatever its size: the router's sync
# (``mx.eval`` before the experts are known), the id remap and cache lookups in Python,
# and dispatching the layer's other ops. Measured on the embedded model (6 MoE layers) on
# this project's 2-core Linux CPU: 1.3-3.7 ms per layer in all, the paged layer's own work
# 0.4-0.7 ms; 1 ms is the low end. No Mac measurement of it is published: the Mac rows
# use it too, and say so.
MOE_LAYER_OVERHEAD_S = 1e-3

# One cold expert read with ``pread`` on macOS: 2.8 ms for a 2.5 MiB expert
# (docs/field-notes.md), about 0.94 GB/s. The Mac rows read experts at this rate (capped
# by the SSD's sequential read): random MiB-sized reads do not reach the sequential figure.
MAC_EXPERT_READ_BYTES_PER_S = 2.5 * 2**20 / 2.8e-3

CALIBRATION_MAX_AGE_DAYS = 30
CALIBRATION_FILE = "speed-calibration.json"
_CALIBRATING = threading.Lock()  # two workers asking at once: one measures, one waits


@dataclass(frozen=True)
class MachineConstants:
    """What one decoded token costs per unit on a machine."""

    disk_bytes_per_s: float  # expert-sized (MiB) random reads, cold
    memory_bytes_per_s: float  # streaming the active weights from memory
    compute_s_per_byte: float  # quantised matmul, per byte of weights as held; 0: memory-bound
    host_s_per_layer: float  # syncs, Python and dispatch per MoE layer
    overlap: float  # share of the read time hidden behind compute, 0..1
    source: str  # "measured on this machine 2026-12-02 (cpu)" or the table row's citation
    basis: str  # short, for a figure: "measured here", "M4 Air table"
    backend: str = ""  # MLX's device when measured: "cpu", "gpu"
    measured_on: str = ""  # ISO date of the measurement ("" for a table row)


@dataclass(frozen=True)
class TokenCosts:
    """What one decoded token does, whatever the machine."""

    misses: float  # expert reads
    disk_bytes: float  # bytes those reads fetch
    moe_layers: int
    active_bytes: float  # weights the token computes with, as held in memory
    host_syncs: float  # host round trips (one per MoE layer in the pager)


def project_decode(costs: TokenCosts, machine: MachineConstants) -> float:
    """Seconds per decoded token.

    ``read = disk_bytes / disk_bytes_per_s``;
    ``compute = max(active_bytes / memory_bytes_per_s, active_bytes * compute_s_per_byte)``
    (memory-bound on a GPU, compute-bound on a slow CPU);
    ``host = host_syncs * host_s_per_layer``;
    ``seconds = read + compute + host - overlap * min(read, compute)``.
    """
    read = costs.disk_bytes / machine.disk_bytes_per_s
    compute = max(
        costs.active_bytes / machine.memory_bytes_per_s,
        costs.active_bytes * machine.compute_s_per_byte,
    )
    host = costs.host_syncs * machine.host_s_per_layer
    return read + compute + host - machine.overlap * min(read, compute)


@dataclass(frozen=True)
class MacRow:
    """One Mac in the projection table: published figures only, each with its source."""

    name: str  # "M4 Air 16GB"
    chip: str  # as sysctl's machdep.cpu.brand_string says it: "Apple M4"
    memory_bytes_per_s: float
    memory_source: str
    ssd_read_bytes_per_s: float | None  # sequential, published; None: not published
    ssd_source: str
    resident_tps: float | None  # mlx-lm, Qwen3-30B-A3B 4-bit, all resident; None: not published
    resident_source: str

    def constants(self) -> MachineConstants:
        """The row as MachineConstants: experts read at the measured macOS ``pread`` rate
        (``MAC_EXPERT_READ_BYTES_PER_S``, capped by the SSD), weights streamed at the
        memory bandwidth (memory-bound: no published compute figure), the host cost per
        layer as measured by this project (``MOE_LAYER_OVERHEAD_S``), no overlap."""
        disk = MAC_EXPERT_READ_BYTES_PER_S
        if self.ssd_read_bytes_per_s is not None:
            disk = min(disk, self.ssd_read_bytes_per_s)
        source = (
            f"{self.name} table: memory {self.memory_bytes_per_s / 1e9:.0f} GB/s "
            f"({self.memory_source}); expert reads {disk / 1e9:.2f} GB/s (2.8 ms per 2.5 MiB "
            f"pread on macOS, docs/field-notes.md; SSD: {self.ssd_source}); host "
            f"{MOE_LAYER_OVERHEAD_S * 1e3:.0f} ms per MoE layer (this project's CPU "
            "measurement, none published for a Mac)"
        )
        return MachineConstants(
            disk_bytes_per_s=disk,
            memory_bytes_per_s=self.memory_bytes_per_s,
            compute_s_per_byte=0.0,
            host_s_per_layer=MOE_LAYER_OVERHEAD_S,
            overlap=0.0,
            source=source,
            basis=f"{self.name.rsplit(' ', 1)[0]} table",
            backend="gpu",
        )


_NOT_PUBLISHED = "not published (none found)"
_MACRUMORS_M1 = (
    "256 GB, Blackmagic 2676 MB/s: MacRumors forum, macrumors.com/2020/11/16/"
    "apple-silicon-macbook-air-ssd-benchmarks"
)
_ARS_M3_AIR = (
    "Ars Technica, 'M3 MacBook Air refresh boosts storage speeds for 256GB models' (2024-03):"
)
_M1_BANDWIDTH = "LPDDR4X-4266 on 128 bits: AnandTech's M1 review; Apple publishes no figure"

# Published figures of Macs for Qwen3-30B-A3B-class paging, printed beside a projection.
# Sources: docs/field-notes.md (a per-expert cache in MLX, nunspark; a repacking MLX tool).
MAC_PAGER_FIGURES = [
    {
        "machine": "16 GB M4 MacBook Pro",
        "tool": "per-expert cache in MLX (nunspark)",
        "budget": "8 GB",
        "tokens_per_second": 6.4,
        "source": "docs/field-notes.md: 4.6 / 6.4 / 6.7 / 7.8 / 6.4 tok/s at 6-11 GB",
    },
    {
        "machine": "16 GB M4 Mac mini",
        "tool": "experts repacked on disk, MLX",
        "budget": "10.6 GB peak",
        "tokens_per_second": 14.1,
        "source": "docs/field-notes.md: 14.1 tok/s at 10.6 GB peak (80 tokens)",
    },
]

MAC_CONSTANTS: dict[str, MacRow] = {
    row.name: row
    for row in [
        MacRow("M1 Air 16GB", "Apple M1", 68.25e9, _M1_BANDWIDTH, 2676e6, _MACRUMORS_M1,
               None, _NOT_PUBLISHED),
        MacRow("M1 Pro 16GB", "Apple M1 Pro", 200e9,
               "Apple newsroom, 'Introducing M1 Pro and M1 Max' (2021-10): up to 200GB/s",
               None, _NOT_PUBLISHED, None, _NOT_PUBLISHED),
        MacRow("M2 Air 16GB", "Apple M2", 100e9,
               "Apple newsroom, 'Apple unveils M2' (2022-06): 100GB/s", 1621e6,
               "256 GB, AJA System Test 1621 MB/s: macotakara.jp/macintosh/entry-46351.html",
               None, _NOT_PUBLISHED),
        MacRow("M2 Pro 16GB", "Apple M2 Pro", 200e9,
               "Apple newsroom, 'Apple unveils M2 Pro and M2 Max' (2023-01): 200GB/s",
               None, _NOT_PUBLISHED, None, _NOT_PUBLISHED),
        MacRow("M3 Air 16GB", "Apple M3", 100e9,
               "Apple, MacBook Air (M3) tech specs: 100GB/s", 2900e6,
               f"{_ARS_M3_AIR} 256 GB about 2,900 MB/s (Blackmagic)", None, _NOT_PUBLISHED),
        MacRow("M3 Pro 18GB", "Apple M3 Pro", 150e9,
               "Apple newsroom, 'Apple unveils M3, M3 Pro, and M3 Max' (2023-10): 150GB/s",
               None, _NOT_PUBLISHED, None, _NOT_PUBLISHED),
        MacRow("M4 Air 16GB", "Apple M4", 120e9,
               "Apple, MacBook Air (M4) tech specs: 120GB/s", None, _NOT_PUBLISHED,
               None, _NOT_PUBLISHED),
        MacRow("M4 Pro 24GB", "Apple M4 Pro", 273e9,
               "Apple newsroom, 'Apple introduces M4 Pro and M4 Max' (2024-10): 273GB/s",
               None, _NOT_PUBLISHED, None, _NOT_PUBLISHED),
    ]
}  # fmt: skip


def mac_row_for(brand: str) -> MacRow | None:
    """The table row of a chip named as sysctl names it ("Apple M4 Pro"), or None."""
    brand = brand.strip()
    for row in MAC_CONSTANTS.values():
        if row.chip == brand:
            return row
    return None


def mac_brand() -> str:
    """sysctl's machdep.cpu.brand_string ("" when it cannot be asked)."""
    try:
        out = subprocess.run(["sysctl", "-n", "machdep.cpu.brand_string"],
                             capture_output=True, text=True, timeout=2, check=False)  # fmt: skip
    except (OSError, subprocess.SubprocessError):
        return ""
    return out.stdout.strip()


# -- calibration here --------------------------------------------------------------------

READ_CHUNK = 5 * 2**19  # 2.5 MiB: Qwen3-30B-A3B's expert, 4-bit
READ_FILE_BYTES = 64 * 2**20  # the temporary file; a probe file must be at least this
READ_COUNT = 16


def timed_reads(path: Path, size: int) -> tuple[float, str]:
    """Bytes/s of ``READ_COUNT`` expert-sized ``pread``s at random page-aligned offsets of
    the first ``size`` bytes of ``path``, kept off the page cache: ``O_DIRECT`` where the
    file system allows it, else ``posix_fadvise(DONTNEED)`` first (the kernel drops the
    file's clean pages); and which of the two it was."""
    fd = -1
    try:
        method = "O_DIRECT" if hasattr(os, "O_DIRECT") else "posix_fadvise(DONTNEED)"
        try:
            fd = os.open(path, os.O_RDONLY | getattr(os, "O_DIRECT", 0))
        except OSError:
            fd, method = os.open(path, os.O_RDONLY), "posix_fadvise(DONTNEED)"
        os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
        buffer = mmap.mmap(-1, READ_CHUNK)  # page-aligned, as O_DIRECT needs
        pages = (size - READ_CHUNK) // mmap.PAGESIZE
        rng = random.Random(0)
        offsets = [rng.randrange(pages) * mmap.PAGESIZE for _ in range(READ_COUNT)]
        try:
            start = time.perf_counter()
            done = sum(os.preadv(fd, [buffer], offset) for offset in offsets)
        except OSError:  # O_DIRECT refused at read time (tmpfs, some FUSE)
            os.close(fd)
            fd, method = os.open(path, os.O_RDONLY), "posix_fadvise(DONTNEED)"
            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
            start = time.perf_counter()
            done = sum(os.preadv(fd, [buffer], offset) for offset in offsets)
        return done / (time.perf_counter() - start), method
    finally:
        if fd >= 0:
            os.close(fd)


def measure_read_bandwidth(folder: Path, probe: Path | None = None) -> tuple[float, str]:
    """Cold expert-sized reads (``timed_reads``) of ``probe``, a large file already on
    disk (a model's shard: what misses read), else of a temporary file written in
    ``folder``. In a virtual machine the host may still cache a file just written, whatever
    the guest does, so a probe file reads nearer the truth; the method says which."""
    if probe is not None and Path(probe).stat().st_size >= READ_FILE_BYTES:
        bps, method = timed_reads(Path(probe), Path(probe).stat().st_size)
        return bps, f"{method}, an existing {Path(probe).stat().st_size / 2**30:.1f} GiB file"
    folder.mkdir(parents=True, exist_ok=True)
    fd, name = tempfile.mkstemp(dir=folder, prefix=".read-probe-")
    try:
        block = os.urandom(2**20)
        for _ in range(READ_FILE_BYTES // len(block)):
            os.write(fd, block)
        os.fsync(fd)
        os.close(fd)
        bps, method = timed_reads(Path(name), READ_FILE_BYTES)
        return bps, f"{method}, a {READ_FILE_BYTES // 2**20} MiB file just written"
    finally:
        os.unlink(name)


def measure_memory_bandwidth(nbytes: int = 64 * 2**20) -> float:
    """Bytes/s of a large copy (read plus write), the best of a few."""
    import numpy as np

    src = np.ones(nbytes // 8)
    dst = np.empty_like(src)
    best = float("inf")
    for _ in range(4):
        start = time.perf_counter()
        np.copyto(dst, src)
        best = min(best, time.perf_counter() - start)
    return 2 * nbytes / best


def measure_compute(rows: int = 2304, cols: int = 2048, repeats: int = 10) -> tuple[float, str]:
    """Seconds per byte of weights (as MLX holds them) of a 4-bit ``quantized_matmul`` of
    one vector with one expert-sized matrix (3 x 768 x 2048: a Qwen3-30B-A3B expert), in
    the compute dtype the engine uses on this backend; and the backend's name."""
    import mlx.core as mx

    from .paging.loader import default_compute_dtype

    dtype = default_compute_dtype() or mx.float16
    w = mx.random.normal((rows, cols)).astype(dtype)
    wq, scales, biases = mx.quantize(w, group_size=64, bits=4)
    x = mx.random.normal((1, cols)).astype(dtype)
    mx.eval(wq, scales, biases, x)

    def once():
        mx.eval(mx.quantized_matmul(x, wq, scales, biases, transpose=True, group_size=64, bits=4))

    once()
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        once()
        best = min(best, time.perf_counter() - start)
    nbytes = wq.nbytes + scales.nbytes + biases.nbytes
    backend = "gpu" if mx.default_device() == mx.gpu else "cpu"
    return best / nbytes, backend


def calibrate(cache_dir: Path, probe: Path | None = None) -> MachineConstants:
    """Measure this machine (about a second): cold expert-sized reads of ``probe`` or of
    a temporary file in ``cache_dir`` (``measure_read_bandwidth``), a memory copy, one
    expert's 4-bit matmul. The host cost per
    layer is the project's measurement (``MOE_LAYER_OVERHEAD_S``); overlap is 0, since
    the pager reads a layer's misses before it computes the layer."""
    disk, method = measure_read_bandwidth(Path(cache_dir), probe)
    memory = measure_memory_bandwidth()
    compute, backend = measure_compute()
    today = date.today().isoformat()
    source = (
        f"measured on this machine {today} (MLX {backend}): reads {disk / 1e6:.0f} MB/s "
        f"({READ_CHUNK / 2**20:.1f} MiB preads, {method}), memory {memory / 1e9:.1f} GB/s, "
        f"4-bit matmul {compute * 1e9:.2f} ns per weight byte; host "
        f"{MOE_LAYER_OVERHEAD_S * 1e3:.0f} ms per MoE layer (project measurement)"
    )
    return MachineConstants(
        disk_bytes_per_s=disk,
        memory_bytes_per_s=memory,
        compute_s_per_byte=compute,
        host_s_per_layer=MOE_LAYER_OVERHEAD_S,
        overlap=0.0,
        source=source,
        basis="measured here",
        backend=backend,
        measured_on=today,
    )


def default_cache_dir() -> Path:
    """Where the calibration is kept (MLX_PAGER_CACHE_DIR overrides, for tests)."""
    import platformdirs

    from .settings import APP_NAME

    return Path(os.environ.get("MLX_PAGER_CACHE_DIR") or platformdirs.user_cache_dir(APP_NAME))


def load_calibration(cache_dir: Path, today: date | None = None) -> MachineConstants | None:
    """The cached calibration, or None: absent, unreadable or older than 30 days."""
    path = Path(cache_dir) / CALIBRATION_FILE
    try:
        found = MachineConstants(**json.loads(path.read_text()))
        measured = datetime.fromisoformat(found.measured_on).date()
    except (OSError, ValueError, TypeError):
        return None
    if ((today or date.today()) - measured).days > CALIBRATION_MAX_AGE_DAYS:
        return None
    return found


def save_calibration(constants: MachineConstants, cache_dir: Path) -> Path:
    data = json.dumps(asdict(constants), indent=2).encode()
    return write_atomic(Path(cache_dir) / CALIBRATION_FILE, data)


def machine_constants(
    cache_dir: Path | None = None, *, measure: bool = True, probe: Path | None = None
) -> MachineConstants | None:
    """This machine's constants: on a Mac whose chip is in the table, its row; else the
    cached calibration (30 days); else a fresh one when ``measure`` (about a second, so
    not on a UI thread; ``probe``: a large file to read, see ``measure_read_bandwidth``),
    else None: the estimate is pending."""
    if platform.system() == "Darwin":
        row = mac_row_for(mac_brand())
        if row is not None:
            return row.constants()
    folder = Path(cache_dir) if cache_dir is not None else default_cache_dir()
    found = load_calibration(folder)
    if found is not None or not measure:
        return found
    with _CALIBRATING:
        found = load_calibration(folder)  # measured meanwhile by another thread
        if found is None:
            found = calibrate(folder, probe)
            save_calibration(found, folder)
    return found
