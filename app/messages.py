"""Messages that workers post to the UI thread (dataclasses, as in posting)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

from textual.message import Message

if TYPE_CHECKING:
    from mlx_pager.engine import Engine


@dataclass
class ReplyUpdated(Message):
    """New reply text waits in the screen's ReplyBuffer.

    The worker posts one only when none is pending, so a fast model cannot flood the
    screen's queue and delay key presses (Esc must stop a reply at once).
    """


@dataclass
class ReplyFinished(Message):
    """Generation ended: "stop", "length" or "cancelled"."""

    finish_reason: str | None


@dataclass
class ReplyFailed(Message):
    """Generation raised; the text says what happened and what to do."""

    error: str


@dataclass
class EngineOpened(Message):
    """A model finished opening on the worker thread."""

    engine: Engine
    model: str
    token: int = 0  # which open request this answers; stale ones are dropped
    explicit: bool = False  # the user chose this model (remember it as the last used)


@dataclass
class EngineFailed(Message):
    """Opening a model failed; the app keeps running without one."""

    model: str
    error: str
    token: int = 0


@dataclass
class DownloadProgress(Message):
    """Bytes of a download so far, out of its total."""

    done_bytes: int
    total_bytes: int


@dataclass
class DownloadFinished(Message):
    """A download ended: ok, cancelled (resumable) or failed with a message."""

    repo_id: str
    status: str  # "done" | "cancelled" | "failed"
    error: str = ""
