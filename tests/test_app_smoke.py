"""The real thing in a real terminal: ``mlx-pager`` (the console script) inside tmux.

Start it on the tiny model (as the last used model in its settings), type a prompt, see
the reply stream with live stats, stop it, quit with Ctrl+Q, and check the exit status.
"""

from __future__ import annotations

import shutil
import subprocess
import sys
import time
import uuid
from pathlib import Path

import pytest

from mlx_pager.settings import Settings, save_settings
from mlx_pager.sim.synthetic import make_checkpoint

pytestmark = pytest.mark.skipif(shutil.which("tmux") is None, reason="tmux is not installed")

SCRIPT = Path(sys.executable).parent / "mlx-pager"


class Tmux:
    """One detached session on a private server socket, so no one else's tmux is touched."""

    def __init__(self, command: str, width: int = 130, height: int = 42) -> None:
        self.socket = f"mlx-pager-smoke-{uuid.uuid4().hex[:8]}"
        self._tmux("new-session", "-d", "-s", "smoke", "-x", str(width), "-y", str(height),
                   command)  # fmt: skip

    def _tmux(self, *args: str) -> str:
        result = subprocess.run(["tmux", "-L", self.socket, *args], capture_output=True,
                                text=True, timeout=20)  # fmt: skip
        return result.stdout

    def screen(self) -> str:
        return self._tmux("capture-pane", "-p", "-t", "smoke")

    def keys(self, *keys: str) -> None:
        self._tmux("send-keys", "-t", "smoke", *keys)

    def wait_for(self, predicate, timeout: float = 60.0) -> str:
        deadline = time.monotonic() + timeout
        while True:
            text = self.screen()
            if predicate(text):
                return text
            if time.monotonic() > deadline:
                raise AssertionError(f"timed out; the terminal shows:\n{text}")
            time.sleep(0.1)

    def kill(self) -> None:
        self._tmux("kill-server")


def test_mlx_pager_in_tmux(tmp_path):
    assert SCRIPT.exists(), f"{SCRIPT} missing: pip install -e . first"
    config, data, exit_file = tmp_path / "config", tmp_path / "data", tmp_path / "exit"
    # A reply long enough to be seen and stopped midway: the app's 1024 tokens of a model
    # that pages (8 layers, 12 of 64 experts held: about 100 tok/s here, 10 s). The apps'
    # 2-layer model decoded 1024 tokens in under 3 s, and on a loaded machine the terminal
    # showed the reply only once it had ended.
    model = make_checkpoint(tmp_path / "models" / "tiny-moe", "qwen3_moe", num_hidden_layers=8,
                            hidden_size=256, moe_intermediate_size=512)  # fmt: skip
    save_settings(Settings(budget="80MB", context_length=2048, last_model=str(model)),
                  config / "settings.toml")  # fmt: skip
    command = (
        # pytest exports COLUMNS/LINES (80x24); the app must see the tmux window's size.
        f"env -u COLUMNS -u LINES MLX_PAGER_CONFIG_DIR={config} MLX_PAGER_DATA_DIR={data} "
        f"TERM=xterm-256color {SCRIPT}; echo $? > {exit_file}; sleep 30"
    )
    tmux = Tmux(command)
    try:
        tmux.wait_for(lambda s: "● tiny-moe" in s, timeout=60)  # opened on the last used model
        # The "Opened tiny-moe" notice lies over the Send/Stop buttons for a few seconds: on a
        # fast machine the whole reply ended under it, so the Stop button was never seen.
        tmux.wait_for(lambda s: "Opened tiny-moe" not in s, timeout=30)
        tmux.keys("hello experts", "Enter")  # greedy: a long reply, so stop it midway
        # The Stop button (the Send button's place while generating) beside live tok/s.
        live = tmux.wait_for(lambda s: "   Stop   " in s and "tok/s" in s and "╭─ tiny-moe" in s)
        assert "decode" in live and "hit rate" in live and "   Send   " not in live
        tmux.keys("Escape")
        tmux.wait_for(lambda s: "stopped" in s and "   Send   " in s, timeout=30)
        tmux.keys("C-q")
        deadline = time.monotonic() + 30
        while not exit_file.exists() or not exit_file.read_text().strip():
            assert time.monotonic() < deadline, f"did not quit:\n{tmux.screen()}"
            time.sleep(0.1)
        assert exit_file.read_text().strip() == "0"
        saved = list((data / "conversations").glob("*.json"))
        assert len(saved) == 1
    finally:
        tmux.kill()
