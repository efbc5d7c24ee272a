"""What the models screen needs from the download layer, in one place.

Rows (catalogue + Hugging Face cache), an estimate per model (download size, free disk,
verdict for the budget), and ``download`` with progress and cancel. Nothing here touches
widgets; the screen calls these on workers.
"""

from __future__ import annotations

import io
import json
import re
import threading
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from rich.console import Group
from rich.table import Table
from rich.text import Text

from mlx_pager.settings import Settings

from .text import size

ASSETS = Path(__file__).resolve().parent.parent / "assets"
# What mlx-lm needs from a repository (its own allow patterns).
ALLOW_PATTERNS = ["*.json", "*.safetensors", "*.py", "tokenizer.model", "*.tiktoken", "*.txt",
                  "*.jinja"]  # fmt: skip
NETWORK_ERRORS = ("ConnectionError", "ConnectTimeout", "ReadTimeout", "LocalEntryNotFoundError",
                  "OfflineModeIsEnabled", "ConnectError", "TimeoutException", "DryRunError",
                  "RemoteProtocolError", "HfHubHTTPError")  # fmt: skip
REPO_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")


class Cancelled(Exception):
    """The user cancelled; what was downloaded stays, and the next download resumes."""


@dataclass
class ModelRow:
    repo_id: str
    label: str
    description: str = ""
    size_bytes: int = 0  # on disk when cached, else the catalogue's download size
    cached: bool = False
    partial: bool = False  # some files here, not all: a download will resume
    path: Path | None = None  # the snapshot folder when cached
    custom: bool = False  # typed by the user, not from the catalogue or the cache

    @property
    def open_name(self) -> str:
        """What Engine.open takes: the Hub id (resolved in the cache)."""
        return self.repo_id


@dataclass
class Estimate:
    size_bytes: int = 0  # the whole model
    remaining_bytes: int = 0  # still to download (less when resuming)
    free_bytes: int | None = None  # free disk where the cache lives
    verdict: str = ""  # fits | paged | too_large | "" (unknown yet)
    explain: str = ""
    tokens_per_second: float | None = None
    error: str = ""

    @property
    def disk_problem(self) -> str:
        if self.free_bytes is not None and self.remaining_bytes > self.free_bytes:
            return (
                f"The download needs {size(self.remaining_bytes)} but only "
                f"{size(self.free_bytes)} is free on that disk: free some space (or set "
                "HF_HUB_CACHE to a larger disk) and try again."
            )
        return ""


def check_repo_id(repo_id: str) -> str:
    """'' when it looks like a Hub id, else what is wrong with it."""
    if not repo_id:
        return "Type a Hub id, such as mlx-community/OLMoE-1B-7B-0924-Instruct-4bit."
    if not REPO_ID.match(repo_id):
        return f"{repo_id!r} is not a Hub id: it looks like org/name."
    return ""


def cache_dir(config) -> Path:  # noqa: ANN001 - AppConfig
    from huggingface_hub import constants

    return Path(config.hub_cache_dir or constants.HF_HUB_CACHE)


def catalogue(config) -> list[ModelRow]:  # noqa: ANN001
    """The curated list in assets/catalogue.json (missing file: an empty list)."""
    path = config.catalogue_path or ASSETS / "catalogue.json"
    if not Path(path).exists():
        return []
    data = json.loads(Path(path).read_text())
    entries = data.get("models", data) if isinstance(data, dict) else data
    rows = []
    for entry in entries:
        repo_id = entry.get("repo_id") or entry.get("id")
        if not repo_id:
            continue
        rows.append(ModelRow(
            repo_id=repo_id,
            label=entry.get("name") or repo_id,
            description=entry.get("description", ""),
            size_bytes=int(entry.get("size_bytes") or entry.get("download_bytes") or 0),
        ))  # fmt: skip
    return rows


def cached(config) -> dict[str, ModelRow]:  # noqa: ANN001
    """Models in the Hugging Face cache with a config and weights in their snapshot."""
    from huggingface_hub import scan_cache_dir

    root = cache_dir(config)
    if not root.is_dir():
        return {}
    found = {}
    for repo in scan_cache_dir(root).repos:
        if repo.repo_type != "model":
            continue
        snapshots = sorted(repo.revisions, key=lambda r: r.last_modified, reverse=True)
        complete = next((r for r in snapshots if _complete(Path(r.snapshot_path))), None)
        found[repo.repo_id] = ModelRow(
            repo_id=repo.repo_id, label=repo.repo_id, size_bytes=repo.size_on_disk,
            cached=complete is not None, partial=complete is None,
            path=Path(complete.snapshot_path) if complete else None,
        )  # fmt: skip
    return found


def _complete(snapshot: Path) -> bool:
    if not (snapshot / "config.json").exists():
        return False
    index = snapshot / "model.safetensors.index.json"
    if index.exists():
        files = set(json.loads(index.read_text()).get("weight_map", {}).values())
        return all((snapshot / f).exists() for f in files)
    return any(snapshot.glob("*.safetensors"))


def list_models(config) -> list[ModelRow]:  # noqa: ANN001
    """Downloaded models first, then the rest of the catalogue."""
    here = cached(config)
    rows = []
    for row in catalogue(config):
        mine = here.pop(row.repo_id, None)
        if mine is not None:
            row.cached, row.partial, row.path = mine.cached, mine.partial, mine.path
            row.size_bytes = mine.size_bytes if mine.cached else row.size_bytes
        rows.append(row)
    rows = list(here.values()) + rows
    return sorted(rows, key=lambda r: not r.cached)


