"""Conversations on disk: one JSON file each, written atomically, listed newest first."""

from __future__ import annotations

import json
import re
import secrets
from dataclasses import asdict, dataclass, field
from datetime import UTC, datetime
from pathlib import Path

from mlx_pager.atomic import write_atomic
from mlx_pager.settings import data_dir


def conversations_dir(base: Path | None = None) -> Path:
    return (base or data_dir()) / "conversations"


def _now() -> str:
    return datetime.now(UTC).isoformat(timespec="seconds")


@dataclass
class Conversation:
    """A chat: the message list the engine's chat template receives, plus labels."""

    id: str = field(default_factory=lambda: datetime.now(UTC).strftime("%Y%m%d-%H%M%S-")
                    + secrets.token_hex(3))  # fmt: skip
    model: str = ""
    created: str = field(default_factory=_now)
    updated: str = field(default_factory=_now)
    messages: list[dict[str, str]] = field(default_factory=list)

    @property
    def title(self) -> str:
        """The first user message, on one line: what people recognise a chat by."""
        for message in self.messages:
            if message["role"] == "user":
                text = " ".join(message["content"].split())
                return text if len(text) <= 60 else text[:59] + "…"
        return "(empty)"

    def add(self, role: str, content: str) -> None:
        self.messages.append({"role": role, "content": content})
        self.updated = _now()


def save_conversation(conversation: Conversation, folder: Path) -> Path:
    """Write via a temporary file and rename, so a crash never leaves half a JSON file."""
    text = json.dumps(asdict(conversation), ensure_ascii=False, indent=1)
    return write_atomic(folder / f"{conversation.id}.json", text.encode("utf-8"))


class ConversationError(ValueError):
    """A saved chat that cannot be read; the message names the file."""


MAX_CONVERSATION_BYTES = 64 * 2**20  # a chat file larger than this is not one of ours
ROLES = ("system", "user", "assistant")
SAFE_ID = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,127}")


def load_conversation(path: Path) -> Conversation:
    """One saved chat, or ConversationError naming the file and what is wrong."""
    path = Path(path)

    def broken(what: str) -> ConversationError:
        return ConversationError(
            f"{path} is not a saved conversation ({what}): move it out of {path.parent} "
            "or delete it."
        )

    if path.stat().st_size > MAX_CONVERSATION_BYTES:
        raise broken(f"larger than {MAX_CONVERSATION_BYTES // 2**20} MiB")
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise broken(f"not JSON: {e}") from None
    except RecursionError:
        raise broken("JSON nested too deeply") from None
    if not isinstance(data, dict):
        raise broken("not a JSON object")
    messages = data.get("messages", [])
    if not isinstance(messages, list):
        raise broken("messages is not a list")
    checked = []
    for i, m in enumerate(messages):
        if not isinstance(m, dict) or m.get("role") not in ROLES:
            raise broken(f"message {i} has no role among {', '.join(ROLES)}")
        if not isinstance(m.get("content"), str):
            raise broken(f"message {i} has no text content")
        checked.append({"role": m["role"], "content": m["content"]})
    labels = {}
    for key in ("id", "model", "created", "updated"):
        value = data.get(key, "")
        if not isinstance(value, str):
            raise broken(f"{key} is not text")
        labels[key] = value
    if labels["id"] and not SAFE_ID.fullmatch(labels["id"]):
        raise broken("its id is not a plain file name")  # saving it would write elsewhere
    return Conversation(
        id=labels["id"] or path.stem,
        model=labels["model"],
        created=labels["created"],
        updated=labels["updated"],
        messages=checked,
    )


def list_conversations(folder: Path) -> list[Conversation]:
    """Every readable conversation, most recently updated first; broken files are skipped."""
    if not folder.is_dir():
        return []
    found = []
    for path in folder.glob("*.json"):
        try:
            found.append(load_conversation(path))
        except (OSError, ValueError):
            continue
    return sorted(found, key=lambda c: (c.updated, c.id), reverse=True)


def delete_conversation(conversation: Conversation, folder: Path) -> None:
    (folder / f"{conversation.id}.json").unlink(missing_ok=True)
