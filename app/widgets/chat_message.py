"""One turn of the conversation: the user's text, or the model's streamed markdown."""

from __future__ import annotations

from markdown_it import MarkdownIt
from markdown_it.rules_core import StateCore
from textual.app import ComposeResult
from textual.containers import Vertical
from textual.widgets import Label, Markdown, Static

from ..text import clean


def _hard_breaks(state: StateCore) -> None:
    """Every newline inside a paragraph is a line break, as the model wrote it."""
    for token in state.tokens:
        for child in token.children or ():
            if child.type == "softbreak":
                child.type = "hardbreak"


def reply_parser() -> MarkdownIt:
    """Markdown for model output: real markdown still renders, but nothing is lost.

    Plain markdown would join single newlines into one line ("import\\nimport" shows as
    "import import") and drop HTML ("<div>" vanishes); here a newline breaks the line
    and HTML is shown as the text it is.
    """
    parser = MarkdownIt("gfm-like", {"html": False})
    parser.core.ruler.push("hard_breaks", _hard_breaks)
    return parser


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
        yield Markdown(self._initial, parser_factory=reply_parser)
        yield Label("", classes="reply-status")

    @property
    def markdown(self) -> Markdown:
        return self.query_one(Markdown)

    def set_status(self, text: str, error: bool = False) -> None:
        label = self.query_one(".reply-status", Label)
        label.update(text)
        label.set_class(bool(text), "-shown")
        label.set_class(error, "-error")
