"""A real memory cap around one child process: a Linux memory cgroup (page cache included)
and the kernel's own counters for what the child read and how long it waited on the disk.

The child joins the cgroup between fork and exec (``preexec_fn``), so nothing it runs is
outside the cap. While it runs, each thread's block-I/O delay (field 42 of
``/proc/PID/task/TID/stat``, delay accounting) is polled and its maximum kept per thread:
the engines read in worker threads, and a thread's count leaves ``/proc`` with it. Once
the child has exited but before it is reaped (``waitid(WNOWAIT)``), its ``/proc/PID/io``
still holds the whole process's ``read_bytes``. Without root or a memory cgroup the child
runs uncapped and the result says why.

Delay accounting sums threads: eight reader threads waiting on one layer's misses count
eight times the wait. The child therefore also runs in a cgroup v2 group of its own (the
memory cgroup on a v2 machine; beside it, in the v2 hierarchy a hybrid machine also
mounts, on v1) whose ``io.pressure`` (PSI) says how long, in wall-clock time, at least one
of its threads (``some``) and every one of its threads that was not idle, at once
(``full``), were stalled on I/O. ``full`` is the time the process could do nothing but
wait for the disk, the same measure whether an engine reads on one thread or eight.
"""

from __future__ import annotations

import os
import signal
import subprocess
import time
import uuid
from dataclasses import asdict, dataclass, field
from pathlib import Path

CGROUP_ROOT = Path("/sys/fs/cgroup")
V1_MEMORY = CGROUP_ROOT / "memory"


@dataclass
class ChildResult:
    """How a child ran: its output, how it ended, the cap it ran under, its counters."""

    argv: list[str]
    returncode: int | None
    signal: str | None  # the signal that killed it, e.g. SIGKILL
    oom_killed: bool
    stdout: str
    stderr: str
    wall_s: float
    cap: dict | None  # {version, limit_bytes, peak_bytes, oom_kills, swap_possible, path}
    cap_reason: str | None  # why there is no cap, when there is none
    read_bytes: int | None  # /proc/PID/io, the whole process
    blkio_delay_s: float | None  # summed over threads; None without delay accounting
    io_pressure_s: dict | None = None  # PSI {"some", "full"} seconds; None without PSI
    threads_seen: int = 0
    delay_accounting: bool = False
    notes: list[str] = field(default_factory=list)

    def to_dict(self) -> dict:
        out = asdict(self)
        out.pop("stdout")
        return out


def cgroup_version() -> tuple[str | None, str]:
    """("v1" | "v2" | None, why): which memory cgroup this machine can give a child."""
    if os.geteuid() != 0:
        return None, "not root: cannot create a memory cgroup"
    if (V1_MEMORY / "memory.limit_in_bytes").exists():
        return "v1", "cgroup v1 memory controller"
    controllers = CGROUP_ROOT / "cgroup.controllers"
    if controllers.exists() and "memory" in controllers.read_text().split():
        return "v2", "cgroup v2 with the memory controller"
    return None, "no memory cgroup controller mounted"


def drop_page_cache() -> bool:
    """Write back and drop the page cache, so the next arm reads cold; False if not allowed."""
    os.sync()
    try:
        Path("/proc/sys/vm/drop_caches").write_text("1\n")
    except OSError:
        return False
    return True


def enable_delay_accounting() -> bool:
    """Turn on per-task delay accounting (kernel.task_delayacct), needed for field 42."""
    knob = Path("/proc/sys/kernel/task_delayacct")
    try:
        if knob.read_text().strip() != "1":
            knob.write_text("1\n")
        return knob.read_text().strip() == "1"
    except OSError:
        return False


def _write(path: Path, value: str) -> None:
    with open(path, "w") as f:
        f.write(value)


class MemoryCgroup:
    """One cgroup with a memory limit; removed by ``remove`` (always call it)."""

    def __init__(self, version: str, limit_bytes: int, name: str | None = None):
        self.version = version
        self.limit_bytes = int(limit_bytes)
        name = name or f"mlx-pager-bench-{os.getpid()}-{uuid.uuid4().hex[:8]}"
        base = V1_MEMORY if version == "v1" else CGROUP_ROOT
        self.path = base / name
        self.swap_possible = True
        self.path.mkdir()
        try:
            self._configure()
        except BaseException:
            self.remove()
            raise

    def _configure(self) -> None:
        if self.version == "v1":
            _write(self.path / "memory.limit_in_bytes", str(self.limit_bytes))
            memsw = self.path / "memory.memsw.limit_in_bytes"
            if memsw.exists():  # memory + swap = memory: no swap for the child
                _write(memsw, str(self.limit_bytes))
                self.swap_possible = False
            try:
                _write(self.path / "memory.swappiness", "0")
            except OSError:
                pass
        else:
            _write(self.path / "memory.max", str(self.limit_bytes))
            swap = self.path / "memory.swap.max"
            if swap.exists():
                _write(swap, "0")
                self.swap_possible = False
            elif not Path("/proc/swaps").read_text().strip().count("\n"):
                self.swap_possible = False

    @property
    def procs(self) -> Path:
        return self.path / "cgroup.procs"

    def peak_bytes(self) -> int | None:
        name = "memory.max_usage_in_bytes" if self.version == "v1" else "memory.peak"
        try:
            return int((self.path / name).read_text().split()[0])
        except (OSError, ValueError, IndexError):
            return None

    def oom_kills(self) -> int | None:
        """The kernel's OOM kills inside this cgroup (v1 memory.oom_control, v2 memory.events)."""
        name = "memory.oom_control" if self.version == "v1" else "memory.events"
        try:
            lines = (self.path / name).read_text().splitlines()
        except OSError:
            return None
        for line in lines:
            key, _, value = line.partition(" ")
            if key == "oom_kill":
                return int(value)
        return None

    def remove(self) -> None:
        remove_group(self.path)


