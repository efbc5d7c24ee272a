"""What the models screen needs from the download layer (``mlx_pager.download`` and
``mlx_pager.hub``), shaped for rows and a detail panel. No widgets here: the screen calls
these on workers, since planning and downloading talk to the Hub.
"""

from __future__ import annotations

import re
import threading
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from rich.console import Group
from rich.table import Table
from rich.text import Text

from mlx_pager import download as dl
from mlx_pager.hub import cached_models, is_runnable
from mlx_pager.settings import Settings

from .text import size

REPO_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")
Cancelled = dl.DownloadCancelled
VERDICT_STYLE = {"fits": "green", "paged": "yellow", "too_large": "red"}


@dataclass
class ModelRow:
    repo_id: str
    label: str
    description: str = ""
    size_bytes: int = 0  # on disk when cached, else the download size (catalogue estimate)
    cached: bool = False  # runnable from the cache
    partial: bool = False  # a download started and not finished: it resumes
    path: Path | None = None  # the snapshot folder when cached
    sizes: dl.ModelSizes | None = None  # catalogue, cached headers or the Hub's plan
    custom: bool = False  # typed by the user
    folder: bool = False  # a model folder outside the HF cache (repo_id is its path)

    @property
    def open_name(self) -> str:
        """What Engine.open takes: the Hub id (found in the cache by mlx_pager.hub) or,
        for a folder, its path."""
        return self.repo_id


@dataclass
class Estimate:
    """Cost and verdict of one model: quick (no network) or from the Hub's plan."""

    size_bytes: int = 0
    remaining_bytes: int = 0
    free_bytes: int | None = None
    verdict: str = ""  # fits | paged | too_large | "" (unknown)
    explain: str = ""
    tokens_per_second: float | None = None
    error: str = ""
    disk_problem: str = ""
    planned: bool = False  # sizes and cached bytes asked of the Hub (not the catalogue's)
    sizes: dl.ModelSizes | None = None  # from the Hub's plan: the screen keeps them on the row


def speed(tokens_per_second: float) -> str:
    return f"{tokens_per_second:.1f} tok/s" if tokens_per_second < 10 else (
        f"{tokens_per_second:.0f} tok/s")  # fmt: skip


def check_repo_id(repo_id: str) -> str:
    """'' when it looks like a Hub id or names a model folder, else what is wrong with it."""
    if not repo_id:
        return "Type a Hub id, such as mlx-community/OLMoE-1B-7B-0125-Instruct-4bit."
    if local_folder(repo_id) is not None:
        return ""
    path = Path(repo_id).expanduser()
    if repo_id.startswith(("/", ".", "~")) or path.exists():
        if not path.is_dir():
            return f"No folder {repo_id}: type the path of a model folder, or a Hub id."
        return (f"{repo_id} is not a model folder: it needs config.json and *.safetensors "
                "weights.")  # fmt: skip
    if not REPO_ID.match(repo_id):
        return f"{repo_id!r} is not a Hub id: it looks like org/name (or type a folder path)."
    return ""


def local_folder(text: str) -> Path | None:
    """The model folder ``text`` names (absolute), or None: not a runnable folder."""
    path = Path(text).expanduser()
    if not (path.is_dir() and is_runnable(path)):
        return None
    return path.resolve()


def folder_row(path: Path, label: str = "", custom: bool = False) -> ModelRow:
    """A row for a model folder outside the HF cache: runnable as it is, never downloaded."""
    size_bytes = sum(p.stat().st_size for p in path.iterdir() if p.is_file())
    row = ModelRow(str(path), label or f"{path.name} (folder)", size_bytes=size_bytes,
                   cached=True, path=path, custom=custom, folder=True)  # fmt: skip
    try:
        row.sizes = dl.local_sizes(path)
    except (OSError, ValueError, KeyError):
        row.sizes = None
    return row


def embedded_row(config) -> ModelRow | None:  # noqa: ANN001 - AppConfig
    """The model shipped in assets/ (the default): always there to go back to."""
    path = local_folder(config.default_model())
    if path is None:
        return None
    row = folder_row(path, f"{path.name} (embedded)")
    row.description = "The small MoE shipped with mlx-pager: opens offline, no download."
    return row


def list_models(config) -> list[ModelRow]:  # noqa: ANN001 - AppConfig
    """Downloaded models first, then the rest of the curated catalogue, then the
    embedded model."""
    try:
        catalogue = dl.load_catalogue(config.catalogue_path)
    except FileNotFoundError:
        catalogue = []
    here: dict[str, ModelRow] = {}
    for model in cached_models(config.hub_cache_dir):  # newest revision first
        if model.repo_id in here:
            continue
        row = ModelRow(model.repo_id, model.repo_id, size_bytes=model.size_bytes,
                       cached=model.runnable, partial=bool(model.incomplete_bytes),
                       path=model.path if model.runnable else None)  # fmt: skip
        if row.cached:
            try:
                row.sizes = dl.local_sizes(model.path)
            except (OSError, ValueError, KeyError):
                row.sizes = None
        here[model.repo_id] = row
    rows = []
    for entry in catalogue:
        row = here.pop(entry.id, None) or ModelRow(entry.id, entry.name,
                                                   size_bytes=entry.sizes.total_bytes)  # fmt: skip
        row.label, row.description = entry.name, entry.description
        row.sizes = row.sizes or entry.sizes
        rows.append(row)
    embedded = embedded_row(config)
    listed = sorted([*here.values(), *rows], key=lambda r: not r.cached)
    return [*listed, embedded] if embedded is not None else listed


