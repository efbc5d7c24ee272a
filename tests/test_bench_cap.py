"""The memory cap: a child over it is OOM-killed and reported so, one under it completes,
the kernel's counters come back, and the cgroup is gone afterwards."""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

import pytest

from mlx_pager.benchmark.cap import blkio_ticks, cgroup2_mount, cgroup_version, run_capped

MiB = 2**20
needs_cgroup = pytest.mark.skipif(cgroup_version()[0] is None, reason=cgroup_version()[1])

TOUCH = "x = bytearray({n} * 2**20)\nfor i in range(0, len(x), 4096): x[i] = 1\nprint('done')"


@needs_cgroup
def test_child_above_the_cap_is_oom_killed():
    r = run_capped([sys.executable, "-c", TOUCH.format(n=400)], 128 * MiB)
    assert r.signal == "SIGKILL" and r.oom_killed
    assert r.cap["oom_kills"] >= 1
    assert 0 < r.cap["peak_bytes"] <= r.cap["limit_bytes"] == 128 * MiB
    assert "done" not in r.stdout
    assert not Path(r.cap["path"]).exists()


@needs_cgroup
def test_child_under_the_cap_completes_with_counters(tmp_path):
    data = tmp_path / "data.bin"
    data.write_bytes(b"\1" * (8 * MiB))
    code = f"import os\nos.posix_fadvise(os.open({str(data)!r}, os.O_RDONLY), 0, 0, 4)\n"
    code += f"open({str(data)!r}, 'rb').read()\n" + TOUCH.format(n=20)
    r = run_capped([sys.executable, "-c", code], 256 * MiB)
    assert r.returncode == 0 and not r.oom_killed and r.signal is None
    assert r.stdout.strip() == "done"
    assert 20 * MiB < r.cap["peak_bytes"] <= 256 * MiB
    assert r.cap["oom_kills"] == 0
    assert r.read_bytes is not None and r.read_bytes >= 0
    assert r.blkio_delay_s is None or r.blkio_delay_s >= 0
    assert not Path(r.cap["path"]).exists()


def test_uncapped_run_says_why():
    r = run_capped([sys.executable, "-c", "print(1)"], None)
    assert r.cap is None and r.cap_reason and r.returncode == 0


def test_impossible_thread_delays_are_left_out():
    assert blkio_ticks({1: 5, 2: 10**7}, {1: 0, 2: 10**7}, 100) == (5, 1)
    assert blkio_ticks({1: 5, 2: 7}, {1: 0, 2: 0}, 100) == (12, 0)


COLD_READ = """
import json, os, threading
from mlx_pager.benchmark.cap import own_counters
path = {path!r}
before = own_counters()[2]
fd = os.open(path, os.O_RDONLY)
os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
size = os.path.getsize(path) // 8
reads = [threading.Thread(target=os.pread, args=(fd, size, i * size)) for i in range(8)]
for t in reads: t.start()
for t in reads: t.join()
after = own_counters()[2]
print(json.dumps({{k: after[k] - before[k] for k in after}}))
"""


@pytest.mark.skipif(
    os.geteuid() != 0 or cgroup2_mount() is None, reason="needs root and a cgroup v2 hierarchy"
)
def test_io_pressure_counts_the_wall_clock_stall_of_a_cold_read(tmp_path):
    """PSI in the child's own group: a cold read on 8 threads is stalled time, counted
    once however many threads wait (full <= some <= wall); the child sees its own."""
    data = tmp_path / "data.bin"
    data.write_bytes(os.urandom(64 * MiB))
    os.sync()  # dirty pages cannot be dropped
    r = run_capped([sys.executable, "-c", COLD_READ.format(path=str(data))], None)
    assert r.returncode == 0, r.stderr
    assert 0 < r.io_pressure_s["full"] <= r.io_pressure_s["some"] <= r.wall_s
    own = json.loads(r.stdout)
    assert 0 < own["some"] <= r.io_pressure_s["some"]
    mine = f"mlx-pager-psi-{os.getpid()}-"  # not those of a benchmark running beside it
    left = [p.name for p in cgroup2_mount().iterdir() if p.name.startswith(mine)]
    assert left == []
