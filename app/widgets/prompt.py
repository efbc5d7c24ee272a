"""The prompt box: Enter sends, Ctrl+J a new line, Up/Down walk through earlier prompts.

A TextArea rather than an Input, so pasted text keeps all its lines (an Input keeps only
the first). It grows with its text up to a few lines, then scrolls.
"""

from __future__ import annotations

from dataclasses import dataclass

from textual import events
from textual.binding import Binding
from textual.message import Message
from textual.widgets import TextArea
from textual.widgets.text_area import Location

PLACEHOLDER = "Ask anything…  (Enter sends, Ctrl+J new line, ↑/↓ history)"


class PromptInput(TextArea):
    """A TextArea with shell-like history; the draft being typed survives a trip through it.

    Up on the first line and Down on the last walk the history; elsewhere they move the
    cursor, as in any multi-line editor.
    """

    DEFAULT_CSS = """
    PromptInput {
        height: auto;
        max-height: 10;
    }
    """

    BINDINGS = [
        Binding("ctrl+j,shift+enter,alt+enter", "newline", "New line", show=False),
    ]

    @dataclass
    class Submitted(Message):
        """Enter was pressed: ``value`` is the prompt as typed (newlines kept)."""

        prompt_input: PromptInput
        value: str

        @property
        def control(self) -> PromptInput:
            return self.prompt_input

    def __init__(self, *, id: str | None = None) -> None:
        super().__init__(
            id=id,
            soft_wrap=True,
            tab_behavior="focus",
            show_line_numbers=False,
            highlight_cursor_line=False,
            placeholder=PLACEHOLDER,
        )
        self.prompts: list[str] = []  # sent, oldest first (TextArea.history is its undo)
        self._index: int | None = None  # None: editing the draft
        self._draft = ""

    @property
    def value(self) -> str:
        return self.text

    @value.setter
    def value(self, text: str) -> None:
        self.load_text(text)
        self.move_cursor(self.document.end)

    async def _on_key(self, event: events.Key) -> None:
        if event.key == "enter":
            event.stop()
            event.prevent_default()
            self.post_message(self.Submitted(self, self.text))
            return
        await super()._on_key(event)

    # Home/End, Ctrl+A/E/K/U act on the whole line, as in readline, not on the part of it
    # that fits one row of the box: a long prompt wraps, but it is still one line.
    def get_cursor_line_start_location(self, smart_home: bool = False) -> Location:
        return self.cursor_location[0], 0

    def get_cursor_line_end_location(self) -> Location:
        row = self.cursor_location[0]
        return row, len(self.document[row])

    def action_newline(self) -> None:
        self.insert("\n")

    def remember(self, prompt: str) -> None:
        if prompt and (not self.prompts or self.prompts[-1] != prompt):
            self.prompts.append(prompt)
        self._index = None

    def action_cursor_up(self, select: bool = False) -> None:
        if select or not self.navigator.is_first_wrapped_line(self.cursor_location):
            super().action_cursor_up(select)
        else:
            self.action_history(-1)

    def action_cursor_down(self, select: bool = False) -> None:
        if select or not self.navigator.is_last_wrapped_line(self.cursor_location):
            super().action_cursor_down(select)
        else:
            self.action_history(1)

    def action_history(self, step: int) -> None:
        if not self.prompts:
            return
        if self._index is None:
            if step > 0:
                return
            self._draft = self.text
            index = len(self.prompts) - 1
        else:
            index = self._index + step
        if index >= len(self.prompts):
            self._index = None
            self.value = self._draft
        else:
            self._index = max(0, index)
            self.value = self.prompts[self._index]
