"""Settings: validated, saved atomically, and the same from the command line."""

from __future__ import annotations

import json

import pytest

from mlx_pager.cli import main
from mlx_pager.settings import Settings, load_settings, save_settings, settings_path


def test_round_trip_and_validation(tmp_path):
    path = tmp_path / "s.toml"
    settings = Settings().replace(budget="6GB", context_length="2048", prefetch="on")
    save_settings(settings, path)
    assert load_settings(path) == settings
    assert settings.budget_bytes(16 * 10**9) == 6 * 10**9
    assert Settings().budget_bytes(10 * 10**9) == 6 * 10**9  # auto: 60% of memory
    for bad in (
        {"budget": "lots"},
        {"context_length": "12"},
        {"read_path": "dma"},
        {"policy": "magic"},
        {"prefetch": "maybe"},
        {"colour": "red"},
    ):
        with pytest.raises(ValueError):
            settings.replace(**bad)


def test_broken_file_says_what_to_do(tmp_path):
    path = tmp_path / "s.toml"
    path.write_text("budget = [unclosed")
    with pytest.raises(ValueError, match="not valid TOML.*delete it"):
        load_settings(path)


def test_failed_write_keeps_the_old_file(tmp_path, monkeypatch):
    path = tmp_path / "s.toml"
    save_settings(Settings(budget="4GB"), path)

    def disk_full(fd):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr("mlx_pager.atomic.os.fsync", disk_full)
    with pytest.raises(OSError):
        save_settings(Settings(budget="8GB"), path)
    assert load_settings(path).budget == "4GB"
    assert [p.name for p in tmp_path.iterdir()] == ["s.toml"]  # no temporary left behind


def test_settings_command(capsys):
    assert main(["settings", "set", "budget", "7GB", "policy", "lru"]) == 0
    assert load_settings().budget == "7GB" and settings_path().exists()
    capsys.readouterr()
    assert main(["settings", "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["budget_bytes"] == 7 * 10**9
    assert main(["settings", "set", "budget"]) == 2  # an odd pair: a clear error, exit 2
    assert "NAME VALUE pairs" in capsys.readouterr().err
    assert main(["settings", "reset"]) == 0 and load_settings() == Settings()
