"""Shared fixtures. Keep this file to fixtures; helpers for building checkpoints live in
tests/checkpoints.py."""

from __future__ import annotations

import pytest


@pytest.fixture(autouse=True)
def isolated_user_dirs(tmp_path_factory, monkeypatch):
    """Settings and profiles go to a fresh folder, never to the user's real ones."""
    root = tmp_path_factory.mktemp("user")
    monkeypatch.setenv("MLX_PAGER_CONFIG_DIR", str(root / "config"))
    monkeypatch.setenv("MLX_PAGER_DATA_DIR", str(root / "data"))
    monkeypatch.setenv("MLX_PAGER_CACHE_DIR", str(root / "cache"))
    return root


@pytest.fixture(autouse=True)
def fixed_speed_calibration(isolated_user_dirs):
    """A calibration already cached, of fixed constants: no test measures this machine
    unless it asks to (speeds must not depend on it)."""
    from datetime import date

    from mlx_pager.speed import MachineConstants, save_calibration

    constants = MachineConstants(
        disk_bytes_per_s=1e9, memory_bytes_per_s=100e9, compute_s_per_byte=0.0,
        host_s_per_layer=1e-3, overlap=0.0, source="fixed constants of the tests",
        basis="test constants", backend="cpu", measured_on=date.today().isoformat(),
    )  # fmt: skip
    save_calibration(constants, isolated_user_dirs / "cache")
    return constants


@pytest.fixture(autouse=True)
def hf_cache(tmp_path_factory, monkeypatch):
    """A fresh Hugging Face home and cache: tests never read or write the user's, nor use
    their token. huggingface_hub reads its environment at import, so patch its constants
    too."""
    from huggingface_hub import constants

    home = tmp_path_factory.mktemp("hf_home")
    cache = home / "hub"
    monkeypatch.setenv("HF_HOME", str(home))
    monkeypatch.setenv("HF_HUB_CACHE", str(cache))
    monkeypatch.setenv("HF_HUB_DISABLE_TELEMETRY", "1")
    monkeypatch.delenv("HF_TOKEN", raising=False)
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    monkeypatch.setattr(constants, "HF_HOME", str(home))
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(cache))
    monkeypatch.setattr(constants, "HF_TOKEN_PATH", str(home / "token"))
    monkeypatch.setattr(constants, "HF_STORED_TOKENS_PATH", str(home / "stored_tokens"))
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
    monkeypatch.setattr(constants, "HF_HUB_DISABLE_TELEMETRY", True)
    return cache


@pytest.fixture
def hub_server():
    """A local Hub on 127.0.0.1 (tests/hub_server.py): ``hub_server.add_repo(id, folder)``,
    then ``endpoint=hub_server.endpoint`` in huggingface_hub or mlx_pager.download."""
    from hub_server import HubServer

    server = HubServer().start()
    yield server
    server.close()


@pytest.fixture(scope="session")
def tiny_model(tmp_path_factory):
    """A small real MoE checkpoint (OLMoE layout, ~1 MB) that mlx-lm and the engine open:
    serve it with ``hub_server.add_repo("org/tiny", tiny_model)``. Read-only: copy it first
    to change it."""
    from mlx_pager.sim.synthetic import make_checkpoint

    return make_checkpoint(tmp_path_factory.mktemp("tiny_model") / "model", "olmoe")
