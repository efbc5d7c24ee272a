"""The chat screen says when `mlx-pager serve` runs from the same settings (its state
file in the data folder, with a live pid), and stops saying it when the server is gone."""

from __future__ import annotations

import os
import subprocess
import sys

from app_fixtures import *  # noqa: F403
from app_fixtures import wait_for, wait_ready

from mlx_pager.serve.state import ServerState, remove_state, write_state


def status_line(app) -> str:
    return str(app.screen.query_one("#model-status").render())


async def test_status_line_shows_a_running_server(make_app, tmp_path, monkeypatch):
    monkeypatch.setattr("mlx_pager_app.screens.chat.SERVER_CHECK_SECONDS", 0.05)
    data = tmp_path / "data"
    write_state(ServerState(os.getpid(), "127.0.0.1", 8080, "tiny-moe"), data)
    app = make_app()
    async with app.run_test(size=(140, 44)) as pilot:
        await wait_ready(pilot)
        assert "tiny-moe" in status_line(app)
        assert "server running at http://127.0.0.1:8080" in status_line(app)
        remove_state(data)  # the server exited
        await wait_for(pilot, lambda: "server running" not in status_line(app))
        assert "tiny-moe" in status_line(app)


async def test_a_dead_servers_file_is_ignored(make_app, tmp_path):
    """A server killed without cleanup leaves its file; its pid is gone."""
    gone = subprocess.Popen([sys.executable, "-c", "pass"])
    gone.wait()
    write_state(ServerState(gone.pid, "127.0.0.1", 8080, "tiny-moe"), tmp_path / "data")
    app = make_app()
    async with app.run_test(size=(140, 44)) as pilot:
        await wait_ready(pilot)
        assert "tiny-moe" in status_line(app)
        assert "server running" not in status_line(app)
