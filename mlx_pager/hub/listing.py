"""Every model the user can open or download, with its verdict for the budget.

One listing, two renderings: `mlx-pager models` prints these rows and the app's Models
screen shows them. Downloaded models first, then the rest of the curated catalogue, then
the embedded model (always there to go back to). A row's verdict is planned by the
engine's own rule (``estimate``): ``quick_estimate`` from what is known offline,
``plan_estimate`` after asking the Hub what a download would fetch.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from ..assets import embedded_model
from ..estimate import ModelSizes, Verdict, local_sizes, local_verdict, verdict
from ..speed import MachineConstants
from ..units import format_bytes
from .cache import cached_models, disk_free, hub_cache_dir, is_runnable
from .catalogue import load_catalogue
from .errors import DownloadError
from .plan import DownloadPlan, plan_download

REPO_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")


@dataclass
class ModelRow:
    repo_id: str  # the Hub id, or the folder's path for a folder
    label: str
    description: str = ""
    size_bytes: int = 0  # on disk when cached, else the download size (catalogue estimate)
    cached: bool = False  # runnable from the cache (or a runnable folder)
    partial: bool = False  # a download started and not finished: it resumes
    path: Path | None = None  # the snapshot folder when cached
    sizes: ModelSizes | None = None  # catalogue, cached headers or the Hub's plan
    custom: bool = False  # typed by the user
    folder: bool = False  # a model folder outside the HF cache (repo_id is its path)
    embedded: bool = False  # the model shipped with mlx-pager
    commit: str = ""  # the cached revision
    incomplete_bytes: int = 0  # partial downloads of this repository

    @property
    def open_name(self) -> str:
        """What Engine.open takes: the Hub id (found in the cache) or the folder's path."""
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
    speed_basis: str = ""  # "measured here", "M4 Air table", "estimate pending"
    speed_source: str = ""  # the machine constants' full citation
    error: str = ""
    disk_problem: str = ""
    planned: bool = False  # sizes and cached bytes asked of the Hub (not the catalogue's)
    sizes: ModelSizes | None = None  # from the Hub's plan: the screen keeps them on the row


def check_model_name(text: str) -> str:
    """'' when ``text`` looks like a Hub id or names a model folder, else what is wrong."""
    if not text:
        return "Type a Hub id, such as mlx-community/OLMoE-1B-7B-0125-Instruct-4bit."
    if local_folder(text) is not None:
        return ""
    path = Path(text).expanduser()
    if text.startswith(("/", ".", "~")) or path.exists():
        if not path.is_dir():
            return f"No folder {text}: type the path of a model folder, or a Hub id."
        return f"{text} is not a model folder: it needs config.json and *.safetensors weights."
    if not REPO_ID.match(text):
        return f"{text!r} is not a Hub id: it looks like org/name (or type a folder path)."
    return ""


def local_folder(text: str) -> Path | None:
    """The model folder ``text`` names (absolute), or None: not a runnable folder."""
    path = Path(text).expanduser()
    if not (path.is_dir() and is_runnable(path)):
        return None
    return path.resolve()


def _sizes_or_none(path: Path) -> ModelSizes | None:
    try:
        return local_sizes(path)
    except (OSError, ValueError, KeyError):
        return None


def folder_row(path: Path, label: str = "", custom: bool = False) -> ModelRow:
    """A row for a model folder outside the HF cache: runnable as it is, never downloaded."""
    size_bytes = sum(p.stat().st_size for p in path.iterdir() if p.is_file())
    row = ModelRow(str(path), label or f"{path.name} (folder)", size_bytes=size_bytes,
                   cached=True, path=path, custom=custom, folder=True)  # fmt: skip
    row.sizes = _sizes_or_none(path)
    return row


def embedded_row(folder: str | Path | None = None) -> ModelRow | None:
    """The model shipped with mlx-pager (the default): opens offline, no download."""
    path = local_folder(str(folder or embedded_model()))
    if path is None:
        return None
    row = folder_row(path, f"{path.name} (embedded)")
    row.description = "The small MoE shipped with mlx-pager: opens offline, no download."
    row.embedded = True
    return row


def list_models(
    cache_dir: str | Path | None = None,
    catalogue_path: str | Path | None = None,
    embedded: str | Path | None = None,
    catalogue: bool = True,
) -> list[ModelRow]:
    """Downloaded models first (newest revision of each), then the rest of the curated
    catalogue (``catalogue``), then the embedded model."""
    entries = []
    if catalogue:
        try:
            entries = load_catalogue(catalogue_path)
        except FileNotFoundError:
            entries = []
    here: dict[str, ModelRow] = {}
    for model in cached_models(cache_dir):  # newest revision first
        if model.repo_id in here:
            continue
        row = ModelRow(model.repo_id, model.repo_id, size_bytes=model.size_bytes,
                       cached=model.runnable, partial=bool(model.incomplete_bytes),
                       path=model.path if model.runnable else None, commit=model.commit,
                       incomplete_bytes=model.incomplete_bytes)  # fmt: skip
        if row.cached:
            row.sizes = _sizes_or_none(model.path)
        here[model.repo_id] = row
    rows = []
    for entry in entries:
        row = here.pop(entry.id, None) or ModelRow(entry.id, entry.name,
                                                   size_bytes=entry.sizes.total_bytes)  # fmt: skip
        row.label, row.description = entry.name, entry.description
        row.sizes = row.sizes or entry.sizes
        rows.append(row)
    listed = sorted([*here.values(), *rows], key=lambda r: not r.cached)
    shipped = embedded_row(embedded)
    return [*listed, shipped] if shipped is not None else listed


