"""The local Hugging Face cache: where it is, what it holds, what a model needs in it.

The layout is huggingface_hub's (``models--org--name/{blobs, snapshots, refs}``), named
and scanned with its own helpers, so mlx-lm, ``huggingface_hub`` and the pager all find
the same files. Experts are read straight from the blobs: no second copy.
"""

from __future__ import annotations

import json
import shutil
from dataclasses import dataclass
from pathlib import Path

# mlx-lm's own allow patterns (mlx_lm.utils.DEFAULT_ALLOW_PATTERNS), copied so that
# planning a download does not import mlx; a test checks they still agree. Less "*.py":
# a repository's code is never run here (no remote code is trusted), so never fetched.
ALLOW_PATTERNS = [
    "*.json",
    "model*.safetensors",
    "tokenizer.model",
    "*.tiktoken",
    "tiktoken.model",
    "*.txt",
    "*.jsonl",
    "*.jinja",
]


def hub_cache_dir(cache_dir: str | Path | None = None) -> Path:
    from huggingface_hub import constants

    return Path(cache_dir or constants.HF_HUB_CACHE)


def disk_free(path: str | Path) -> int:
    """Free bytes on the disk holding ``path`` (or its nearest existing parent)."""
    path = Path(path)
    while not path.exists() and path != path.parent:
        path = path.parent
    return shutil.disk_usage(path).free


def repo_storage(cache_dir: Path, repo_id: str) -> Path:
    """The repository's folder in the cache (``models--org--name``), named by
    huggingface_hub's own rule."""
    from huggingface_hub.file_download import repo_folder_name

    return Path(cache_dir) / repo_folder_name(repo_id=repo_id, repo_type="model")


def partial_bytes(cache_dir: Path, repo_id: str) -> int:
    """Bytes in ``repo_id``'s unfinished downloads (``blobs/*.incomplete``) in the cache."""
    blobs = repo_storage(cache_dir, repo_id) / "blobs"
    try:
        return sum(p.stat().st_size for p in blobs.glob("*.incomplete"))
    except OSError:
        return 0


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
    from huggingface_hub import scan_cache_dir

    root = hub_cache_dir(cache_dir)
    if not root.is_dir():
        return []
    found = []
    for repo in scan_cache_dir(root).repos:
        if repo.repo_type != "model":
            continue
        partial = partial_bytes(root, repo.repo_id)
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
