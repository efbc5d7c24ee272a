"""The settings screen: the breakdown and verdict follow the budget; saving persists and
reopens the engine without restarting the app."""

from __future__ import annotations

from app_fixtures import *  # noqa: F403
from app_fixtures import CONTEXT, wait_for, wait_ready
from mlx_pager_app.screens.settings import SettingsScreen, parse_budget
from mlx_pager_app.widgets.budget_bar import BudgetBar

from mlx_pager.settings import load_settings


async def open_settings(pilot) -> SettingsScreen:
    await wait_ready(pilot)
    await pilot.press("f3")
    await wait_for(pilot, lambda: isinstance(pilot.app.screen, SettingsScreen))
    screen = pilot.app.screen
    await wait_for(pilot, lambda: screen._plan is not None)
    return screen


async def set_budget(pilot, screen: SettingsScreen, text: str) -> None:
    box = screen.query_one("#budget")
    box.value = text
    await pilot.pause()


def verdict(screen: SettingsScreen) -> str:
    return str(screen.query_one("#verdict").render())


async def test_budget_changes_breakdown_verdict_and_persists(make_app, settings_file, fixed_bytes):
    app = make_app()
    async with app.run_test(size=(120, 40)) as pilot:
        screen = await open_settings(pilot)
        assert screen._plan.verdict == "fits" and "Fits fully" in verdict(screen)
        assert "16 of 16" in str(screen.query_one("#slots").render())

        one_expert = screen._plan.expert_bytes
        await set_budget(pilot, screen, f"{fixed_bytes + 5 * one_expert}B")
        assert screen._plan.verdict == "paged" and screen._plan.slots == 5
        assert "Runs paged" in verdict(screen) and "5 of 16" in str(
            screen.query_one("#slots").render()
        )
        bar = screen.query_one(BudgetBar)
        assert [p.bytes for p in bar.parts][1] == 5 * one_expert
        assert screen.query_one("#verdict").has_class("-paged")
        assert "tokens/s (fixed; an estimate" in verdict(screen)

        await set_budget(pilot, screen, f"{fixed_bytes - 1}B")
        assert screen._plan.verdict == "too_large" and "Too large" in verdict(screen)
        await pilot.press("ctrl+s")  # refused: the app says why and stays here
        assert isinstance(app.screen, SettingsScreen)
        assert any("Budget too small" in (n.title or "") for n in app._notifications)
        assert load_settings(settings_file).budget == "60MB"

        await set_budget(pilot, screen, "abc")
        assert "Cannot read the size" in verdict(screen)

        old_engine = app.engine
        await set_budget(pilot, screen, f"{fixed_bytes + 5 * one_expert}B")
        await pilot.press("ctrl+s")
        await wait_for(pilot, lambda: not isinstance(app.screen, SettingsScreen))
        assert load_settings(settings_file).budget == f"{fixed_bytes + 5 * one_expert}B"
        # Applied without a restart: the engine reopened on a worker under the new budget.
        await wait_ready(pilot)
        assert app.engine is not old_engine and app.engine_state.status == "ready"
        assert app.engine.plan.slots == 5 and app.engine.stats.slots == 5


async def test_context_length_and_policy_options(make_app, settings_file):
    app = make_app()
    async with app.run_test(size=(120, 40)) as pilot:
        screen = await open_settings(pilot)
        kv = screen._plan.kv_bytes
        screen.query_one("#context_length").value = str(CONTEXT * 2)
        await wait_for(pilot, lambda: screen._plan is not None and screen._plan.kv_bytes != kv)
        assert screen._plan.kv_bytes == 2 * kv
        screen.query_one("#read_path").value = "mmap"
        screen.query_one("#prefetch").value = False  # on by default
        await pilot.press("ctrl+s")
        await wait_for(pilot, lambda: not isinstance(app.screen, SettingsScreen))
        saved = load_settings(settings_file)
        assert (saved.context_length, saved.read_path, saved.prefetch) == (512, "mmap", False)
        await wait_ready(pilot)
        assert app.engine.context_length == 512


