"""The running server's state file: pid, host and port, in the data folder.

The server writes it atomically when it listens and removes it on exit; a server killed
without cleanup leaves a file whose pid is gone, which ``running_server`` ignores. Light
to import (no MLX), so the app can ask whether a server is running.
"""

from __future__ import annotations

import json
import os
from dataclasses import asdict, dataclass
from pathlib import Path

import psutil

from ..atomic import write_atomic
from ..settings import data_dir

STATE_NAME = "server.json"


@dataclass(frozen=True)
class ServerState:
    pid: int
    host: str
    port: int
    model: str

    @property
    def url(self) -> str:
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"http://{host}:{self.port}"


def state_path(base: Path | None = None) -> Path:
    return (base or data_dir()) / STATE_NAME


def write_state(state: ServerState, base: Path | None = None) -> Path:
    return write_atomic(state_path(base), json.dumps(asdict(state)).encode())


def remove_state(base: Path | None = None, pid: int | None = None) -> None:
    """Remove the file if it is this process's (``pid``, default ours): a second server
    that failed to start must not delete the first one's."""
    path = state_path(base)
    state = read_state(path)
    if state is not None and state.pid == (os.getpid() if pid is None else pid):
        path.unlink(missing_ok=True)


def read_state(path: Path) -> ServerState | None:
    try:
        data = json.loads(path.read_text())
        return ServerState(int(data["pid"]), str(data["host"]), int(data["port"]), data["model"])
    except (OSError, ValueError, KeyError, TypeError):
        return None


def running_server(base: Path | None = None) -> ServerState | None:
    """The server serving from this data folder, or None when there is none (no file, a
    broken one, or one left by a process that is gone)."""
    state = read_state(state_path(base))
    if state is None or not _alive(state.pid):
        return None
    return state


def _alive(pid: int) -> bool:
    try:
        return psutil.Process(pid).status() != psutil.STATUS_ZOMBIE
    except psutil.Error:
        return False