def remove_group(path: Path) -> None:
    """rmdir a cgroup; a lingering process (should be none) is moved out first."""
    if not path.exists():
        return
    for _ in range(50):
        try:
            path.rmdir()
            return
        except OSError:
            try:
                for pid in (path / "cgroup.procs").read_text().split():
                    _write(path.parent / "cgroup.procs", pid)
            except OSError:
                pass
            time.sleep(0.05)
    path.rmdir()


def cgroup2_mount() -> Path | None:
    """Where the cgroup v2 hierarchy is mounted (``/sys/fs/cgroup`` on a v2 machine,
    ``/sys/fs/cgroup/unified`` beside v1 on a hybrid one), or None."""
    try:
        mounts = Path("/proc/self/mounts").read_text().splitlines()
    except OSError:
        return None
    for line in mounts:
        fields = line.split()
        if len(fields) > 2 and fields[2] == "cgroup2":
            return Path(fields[1])
    return None


class PressureGroup:
    """A cgroup v2 group with no limits, made only for its ``io.pressure``; ``remove`` it."""

    def __init__(self, root: Path, name: str | None = None):
        self.path = root / (name or f"mlx-pager-psi-{os.getpid()}-{uuid.uuid4().hex[:8]}")
        self.path.mkdir()
        if not (self.path / "io.pressure").exists():  # a kernel without PSI
            self.path.rmdir()
            raise OSError("no io.pressure: this kernel has no pressure stall information")

    @property
    def procs(self) -> Path:
        return self.path / "cgroup.procs"

    def remove(self) -> None:
        remove_group(self.path)


def io_pressure(group: Path) -> dict[str, float] | None:
    """Seconds the group's tasks were stalled on I/O (PSI totals): ``some`` (at least one
    task) and ``full`` (every task not idle, at once); None where the kernel does not say."""
    try:
        lines = (group / "io.pressure").read_text().splitlines()
    except OSError:
        return None
    out = {}
    for line in lines:
        kind, *fields = line.split()
        values = dict(f.split("=", 1) for f in fields)
        out[kind] = int(values["total"]) / 1e6
    return out if {"some", "full"} <= out.keys() else None


def own_pressure_group() -> Path | None:
    """This process's own cgroup v2 group (the harness puts each arm in one), or None when
    it is in the hierarchy's root: that one's pressure is the whole machine's."""
    mount = cgroup2_mount()
    try:
        lines = Path("/proc/self/cgroup").read_text().splitlines()
    except OSError:
        return None
    for line in lines:
        if line.startswith("0::"):
            path = line[3:].strip().lstrip("/")
            return mount / path if mount is not None and path else None
    return None


def _thread_delays(pid: int, into: dict[int, int], first: dict[int, int] | None = None) -> None:
    """Each live thread's block-I/O delay ticks (stat field 42), the max kept per thread
    (and the first value seen, in ``first``)."""
    try:
        tids = os.listdir(f"/proc/{pid}/task")
    except OSError:
        return
    for tid in tids:
        try:
            stat = Path(f"/proc/{pid}/task/{tid}/stat").read_text()
        except OSError:
            continue
        fields = stat.rsplit(")", 1)[1].split()  # fields from 3 on; the name may hold spaces
        ticks = int(fields[42 - 3])
        into[int(tid)] = max(into.get(int(tid), 0), ticks)
        if first is not None:
            first.setdefault(int(tid), ticks)


def blkio_ticks(
    delays: dict[int, int], first: dict[int, int], elapsed_ticks: float
) -> tuple[int, int]:
    """Summed ticks, and how many threads showed more delay than the child has lived: this
    kernel hands some new threads a garbage count (seen on 6.18); those are left out."""
    total, bogus = 0, 0
    for tid, ticks in delays.items():
        if ticks > elapsed_ticks + 1 or first.get(tid, 0) > elapsed_ticks + 1:
            bogus += 1
            continue
        total += ticks
    return total, bogus


