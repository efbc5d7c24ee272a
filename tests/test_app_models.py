"""The models screen against the local Hub server (tests/hub_server.py): verdicts, the
plan before a download, progress, cancel, resume, the files in the HF cache layout, and
the model opening in the chat. Errors leave the screen usable."""

from __future__ import annotations

import json

from app_fixtures import *  # noqa: F403
from app_fixtures import CONTEXT, hf_cache_with, wait_for, wait_ready
from hub_server import HubServer, free_port_endpoint
from mlx_pager_app import downloads
from mlx_pager_app.screens.models import ConfirmDownload, ModelsScreen
from test_download import fill_disk_after
from textual.geometry import Region
from textual.widgets import DataTable, Input

import mlx_pager.hub.fetch as dl
from mlx_pager.settings import Settings, save_settings


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


def on_screen(widget) -> str:
    """What the widget shows, its wrapped lines joined: cut-off text is missing here."""
    lines = widget.render_lines(Region(0, 0, widget.size.width, widget.size.height))
    return " ".join(" ".join(strip.text.split()) for strip in lines).strip()


async def type_id(pilot, screen: ModelsScreen, text: str) -> None:
    """Type ``text`` into the emptied Hub id field and press Enter."""
    screen.query_one("#repo-id", Input).value = ""
    await pilot.click("#repo-id")
    await pilot.press(*text, "enter")


async def check_id(pilot, screen: ModelsScreen, repo_id: str, outcome: str = "planned"):
    """Type a Hub id and wait until the Hub's answer is in: ``planned`` or ``error``."""
    await type_id(pilot, screen, repo_id)
    await wait_for(pilot, lambda: getattr(screen.estimates.get(repo_id), outcome, None))
    return screen.estimates[repo_id]


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
        embedded = str(app_model.resolve())  # make_app's default model: the embedded one
        assert list(screen.rows) == ["test/tiny-moe", "test/big-moe", embedded]
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
                       and app.engine_state.status == "ready")  # fmt: skip
        assert app.engine.info.path == snapshot
        assert app.settings.last_model == "test/tiny-moe"


async def test_a_download_asked_for_before_the_hub_answered_waits_for_its_size(
    make_app, app_model, hf_cache, hub_server, tmp_path
):
    hub_server.add_repo("test/tiny-moe", app_model)
    total = sum(f.size for f in hub_server.repos["test/tiny-moe"].files.values())
    hub_server.api_delay = 1.0
    catalogue = write_catalogue(
        tmp_path / "catalogue.json", catalogue_entry("test/tiny-moe", "Tiny", 10**6)
    )
    app = make_app(hub_endpoint=hub_server.endpoint, catalogue_path=catalogue)
    async with app.run_test(size=(130, 36)) as pilot:
        screen = await open_models(pilot)
        assert screen.selected == "test/tiny-moe"
        assert not screen.estimates["test/tiny-moe"].planned  # the catalogue's guess only
        await pilot.press("ctrl+d")
        assert screen.downloading is None  # not before the Hub said what it takes
        bar = screen.query_one("#download-bar")
        await wait_for(pilot, lambda: screen.downloading == "test/tiny-moe")
        assert bar.total == total  # the Hub's exact size, not the catalogue's 1 MB
        await wait_for(pilot, lambda: screen.rows["test/tiny-moe"].cached, timeout=30)


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
    make_app, app_model, hub_server, hf_cache, tmp_path, monkeypatch
):
    import threading

    from mlx_pager_app import downloads

    monkeypatch.setattr(dl, "CHUNK_BYTES", 32 * 1024)
    ended, download = threading.Event(), downloads.download

    def tracked(*args, **kwargs):
        try:
            return download(*args, **kwargs)
        finally:
            ended.set()

    monkeypatch.setattr(downloads, "download", tracked)
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
    assert screen._cancel.is_set()
    # The thread ends within a chunk (at 100 KB/s the whole download would take 10 s), and
    # what it fetched stays, to resume.
    assert ended.wait(timeout=2)
    assert list(hf_cache.rglob("*.incomplete"))


