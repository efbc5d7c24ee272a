"""The models screen against the local Hub server (tests/hub_server.py): verdicts, the
plan before a download, progress, cancel, resume, the files in the HF cache layout, and
the model opening in the chat. Errors leave the screen usable."""

from __future__ import annotations

import json

from app_fixtures import *  # noqa: F403
from app_fixtures import hf_cache_with, wait_for, wait_ready
from hub_server import free_port_endpoint

from app.screens.models import ModelsScreen
from mlx_pager import download as dl


def catalogue_entry(repo_id: str, name: str, total: int, **overrides) -> dict:
    """An entry in assets/catalogue.json's format, shaped like Qwen3-30B-A3B."""
    dense = overrides.pop("dense_bytes", total // 20)
    return {
        "id": repo_id, "name": name, "architecture": "qwen3_moe", "total_bytes": total,
        "dense_bytes": dense, "expert_bytes": total - dense,
        "one_expert_bytes": (total - dense) // (48 * 128), "moe_layers": 48,
        "experts": 128, "top_k": 8, "kv_bytes_per_token": 98304,
        "description": f"{name}, for the tests", **overrides,
    }  # fmt: skip


def write_catalogue(path, *entries):
    path.write_text(json.dumps({"version": 1, "models": list(entries)}))
    return path


async def open_models(pilot) -> ModelsScreen:
    await wait_ready(pilot)
    await pilot.press("f2")
    await wait_for(pilot, lambda: isinstance(pilot.app.screen, ModelsScreen))
    screen = pilot.app.screen
    await wait_for(pilot, lambda: screen.loaded)
    return screen


def status(screen: ModelsScreen) -> str:
    return str(screen.query_one("#download-status").render())


async def test_verdicts_and_unreachable_hub(make_app, app_model, hf_cache, tmp_path):
    hf_cache_with(app_model, hf_cache, "test/tiny-moe")
    catalogue = write_catalogue(
        tmp_path / "catalogue.json",
        catalogue_entry("test/big-moe", "Big MoE", 17_000_000_000),
    )
    app = make_app(catalogue_path=catalogue, hub_endpoint=free_port_endpoint(),
                   disk_free=lambda path: 50 * 10**9)  # fmt: skip
    async with app.run_test(size=(130, 36)) as pilot:
        screen = await open_models(pilot)
        assert list(screen.rows) == ["test/tiny-moe", "test/big-moe"]
        assert screen.rows["test/tiny-moe"].cached
        # Verdicts for every row before any network: cached headers, catalogue sizes.
        assert screen.estimates["test/tiny-moe"].verdict == "fits"
        assert screen.estimates["test/big-moe"].verdict == "too_large"
        assert "needs at least" in screen.estimates["test/big-moe"].explain

        await pilot.press("down")
        await wait_for(pilot, lambda: screen.estimates["test/big-moe"].error)
        assert "Cannot reach" in screen.estimates["test/big-moe"].error
        await pilot.press("ctrl+d")  # refused with the reason; nothing starts
        assert screen.downloading is None
        assert any("Cannot reach" in n.message for n in app._notifications)

        await pilot.click("#repo-id")
        await pilot.press(*"not an id", "enter")
        assert any("not a Hub id" in n.message for n in app._notifications)
        await pilot.press("escape")
        assert not isinstance(app.screen, ModelsScreen)


async def test_download_progress_cancel_resume_then_open(
    make_app, app_model, hf_cache, hub_server, monkeypatch, tmp_path
):
    monkeypatch.setattr(dl, "CHUNK_BYTES", 32 * 1024)  # progress and cancel every 32 KB
    hub_server.throttle = 250_000  # bytes/s: about 4 s for the 1 MB of weights
    commit = hub_server.add_repo("test/tiny-moe", app_model)
    total = sum(f.size for f in hub_server.repos["test/tiny-moe"].files.values())
    app = make_app(hub_endpoint=hub_server.endpoint, catalogue_path=tmp_path / "none.json")
    async with app.run_test(size=(130, 36)) as pilot:
        screen = await open_models(pilot)
        await pilot.click("#repo-id")
        await pilot.press(*"test/tiny-moe", "enter")
        await wait_for(pilot, lambda: screen.estimates.get("test/tiny-moe")
                       and screen.estimates["test/tiny-moe"].planned)  # fmt: skip
        plan = screen.estimates["test/tiny-moe"]
        # Before it starts: the size, free disk, and the verdict from the remote headers.
        assert plan.size_bytes == plan.remaining_bytes == total
        assert plan.free_bytes and not plan.error and plan.verdict == "fits"

        await pilot.press("ctrl+d")
        bar = screen.query_one("#download-bar")
        await wait_for(pilot, lambda: (bar.progress or 0) > 100_000)
        assert screen.downloading == "test/tiny-moe" and bar.total == total
        assert "test/tiny-moe:" in status(screen)
        await pilot.press("ctrl+x")
        await wait_for(pilot, lambda: screen.downloading is None)
        assert "Cancelled" in status(screen)
        kept = sum(p.stat().st_size for p in hf_cache.rglob("*.incomplete"))
        assert 0 < kept < total

        hub_server.throttle = None
        await wait_for(pilot, lambda: screen.estimates.get("test/tiny-moe")
                       and screen.estimates["test/tiny-moe"].planned)  # fmt: skip
        assert screen.estimates["test/tiny-moe"].remaining_bytes < total
        await pilot.press("ctrl+d")
        await wait_for(pilot, lambda: screen.downloading is None, timeout=30)
        assert "Downloaded" in status(screen)
        assert any("Range" in r.headers for r in hub_server.seen("GET", ".safetensors"))

        snapshot = hf_cache / "models--test--tiny-moe" / "snapshots" / commit
        assert (snapshot / "config.json").is_symlink()
        assert (snapshot / "model.safetensors").resolve().parent.name == "blobs"
        await wait_for(pilot, lambda: screen.rows["test/tiny-moe"].cached)
        await pilot.press("ctrl+o")
        await wait_for(pilot, lambda: app.model_name == "test/tiny-moe"
                       and app.engine_status == "ready")  # fmt: skip
        assert app.engine.info.path == snapshot
        assert app.settings.last_model == "test/tiny-moe"


async def test_download_failure_is_shown_and_screen_stays_usable(
    make_app, app_model, hub_server, tmp_path
):
    hub_server.add_repo("test/tiny-moe", app_model)
    app = make_app(hub_endpoint=hub_server.endpoint, catalogue_path=tmp_path / "none.json")
    async with app.run_test(size=(130, 36)) as pilot:
        screen = await open_models(pilot)
        await pilot.click("#repo-id")
        await pilot.press(*"test/tiny-moe", "enter")
        await wait_for(pilot, lambda: screen.estimates.get("test/tiny-moe")
                       and screen.estimates["test/tiny-moe"].planned)  # fmt: skip
        hub_server.close()  # the network goes away mid-way
        await pilot.press("ctrl+d")
        await wait_for(pilot, lambda: screen.downloading is None, timeout=30)
        assert "Failed" in status(screen)
        assert any(n.severity == "error" for n in app._notifications)
        await pilot.press("escape")
        assert not isinstance(app.screen, ModelsScreen)


async def test_not_enough_disk_is_refused_with_what_to_do(
    make_app, app_model, hub_server, hf_cache, tmp_path
):
    hub_server.add_repo("test/tiny-moe", app_model)
    app = make_app(hub_endpoint=hub_server.endpoint, catalogue_path=tmp_path / "none.json",
                   disk_free=lambda path: 1000)  # fmt: skip
    async with app.run_test(size=(130, 36)) as pilot:
        screen = await open_models(pilot)
        await pilot.click("#repo-id")
        await pilot.press(*"test/tiny-moe", "enter")
        await wait_for(pilot, lambda: screen.estimates.get("test/tiny-moe")
                       and screen.estimates["test/tiny-moe"].planned)  # fmt: skip
        assert "free some space" in screen.estimates["test/tiny-moe"].disk_problem
        await pilot.press("ctrl+d")
        assert screen.downloading is None
        assert any(n.title == "Not enough disk" for n in app._notifications)
        assert not list(hf_cache.rglob("*.incomplete"))  # not a byte of weights fetched


async def test_quit_during_a_download_cancels_it(
    make_app, app_model, hub_server, tmp_path, monkeypatch
):
    monkeypatch.setattr(dl, "CHUNK_BYTES", 32 * 1024)
    hub_server.throttle = 100_000
    hub_server.add_repo("test/tiny-moe", app_model)
    app = make_app(hub_endpoint=hub_server.endpoint, catalogue_path=tmp_path / "none.json")
    async with app.run_test(size=(130, 36)) as pilot:
        screen = await open_models(pilot)
        await pilot.click("#repo-id")
        await pilot.press(*"test/tiny-moe", "enter")
        await wait_for(pilot, lambda: screen.estimates.get("test/tiny-moe")
                       and screen.estimates["test/tiny-moe"].planned)  # fmt: skip
        await pilot.press("ctrl+d")
        await wait_for(pilot, lambda: screen.downloading)
        await pilot.press("ctrl+q")
    assert screen._cancel.is_set()  # the worker thread ends within a chunk: exit is prompt
