"""The two Textual leaks the app soak found, each without a model: the footer's dead keys
after a recompose, and removed widgets' rendered lines held by an lru_cache. Each test
also checks that plain Textual still leaks, so the work-around goes when Textual is
fixed (textual is pinned in pyproject.toml)."""

from __future__ import annotations

import pytest
from mlx_pager_app.widgets.footer import Footer
from mlx_pager_app.widgets.render_caches import release_render_caches
from soak_checks import kept_once_settled, render_objects
from textual.app import App, ComposeResult
from textual.binding import Binding
from textual.containers import VerticalScroll
from textual.widgets import Button, Input, Static
from textual.widgets import Footer as TextualFooter


class Focusable(Static, can_focus=True):
    BINDINGS = [Binding("x", "noop", "Other bindings")]  # the footer recomposes for these


@pytest.mark.parametrize("footer, leaks", [(Footer, False), (TextualFooter, True)])
async def test_footer_keeps_no_dead_keys_as_focus_moves(footer, leaks):
    class Demo(App):
        def compose(self) -> ComposeResult:
            yield Input()
            yield Button("b")
            yield Focusable("f")
            yield footer()

    earlier, app = render_objects(), Demo()
    async with app.run_test() as pilot:
        await pilot.pause()
        for _ in range(6):
            await pilot.press("tab")
            await pilot.pause()
        dead, _ = await kept_once_settled(pilot, earlier)
    assert (dead > 0) == leaks, dead


@pytest.mark.parametrize("release, leaks", [(True, False), (False, True)])
async def test_removed_widgets_leave_no_rendered_lines(release, leaks):
    class Demo(App):
        def compose(self) -> ComposeResult:
            yield VerticalScroll(id="log")

    earlier, app = render_objects(), Demo()
    async with app.run_test() as pilot:
        log = app.query_one("#log")
        for turn in range(5):
            await log.mount_all([Static(f"line {turn} {i}") for i in range(4)])
            await pilot.pause()
            await log.remove_children()
            if release:
                release_render_caches()
        _, caches = await kept_once_settled(pilot, earlier)
    assert (caches > 0) == leaks, caches
