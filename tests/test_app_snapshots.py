"""Snapshots of every screen (pytest-textual-snapshot; Textual pinned in pyproject).

Deterministic by construction: fixed terminal sizes, a fixed machine, the tiny model's
sizes (which do not depend on its random weights), conversations with fixed timestamps,
pinned stats wherever speeds or RSS would show, and each shot taken once every worker is
done and no cursor blinks (``snap``). Update with
``pytest tests/test_app_snapshots.py --snapshot-update`` and look at the SVGs.
"""

from __future__ import annotations

import numpy as np
import pytest
from app_fixtures import *  # noqa: F403
from app_fixtures import wait_for, wait_ready
from mlx_pager_app.conversations import Conversation, conversations_dir, save_conversation
from mlx_pager_app.widgets.heatmap import ExpertHeatmap
from mlx_pager_app.widgets.stats_panel import PanelState, StatsPanel
from textual.app import App, ComposeResult
from textual.widgets import DataTable

from mlx_pager.stats import Stats

SIZE = (120, 36)


def fixed_conversation(n: int = 0) -> Conversation:
    conversation = Conversation(
        id=f"20260101-00000{n}-abcdef",
        model="mlx-community/Qwen3-30B-A3B-4bit",
        created=f"2026-01-0{n + 1}T09:30:00+00:00",
        updated=f"2026-01-0{n + 1}T09:45:00+00:00",
    )
    conversation.add("user", "Which experts does a mixture-of-experts model use per token?")
    conversation.add(
        "assistant",
        "A **router** picks the *top-k* experts in each layer:\n\n"
        "- Qwen3-30B-A3B: 8 of 128\n- Mixtral: 2 of 8\n\n```python\nscores.topk(k)\n```",
    )
    conversation.updated = f"2026-01-0{n + 1}T09:45:00+00:00"
    return conversation


def fixed_stats() -> Stats:
    counts = np.array(
        [[90, 4, 33, 0, 12, 61, 7, 1], [2, 75, 18, 44, 0, 9, 120, 30]], dtype=np.int64
    )
    return Stats(
        budget_bytes=60_000_000, resident_bytes=267_776, cache_bytes=786_432,
        kv_bytes=131_072, headroom_bytes=50_331_648, slots=16, hits=150, misses=28,
        decode_hits=120, decode_misses=10, bytes_read=1_376_256, prompt_tokens=21,
        prompt_tps=584.6, generation_tokens=40, decode_tps=98.5, ttft_seconds=0.12,
        peak_rss_bytes=341_700_000, expert_counts=counts,
    )  # fmt: skip


@pytest.fixture
def snap(snap_compare):
    """``snap_compare``, shot in a steady state: every worker done and every cursor shown
    (a blinking cursor is on or off depending on when a loaded CPU gets to the shot)."""

    def compare(app: App, terminal_size: tuple[int, int], run_before=None) -> bool:
        async def steady(pilot) -> None:
            if run_before is not None:
                await run_before(pilot)
            await pilot.app.workers.wait_for_complete()
            for widget in pilot.app.screen.query("TextArea, Input"):
                widget.cursor_blink = False
            await pilot.pause()

        return snap_compare(app, terminal_size=terminal_size, run_before=steady)

    return compare


async def settle(pilot) -> None:
    await wait_ready(pilot)
    pilot.app.clear_notifications()
    await pilot.pause()


def test_chat_empty(snap, make_app):
    async def run_before(pilot) -> None:
        await settle(pilot)
        # The engine's live numbers, with the engine's preload wording fixed.
        stats = pilot.app.engine.stats.snapshot()
        pilot.app.screen.query_one(StatsPanel).pin(PanelState(stats, False, "off: no profile"))
        await pilot.pause()

    assert snap(make_app(), terminal_size=SIZE, run_before=run_before)


def test_chat_with_reply_and_stats(snap, make_app):
    async def run_before(pilot) -> None:
        await settle(pilot)
        screen = pilot.app.screen
        await screen.load(fixed_conversation())
        screen.query_one(StatsPanel).pin(PanelState(fixed_stats(), False, "off: no profile"))
        screen.refresh_stats = lambda: None  # keep the pinned heatmap too
        screen.query_one(ExpertHeatmap).update_counts(fixed_stats().expert_counts)
        await pilot.pause()

    # Two rows taller than SIZE: the whole side panel shows, down to the heatmap's summary.
    assert snap(make_app(), terminal_size=(120, 38), run_before=run_before)


def test_chat_narrow_hides_panel(snap, make_app):
    assert snap(make_app(), terminal_size=(80, 24), run_before=settle)


