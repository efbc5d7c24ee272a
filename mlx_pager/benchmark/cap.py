"""A real memory cap around one child process: a Linux memory cgroup (page cache included)
and the kernel's own counters for what the child read and how long it waited on the disk.

The child joins the cgroup between fork and exec (``preexec_fn``), so nothing it runs is
outside the cap. While it runs, each thread's block-I/O delay (field 42 of
``/proc/PID/task/TID/stat``, delay accounting) is polled and its maximum kept per thread:
the engines read in worker threads, and a thread's count leaves ``/proc`` with it. Once
the child has exited but before it is reaped (``waitid(WNOWAIT)``), its ``/proc/PID/io``
still holds the whole process's ``read_bytes``. Without root or a memory cgroup the child
runs uncapped and the result says why.
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
        """rmdir the cgroup; a lingering process (should be none) is moved out first."""
        if not self.path.exists():
            return
        parent = self.path.parent / "cgroup.procs"
        for _ in range(50):
            try:
                self.path.rmdir()
                return
            except OSError:
                try:
                    for pid in self.procs.read_text().split():
                        _write(parent, pid)
                except OSError:
                    pass
                time.sleep(0.05)
        self.path.rmdir()


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


def own_counters() -> tuple[int | None, float | None]:
    """This process's storage bytes read so far (``/proc/self/io``) and block-I/O delay
    summed over its live threads, in seconds (None where the kernel does not say): read
    at two moments, the difference is what happened between them (a decode's reads)."""
    ticks: dict[int, int] = {}
    _thread_delays(os.getpid(), ticks)
    clk = os.sysconf("SC_CLK_TCK")
    with open("/proc/self/stat") as f:  # field 22: start time, in ticks after boot
        started = int(f.read().rsplit(")", 1)[1].split()[22 - 3])
    with open("/proc/uptime") as f:
        lived = float(f.read().split()[0]) * clk - started
    total, _ = blkio_ticks(ticks, ticks, lived)  # a garbage count is left out, as outside
    return _read_bytes(os.getpid()), total / clk if ticks else None


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
    delayacct = enable_delay_accounting()
    if not delayacct:
        notes.append("delay accounting unavailable: no block-I/O stall seconds")
    import tempfile

    try:
        with tempfile.TemporaryFile() as out, tempfile.TemporaryFile() as err:
            procs = str(group.procs) if group else None

            def join_cgroup() -> None:  # in the child, after fork, before exec
                if procs:
                    with open(procs, "w") as f:
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
            threads_seen=len(delays),
            delay_accounting=delayacct,
            notes=notes,
        )
    finally:
        if group is not None:
            group.remove()
