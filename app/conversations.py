"""Conversations on disk: one JSON file each, written atomically, listed newest first."""

from __future__ import annotations

import json
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


def load_conversation(path: Path) -> Conversation:
    data = json.loads(path.read_text(encoding="utf-8"))
    messages = [
        {"role": str(m["role"]), "content": str(m["content"])} for m in data.get("messages", [])
    ]
    return Conversation(
        id=str(data.get("id") or path.stem),
        model=str(data.get("model", "")),
        created=str(data.get("created", "")),
        updated=str(data.get("updated", "")),
        messages=messages,
    )


def list_conversations(folder: Path) -> list[Conversation]:
    """Every readable conversation, most recently updated first; broken files are skipped."""
    if not folder.is_dir():
        return []
    found = []
    for path in folder.glob("*.json"):
        try:
            found.append(load_conversation(path))
        except (OSError, ValueError, KeyError, TypeError):
            continue
    return sorted(found, key=lambda c: (c.updated, c.id), reverse=True)


def delete_conversation(conversation: Conversation, folder: Path) -> None:
    (folder / f"{conversation.id}.json").unlink(missing_ok=True)
