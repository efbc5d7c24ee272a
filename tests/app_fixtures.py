"""Fixtures and helpers for the app's tests: a tiny real checkpoint and an app around it.

Import with ``from app_fixtures import *`` (pytest puts tests/ on sys.path).
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable
from pathlib import Path

import pytest
from mlx_pager_app.main import create_app

from mlx_pager.machine import MachineMemory
from mlx_pager.paging.loader import inspect_model
from mlx_pager.settings import Settings, save_settings
from mlx_pager.sim.synthetic import make_checkpoint
from mlx_pager.speed import MachineConstants

CONTEXT = 256
# Fixed machine for the settings screen, so snapshots do not depend on the host.
MACHINE = MachineMemory(total_bytes=16 * 10**9, available_bytes=9 * 10**9, gpu_limit_bytes=None)
# Fixed speed constants, so no test measures this machine and speeds do not depend on it.
SPEED = MachineConstants(
    disk_bytes_per_s=1e9, memory_bytes_per_s=100e9, compute_s_per_byte=0.0,
    host_s_per_layer=1e-3, overlap=0.0, source="fixed constants of the app tests",
    basis="fixed",
)  # fmt: skip


@pytest.fixture(scope="session")
def app_model(tmp_path_factory) -> Path:
    """A random qwen3_moe checkpoint (2 MoE layers x 8 experts, top-2), with tokenizer."""
    return make_checkpoint(tmp_path_factory.mktemp("models") / "tiny-moe", "qwen3_moe")


@pytest.fixture(scope="session")
def fixed_bytes(app_model) -> int:
    """Core + KV + headroom at the test context: the budget that leaves no expert slot."""
    return inspect_model(app_model, CONTEXT).plan(0).fixed_bytes


@pytest.fixture
def settings_file(tmp_path) -> Path:
    path = tmp_path / "config" / "settings.toml"
    save_settings(Settings(budget="60MB", context_length=CONTEXT), path)
    return path


@pytest.fixture
def long_context(settings_file) -> Path:
    """Settings whose context leaves room for a reply of thousands of tokens (a reply
    ends at the context length)."""
    save_settings(Settings(budget="60MB", context_length=8192), settings_file)
    return settings_file


@pytest.fixture
def make_app(tmp_path, app_model, settings_file) -> Callable:
    """``make_app(**overrides)``: the app on the tiny model, with its files in tmp_path."""

    def make(**overrides):
        options = dict(
            settings_path=settings_file,
            data_dir=tmp_path / "data",
            model=str(app_model),
            default_model=lambda: str(app_model),
            machine=lambda: MACHINE,
            speed=lambda measure=True: SPEED,
            max_tokens=24,
        )
        options.update(overrides)
        return create_app(**options)

    return make


async def wait_for(pilot, predicate: Callable[[], object], timeout: float = 20.0) -> None:
    """Let the app run until ``predicate()`` holds (workers finish on other threads)."""
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {predicate}")
        await pilot.pause(0.02)
    await asyncio.sleep(0)


async def wait_ready(pilot) -> None:
    await wait_for(pilot, lambda: pilot.app.engine_state.status in ("ready", "error"))
    await pilot.pause()


def hf_cache_with(src: Path, cache: Path, repo: str) -> Path:
    """Lay a checkpoint out as huggingface_hub does: blobs, refs, snapshot symlinks."""
    import hashlib
    import os
    import shutil

    root = cache / f"models--{repo.replace('/', '--')}"
    commit = hashlib.sha1(repo.encode()).hexdigest()
    snapshot = root / "snapshots" / commit
    (root / "blobs").mkdir(parents=True)
    snapshot.mkdir(parents=True)
    (root / "refs").mkdir()
    (root / "refs" / "main").write_text(commit)
    for file in sorted(src.iterdir()):
        blob = root / "blobs" / hashlib.sha256(file.read_bytes()).hexdigest()
        shutil.copy(file, blob)
        (snapshot / file.name).symlink_to(os.path.relpath(blob, snapshot))
    return snapshot
