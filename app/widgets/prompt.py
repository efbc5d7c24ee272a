"""The prompt box: one line, Enter sends, Up/Down walk through earlier prompts."""

from __future__ import annotations

from textual.binding import Binding
from textual.widgets import Input


class PromptInput(Input):
    """An Input with shell-like history; the draft being typed survives a trip through it."""

    BINDINGS = [
        Binding("up", "history(-1)", "Previous prompt", show=False),
        Binding("down", "history(1)", "Next prompt", show=False),
    ]

    def __init__(self, *, id: str | None = None) -> None:
        super().__init__(placeholder="Ask anything…  (Enter sends, ↑/↓ history)", id=id)
        self.history: list[str] = []
        self._index: int | None = None  # None: editing the draft
        self._draft = ""

    def remember(self, prompt: str) -> None:
        if prompt and (not self.history or self.history[-1] != prompt):
            self.history.append(prompt)
        self._index = None

    def action_history(self, step: int) -> None:
        if not self.history:
            return
        if self._index is None:
            if step > 0:
                return
            self._draft = self.value
            index = len(self.history) - 1
        else:
            index = self._index + step
        if index >= len(self.history):
            self._index = None
            self.value = self._draft
        else:
            self._index = max(0, index)
            self.value = self.history[self._index]
        self.cursor_position = len(self.value)