async def test_the_embedded_model_and_typed_folders_open_again(
    make_app, app_model, tiny_model, hf_cache, tmp_path
):
    hf_cache_with(app_model, hf_cache, "test/tiny-moe")
    app = make_app(catalogue_path=tmp_path / "none.json", hub_endpoint=free_port_endpoint())
    embedded = str(app_model.resolve())
    async with app.run_test(size=(130, 36)) as pilot:
        screen = await open_models(pilot)
        assert list(screen.rows) == ["test/tiny-moe", embedded]
        row = screen.rows[embedded]
        assert row.cached and row.folder and row.label == "tiny-moe (embedded)"
        assert screen.estimates[embedded].verdict == "fits"  # planned by the engine, offline
        # Open the downloaded model, then go back to the embedded one.
        await pilot.press("ctrl+o")
        await wait_for(pilot, lambda: app.model_name == "test/tiny-moe"
                       and app.engine_state.status == "ready")  # fmt: skip
        await pilot.press("f2")
        await wait_for(pilot, lambda: app.screen is screen and screen.loaded)
        table = screen.query_one(DataTable)
        table.focus()
        table.move_cursor(row=table.get_row_index(embedded))
        await wait_for(pilot, lambda: screen.selected == embedded)
        await pilot.press("enter")  # a model that is here opens, no question asked
        await wait_for(pilot, lambda: app.model_name == embedded
                       and app.engine_state.status == "ready")  # fmt: skip
        assert app.engine.info.path.resolve() == app_model.resolve()

        # Any model folder typed in: listed as it is, opens without a download.
        await pilot.press("f2")
        await wait_for(pilot, lambda: app.screen is screen)
        await type_id(pilot, screen, str(tiny_model))
        folder = str(tiny_model.resolve())
        await wait_for(pilot, lambda: screen.selected == folder)
        assert screen.rows[folder].cached and screen.rows[folder].custom
        await wait_for(pilot, lambda: screen.estimates.get(folder)
                       and screen.estimates[folder].verdict)  # fmt: skip
        await pilot.press("ctrl+o")
        await wait_for(pilot, lambda: app.model_name == folder
                       and app.engine_state.status == "ready")  # fmt: skip

        await pilot.press("f2")
        await wait_for(pilot, lambda: app.screen is screen)
        await type_id(pilot, screen, str(tmp_path))  # a folder, but no model in it
        await wait_for(pilot, lambda: any("is not a model folder" in n.message
                                          for n in app._notifications))  # fmt: skip


async def test_network_lost_mid_download_says_so_and_keeps_the_partial(
    make_app, app_model, hf_cache, hub_server, monkeypatch, tmp_path
):
    monkeypatch.setattr(dl, "CHUNK_BYTES", 32 * 1024)
    monkeypatch.setattr(dl, "RETRY_WAIT_S", 0.01)
    hub_server.throttle = 250_000
    hub_server.add_repo("test/tiny-moe", app_model)
    weights = hub_server.repos["test/tiny-moe"].files["model.safetensors"].size
    total = sum(f.size for f in hub_server.repos["test/tiny-moe"].files.values())
    endpoint = hub_server.endpoint
    app = make_app(hub_endpoint=endpoint, catalogue_path=tmp_path / "none.json")
    async with app.run_test(size=(130, 36)) as pilot:
        screen = await open_models(pilot)
        await check_id(pilot, screen, "test/tiny-moe")
        await pilot.press("ctrl+d")
        bar = screen.query_one("#download-bar")
        await wait_for(pilot, lambda: (bar.progress or 0) > 100_000)
        hub_server.close()  # bytes have arrived; now the network goes away
        await wait_for(pilot, lambda: screen.downloading is None, timeout=30)
        expected = (f"Failed: Cannot reach {endpoint}: check your connection; the partial "
                    "download is kept and resumes next time.")  # fmt: skip
        assert status(screen) == expected
        await pilot.pause()
        assert on_screen(screen.query_one("#download-status")) == expected  # all of it
        assert any(n.severity == "error" for n in app._notifications)
        (partial,) = hf_cache.rglob("*.incomplete")
        kept = partial.stat().st_size
        assert 0 < kept < weights

        back = HubServer().start()  # the network is back (the Hub, elsewhere)
        try:
            back.add_repo("test/tiny-moe", app_model)
            # The row was checked again after the failure, against the dead endpoint.
            await wait_for(pilot, lambda: screen.estimates.get("test/tiny-moe")
                           and screen.estimates["test/tiny-moe"].error)  # fmt: skip
            assert "already downloaded is kept and resumes" in (
                screen.estimates["test/tiny-moe"].error
            )
            app.config.hub_endpoint = back.endpoint
            await pilot.press("ctrl+d")  # asks the Hub again: it answers now
            await wait_for(pilot, lambda: screen.estimates["test/tiny-moe"].planned)
            assert screen.estimates["test/tiny-moe"].remaining_bytes <= total - kept
            await pilot.press("ctrl+d")
            await wait_for(pilot, lambda: "Downloaded" in status(screen), timeout=30)
            ranges = [r.headers.get("Range") for r in back.seen("GET", "model.safetensors")]
            assert f"bytes={kept}-" in ranges
        finally:
            back.close()


async def test_disk_full_during_a_download_says_so_and_keeps_the_partial(
    make_app, app_model, hf_cache, hub_server, monkeypatch, tmp_path
):
    monkeypatch.setattr(dl, "CHUNK_BYTES", 32 * 1024)
    hub_server.add_repo("test/tiny-moe", app_model)
    written = fill_disk_after(monkeypatch, 300_000)
    app = make_app(hub_endpoint=hub_server.endpoint, catalogue_path=tmp_path / "none.json")
    async with app.run_test(size=(130, 36)) as pilot:
        screen = await open_models(pilot)
        await check_id(pilot, screen, "test/tiny-moe")
        await pilot.press("ctrl+d")
        await wait_for(pilot, lambda: screen.downloading is None, timeout=30)
        expected = ("Failed: The disk is full: free some space (or set HF_HUB_CACHE to a "
                    "larger disk); the partial download is kept and `mlx-pager download "
                    "test/tiny-moe` resumes it.")  # fmt: skip
        assert status(screen) == expected
        await pilot.pause()
        assert on_screen(screen.query_one("#download-status")) == expected
        (partial,) = hf_cache.rglob("*.incomplete")
        assert 0 < partial.stat().st_size == written[str(partial)]


