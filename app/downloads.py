"""The Models screen's calls into the engine's listing (``mlx_pager.hub.listing``), with
the app's paths and fakes from ``AppConfig``, and the detail panel rendered with Rich.

No widgets here: the screen calls these on workers, since planning and downloading talk
to the Hub. The rows, verdicts and download descriptions are the engine's, the same ones
`mlx-pager models` and `mlx-pager download` print.
"""

from __future__ import annotations

import threading
from collections.abc import Callable
from pathlib import Path

from rich.console import Group
from rich.table import Table
from rich.text import Text

from mlx_pager.hub import listing
from mlx_pager.hub.errors import DownloadCancelled, DownloadError
from mlx_pager.hub.fetch import download as fetch
from mlx_pager.hub.listing import (
    Estimate,
    ModelRow,
    check_model_name,
    describe_download,
    estimate_speed_text,
    folder_row,
    local_folder,
    speed_text,
)
from mlx_pager.settings import Settings
from mlx_pager.speed import MachineConstants

from .config import AppConfig
from .text import size

__all__ = [
    "Cancelled", "DownloadError", "Estimate", "ModelRow", "check_model_name",
    "describe_download", "estimate_speed_text", "folder_row", "local_folder", "speed_text",
]  # fmt: skip

Cancelled = DownloadCancelled
VERDICT_STYLE = {"fits": "green", "paged": "yellow", "too_large": "red"}


def list_models(config: AppConfig) -> list[ModelRow]:
    return listing.list_models(config.hub_cache_dir, config.catalogue_path,
                               embedded=config.default_model())  # fmt: skip


def quick_estimate(
    row: ModelRow,
    settings: Settings,
    total_memory: int,
    machine: MachineConstants | None = None,
) -> Estimate:
    """No network; the speed for ``machine`` (None: "estimate pending")."""
    return listing.quick_estimate(row, settings.budget_bytes(total_memory),
                                  settings.context_length, machine)  # fmt: skip


def estimate(
    config: AppConfig,
    settings: Settings,
    row: ModelRow,
    total_memory: int,
    machine: MachineConstants | None = None,
) -> Estimate:
    """Ask the Hub: files, sizes, what is cached (partial too), free disk; then the verdict."""
    return listing.plan_estimate(
        row, settings.budget_bytes(total_memory), settings.context_length,
        endpoint=config.hub_endpoint, cache_dir=config.hub_cache_dir,
        free_space=config.disk_free, machine=machine,
    )  # fmt: skip


def download(
    config: AppConfig,
    repo_id: str,
    progress: Callable[[int, int], None],
    cancel: threading.Event,
) -> Path:
    """Into the Hugging Face cache, resuming partial files; raises Cancelled or a
    DownloadError whose message says what to do. ``progress`` comes throttled."""
    return fetch(
        repo_id, endpoint=config.hub_endpoint, cache_dir=config.hub_cache_dir,
        progress=lambda done, total, _file: progress(done, total), cancel=cancel,
        free_space=config.disk_free,
    )  # fmt: skip


def describe(row: ModelRow, estimate: Estimate | None) -> Group:
    """The detail panel for one model: its layout, then the engine's description of what
    downloading and running it costs."""
    lines: list = [Text(row.repo_id, style="bold")]
    if row.label != row.repo_id:
        lines.append(Text(row.label))
    if row.description:
        lines.append(Text(row.description, style="dim"))
    table = Table.grid(padding=(0, 2))
    table.add_column(style="dim", no_wrap=True)
    table.add_column()
    sizes = row.sizes or (estimate.sizes if estimate is not None else None)
    if sizes is not None and sizes.moe_layers:
        s = sizes
        table.add_row("experts", f"{s.moe_layers} layers × {s.experts}, top-{s.top_k}, "
                                 f"{size(s.one_expert_bytes)} each")  # fmt: skip
        table.add_row("resident", size(s.dense_bytes))
    if row.cached:
        where = "a local folder" if row.folder else "downloaded"
        table.add_row("on disk", f"{size(row.size_bytes)}, {where}")
    if estimate is not None:
        if row.cached:  # nothing to download: the size on disk says it
            estimate = Estimate(**{**estimate.__dict__, "size_bytes": 0})
        for label, value in describe_download(estimate):
            style = ""
            if label == "your budget":
                style = VERDICT_STYLE.get(estimate.verdict, "dim")
            elif label == "problem" or (label == "free disk" and estimate.disk_problem):
                style = "red"
            table.add_row(label, Text(value, style=style))
    lines += [Text(""), table]
    return Group(*lines)
