"""What downloading a model costs, asked of the Hub before any weight is fetched.

``plan_download``: the files mlx-lm needs, their sizes, what the cache already holds
(whole or partial), the free disk and, from the safetensors headers (Range requests of a
few hundred KB), the dense and expert bytes the verdict needs.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass, replace
from pathlib import Path

from ..estimate import ModelSizes, sizes_from_tensors
from ..units import format_bytes
from .cache import ALLOW_PATTERNS, disk_free, hub_cache_dir, partial_bytes, repo_storage
from .errors import DownloadError, hub_error

TIMEOUT_S = 10.0  # no byte for this long: the connection is dropped (and retried)
BUSY_STATUSES = (429, 500, 502, 503, 504)  # the Hub is busy or failing: retried
PLAN_RETRIES = 3  # the file listing asked again after a busy answer, waits doubling
PLAN_WAIT_S = 0.5


@dataclass(frozen=True)
class RemoteFile:
    name: str
    size: int
    etag: str  # the blob's name in the cache: LFS sha256, else the git blob id
    cached_bytes: int = 0  # size when the blob is complete, else what the partial holds

    @property
    def complete(self) -> bool:
        return self.cached_bytes >= self.size


@dataclass(frozen=True)
class DownloadPlan:
    repo_id: str
    revision: str  # as asked ("main" by default)
    commit: str
    endpoint: str
    cache_dir: Path
    files: list[RemoteFile]
    free_bytes: int  # on the disk that holds the cache
    sizes: ModelSizes | None = None  # None when the safetensors headers could not be read
    sizes_error: str = ""

    @property
    def total_bytes(self) -> int:
        return sum(f.size for f in self.files)

    @property
    def cached_bytes(self) -> int:
        """Already here, complete files and partial ones."""
        return sum(min(f.cached_bytes, f.size) for f in self.files)

    @property
    def remaining_bytes(self) -> int:
        return self.total_bytes - self.cached_bytes

    @property
    def complete(self) -> bool:
        return all(f.complete for f in self.files)

    @property
    def disk_problem(self) -> str:
        """'' when the rest fits on the disk, else what to do."""
        if self.remaining_bytes <= self.free_bytes:
            return ""
        return (
            f"{self.repo_id} needs {format_bytes(self.remaining_bytes)} more on disk but only "
            f"{format_bytes(self.free_bytes)} is free where the cache lives ({self.cache_dir}): "
            "free some space, or set HF_HUB_CACHE to a folder on a larger disk, then run "
            f"`mlx-pager download {self.repo_id}` again."
        )


def _endpoint(endpoint: str | None) -> str:
    from huggingface_hub import constants

    return (endpoint or constants.ENDPOINT).rstrip("/")


def plan_download(
    repo_id: str,
    revision: str | None = None,
    endpoint: str | None = None,
    *,
    cache_dir: str | Path | None = None,
    token: str | bool | None = None,
    free_space: Callable[[Path], int] = disk_free,
    read_sizes: bool = True,
) -> DownloadPlan:
    """What downloading ``repo_id`` costs: the files mlx-lm needs, their sizes, what is
    already cached (whole or partial), free disk and, from the safetensors headers
    (Range requests, a few hundred KB), the dense and expert bytes. Downloads no weights.
    """
    from huggingface_hub import HfApi
    from huggingface_hub.utils import filter_repo_objects

    endpoint = _endpoint(endpoint)
    revision = revision or "main"
    cache = hub_cache_dir(cache_dir)
    api = HfApi(endpoint=endpoint, token=token)
    for attempt in range(PLAN_RETRIES + 1):
        try:
            info = api.model_info(repo_id, revision=revision, files_metadata=True)
            break
        except Exception as e:
            status = getattr(getattr(e, "response", None), "status_code", None)
            if status in BUSY_STATUSES and attempt < PLAN_RETRIES:
                time.sleep(min(PLAN_WAIT_S * 2**attempt, 30.0))  # busy: back off, ask again
                continue
            partial = partial_bytes(cache, repo_id)
            raise hub_error(e, repo_id, endpoint, revision, partial_bytes=partial) from None
    wanted = set(
        filter_repo_objects(
            [s.rfilename for s in info.siblings or []], allow_patterns=ALLOW_PATTERNS
        )
    )
    blobs = repo_storage(cache, repo_id) / "blobs"
    files = []
    for s in info.siblings or []:
        if s.rfilename not in wanted:
            continue
        if not _inside_snapshot(s.rfilename):
            raise DownloadError(
                f"{repo_id} lists a file named {s.rfilename!r}, which would land outside "
                "its snapshot folder: refused. Report it to the repository's owner."
            )
        etag = s.lfs.sha256 if s.lfs else s.blob_id or ""
        size = int(s.size or 0)
        if not etag:  # a Hub that lists no blob ids: ask the file itself
            etag, size = _head(repo_id, s.rfilename, info.sha or revision, endpoint, token)
        have = 0
        if etag and (blobs / etag).exists():
            have = size
        elif etag and (blobs / f"{etag}.incomplete").exists():
            have = (blobs / f"{etag}.incomplete").stat().st_size
        files.append(RemoteFile(s.rfilename, size, etag, have))
    plan = DownloadPlan(
        repo_id=repo_id,
        revision=revision,
        commit=info.sha or revision,
        endpoint=endpoint,
        cache_dir=cache,
        files=files,
        free_bytes=int(free_space(cache)),
    )
    if not any(f.name.endswith(".safetensors") for f in files):
        return replace(plan, sizes_error=f"{repo_id} has no *.safetensors weights for MLX.")
    if not read_sizes:
        return plan
    try:
        names = [f.name for f in files]
        return replace(plan, sizes=_remote_sizes(api, repo_id, plan.commit, names, token))
    except Exception as e:
        return replace(plan, sizes_error=f"Could not read the safetensors headers: {e}")


def _inside_snapshot(name: str) -> bool:
    """A relative path that stays inside the snapshot: no root, no drive, no ``..``."""
    parts = name.replace("\\", "/").split("/")
    return (
        bool(name)
        and not name.startswith(("/", "\\"))
        and ":" not in name
        and all(p not in ("", ".", "..") for p in parts)
    )


def _head(repo_id: str, name: str, revision: str, endpoint: str, token) -> tuple[str, int]:
    from huggingface_hub import get_hf_file_metadata, hf_hub_url

    url = hf_hub_url(repo_id, name, revision=revision, endpoint=endpoint)
    meta = get_hf_file_metadata(url, token=token)
    if not meta.etag:
        raise DownloadError(f"{endpoint} gives no ETag for {name} of {repo_id}: cannot cache it.")
    return meta.etag, int(meta.size or 0)


def _remote_sizes(api, repo_id: str, commit: str, names: list[str], token) -> ModelSizes:
    """Sizes from config.json and the safetensors headers, fetched into memory (Range
    requests of about 100 KB per shard): nothing is written to the cache."""
    from huggingface_hub import hf_hub_url
    from huggingface_hub.utils import build_hf_headers, get_session, hf_raise_for_status

    def get_json(name: str) -> dict:
        url = hf_hub_url(repo_id, name, revision=commit, endpoint=api.endpoint)
        r = get_session().get(
            url, headers=build_hf_headers(token=token), follow_redirects=True, timeout=TIMEOUT_S
        )
        hf_raise_for_status(r)
        return r.json()

    config = get_json("config.json")
    if "model.safetensors.index.json" in names:
        shards = sorted(set(get_json("model.safetensors.index.json")["weight_map"].values()))
    else:
        shards = [n for n in names if n.endswith(".safetensors")]
    tensors = {}
    for shard in shards:
        meta = api.parse_safetensors_file_metadata(repo_id, shard, revision=commit, token=token)
        for name, t in meta.tensors.items():
            tensors[name] = (t.data_offsets[1] - t.data_offsets[0], list(t.shape), t.dtype)
    return sizes_from_tensors(tensors, config)