def _show_verdict(result: Estimate, found: Verdict) -> None:
    result.verdict, result.explain = found.verdict, found.reason
    result.tokens_per_second = found.tokens_per_second
    result.speed_basis, result.speed_source = found.speed_basis, found.speed_source


def _judge(
    result: Estimate,
    sizes: ModelSizes,
    budget_bytes: int,
    context_length: int,
    machine: MachineConstants | None,
) -> None:
    try:
        _show_verdict(result, verdict(sizes, budget_bytes, context_length, machine=machine))
    except ValueError as e:
        result.error = str(e)


def quick_estimate(
    row: ModelRow,
    budget_bytes: int,
    context_length: int,
    machine: MachineConstants | None = None,
) -> Estimate:
    """The verdict from sizes already known (catalogue or local headers): no network.
    The speed is for ``machine`` (``speed.machine_constants``); None: pending.

    A downloaded model is planned by the engine itself (``local_verdict``: the loader's
    ``inspect_model``), a remote one by the same rule (``verdict``), so every screen and
    command agrees. A model without routed experts gets no verdict, and says why.
    """
    result = Estimate(size_bytes=row.size_bytes)
    if row.cached and row.path is not None:
        try:
            found = local_verdict(row.path, budget_bytes, context_length, machine)
        except Exception as e:
            result.error = str(e) or type(e).__name__
            return result
        if not found.plan.num_experts:
            result.explain = "Not a mixture-of-experts model: nothing to page."
            return result
        _show_verdict(result, found)
    elif row.sizes is not None:
        _judge(result, row.sizes, budget_bytes, context_length, machine)
    return result


def plan_estimate(
    row: ModelRow,
    budget_bytes: int,
    context_length: int,
    *,
    endpoint: str | None = None,
    cache_dir: str | Path | None = None,
    free_space: Callable[[Path], int] = disk_free,
    machine: MachineConstants | None = None,
) -> Estimate:
    """Ask the Hub: files, sizes, what is cached (partial too), free disk; then the verdict."""
    if row.cached:
        result = quick_estimate(row, budget_bytes, context_length, machine)
        result.free_bytes = free_space(hub_cache_dir(cache_dir))
        return result
    try:
        plan = plan_download(row.repo_id, endpoint=endpoint, cache_dir=cache_dir,
                             free_space=free_space)  # fmt: skip
    except DownloadError as e:
        result = quick_estimate(row, budget_bytes, context_length, machine)
        result.error = str(e)
        try:  # the disk is there even when the Hub is not
            result.free_bytes = free_space(hub_cache_dir(cache_dir))
        except OSError:
            result.free_bytes = None
        return result
    return estimate_from_plan(plan, budget_bytes, context_length, row.sizes, machine)


def estimate_from_plan(
    plan: DownloadPlan,
    budget_bytes: int,
    context_length: int,
    known: ModelSizes | None = None,
    machine: MachineConstants | None = None,
) -> Estimate:
    """A download plan's cost and verdict (``known``: sizes to use when the Hub's
    headers could not be read, such as the catalogue's)."""
    result = Estimate(size_bytes=plan.total_bytes, remaining_bytes=plan.remaining_bytes,
                      free_bytes=plan.free_bytes, disk_problem=plan.disk_problem,
                      planned=True, sizes=plan.sizes)  # fmt: skip
    sizes = plan.sizes or known
    if sizes is not None:
        _judge(result, sizes, budget_bytes, context_length, machine)
    elif plan.sizes_error:
        result.explain = plan.sizes_error
    return result


def describe_download(estimate: Estimate) -> list[tuple[str, str]]:
    """What a download costs, as (label, text) lines: the CLI prints them, the Models
    screen shows them in its detail panel and its confirm dialog."""
    lines = []
    if estimate.size_bytes:
        left = estimate.remaining_bytes if estimate.planned else estimate.size_bytes
        note = ""
        if estimate.planned and 0 < left < estimate.size_bytes:
            note = f" ({format_bytes(left)} left: resumes)"
        label = "download" if estimate.planned else "download ≈"
        lines.append((label, f"{format_bytes(estimate.size_bytes)}{note}"))
    if estimate.free_bytes is not None:
        lines.append(("free disk", format_bytes(estimate.free_bytes)))
    if estimate.explain:
        lines.append(("your budget", estimate.explain))
    if estimate.verdict not in ("", "fits", "too_large") and estimate.speed_basis:
        lines.append(("speed", estimate_speed_text(estimate)))
    lines += [("problem", p) for p in (estimate.error, estimate.disk_problem) if p]
    return lines


def estimate_speed_text(estimate: Estimate) -> str:
    """'~0.2 tok/s (measured here)', '~6.1 tok/s (M4 Air table)', 'estimate pending': an
    estimated speed with the basis of its machine constants, everywhere it is shown."""
    if not estimate.tokens_per_second:
        return estimate.speed_basis or "estimate pending"
    return f"~{speed_text(estimate.tokens_per_second)} ({estimate.speed_basis})"


def speed_text(tokens_per_second: float) -> str:
    """'6.4 tok/s', '41 tok/s': how an estimated speed is written everywhere."""
    if tokens_per_second < 10:
        return f"{tokens_per_second:.1f} tok/s"
    return f"{tokens_per_second:.0f} tok/s"
