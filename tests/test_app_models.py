"""The models screen: catalogue and cache rows with verdicts, errors that leave it usable."""

from __future__ import annotations

import json

from app_fixtures import *  # noqa: F403
from app_fixtures import hf_cache_with, wait_for, wait_ready

from app.screens.models import ModelsScreen

UNREACHABLE = "http://127.0.0.1:9"  # discard port: nothing listens


def write_catalogue(path, *entries):
    path.write_text(json.dumps({"models": list(entries)}))
    return path


async def open_models(pilot) -> ModelsScreen:
    await wait_ready(pilot)
    await pilot.press("f2")
    await wait_for(pilot, lambda: isinstance(pilot.app.screen, ModelsScreen))
    screen = pilot.app.screen
    await wait_for(pilot, lambda: screen.rows)
    return screen


async def test_cached_model_verdict_and_unreachable_hub(make_app, tiny_model, tmp_path):
    cache = tmp_path / "hf"
    hf_cache_with(tiny_model, cache, "test/tiny-moe")
    catalogue = write_catalogue(
        tmp_path / "catalogue.json",
        {"repo_id": "test/remote-moe", "name": "Remote MoE", "size_bytes": 123_000_000},
    )
    app = make_app(hub_cache_dir=cache, catalogue_path=catalogue, hub_endpoint=UNREACHABLE,
                   disk_free=lambda path: 50 * 10**9)  # fmt: skip
    async with app.run_test(size=(130, 36)) as pilot:
        screen = await open_models(pilot)
        assert list(screen.rows) == ["test/tiny-moe", "test/remote-moe"]
        assert screen.rows["test/tiny-moe"].cached
        await wait_for(pilot, lambda: "test/tiny-moe" in screen.estimates)
        assert screen.estimates["test/tiny-moe"].verdict == "fits"

        await pilot.press("down")
        await wait_for(pilot, lambda: "test/remote-moe" in screen.estimates)
        assert "Cannot reach the Hub" in screen.estimates["test/remote-moe"].error
        await pilot.press("ctrl+d")  # refused with the reason, nothing starts
        assert screen.downloading is None
        assert any("Cannot reach" in n.message for n in app._notifications)

        await pilot.click("#repo-id")
        await pilot.press(*"not an id", "enter")
        assert any("not a Hub id" in n.message for n in app._notifications)
        await pilot.press("escape")
        assert not isinstance(app.screen, ModelsScreen)