def quick_estimate(row: ModelRow, settings: Settings, total_memory: int) -> Estimate:
    """The verdict from sizes already known (catalogue or local headers): no network.

    A downloaded model is planned by the engine itself (``download.local_verdict``:
    ``inspect_model``'s plan), a remote one by the same rule (``download.verdict``), so
    this screen, `mlx-pager models`, the settings and the chat agree.
    """
    result = Estimate(size_bytes=row.size_bytes)
    if row.cached and row.path is not None:
        try:
            found = dl.local_verdict(row.path, settings.budget_bytes(total_memory),
                                     settings.context_length)  # fmt: skip
        except Exception as e:  # noqa: BLE001 - shown as the row's problem
            result.error = str(e) or type(e).__name__
            return result
        _show_verdict(result, found)
    elif row.sizes is not None:
        _judge(result, row.sizes, settings, total_memory)
    return result


def estimate(config, settings: Settings, row: ModelRow, total_memory: int) -> Estimate:  # noqa: ANN001
    """Ask the Hub: files, sizes, what is cached (partial too), free disk; then the verdict."""
    if row.cached:
        result = quick_estimate(row, settings, total_memory)
        result.free_bytes = config.disk_free(dl.hub_cache_dir(config.hub_cache_dir))
        return result
    try:
        plan = dl.plan_download(row.repo_id, endpoint=config.hub_endpoint,
                                cache_dir=config.hub_cache_dir,
                                free_space=config.disk_free)  # fmt: skip
    except dl.DownloadError as e:
        result = quick_estimate(row, settings, total_memory)
        result.error = str(e)
        try:  # the disk is there even when the Hub is not
            result.free_bytes = config.disk_free(dl.hub_cache_dir(config.hub_cache_dir))
        except OSError:
            result.free_bytes = None
        return result
    result = Estimate(size_bytes=plan.total_bytes, remaining_bytes=plan.remaining_bytes,
                      free_bytes=plan.free_bytes, disk_problem=plan.disk_problem,
                      planned=True, sizes=plan.sizes)  # fmt: skip
    sizes = plan.sizes or row.sizes
    if sizes is not None:
        _judge(result, sizes, settings, total_memory)
    elif plan.sizes_error:
        result.explain = plan.sizes_error
    return result


def _judge(result: Estimate, sizes: dl.ModelSizes, settings: Settings, total: int) -> None:
    try:
        verdict = dl.verdict(sizes, settings.budget_bytes(total), settings.context_length)
    except ValueError as e:
        result.error = str(e)
        return
    _show_verdict(result, verdict)


def _show_verdict(result: Estimate, verdict: dl.Verdict) -> None:
    result.verdict, result.explain = verdict.verdict, verdict.reason
    result.tokens_per_second = verdict.tokens_per_second


def download(
    config,  # noqa: ANN001
    repo_id: str,
    progress: Callable[[int, int], None],
    cancel: threading.Event,
) -> Path:
    """Into the Hugging Face cache, resuming partial files; raises Cancelled or a
    DownloadError whose message says what to do."""
    return dl.download(
        repo_id, endpoint=config.hub_endpoint, cache_dir=config.hub_cache_dir,
        progress=lambda done, total, _file: progress(done, total), cancel=cancel,
        free_space=config.disk_free,
    )  # fmt: skip


def describe(row: ModelRow, estimate: Estimate | None) -> Group:
    """The detail panel for one model."""
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
        if not row.cached and estimate.size_bytes:
            left = estimate.remaining_bytes if estimate.planned else estimate.size_bytes
            note = ""
            if estimate.planned and 0 < left < estimate.size_bytes:
                note = f" ({size(left)} left: resumes)"
            label = "download" if estimate.planned else "download ≈"
            table.add_row(label, f"{size(estimate.size_bytes)}{note}")
        if estimate.free_bytes is not None:
            style = "red" if estimate.disk_problem else ""
            table.add_row("free disk", Text(size(estimate.free_bytes), style=style))
        if estimate.verdict:
            table.add_row("your budget", Text(estimate.explain,
                                              style=VERDICT_STYLE[estimate.verdict]))  # fmt: skip
        elif estimate.explain:
            table.add_row("your budget", Text(estimate.explain, style="dim"))
        if estimate.tokens_per_second and estimate.verdict != "fits":
            table.add_row("speed", f"~{speed(estimate.tokens_per_second)} (estimate)")
        for problem in (estimate.error, estimate.disk_problem):
            if problem:
                table.add_row("problem", Text(problem, style="red"))
    lines += [Text(""), table]
    return Group(*lines)