def estimate(config, settings: Settings, repo_id: str, row: ModelRow | None) -> Estimate:  # noqa: ANN001
    """Download size (from the Hub: a dry run), free disk and the verdict for the budget."""
    from mlx_pager.engine import total_memory

    result = Estimate()
    budget = settings.budget_bytes(total_memory())
    root = cache_dir(config)
    probe = root if root.exists() else root.parent
    while not probe.exists() and probe != probe.parent:
        probe = probe.parent
    result.free_bytes = config.disk_free(probe)
    if row is not None and row.cached and row.path is not None:
        result.size_bytes = row.size_bytes
        _local_verdict(result, row.path, budget, settings.context_length)
        return result
    try:
        from huggingface_hub import snapshot_download

        files = snapshot_download(repo_id, cache_dir=root, endpoint=config.hub_endpoint,
                                  allow_patterns=ALLOW_PATTERNS, dry_run=True)  # fmt: skip
    except Exception as e:  # noqa: BLE001 - the message is what the user sees
        result.error = hub_error(repo_id, e)
        return result
    result.size_bytes = sum(f.file_size or 0 for f in files)
    result.remaining_bytes = sum(f.file_size or 0 for f in files if f.will_download)
    result.explain = "The verdict for your budget comes once the download is here."
    return result


def _local_verdict(result: Estimate, path: Path, budget: int, context: int) -> None:
    from mlx_pager.loader import inspect_model

    try:
        plan = inspect_model(path, context).plan(budget)
    except Exception as e:  # noqa: BLE001
        result.error = str(e)
        return
    result.verdict, result.explain = plan.verdict, plan.explain()


def hub_error(repo_id: str, error: Exception) -> str:
    """Hub and network exceptions, said plainly with what to do."""
    name = type(error).__name__
    if name in ("RepositoryNotFoundError", "RevisionNotFoundError"):
        return f"{repo_id} was not found on the Hub: check the id (org/name)."
    if name in ("GatedRepoError",):
        return f"{repo_id} is gated: accept its licence on huggingface.co and log in."
    if isinstance(error, OSError) and getattr(error, "errno", None) == 28:
        return "The disk is full: free some space, then download again to resume."
    if name in NETWORK_ERRORS:
        return (f"Cannot reach the Hub ({error}). Check the network and try again; a "
                "download resumes where it stopped.")  # fmt: skip
    return f"{name}: {error}"


def download(
    config,  # noqa: ANN001
    repo_id: str,
    progress: Callable[[int, int], None],
    cancel: threading.Event,
) -> Path:
    """Download into the Hugging Face cache; resumes partial files; raises Cancelled."""
    from huggingface_hub import snapshot_download
    from tqdm.auto import tqdm

    class Progress(tqdm):
        """Forwards the byte bar's counts; raising here is how a cancel stops the transfer."""

        def __init__(self, *args, **kwargs) -> None:
            kwargs["file"] = io.StringIO()
            kwargs["disable"] = False
            super().__init__(*args, **kwargs)

        def update(self, n: float | None = 1) -> bool | None:
            if cancel.is_set():
                raise Cancelled()
            shown = super().update(n)
            if self.unit == "B" and str(self.desc).startswith("Reconstruct"):
                progress(int(self.n), int(self.total or 0))
            return shown

    try:
        path = snapshot_download(repo_id, cache_dir=cache_dir(config), endpoint=config.hub_endpoint,
                                 allow_patterns=ALLOW_PATTERNS, tqdm_class=Progress)  # fmt: skip
    except Cancelled:
        raise
    except Exception as e:  # noqa: BLE001
        if cancel.is_set():
            raise Cancelled() from e
        raise RuntimeError(hub_error(repo_id, e)) from e
    return Path(path)


def describe(row: ModelRow, estimate: Estimate | None) -> Group:
    """The detail panel for one model."""
    title = Text(row.repo_id, style="bold")
    lines: list = [title]
    if row.description:
        lines.append(Text(row.description, style="dim"))
    table = Table.grid(padding=(0, 2))
    table.add_column(style="dim", no_wrap=True)
    table.add_column()
    if row.cached:
        table.add_row("on disk", f"{size(row.size_bytes)} (downloaded)")
    if estimate is None:
        table.add_row("download", Text("checking…", style="dim"))
    else:
        if not row.cached and estimate.size_bytes:
            left = estimate.remaining_bytes
            note = "" if left >= estimate.size_bytes else f" ({size(left)} left: resumes)"
            table.add_row("download", f"{size(estimate.size_bytes)}{note}")
        if estimate.free_bytes is not None:
            style = "red" if estimate.disk_problem else ""
            table.add_row("free disk", Text(size(estimate.free_bytes), style=style))
        if estimate.verdict:
            style = {"fits": "green", "paged": "yellow", "too_large": "red"}[estimate.verdict]
            table.add_row("your budget", Text(estimate.explain, style=style))
        elif estimate.explain:
            table.add_row("your budget", Text(estimate.explain, style="dim"))
        if estimate.tokens_per_second:
            table.add_row("speed", f"~{estimate.tokens_per_second:.0f} tok/s (estimate)")
        if estimate.error:
            table.add_row("problem", Text(estimate.error, style="red"))
        if estimate.disk_problem:
            table.add_row("problem", Text(estimate.disk_problem, style="red"))
    lines += [Text(""), table]
    return Group(*lines)
