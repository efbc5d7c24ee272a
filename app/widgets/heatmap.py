"""The expert heatmap: MoE layers by experts, how often each expert fired.

Two layers share a text row (upper half block: top layer in the foreground colour, the
next layer in the background), so a 48-layer model takes 24 rows; experts beyond the
width are binned. Each layer is scaled to its own busiest expert, since every layer sees
the same number of activations.
"""

from __future__ import annotations

import math

import numpy as np
from rich.color import Color
from rich.style import Style
from rich.text import Text
from textual import events
from textual.widget import Widget

from mlx_pager.tasks.coverage import top_share

# cold -> hot: near background, blue, teal, yellow, red
STOPS = [(0.0, (38, 42, 54)), (0.25, (45, 80, 170)), (0.5, (30, 160, 150)),
         (0.75, (240, 200, 60)), (1.0, (230, 70, 50))]  # fmt: skip
LEVELS = 9
GUTTER = 4


def _gradient(t: float) -> Color:
    for (t0, c0), (t1, c1) in zip(STOPS, STOPS[1:], strict=False):
        if t <= t1:
            f = (t - t0) / (t1 - t0) if t1 > t0 else 0.0
            return Color.from_rgb(*(round(a + (b - a) * f) for a, b in zip(c0, c1, strict=True)))
    return Color.from_rgb(*STOPS[-1][1])


PALETTE = [_gradient(i / (LEVELS - 1)) for i in range(LEVELS)]
ZERO = Color.from_rgb(26, 28, 36)


def levels(counts: np.ndarray, columns: int) -> np.ndarray:
    """Counts [layers, experts] -> palette levels [layers, bins], -1 where nothing fired."""
    layers, experts = counts.shape
    per_bin = max(1, math.ceil(experts / max(1, columns)))
    bins = math.ceil(experts / per_bin)
    padded = np.zeros((layers, bins * per_bin), np.float64)
    padded[:, :experts] = counts
    binned = padded.reshape(layers, bins, per_bin).sum(axis=2)
    peak = binned.max(axis=1, keepdims=True)
    scaled = np.sqrt(np.divide(binned, peak, out=np.zeros_like(binned), where=peak > 0))
    out = np.rint(scaled * (LEVELS - 1)).astype(np.int64)
    out[binned == 0] = -1
    return out


def layout_for(layers: int, experts: int, width: int) -> tuple[int, int, int]:
    """(layers per text row, cells per column, columns) that fit ``width`` cells.

    Small models get one row per layer and wide cells; large ones two layers per row
    (half blocks) and experts binned into columns.
    """
    room = max(1, width - GUTTER)
    columns = min(experts, room)
    cell = max(1, min(3, room // max(1, columns)))
    return (1 if layers <= 16 else 2), cell, columns


def render_heatmap(counts: np.ndarray, width: int, empty: str = "no routed experts") -> Text:
    """The picture, as Rich text ``width`` cells wide (labels included)."""
    layers, experts = counts.shape if counts.ndim == 2 else (0, 0)
    if layers == 0 or experts == 0:
        return Text(empty, style="dim")
    per_row, cell, columns = layout_for(layers, experts, width)
    grid = levels(counts, columns)
    per_bin = math.ceil(experts / grid.shape[1])
    text = Text(no_wrap=True, overflow="crop")
    scale = f"{per_bin} experts per cell" if per_bin > 1 else "one per cell"
    text.append(f"{'L':>{GUTTER - 1}} experts 0–{experts - 1} ({scale})\n", style="dim")

    def colour(level: int) -> Color:
        return ZERO if level < 0 else PALETTE[level]

    for row in range(0, layers, per_row):
        text.append(f"{row:>{GUTTER - 1}} ", style="dim")
        for col in range(grid.shape[1]):
            top = colour(grid[row, col])
            if per_row == 1:
                text.append("█" * cell, Style(color=top))
                continue
            bottom = colour(grid[row + 1, col]) if row + 1 < layers else None
            text.append("▀" * cell, Style(color=top, bgcolor=bottom))
        text.append("\n")
    total = int(counts.sum())
    text.append(f"{'':>{GUTTER}}cold ", style="dim")
    for c in PALETTE:
        text.append("█", Style(color=c))
    text.append(" hot\n", style="dim")
    if total == 0:
        text.append(f"{'':>{GUTTER}}no activations yet", style="dim")
    else:
        # Two short lines: one would not fit the side panel (46 columns).
        share = top_share(counts, 0.10) or 0.0
        text.append(f"{'':>{GUTTER}}{total:,} activations\n", style="dim")
        text.append(f"{'':>{GUTTER}}top 10% of experts took {share:.0%}", style="dim")
    return text


class ExpertHeatmap(Widget):
    """Redrawn from ``update_counts`` while a reply streams."""

    DEFAULT_CSS = """
    ExpertHeatmap { height: auto; }
    """

    def __init__(self, *, id: str | None = None) -> None:
        super().__init__(id=id)
        self.counts = np.zeros((0, 0), np.int64)
        self.empty_text = "no model open"  # shown when there is no [layers, experts] grid

    def update_counts(self, counts: np.ndarray, empty_text: str | None = None) -> None:
        if empty_text is not None and empty_text != self.empty_text:
            self.empty_text = empty_text
            self.refresh(layout=True)
        if counts.shape != self.counts.shape or not np.array_equal(counts, self.counts):
            # The summary takes one line before the first activation and two after.
            resized = counts.shape != self.counts.shape or counts.any() != self.counts.any()
            self.counts = counts.copy()
            self.refresh(layout=resized)

    def render(self) -> Text:
        return render_heatmap(self.counts, self.content_size.width, self.empty_text)

    def on_mouse_move(self, event: events.MouseMove) -> None:
        """Which layer and experts a cell is, and how busy: the tooltip under the mouse."""
        self.tooltip = cell_info(self.counts, self.content_size.width, event.x, event.y)


def cell_info(counts: np.ndarray, width: int, x: int, y: int) -> str | None:
    """The tooltip for text cell (x, y) of ``render_heatmap``'s picture, or None."""
    if counts.ndim != 2 or counts.size == 0:
        return None
    layers, experts = counts.shape
    per_row, cell, columns = layout_for(layers, experts, width)
    per_bin = math.ceil(experts / columns)
    column = (x - GUTTER) // cell
    row = y - 1
    if row < 0 or column < 0 or row * per_row >= layers or column * per_bin >= experts:
        return None
    first, last = column * per_bin, min(experts, (column + 1) * per_bin) - 1
    lines = []
    for layer in range(row * per_row, min(layers, (row + 1) * per_row)):
        fired = int(counts[layer, first : last + 1].sum())
        total = int(counts[layer].sum())
        share = f" ({fired / total:.1%} of the layer)" if total else ""
        which = f"expert {first}" if first == last else f"experts {first}–{last}"
        lines.append(f"layer {layer}, {which}: {fired:,} tokens{share}")
    return "\n".join(lines)
