"""Finding a model: a local folder as is, a Hub id in the local Hugging Face cache."""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

from huggingface_hub import snapshot_download
from huggingface_hub.errors import IncompleteSnapshotError, LocalEntryNotFoundError

from .download import ALLOW_PATTERNS


def resolve_model(
    id_or_path: str, revision: str | None = None, cache_dir: str | Path | None = None
) -> Path:
    """The folder to open: ``id_or_path`` itself, or the cached snapshot of a Hub id
    (in ``cache_dir``, default: the Hugging Face cache).

    Never downloads (that is `mlx-pager download`): a model that is not cached is an
    error that says so.
    """
    path = Path(id_or_path).expanduser()
    if path.exists():
        if not (path / "config.json").exists():
            raise FileNotFoundError(f"{path} is not a model folder: it has no config.json.")
        return path
    if id_or_path.count("/") != 1 or id_or_path.startswith(("/", ".", "~")):
        raise FileNotFoundError(
            f"No folder {id_or_path!r}, and it is not a Hub id (org/name) either."
        )
    try:
        # mlx-lm's patterns: a snapshot lacking only README.md or *.bin files is complete.
        return Path(
            snapshot_download(
                id_or_path,
                revision=revision,
                cache_dir=cache_dir,
                local_files_only=True,
                allow_patterns=ALLOW_PATTERNS,
            )
        )
    except IncompleteSnapshotError:
        raise FileNotFoundError(
            f"{id_or_path} is only partly downloaded. Finish it: `mlx-pager download "
            f"{id_or_path}` (it resumes where it stopped)."
        ) from None
    except LocalEntryNotFoundError:
        raise FileNotFoundError(
            f"{id_or_path} is not in the Hugging Face cache. Download it first: "
            f"`mlx-pager download {id_or_path}` (or pick it in the app's Models screen)."
        ) from None


@dataclass(frozen=True)
class CachedModel:
    """One revision of a model repository in the local Hugging Face cache."""

    repo_id: str
    commit: str
    refs: tuple[str, ...]  # branches and tags pointing at it ("main")
    path: Path  # snapshots/<commit>
    size_bytes: int  # on disk, blobs counted once
    runnable: bool  # config.json and *.safetensors weights: MLX can open it
    incomplete_bytes: int = 0  # partial downloads (*.incomplete) of this repo, resumable


def cached_models(cache_dir: str | Path | None = None) -> list[CachedModel]:
    """The models in the Hugging Face cache, newest first; one entry per revision."""
    from huggingface_hub import constants, scan_cache_dir

    root = Path(cache_dir or constants.HF_HUB_CACHE)
    if not root.is_dir():
        return []
    found = []
    for repo in scan_cache_dir(root).repos:
        if repo.repo_type != "model":
            continue
        partial = sum(p.stat().st_size for p in (repo.repo_path / "blobs").glob("*.incomplete"))
        for rev in sorted(repo.revisions, key=lambda r: r.last_modified, reverse=True):
            path = Path(rev.snapshot_path)
            found.append(
                CachedModel(
                    repo_id=repo.repo_id,
                    commit=rev.commit_hash,
                    refs=tuple(sorted(rev.refs)),
                    path=path,
                    size_bytes=rev.size_on_disk,
                    runnable=is_runnable(path),
                    incomplete_bytes=partial,
                )
            )
    return found


def is_runnable(folder: Path) -> bool:
    """A config.json and every weight file the index names (or some *.safetensors)."""
    if not (folder / "config.json").exists():
        return False
    index = folder / "model.safetensors.index.json"
    if index.exists():
        shards = set(json.loads(index.read_text()).get("weight_map", {}).values())
        return bool(shards) and all((folder / s).exists() for s in shards)
    return any(folder.glob("*.safetensors"))