def own_counters() -> tuple[int | None, float | None, dict[str, float] | None]:
    """This process's storage bytes read so far (``/proc/self/io``), block-I/O delay
    summed over its live threads in seconds, and its own cgroup's I/O pressure seconds
    (None where the kernel does not say): read at two moments, the difference is what
    happened between them (a decode's reads)."""
    ticks: dict[int, int] = {}
    _thread_delays(os.getpid(), ticks)
    clk = os.sysconf("SC_CLK_TCK")
    with open("/proc/self/stat") as f:  # field 22: start time, in ticks after boot
        started = int(f.read().rsplit(")", 1)[1].split()[22 - 3])
    with open("/proc/uptime") as f:
        lived = float(f.read().split()[0]) * clk - started
    total, _ = blkio_ticks(ticks, ticks, lived)  # a garbage count is left out, as outside
    group = own_pressure_group()
    pressure = io_pressure(group) if group is not None else None
    return _read_bytes(os.getpid()), total / clk if ticks else None, pressure


def _read_bytes(pid: int) -> int | None:
    try:
        for line in Path(f"/proc/{pid}/io").read_text().splitlines():
            if line.startswith("read_bytes:"):
                return int(line.split()[1])
    except OSError:
        return None
    return None


def run_capped(
    argv: list[str],
    cap_bytes: int | None,
    *,
    poll_s: float = 0.2,
    timeout_s: float | None = None,
    env: dict[str, str] | None = None,
    cwd: str | Path | None = None,
) -> ChildResult:
    """Run ``argv`` to completion inside a memory cgroup of ``cap_bytes`` (None: uncapped),
    with its kernel counters; the cgroup is removed whatever happens."""
    notes: list[str] = []
    version, why = cgroup_version() if cap_bytes is not None else (None, "no cap asked")
    group = MemoryCgroup(version, cap_bytes) if version else None
    pressure, why_no_pressure, v2 = None, None, cgroup2_mount()
    if group is not None and group.version == "v2":
        pressure = group  # the memory cgroup's own io.pressure
    elif os.geteuid() == 0 and v2 is not None:
        try:
            pressure = PressureGroup(v2)
        except OSError as e:
            why_no_pressure = str(e)
    else:
        why_no_pressure = "no cgroup v2 hierarchy (or not root): no I/O pressure seconds"
    if why_no_pressure:
        notes.append(why_no_pressure)
    delayacct = enable_delay_accounting()
    if not delayacct:
        notes.append("delay accounting unavailable: no block-I/O stall seconds")
    import tempfile

    try:
        with tempfile.TemporaryFile() as out, tempfile.TemporaryFile() as err:
            procs = [str(g.procs) for g in dict.fromkeys((group, pressure)) if g is not None]

            def join_cgroup() -> None:  # in the child, after fork, before exec
                for path in procs:
                    with open(path, "w") as f:
                        f.write(str(os.getpid()))

            start = time.perf_counter()
            child = subprocess.Popen(
                argv, stdout=out, stderr=err, env=env, cwd=cwd, preexec_fn=join_cgroup
            )
            delays: dict[int, int] = {}
            first: dict[int, int] = {}
            timed_out = False
            while True:
                done = os.waitid(os.P_PID, child.pid, os.WEXITED | os.WNOHANG | os.WNOWAIT)
                if done is not None:
                    break
                _thread_delays(child.pid, delays, first)
                if timeout_s is not None and time.perf_counter() - start > timeout_s:
                    child.kill()
                    timed_out = True
                time.sleep(poll_s)
            # Exited, not reaped: /proc/PID/io holds the whole process's counts.
            _thread_delays(child.pid, delays, first)
            read_bytes = _read_bytes(child.pid)
            stalled = io_pressure(pressure.path) if pressure is not None else None
            child.wait()
            wall = time.perf_counter() - start
            out.seek(0)
            err.seek(0)
            stdout = out.read().decode(errors="replace")
            stderr = err.read().decode(errors="replace")
        if timed_out:
            notes.append(f"killed after the {timeout_s} s time limit")
        rc = child.returncode
        sig = signal.Signals(-rc).name if rc is not None and rc < 0 else None
        cap = None
        oom = False
        if group is not None:
            kills = group.oom_kills()
            oom = bool(kills) and sig == "SIGKILL"
            cap = {
                "version": group.version,
                "path": str(group.path),
                "limit_bytes": group.limit_bytes,
                "peak_bytes": group.peak_bytes(),
                "oom_kills": kills,
                "swap_possible": group.swap_possible,
            }
        clk = os.sysconf("SC_CLK_TCK")
        ticks, bogus = blkio_ticks(delays, first, wall * clk)
        if bogus:
            notes.append(
                f"{bogus} threads reported more block-I/O delay than the child's lifetime "
                "(a kernel miscount at thread start): left out of the stall seconds"
            )
        return ChildResult(
            argv=list(argv),
            returncode=rc,
            signal=sig,
            oom_killed=oom,
            stdout=stdout,
            stderr=stderr,
            wall_s=wall,
            cap=cap,
            cap_reason=None if group else why,
            read_bytes=read_bytes,
            blkio_delay_s=ticks / clk if delayacct else None,
            io_pressure_s=stalled,
            threads_seen=len(delays),
            delay_accounting=delayacct,
            notes=notes,
        )
    finally:
        if pressure is not None and pressure is not group:
            pressure.remove()
        if group is not None:
            group.remove()
