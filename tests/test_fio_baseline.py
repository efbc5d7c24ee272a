"""The benchmark's disk baseline: fio's command line for bursts, and a stalled fio ended
with every process it forked."""

from __future__ import annotations

import json
import os
import shutil
import time

import pytest

from mlx_pager.sim.bench import fio_random_read


def _fake_fio(folder, body: str) -> None:
    """A ``fio`` first on PATH that runs ``body`` (sh) with the command line in ``$@``."""
    fio = folder / "fio"
    fio.write_text(f"#!/bin/sh\n{body}\n")
    fio.chmod(0o755)


def test_bursts_wait_for_every_read_before_the_next(tmp_path, monkeypatch):
    data = tmp_path / "data"
    data.write_bytes(b"\0" * (1 << 20))
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    report = json.dumps({"jobs": [{"read": {"bw_bytes": 5e8}}]})
    _fake_fio(bin_dir, f"echo \"$@\" > {tmp_path / 'args'}\necho '{report}'")
    monkeypatch.setenv("PATH", f"{bin_dir}{os.pathsep}{os.environ['PATH']}")
    assert fio_random_read(data, 32768, 12, False, burst=True) == 5e8
    args = (tmp_path / "args").read_text().split()
    # a think time after every 12 reads issued: fio waits for all of them first
    assert {"--iodepth=12", "--thinktime=1", "--thinktime_blocks=12"} <= set(args)
    assert "--thinktime_blocks_type=issue" in args and "--thinktime_spin=1" not in args
    assert fio_random_read(data, 32768, 8, False) == 5e8  # a steady queue: no think time
    assert not any(a.startswith("--thinktime") for a in (tmp_path / "args").read_text().split())


@pytest.mark.skipif(shutil.which("sh") is None, reason="needs a POSIX shell")
def test_a_stalled_fio_is_ended_with_the_processes_it_forked(tmp_path, monkeypatch):
    data = tmp_path / "data"
    data.write_bytes(b"\0" * (1 << 20))
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    pid_file = tmp_path / "job.pid"
    # as fio does: a job process of its own, which here never finishes
    _fake_fio(bin_dir, f"sleep 60 &\necho $! > {pid_file}\nwait")
    monkeypatch.setenv("PATH", f"{bin_dir}{os.pathsep}{os.environ['PATH']}")
    start = time.monotonic()
    assert fio_random_read(data, 32768, 12, False, burst=True, timeout=1.0) is None
    assert time.monotonic() - start < 30
    job = int(pid_file.read_text())
    deadline = time.monotonic() + 5  # the kill is delivered at once; reaping may lag
    while _alive(job):
        if time.monotonic() > deadline:
            pytest.fail(f"fio's job process {job} outlived the timeout")
        time.sleep(0.1)


def _alive(pid: int) -> bool:
    """Running: not gone, and not a zombie waiting to be reaped (Linux's /proc says)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    try:
        with open(f"/proc/{pid}/stat") as stat:
            return stat.read().rsplit(")", 1)[1].split()[0] != "Z"
    except OSError:
        return True