def test_chat_model_missing(snap, make_app):
    def missing(model, settings, cache_dir=None):
        raise FileNotFoundError(
            f"{model} is not in the Hugging Face cache: download it first (F2)."
        )

    app = make_app(model="mlx-community/Missing-MoE-4bit", open_engine=missing)
    assert snap(app, terminal_size=SIZE, run_before=settle)


def test_saved_chats(snap, make_app, tmp_path):
    folder = conversations_dir(tmp_path / "data")
    for n in range(2):
        save_conversation(fixed_conversation(n), folder)

    async def run_before(pilot) -> None:
        await settle(pilot)
        await pilot.press("ctrl+o")
        await pilot.pause()

    assert snap(make_app(), terminal_size=SIZE, run_before=run_before)


def test_settings(snap, make_app):
    async def run_before(pilot) -> None:
        await settle(pilot)
        await pilot.press("f3")
        screen = pilot.app.screen
        await wait_for(pilot, lambda: screen._plan is not None)  # the layout worker is done
        await pilot.pause()

    assert snap(make_app(), terminal_size=SIZE, run_before=run_before)


def test_models(snap, make_app, app_model, hf_cache, tmp_path):
    from app_fixtures import hf_cache_with
    from hub_server import free_port_endpoint
    from mlx_pager_app.screens.models import ModelsScreen
    from test_app_models import catalogue_entry, write_catalogue

    hf_cache_with(app_model, hf_cache, "test/tiny-moe")
    catalogue = write_catalogue(
        tmp_path / "catalogue.json",
        catalogue_entry("mlx-community/Qwen3-30B-A3B-4bit", "Qwen3 30B-A3B (4-bit)", 17 * 10**9),
        catalogue_entry(
            "test/medium-moe", "Medium MoE", 20_000_000, dense_bytes=10**6, kv_bytes_per_token=1000
        ),  # fmt: skip
    )
    app = make_app(
        catalogue_path=catalogue,
        hub_endpoint=free_port_endpoint(),
        disk_free=lambda path: 50 * 10**9,
    )

    async def run_before(pilot) -> None:
        await settle(pilot)
        await pilot.press("f2")
        screen = pilot.app.screen
        assert isinstance(screen, ModelsScreen)
        await wait_for(pilot, lambda: screen.loaded)
        # Every row's verdict in, then the table's column widths settle (a loaded CPU
        # otherwise shot the table mid-layout, columns cut to five characters).
        medium = "test/medium-moe"
        await wait_for(pilot, lambda: getattr(screen.estimates.get(medium), "verdict", None))
        table = screen.query_one(DataTable)
        await wait_for(pilot, lambda: table.row_count == len(screen.rows))
        for _ in range(3):
            await pilot.pause(0.05)

    assert snap(app, terminal_size=SIZE, run_before=run_before)


def test_confirm_download(snap, make_app, tmp_path):
    """The question before a download: what it costs, the disk, the verdict and why."""
    from mlx_pager_app.downloads import Estimate, ModelRow
    from mlx_pager_app.screens.models import ConfirmDownload

    row = ModelRow("mlx-community/Qwen3-30B-A3B-4bit", "Qwen3 30B-A3B (4-bit)")
    estimate = Estimate(
        size_bytes=17_190_000_000, remaining_bytes=5_400_000_000, free_bytes=48_300_000_000,
        verdict="paged", planned=True, tokens_per_second=6.2, speed_basis="M4 Air table",
        explain="8.00 GB holds the 1.40 GB core, the KV cache at 4096 tokens and 2,400 "
        "of 6,144 experts. Estimated hit rate 88%, about 6.2 tokens/s (M4 Air table).",
    )  # fmt: skip

    async def run_before(pilot) -> None:
        await settle(pilot)
        stats = pilot.app.engine.stats.snapshot()  # the chat behind, as in test_chat_empty
        pilot.app.screen.query_one(StatsPanel).pin(PanelState(stats, False, "off: no profile"))
        await pilot.app.push_screen(ConfirmDownload(row, estimate))
        await pilot.pause()

    assert snap(make_app(catalogue_path=tmp_path / "none.json"), SIZE, run_before)


class HeatmapApp(App):
    """The heatmap alone at a real model's shape: 48 layers x 128 experts (Qwen3-30B)."""

    def compose(self) -> ComposeResult:
        yield ExpertHeatmap()

    def on_mount(self) -> None:
        rng = np.random.default_rng(0)
        skew = rng.zipf(1.6, size=(48, 128)).clip(max=200)
        self.query_one(ExpertHeatmap).update_counts(skew.astype(np.int64))


def test_heatmap_large_model(snap):
    assert snap(HeatmapApp(), terminal_size=(60, 30))
