"""A stacked bar of how a memory budget divides, with a legend."""

from __future__ import annotations

from dataclasses import dataclass

from rich.console import Group
from rich.table import Table
from rich.text import Text
from textual.widget import Widget

from ..text import size


@dataclass(frozen=True)
class Part:
    label: str
    bytes: int
    colour: str
    note: str = ""


# One colour per part, the same in the chat's side panel and the settings screen.
CORE, EXPERTS, KV, HEADROOM = "#5b8def", "#e5a50a", "#b36ae2", "#7f8c8d"


def bar_text(parts: list[Part], budget: int, width: int) -> Text:
    """``width`` cells: each part by its share of the budget, the rest shaded as free.

    Parts beyond the budget turn the bar red: the plan does not fit.
    """
    width = max(4, width)
    used = sum(p.bytes for p in parts)
    scale = max(budget, used, 1)
    text = Text()
    filled = 0
    for part in parts:
        cells = round(part.bytes / scale * width)
        if part.bytes > 0:
            cells = max(1, cells)
        cells = min(cells, width - filled)
        text.append("█" * cells, style=part.colour)
        filled += cells
    if used > budget > 0:
        text.stylize("on #5c1a1a")
    text.append("░" * (width - filled), style="#3a3f4b")
    return text


def legend(parts: list[Part], budget: int) -> Table:
    table = Table.grid(padding=(0, 1), expand=True)
    table.add_column(no_wrap=True)
    table.add_column(ratio=1, no_wrap=True)
    table.add_column(justify="right", no_wrap=True)
    for part in parts:
        label = Text.assemble(("■ ", part.colour), part.label)
        table.add_row(label, Text(part.note, style="dim"), size(part.bytes))
    used = sum(p.bytes for p in parts)
    style = "bold red" if used > budget else "bold"
    table.add_row(Text("  total", style=style), "", Text(f"{size(used)} / {size(budget)}", style))
    return table


class BudgetBar(Widget):
    """Bar and legend; ``update_parts`` redraws. Sized to its container's width."""

    DEFAULT_CSS = """
    BudgetBar { height: auto; }
    """

    def __init__(self, *, name: str | None = None, id: str | None = None) -> None:
        super().__init__(name=name, id=id)
        self.parts: list[Part] = []
        self.budget = 0

    def update_parts(self, parts: list[Part], budget: int) -> None:
        self.parts, self.budget = parts, budget
        self.refresh(layout=True)

    def render(self) -> Group | Text:
        if not self.parts:
            return Text("no model to plan for", style="dim")
        return Group(bar_text(self.parts, self.budget, self.content_size.width), legend(
            self.parts, self.budget))  # fmt: skip
