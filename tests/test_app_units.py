"""The app's pure parts: conversations on disk, heatmap binning, reply coalescing."""

from __future__ import annotations

import json

import numpy as np
from mlx_pager_app.conversations import (
    Conversation,
    delete_conversation,
    list_conversations,
    save_conversation,
)
from mlx_pager_app.screens.chat import ReplyBuffer
from mlx_pager_app.text import clean, model_label
from mlx_pager_app.widgets.heatmap import cell_info, levels, render_heatmap


def test_conversations_roundtrip_newest_first_and_broken_files_skipped(tmp_path):
    old, new = Conversation(id="a", updated="2026-01-01"), Conversation(id="b")
    old.add("user", "first [not markup]")
    new.add("user", "second")
    new.add("assistant", "reply")
    for c in (old, new):
        save_conversation(c, tmp_path)
    (tmp_path / "broken.json").write_text("{not json")
    found = list_conversations(tmp_path)
    assert [c.id for c in found] == ["b", "a"]
    assert found[0].messages == new.messages and found[1].title == "first [not markup]"
    assert not list(tmp_path.glob(".conv-*"))  # no temporary files left behind
    assert json.loads((tmp_path / "b.json").read_text())["messages"][1]["role"] == "assistant"
    delete_conversation(old, tmp_path)
    assert [c.id for c in list_conversations(tmp_path)] == ["b"]


def test_heatmap_bins_wide_models_and_scales_per_layer():
    counts = np.zeros((48, 128), np.int64)
    counts[0, 0] = 10
    counts[1, 127] = 1000
    grid = levels(counts, 32)
    assert grid.shape == (48, 32)  # 4 experts per column
    assert grid[0, 0] == grid[1, 31] == 8  # each layer against its own busiest expert
    assert (grid[2:] == -1).all()  # nothing fired: its own colour, not the coldest
    text = render_heatmap(counts, 40).plain
    assert "4 experts per cell" in text and "1,010 activations" in text
    assert "top 10% of experts took 100%" in text
    assert len(text.splitlines()) == 1 + 24 + 3  # two layers per text row; 2-line summary
    assert max(len(line) for line in text.splitlines()) <= 40  # nothing is cut off


def test_heatmap_summary_fits_the_side_panel():
    """The chat's side panel leaves 43 cells: the summary's numbers must all show."""
    counts = np.arange(2 * 8, dtype=np.int64).reshape(2, 8) * 1000
    lines = render_heatmap(counts, 43).plain.splitlines()
    assert lines[-2:] == ["    120,000 activations", "    top 10% of experts took 24%"]


def test_reply_buffer_posts_once_until_drained():
    buffer = ReplyBuffer()
    assert buffer.push("a") is True
    assert buffer.push("b") is False  # a notice is pending: no second message
    assert buffer.drain() == "ab"
    assert buffer.push("c") is True


def test_text_helpers():
    assert clean("ok\x1b[31m\x07 fine\n") == "ok[31m fine\n"
    assert model_label("mlx-community/Qwen3-30B-A3B-4bit") == "mlx-community/Qwen3-30B-A3B-4bit"
    assert model_label("/tmp/x/tiny-moe/") == "tiny-moe"


def test_heatmap_tooltip_names_the_cell():
    counts = np.zeros((2, 8), np.int64)
    counts[1, 5] = 30
    counts[1, 0] = 10
    # 2 layers x 8 experts at width 28: one row per layer, 3 cells per expert.
    assert (
        cell_info(counts, 28, x=4 + 5 * 3 + 1, y=2)
        == "layer 1, expert 5: 30 tokens (75.0% of the layer)"
    )
    assert cell_info(counts, 28, x=4, y=1) == "layer 0, expert 0: 0 tokens"
    assert cell_info(counts, 28, x=1, y=1) is None  # the gutter


def test_stats_panel_says_which_lossy_modes_are_on():
    from mlx_pager_app.widgets.stats_panel import cold_text, routing_text

    from mlx_pager.stats import Stats

    exact = Stats()
    assert str(routing_text(exact)) == "exact" and str(cold_text(exact)) == "full precision"
    lossy = Stats(routing="cache-aware", route_margin=0.2, rerouted=41,
                  cold_precision="3bit", cold_slots=90, cold_hits=7, cold_misses=5)  # fmt: skip
    assert str(routing_text(lossy)) == "margin 0.2 · 41 rerouted"
    assert str(cold_text(lossy)) == "3bit · 12 served"
    assert lossy.lossy == ["cache-aware routing, margin 0.2", "cold experts at 3bit"]


def test_stats_panel_says_whether_prefetch_pays():
    from mlx_pager_app.widgets.stats_panel import prefetch_text

    from mlx_pager.stats import Stats

    assert str(prefetch_text(Stats(), on=False)) == "off"
    measuring = Stats(prefetch_issued=10, prefetch_precision=0.75)
    assert str(prefetch_text(measuring, on=True)) == "measuring · 75.0% accurate"
    assert str(prefetch_text(Stats(), on=True)) == "measuring"
    faster = Stats(prefetch_issued=10, prefetch_precision=0.75, prefetch_pays=True)
    assert str(prefetch_text(faster, on=True)) == "75.0% accurate"
    slower = Stats(prefetch_issued=10, prefetch_pays=False)
    assert str(prefetch_text(slower, on=True)) == "paused: decodes faster without"
