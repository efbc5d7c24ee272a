"""Saved chats: a list to pick one from (Enter), or delete (Delete)."""

from __future__ import annotations

from pathlib import Path

from rich.text import Text
from textual import on
from textual.app import ComposeResult
from textual.binding import Binding
from textual.containers import Vertical
from textual.screen import ModalScreen
from textual.widgets import Label, OptionList
from textual.widgets.option_list import Option

from ..conversations import Conversation, delete_conversation, list_conversations
from ..text import model_label
from ..widgets.footer import Footer


def _row(conversation: Conversation) -> Text:
    when = conversation.updated.replace("T", " ")[:16]
    turns = sum(1 for m in conversation.messages if m["role"] == "user")
    text = Text(conversation.title, style="bold", no_wrap=True, overflow="ellipsis")
    plural = "" if turns == 1 else "s"
    model = model_label(conversation.model) or "?"
    text.append(f"\n{when} · {model} · {turns} prompt{plural}", style="dim")
    return text


class ConversationsScreen(ModalScreen[Conversation | None]):
    """Returns the chosen conversation, or None on Escape."""

    BINDINGS = [
        Binding("escape", "dismiss(None)", "Back"),
        Binding("delete", "delete", "Delete"),
    ]

    def __init__(self, folder: Path) -> None:
        super().__init__()
        self.folder = folder
        self.conversations = list_conversations(folder)

    def compose(self) -> ComposeResult:
        with Vertical(id="conversations-dialog"):
            yield Label("Saved chats", classes="dialog-title")
            if self.conversations:
                yield OptionList(*self._options(), id="conversation-list")
            else:
                yield Label(f"No saved chats yet in {self.folder}.", classes="dim")
            yield Footer()

    def _options(self) -> list[Option]:
        return [Option(_row(c), id=c.id) for c in self.conversations]

    @on(OptionList.OptionSelected)
    def _picked(self, event: OptionList.OptionSelected) -> None:
        self.dismiss(self.conversations[event.option_index])

    def action_delete(self) -> None:
        if not self.conversations:
            return
        options = self.query_one(OptionList)
        index = options.highlighted
        if index is None:
            return
        conversation = self.conversations.pop(index)
        delete_conversation(conversation, self.folder)
        options.remove_option_at_index(index)
        self.notify(f"Deleted “{conversation.title}”.")