async def test_a_hub_error_is_asked_again_and_free_disk_still_shows(
    make_app, app_model, hub_server, tmp_path
):
    hub_server.add_repo("test/tiny-moe", app_model)
    app = make_app(hub_endpoint=free_port_endpoint(), catalogue_path=tmp_path / "none.json",
                   disk_free=lambda path: 50 * 10**9)  # fmt: skip
    async with app.run_test(size=(130, 36)) as pilot:
        screen = await open_models(pilot)
        await check_id(pilot, screen, "test/tiny-moe", "error")
        failed = screen.estimates["test/tiny-moe"]
        assert "to look up test/tiny-moe" in failed.error
        assert "nothing was downloaded" in failed.error  # no resume promised
        assert failed.free_bytes == 50 * 10**9  # the disk is there without the Hub
        assert "free disk 50.00 GB" in on_screen(screen.query_one("#model-detail"))

        app.config.hub_endpoint = hub_server.endpoint  # the network is back
        await pilot.press("ctrl+d")  # asks the Hub again instead of repeating the error
        await wait_for(pilot, lambda: screen.estimates["test/tiny-moe"].planned)
        assert not screen.estimates["test/tiny-moe"].error
        assert screen.downloading is None
        assert any("Asking the Hub again" in n.message for n in app._notifications)
        await pilot.press("ctrl+d")
        await wait_for(pilot, lambda: "Downloaded" in status(screen), timeout=30)


async def test_a_row_asks_before_downloading_and_says_the_verdict(
    make_app, app_model, hub_server, hf_cache, tmp_path
):
    hub_server.add_repo("test/tiny-moe", app_model)
    small = tmp_path / "small.toml"
    save_settings(Settings(budget="10MB", context_length=CONTEXT), small)
    app = make_app(hub_endpoint=hub_server.endpoint, catalogue_path=tmp_path / "none.json",
                   settings_path=small)  # fmt: skip
    async with app.run_test(size=(130, 36)) as pilot:
        screen = await open_models(pilot)
        await check_id(pilot, screen, "test/tiny-moe")
        estimate = screen.estimates["test/tiny-moe"]
        assert estimate.verdict == "too_large"
        # A typed id keeps the Hub's sizes: the panel shows experts and the resident part.
        assert screen.rows["test/tiny-moe"].sizes == estimate.sizes is not None
        detail = on_screen(screen.query_one("#model-detail"))
        assert "experts 2 layers × 8, top-2" in detail and "resident" in detail

        await pilot.press("enter")  # Enter on the row: a question, not a download
        await wait_for(pilot, lambda: isinstance(app.screen, ConfirmDownload))
        question = str(app.screen.query_one("#confirm-text").render())
        assert "Your budget: too large." in question and "will not run at this budget" in question
        await pilot.press("n")
        await wait_for(pilot, lambda: app.screen is screen)
        await pilot.press("ctrl+d")  # too large: Ctrl+D asks as well
        await wait_for(pilot, lambda: isinstance(app.screen, ConfirmDownload))
        await pilot.press("escape")
        await wait_for(pilot, lambda: app.screen is screen)
        assert screen.downloading is None and not list(hf_cache.rglob("*.incomplete"))

        await pilot.press("enter")
        await wait_for(pilot, lambda: isinstance(app.screen, ConfirmDownload))
        await pilot.press("y")  # the user's call: it downloads
        await wait_for(pilot, lambda: "Downloaded" in status(screen), timeout=30)


async def test_speeds_say_pending_until_this_machine_is_measured(make_app, tmp_path):
    """No calibration cached: the rows show "estimate pending" at once, then the speed
    with its basis once the worker has measured (here: fixed constants, after a wait)."""
    import threading

    from app_fixtures import SPEED

    measured = threading.Event()

    def speed(measure: bool = True):
        if not measure:
            return None  # nothing cached yet
        measured.wait(10)
        return SPEED

    catalogue = write_catalogue(
        tmp_path / "catalogue.json",
        catalogue_entry("test/medium-moe", "Medium MoE", 20_000_000, dense_bytes=10**6,
                        kv_bytes_per_token=1000),
    )  # fmt: skip
    app = make_app(catalogue_path=catalogue, hub_endpoint=free_port_endpoint(), speed=speed)
    async with app.run_test(size=(130, 36)) as pilot:
        screen = await open_models(pilot)
        pending = screen.estimates["test/medium-moe"]
        assert pending.verdict == "paged" and pending.tokens_per_second is None
        assert downloads.estimate_speed_text(pending) == "estimate pending"
        measured.set()
        await wait_for(pilot, lambda: screen.estimates["test/medium-moe"].tokens_per_second)
        found = screen.estimates["test/medium-moe"]
        assert downloads.estimate_speed_text(found).endswith(" tok/s (fixed)")
        assert found.speed_source == SPEED.source