async def test_a_layout_that_lands_late_does_not_replace_the_current_one(make_app):
    """Typing "512" asks for 5, 51 and 512; an answer for an older value arriving last
    must not put its KV cache under the title of the value typed."""
    app = make_app()
    async with app.run_test(size=(120, 40)) as pilot:
        screen = await open_settings(pilot)
        stale_key, stale_layout = screen._current_key(), screen._layout
        screen.query_one("#context_length").value = str(CONTEXT * 2)
        await wait_for(pilot, lambda: screen._plan.kv_bytes == 2 * stale_layout.kv_bytes)
        screen._layout_ready(stale_key, stale_layout)  # the slow worker for the old value
        await pilot.pause()
        assert screen._layout is not stale_layout
        assert screen._plan.kv_bytes == 2 * stale_layout.kv_bytes


async def test_predicted_hit_rate_from_the_session_profile(make_app):
    app = make_app(max_tokens=16)
    async with app.run_test(size=(120, 40)) as pilot:
        screen = await open_settings(pilot)
        assert "no profile yet" in str(screen.query_one("#slots").render())
        await pilot.press("escape")
        chat = app.screen
        await pilot.press(*"profile me", "enter")
        await wait_for(pilot, lambda: len(chat.conversation.messages) == 2)
        screen = await open_settings(pilot)
        assert "100.0% of this session" in str(screen.query_one("#slots").render())


async def test_predicted_hit_rate_from_the_saved_profile_after_a_restart(
    make_app, app_model, fixed_bytes
):
    """A new session has no activations yet: the task profiles earlier ones saved count."""
    import numpy as np

    from mlx_pager.tasks.profiles import TaskProfiles

    profiles = TaskProfiles.load(app_model, 2, 8)  # where the engine will look at open
    profiles.add("code", np.array([[50, 40, 30, 20, 10, 0, 0, 0], [0] * 8]))
    profiles.add("chat", np.array([[0] * 8, [5] * 8]))
    profiles.save()
    app = make_app()
    async with app.run_test(size=(120, 40)) as pilot:
        screen = await open_settings(pilot)
        assert app.engine.stats.snapshot().expert_counts.sum() == 0  # nothing this session
        assert "100.0% of the saved profile" in str(screen.query_one("#slots").render())
        await set_budget(pilot, screen, f"{fixed_bytes + 5 * screen._plan.expert_bytes}B")
        assert screen._plan.slots == 5
        # The 5 busiest pairs took 50+40+30+20+10 of the 190 activations.
        assert "78.9% of the saved profile" in str(screen.query_one("#slots").render())


def test_parse_budget():
    assert parse_budget("8") == "8GB"
    assert parse_budget(" auto ") == "auto"
    assert parse_budget("750MB") == "750MB"
    for bad in ("", "0", "lots"):
        try:
            parse_budget(bad)
        except ValueError:
            continue
        raise AssertionError(bad)


async def test_task_preload_applies_without_reopening(make_app, settings_file):
    app = make_app()
    async with app.run_test(size=(120, 40)) as pilot:
        screen = await open_settings(pilot)
        engine = app.engine
        screen.query_one("#task_preload").value = False
        await pilot.press("ctrl+s")
        await wait_for(pilot, lambda: not isinstance(app.screen, SettingsScreen))
        assert app.engine is engine and engine.task_preload is False
        assert load_settings(settings_file).task_preload is False


async def test_route_margin_reopens_and_the_panel_says_so(make_app, settings_file):
    """Cache-aware routing is lossy: a bad margin is refused with its range, a good one
    reopens the model with it, and the stats panel says routing is cache-aware."""
    from mlx_pager_app.widgets.stats_panel import StatsPanel

    app = make_app()
    async with app.run_test(size=(120, 40)) as pilot:
        screen = await open_settings(pilot)
        assert screen.query_one("#route_margin").value == "0"
        screen.query_one("#route_margin").value = "2"
        await pilot.press("ctrl+s")
        assert isinstance(app.screen, SettingsScreen)
        assert any("route_margin takes a number from 0" in n.message for n in app._notifications)
        screen.query_one("#route_margin").value = "0.3"
        await pilot.press("ctrl+s")
        await wait_for(pilot, lambda: not isinstance(app.screen, SettingsScreen))
        assert load_settings(settings_file).route_margin == 0.3
        await wait_ready(pilot)
        assert app.engine.stats.routing == "cache-aware" and app.engine.stats.route_margin == 0.3
        app.screen._stats_dirty = True
        app.screen.refresh_stats()
        await pilot.pause()
        panel = app.screen.query_one(StatsPanel)
        text = " ".join(str(panel.render_line(y).text) for y in range(panel.size.height))
        assert "routing" in text and "margin 0.3 · 0 rerouted" in text, text
