"""One turn of the conversation: the user's text, or the model's streamed markdown."""

from __future__ import annotations

from textual.app import ComposeResult
from textual.containers import Vertical
from textual.widgets import Label, Markdown, Static

from ..text import clean


class UserMessage(Static):
    """Plain text, never markup: prompts may contain brackets."""

    def __init__(self, text: str) -> None:
        super().__init__(text, markup=False, classes="message user")
        self.border_title = "you"


class AssistantMessage(Vertical):
    """A Markdown body that a MarkdownStream appends to, plus a status line under it."""

    def __init__(self, text: str = "", model: str = "") -> None:
        super().__init__(classes="message assistant")
        self._initial = clean(text)
        self.border_title = model or "model"

    def compose(self) -> ComposeResult:
        yield Markdown(self._initial)
        yield Label("", classes="reply-status")

    @property
    def markdown(self) -> Markdown:
        return self.query_one(Markdown)

    def set_status(self, text: str, error: bool = False) -> None:
        label = self.query_one(".reply-status", Label)
        label.update(text)
        label.set_class(bool(text), "-shown")
        label.set_class(error, "-error")
