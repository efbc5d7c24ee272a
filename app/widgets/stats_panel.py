"""The live numbers beside the chat: speed, memory against the budget, cache and disk."""

from __future__ import annotations

from dataclasses import dataclass

from rich.console import Group
from rich.table import Table
from rich.text import Text
from textual.widget import Widget

from mlx_pager.stats import Stats

from ..text import heading_colour, megabytes, percent, rate, seconds, size
from .budget_bar import CORE, EXPERTS, HEADROOM, KV, Part, bar_text


@dataclass(frozen=True)
class PanelState:
    """What the panel shows: a stats snapshot plus the switches that explain blanks."""

    stats: Stats
    prefetch_on: bool = False
    preload: str = "off"  # the engine's preload_status: "on: ..." or "off: why"


def kv_note(stats: Stats) -> str:
    """The KV part is reserved at the context length; beside it, what a reply fills."""
    if stats.kv_used_bytes:
        return f"{size(stats.kv_used_bytes)} used of"
    return "at context"


def memory_parts(stats: Stats) -> list[Part]:
    return [
        Part("core", stats.resident_bytes, CORE, "resident"),
        Part("experts", stats.cache_bytes, EXPERTS, f"{stats.slots} slots"),
        Part("KV cache", stats.kv_bytes, KV, kv_note(stats)),
        Part("headroom", stats.headroom_bytes, HEADROOM),
    ]


def routing_text(stats: Stats) -> Text:
    """Exact routing, or cache-aware (lossy) with its margin and the routes it changed."""
    if stats.routing != "cache-aware":
        return Text("exact", style="dim")
    text = Text(f"margin {stats.route_margin:g}", style="#e5a50a")
    text.append(f" · {stats.rerouted} rerouted", style="dim")
    return text


def cold_text(stats: Stats) -> Text:
    """Full precision, or the cold tier (lossy): its precision and what it served."""
    if not stats.cold_slots:
        return Text("full precision", style="dim")
    text = Text(f"{stats.cold_precision}", style="#e5a50a")
    text.append(f" · {stats.cold_hits + stats.cold_misses} served", style="dim")
    return text


def prefetch_text(stats: Stats, on: bool) -> Text:
    """The guesses' accuracy, or why there are none: off, or paused where the engine
    measured decode faster without them."""
    if not on:
        return Text("off", style="dim")
    if stats.prefetch_pays is False:
        return Text("paused: decodes faster without", style="dim")
    accuracy = f"{percent(stats.prefetch_precision)} accurate" if stats.prefetch_issued else ""
    if stats.prefetch_pays is None:  # decode windows with guesses and without, still running
        return Text(" · ".join(filter(None, ["measuring", accuracy])))
    return Text(accuracy or "no guesses yet")


def _section(title: str, right: str = "", colour: str = "#FFBE98") -> Table:
    table = Table.grid(expand=True)
    table.add_column(no_wrap=True)
    table.add_column(justify="right", no_wrap=True)
    table.add_row(Text(title, style=f"bold {colour}"), Text(right, style="dim"))
    return table


def _rows(rows: list[tuple[str, str | Text]]) -> Table:
    table = Table.grid(padding=(0, 1), expand=True)
    table.add_column(style="dim", no_wrap=True)
    table.add_column(justify="right", no_wrap=True)
    for label, value in rows:
        table.add_row(f" {label}", value)
    return table


def panel_renderable(state: PanelState, width: int, colour: str = "#FFBE98") -> Group:
    s = state.stats
    speed = _rows([
        ("prompt", rate(s.prompt_tps)),
        ("decode", rate(s.decode_tps)),
        ("first token", seconds(s.ttft_seconds)),
        *([("  reading · computing", f"{seconds(s.ttft_read_seconds)} · "
             f"{seconds(s.ttft_compute_seconds)}")] if s.ttft_seconds else []),
        *([("  waiting", seconds(s.ttft_wait_seconds))] if s.ttft_wait_seconds >= 0.05 else []),
        ("tokens", f"{s.prompt_tokens} in · {s.generation_tokens} out"),
    ])  # fmt: skip
    parts = memory_parts(s)
    used = sum(p.bytes for p in parts)
    memory = _rows(
        [(p.label, Text.assemble((f"{p.note} " if p.note else "", "dim"), size(p.bytes)))
         for p in parts]
        + [("total", Text(f"{size(used)} / {size(s.budget_bytes)}",
                          style="bold red" if used > s.budget_bytes else "bold"))]
        + ([("peak RSS", size(s.peak_rss_bytes))] if s.peak_rss_bytes else [])
    )  # fmt: skip
    lookups = s.hits + s.misses
    hit = Text(percent(s.hit_rate if lookups else None))
    if lookups:
        hit.append(f" ({s.hits}/{lookups})", style="dim")
    decode = s.decode_hits + s.decode_misses
    decode_hit = percent(s.decode_hits / decode) if decode else "—"
    preload, _, why = state.preload.partition(":")
    cache = _rows([
        ("hit rate", hit),
        ("hit rate, decode", decode_hit),
        ("disk / token", megabytes(s.bytes_per_token) if lookups else "—"),
        ("read from disk", size(s.bytes_read) if lookups else "—"),
        ("prefetch", prefetch_text(s, state.prefetch_on)),
        ("detected task", s.task or "—"),
        ("task preload", Text(preload.strip() or "off", style="" if preload == "on" else "dim")),
        ("routing", routing_text(s)),
        ("cold experts", cold_text(s)),
    ])  # fmt: skip
    note = Text(f" {why.strip()}", style="dim italic") if why.strip() else Text("")
    bar = Text(" ") + bar_text(parts, s.budget_bytes, width - 1)
    return Group(
        _section("Speed", "", colour), speed, Text(""),
        _section("Memory", f"budget {size(s.budget_bytes)}", colour), bar, memory, Text(""),
        _section("Experts", f"{s.slots} slots", colour), cache, note,
    )  # fmt: skip


class StatsPanel(Widget):
    """``show`` a state to redraw; ``pin`` one to freeze it (snapshot tests, demos)."""

    DEFAULT_CSS = """
    StatsPanel { height: auto; }
    """

    def __init__(self, *, id: str | None = None) -> None:
        super().__init__(id=id)
        self.state: PanelState | None = None
        self.pinned = False

    def show(self, state: PanelState | None) -> None:
        if not self.pinned:
            self.state = state
            self.refresh(layout=True)

    def pin(self, state: PanelState) -> None:
        self.state, self.pinned = state, True
        self.refresh(layout=True)

    def render(self) -> Group | Text:
        if self.state is None:
            return Text("no model open", style="dim")
        return panel_renderable(self.state, self.content_size.width, heading_colour(self))
