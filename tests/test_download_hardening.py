"""Downloads a stranger's repository cannot turn against the user: bytes checked against
the Hub's sha256 before they take the blob's name, busy servers retried then reported,
names that climb out of the snapshot refused, nothing fetched that would be run, a
download killed with SIGKILL resumed by the next run."""

from __future__ import annotations

import hashlib
import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
from safetensors.numpy import save_file

import mlx_pager.hub.fetch as fetch
from mlx_pager.hub.errors import DownloadError
from mlx_pager.hub.fetch import download
from mlx_pager.hub.plan import plan_download

ROOT = Path(__file__).resolve().parents[1]


def sha(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


@pytest.fixture(scope="module")
def repo(tmp_path_factory) -> Path:
    """4 MiB of random weights, a config, and a Python file that must never arrive."""
    folder = tmp_path_factory.mktemp("repo") / "model"
    folder.mkdir()
    rng = np.random.default_rng(1)
    save_file({"w": rng.integers(0, 2**32, (1024, 1024), dtype=np.uint32)},
              str(folder / "model.safetensors"))  # fmt: skip
    (folder / "config.json").write_text(json.dumps({"model_type": "qwen3_moe"}))
    (folder / "modeling_evil.py").write_text("raise SystemExit('executed')\n")
    return folder


@pytest.fixture(autouse=True)
def quick_retries(monkeypatch):
    monkeypatch.setattr(fetch, "RETRY_WAIT_S", 0.01)


def test_wrong_bytes_after_a_resume_are_discarded(hub_server, repo, hf_cache):
    hub_server.add_repo("org/m", repo)
    hub_server.fail_after = 1_000_000  # the connection drops; the resume gets bad bytes
    hub_server.corrupt_resumes = True
    with pytest.raises(DownloadError, match=r"model.safetensors of org/m arrived corrupt"):
        download("org/m", endpoint=hub_server.endpoint)
    blobs = hf_cache / "models--org--m" / "blobs"
    etag = sha(repo / "model.safetensors")
    assert not (blobs / etag).exists() and not (blobs / f"{etag}.incomplete").exists()
    for blob in blobs.iterdir():  # every blob named by a sha256 holds exactly that
        if re.fullmatch(r"[0-9a-f]{64}", blob.name):
            assert sha(blob) == blob.name
    hub_server.corrupt_resumes = False
    path = download("org/m", endpoint=hub_server.endpoint)
    assert sha(path / "model.safetensors") == etag


def test_busy_server_is_retried_with_backoff(hub_server, repo, hf_cache, monkeypatch):
    waits = []
    monkeypatch.setattr(fetch.time, "sleep", waits.append)
    hub_server.add_repo("org/m", repo)
    hub_server.busy = [429, 503, 500]
    path = download("org/m", endpoint=hub_server.endpoint)
    assert sha(path / "model.safetensors") == sha(repo / "model.safetensors")
    assert waits[:3] == [0.01, 0.02, 0.04]  # doubled each time


def test_a_server_that_stays_busy_is_reported(hub_server, repo, hf_cache):
    hub_server.add_repo("org/m", repo)
    hub_server.busy = [503] * (fetch.RETRIES + 1)
    with pytest.raises(DownloadError, match=r"answered 503 to 6 requests in a row.*later"):
        download("org/m", endpoint=hub_server.endpoint)


def test_a_busy_listing_is_asked_again_then_reported(hub_server, repo, hf_cache, monkeypatch):
    import mlx_pager.hub.plan as plan

    waits = []
    monkeypatch.setattr(plan.time, "sleep", waits.append)
    hub_server.add_repo("org/m", repo)
    hub_server.busy_api = [503, 429]
    assert plan_download("org/m", endpoint=hub_server.endpoint, read_sizes=False).files
    assert waits == [0.5, 1.0]
    hub_server.busy_api = [503] * (plan.PLAN_RETRIES + 1)
    with pytest.raises(DownloadError, match="org/m"):
        plan_download("org/m", endpoint=hub_server.endpoint, read_sizes=False)


@pytest.mark.parametrize("name", ["../escape.json", "sub/../../escape.json"])
def test_a_name_that_climbs_out_of_the_snapshot_is_refused(hub_server, repo, hf_cache, name):
    hub_server.add_repo("org/m", repo)
    files = hub_server.repos["org/m"].files
    files[name] = files["config.json"]
    with pytest.raises(DownloadError, match="outside its snapshot folder"):
        plan_download("org/m", endpoint=hub_server.endpoint)
    assert not list(hf_cache.parent.rglob("escape.json"))


def test_only_what_the_model_needs_and_no_code(hub_server, repo, hf_cache):
    hub_server.add_repo("org/m", repo)
    path = download("org/m", endpoint=hub_server.endpoint)
    assert sorted(p.name for p in path.iterdir()) == ["config.json", "model.safetensors"]
    assert not hub_server.seen("GET", "modeling_evil.py")


def test_no_trust_remote_code_anywhere():
    """Nothing downloaded is executed: no code path asks transformers or mlx-lm to (the
    server's mlx-lm arguments say False, explicitly)."""
    hits = []
    for folder in ("mlx_pager", "app"):
        for path in (ROOT / folder).rglob("*.py"):
            for i, line in enumerate(path.read_text().splitlines(), 1):
                if "trust_remote_code" in line and "trust_remote_code=False" not in line:
                    hits.append(f"{path.relative_to(ROOT)}:{i}")
    assert hits == []


@pytest.mark.slow
def test_sigkill_mid_download_then_the_next_run_resumes(hub_server, repo, hf_cache, tmp_path):
    hub_server.add_repo("org/m", repo)
    hub_server.throttle = 1_000_000  # 4 MiB: about 4 s, time to kill it halfway
    env = {**os.environ, "HF_HUB_CACHE": str(hf_cache), "HF_HOME": str(hf_cache.parent)}
    cmd = [sys.executable, "-m", "mlx_pager.cli", "download", "org/m",
           "--endpoint", hub_server.endpoint]  # fmt: skip
    blobs = hf_cache / "models--org--m" / "blobs"
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        partial = list(blobs.glob("*.incomplete")) if blobs.exists() else []
        if partial and partial[0].stat().st_size > 1_000_000:
            break
        time.sleep(0.05)
    proc.send_signal(signal.SIGKILL)
    proc.wait(10)
    (partial,) = blobs.glob("*.incomplete")
    kept = partial.stat().st_size
    assert 0 < kept < (repo / "model.safetensors").stat().st_size
    hub_server.throttle = None
    done = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    snapshot = Path(done.stdout.strip().splitlines()[-1])
    for name in ("model.safetensors", "config.json"):
        assert sha(snapshot / name) == sha(repo / name)
    ranges = [r.headers.get("Range") for r in hub_server.seen("GET", "model.safetensors")]
    assert any(r and int(r.split("=")[1].rstrip("-")) >= kept for r in ranges)
    assert not list(blobs.glob("*.incomplete"))
