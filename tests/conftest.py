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
    return root
