"""Downloading a model into the Hugging Face cache, and what it will cost before that.

``plan_download`` asks the Hub what mlx-lm would fetch (sizes, what is already cached,
free disk, dense vs expert bytes from the safetensors headers). ``download`` fetches it
with byte progress, cancel and resume, into the ordinary HF cache layout, so mlx-lm,
``huggingface_hub`` and the pager all find the same files. ``verdict`` says whether a
model fits a memory budget, runs paged, or is too large, with an estimated speed.

Why not only ``snapshot_download``: huggingface_hub 2.x writes each file to a
process-unique ``*.incomplete`` file and deletes it on failure, so an interrupted
download starts over. Multi-GB shards over a home connection must resume, so each file
is fetched here into ``blobs/<etag>.incomplete`` with ``Range`` requests, moved to its
blob when complete, and ``snapshot_download`` then only links the snapshot (no bytes).
"""

from __future__ import annotations

import errno
import json
import os
import shutil
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from pathlib import Path

from .budget import BudgetPlan, plan_budget
from .checkpoint import DTYPE_SIZES, index_checkpoint, kv_bytes_per_layer_token, text_config
from .units import format_bytes

# mlx-lm's own allow patterns (mlx_lm.utils.DEFAULT_ALLOW_PATTERNS), copied so that
# planning a download does not import mlx; a test checks they still agree.
ALLOW_PATTERNS = [
    "*.json",
    "model*.safetensors",
    "*.py",
    "tokenizer.model",
    "*.tiktoken",
    "tiktoken.model",
    "*.txt",
    "*.jsonl",
    "*.jinja",
]
CHUNK_BYTES = 256 * 1024  # progress and cancel granularity
RETRIES = 5  # dropped connections retried (with Range) within one call
RETRY_WAIT_S = 0.5
TIMEOUT_S = 10.0  # no byte for this long: the connection is dropped (and retried)
CATALOGUE = Path(__file__).resolve().parent.parent / "assets" / "catalogue.json"

# (done_bytes, total_bytes, current_file); done counts bytes already in the cache.
ProgressFn = Callable[[int, int, str], None]


class DownloadError(RuntimeError):
    """A download or plan that cannot go on; the message says what to do."""


class ModelNotFound(DownloadError):
    pass


class ModelGated(DownloadError):
    pass


class HubUnreachable(DownloadError):
    pass


class NotEnoughDisk(DownloadError):
    pass


class DownloadCancelled(Exception):
    """The user cancelled. What arrived stays in ``*.incomplete`` files and resumes."""


# --- sizes ----------------------------------------------------------------------------


# safetensors dtypes the engine casts to its compute dtype (``loader.cast_floating``);
# packed quantised weights (U32) and MXFP4 scales (U8) stay as stored.
FLOAT_DTYPES = frozenset({"F16", "BF16", "F32", "F64"})


@dataclass(frozen=True)
class ModelSizes:
    """Where a model's bytes are: what the budget and the speed estimate need.

    The byte counts are the checkpoint's (on disk). The engine holds floating-point
    tensors in its compute dtype (float32 on MLX's CPU backend), so ``in_memory`` gives
    what the budget must hold; the ``*_float_*`` fields say how much of each part is
    floating point (0 when unknown: then the stored bytes are taken as they are).
    """

    total_bytes: int  # weights (safetensors), all of them
    dense_bytes: int  # resident part: embeddings, attention, norms, routers, shared experts
    expert_bytes: int  # all routed experts of all MoE layers
    one_expert_bytes: int  # one routed expert of one layer, all its projections
    moe_layers: int
    experts: int  # routed experts per MoE layer
    top_k: int
    kv_bytes_per_token: int = 0  # all layers, float16; 0 when unknown
    dense_float_bytes: int = 0  # floating-point part of dense_bytes, as stored
    dense_float_values: int = 0  # ... in values (elements)
    expert_float_bytes: int = 0  # floating-point part of expert_bytes, as stored
    expert_float_values: int = 0
    float_itemsize: int = 2  # bytes per value of the checkpoint's floats

    @property
    def num_experts(self) -> int:
        return self.moe_layers * self.experts

    def in_memory(self, compute_itemsize: int | None) -> ModelSizes:
        """The sizes as the engine holds them: floats at ``compute_itemsize`` bytes (None:
        as stored, a GPU), quantised weights as stored, the KV cache in the compute dtype
        (``loader.inspect_model`` does the same with the real tensors)."""
        kv = self.kv_bytes_per_token * (compute_itemsize or self.float_itemsize) // 2
        if compute_itemsize is None:
            return replace(self, kv_bytes_per_token=kv)
        dense_float = self.dense_float_values * compute_itemsize
        expert_float = self.expert_float_values * compute_itemsize
        dense = self.dense_bytes - self.dense_float_bytes + dense_float
        experts = self.expert_bytes - self.expert_float_bytes + expert_float
        units = self.num_experts
        return replace(
            self,
            total_bytes=dense + experts,
            dense_bytes=dense,
            expert_bytes=experts,
            one_expert_bytes=experts // units if units else 0,
            kv_bytes_per_token=kv,
            dense_float_bytes=dense_float,
            expert_float_bytes=expert_float,
            float_itemsize=compute_itemsize,
        )


def engine_float_itemsize() -> int | None:
    """Bytes per floating-point value the engine computes in on this machine: the
    loader's own rule (``default_compute_dtype``: float32 on the CPU backend), or None
    where it keeps the checkpoint's dtype (a GPU)."""
    from .loader import default_compute_dtype

    dtype = default_compute_dtype()
    return None if dtype is None else int(dtype.size)


def is_expert_tensor(name: str) -> bool:
    """Routed expert weights: MLX's stacked ``switch_mlp`` / ``experts`` or per-expert ones."""
    return ".experts." in name or "switch_mlp" in name


def _first(cfg: dict, *keys: str) -> int:
    for key in keys:
        if cfg.get(key):
            return int(cfg[key])
    return 0


def kv_bytes_per_token(config: dict, itemsize: int = 2) -> int:
    """KV cache per token over the full-attention layers (sliding windows and linear
    attention layers are bounded, so they are left out: an estimate)."""
    cfg = text_config(config)
    layers = int(cfg.get("num_hidden_layers") or 0)
    if cfg.get("layer_types"):
        layers = sum(t == "full_attention" for t in cfg["layer_types"])
    elif cfg.get("full_attention_interval"):
        layers = layers // int(cfg["full_attention_interval"])
    return kv_bytes_per_layer_token(config, itemsize) * layers


def sizes_from_tensors(tensors: dict[str, tuple], config: dict) -> ModelSizes:
    """ModelSizes from ``{name: (nbytes, shape, dtype)}`` of every tensor (``dtype`` as in
    safetensors, "BF16"; without it a tensor counts as not floating point) and the config."""
    cfg = text_config(config)
    expert = {n: v for n, v in tensors.items() if is_expert_tensor(n)}
    dense = {n: v for n, v in tensors.items() if n not in expert}
    expert_bytes = sum(v[0] for v in expert.values())
    total = sum(v[0] for v in tensors.values())
    layers = {_layer_index(n) for n in expert} - {None}
    experts = _first(cfg, "num_experts", "num_local_experts", "n_routed_experts", "moe_num_experts")
    if not experts and expert:
        per_expert = {n.split(".experts.")[1].split(".")[0] for n in expert if ".experts." in n}
        digits = {e for e in per_expert if e.isdigit()}
        experts = len(digits) or max(v[1][0] for v in expert.values() if v[1])
    top_k = _first(
        cfg, "num_experts_per_tok", "num_experts_per_token", "experts_per_token", "moe_top_k"
    )
    units = len(layers) * experts
    dense_float, dense_values = _floats(dense)
    expert_float, expert_values = _floats(expert)
    itemsizes = [DTYPE_SIZES[v[2]] for v in dense.values() if len(v) > 2 and v[2] in FLOAT_DTYPES]
    return ModelSizes(
        total_bytes=total,
        dense_bytes=total - expert_bytes,
        expert_bytes=expert_bytes,
        one_expert_bytes=expert_bytes // units if units else 0,
        moe_layers=len(layers),
        experts=experts,
        top_k=top_k,
        kv_bytes_per_token=kv_bytes_per_token(config),
        dense_float_bytes=dense_float,
        dense_float_values=dense_values,
        expert_float_bytes=expert_float,
        expert_float_values=expert_values,
        float_itemsize=max(set(itemsizes), key=itemsizes.count) if itemsizes else 2,
    )


def _floats(tensors: dict[str, tuple]) -> tuple[int, int]:
    """(bytes, values) of the floating-point tensors among ``{name: (nbytes, shape, dtype)}``."""
    floats = [v for v in tensors.values() if len(v) > 2 and v[2] in FLOAT_DTYPES]
    return sum(v[0] for v in floats), sum(v[0] // DTYPE_SIZES[v[2]] for v in floats)


def _layer_index(name: str) -> int | None:
    parts = name.split(".")
    for i, part in enumerate(parts[:-1]):
        if part in ("layers", "h", "blocks") and parts[i + 1].isdigit():
            return int(parts[i + 1])
    return None


def local_sizes(folder: str | Path) -> ModelSizes:
    """ModelSizes of a model folder (a cached snapshot or any local folder)."""
    folder = Path(folder)
    config = json.loads((folder / "config.json").read_text())
    headers = index_checkpoint(folder)  # validated, shards included, no weights read
    tensors = {name: (t.nbytes, list(t.shape), t.dtype) for name, t in headers.items()}
    return sizes_from_tensors(tensors, config)


# --- the catalogue --------------------------------------------------------------------


@dataclass(frozen=True)
class CatalogueEntry:
    id: str
    name: str
    architecture: str
    sizes: ModelSizes
    description: str = ""
    notes: str = ""
    source: str = ""


def float_share(model_id: str) -> tuple[float, float]:
    """The floating-point share of (dense, expert) bytes of a checkpoint named
    ``model_id``, for catalogue entries that do not state it: MLX's affine quantisation
    at group size 64 stores a float16 scale and bias per 64 weights, 0.5 bits per weight
    next to ``bits`` packed ones ("-4bit": 0.5 / 4.5); MXFP4 experts have uint8 scales
    (no floats); no quantisation in the name: all floating point."""
    import re

    name = model_id.lower()
    bits = re.search(r"(\d+)[-_]?bits?\b", name)
    affine = 0.5 / (int(bits[1]) + 0.5) if bits and int(bits[1]) < 16 else None
    if "mxfp4" in name:
        return (affine if affine is not None else 0.5 / 4.5), 0.0
    if affine is not None:
        return affine, affine
    return 1.0, 1.0


def load_catalogue(path: str | Path | None = None) -> list[CatalogueEntry]:
    """The curated models in assets/catalogue.json. Missing numbers read as 0 (and such
    an entry gets no verdict) so that a hand-written catalogue still lists. The
    floating-point bytes (what the engine widens on a CPU) are ``dense_float_bytes`` and
    ``expert_float_bytes`` where an entry states them, else ``float_share`` of its id;
    they are float16."""
    data = json.loads(Path(path or CATALOGUE).read_text())
    entries = []
    for m in data["models"] if isinstance(data, dict) else data:
        model_id = m.get("id") or m.get("repo_id")
        if not model_id:
            continue
        total = m.get("total_bytes") or m.get("download_bytes") or m.get("size_bytes") or 0
        dense, expert = int(m.get("dense_bytes", 0)), int(m.get("expert_bytes", 0))
        dense_share, expert_share = float_share(model_id)
        dense_float = int(m.get("dense_float_bytes", dense * dense_share)) // 2 * 2
        expert_float = int(m.get("expert_float_bytes", expert * expert_share)) // 2 * 2
        sizes = ModelSizes(
            total_bytes=int(total),
            dense_bytes=dense,
            expert_bytes=expert,
            one_expert_bytes=int(m.get("one_expert_bytes", 0)),
            moe_layers=int(m.get("moe_layers", 0)),
            experts=int(m.get("experts", 0)),
            top_k=int(m.get("top_k", 0)),
            kv_bytes_per_token=int(m.get("kv_bytes_per_token", 0)),
            dense_float_bytes=dense_float,
            dense_float_values=dense_float // 2,
            expert_float_bytes=expert_float,
            expert_float_values=expert_float // 2,
        )
        entries.append(
            CatalogueEntry(
                id=model_id,
                name=m.get("name", model_id),
                architecture=m.get("architecture", ""),
                sizes=sizes,
                description=m.get("description", ""),
                notes=m.get("notes", ""),
                source=m.get("source", ""),
            )
        )
    return entries


# --- verdict --------------------------------------------------------------------------

# Share of routed-expert activations a cache holding ``fraction`` of all (layer, expert)
# pairs serves, from NOTES.md: on Qwen3 35B-A3B over a coding session the top 1% of
# experts took 20% of activations, the top 5% took 50%, the top 20% took 85%; on
# Qwen3-30B-A3B a 16 GB Mac with an 8 GB budget (about 40% of experts cached) measured
# 89-92% hits. Interpolated linearly in log(fraction) between these points.
HIT_CURVE = [(0.01, 0.20), (0.05, 0.50), (0.20, 0.85), (0.40, 0.90), (1.0, 1.0)]


def hit_rate_estimate(fraction: float, experts_per_layer: int = 0) -> float:
    """Expected cache hit rate when ``fraction`` of the routed experts fit in the cache.

    Models with few, large experts (8 per layer, Mixtral) use them nearly uniformly:
    NOTES.md reports LRU/LFU barely beating random eviction there, so the hit rate is
    taken as the fraction held.
    """
    import math

    if fraction <= 0:
        return 0.0
    if fraction >= 1:
        return 1.0
    if 0 < experts_per_layer <= 8:
        return fraction
    x0, y0 = 0.0, 0.0
    for x1, y1 in HIT_CURVE:
        if fraction <= x1:
            if x0 == 0.0:  # below 1%: proportional to the share held
                return y1 * fraction / x1
            t = (math.log(fraction) - math.log(x0)) / (math.log(x1) - math.log(x0))
            return y0 + t * (y1 - y0)
        x0, y0 = x1, y1
    return 1.0


# Fixed cost of one MoE layer per decoded token, whatever its size: the router's sync
# (``mx.eval`` before the experts are known), the id remap and cache lookups in Python,
# and dispatching the layer's other ops. Measured on the embedded model (6 MoE layers,
# everything else under 0.2 ms per token) on this project's 2-core Linux CPU: the paged
# layer's own work 0.4-0.7 ms, the rest of the layer 0.7-1.3 ms, decode 41-124 tok/s
# depending on load (1.3-3.7 ms per layer in all). 1 ms is the low end; with it the
# Qwen3-30B-A3B estimate at an 8 GB budget comes to 6 tok/s on a Mac, where 6.4-7.8
# was measured (NOTES.md), and the embedded model's to about 150 tok/s instead of
# thousands.
MOE_LAYER_OVERHEAD_S = 1e-3


@dataclass(frozen=True)
class Verdict:
    verdict: str  # "fits" | "paged" | "too_large"
    reason: str
    plan: BudgetPlan
    hit_rate: float | None = None  # estimated, paged only
    tokens_per_second: float | None = None  # estimated decode speed; None when too large


def verdict(
    sizes: ModelSizes | DownloadPlan,
    budget_bytes: int,
    context_length: int,
    *,
    compute_itemsize: int | None | str = "auto",
    disk_bytes_per_s: float = 1e9,
    memory_bytes_per_s: float = 100e9,
    layer_overhead_s: float = MOE_LAYER_OVERHEAD_S,
) -> Verdict:
    """Fits / runs paged / too large for a memory budget, with an estimated decode speed,
    from sizes read before a download (the Hub's headers, the catalogue).

    The budget is planned the way the engine plans it (``budget.plan_budget``) for the
    sizes the engine will hold: floats widened to ``compute_itemsize`` ("auto": the
    loader's rule on this machine, see ``ModelSizes.in_memory``). For a model on disk,
    ``local_verdict`` asks the engine's own ``inspect_model``; the two agree.
    """
    if isinstance(sizes, DownloadPlan):
        if sizes.sizes is None:
            raise ValueError(f"The sizes of {sizes.repo_id} are unknown: no verdict.")
        sizes = sizes.sizes
    if not (sizes.num_experts and sizes.top_k and sizes.one_expert_bytes):
        raise ValueError("The expert sizes of this model are unknown: no verdict.")
    if compute_itemsize == "auto":
        compute_itemsize = engine_float_itemsize()
    memory = sizes.in_memory(compute_itemsize)  # type: ignore[arg-type]
    plan = plan_budget(
        budget_bytes,
        resident_bytes=memory.dense_bytes,
        kv_bytes=memory.kv_bytes_per_token * context_length,
        expert_bytes=memory.one_expert_bytes,
        num_experts=memory.num_experts,
        top_k=memory.top_k,
    )
    return judge_plan(
        plan,
        memory.moe_layers,
        memory.experts,
        disk_bytes_per_s=disk_bytes_per_s,
        memory_bytes_per_s=memory_bytes_per_s,
        layer_overhead_s=layer_overhead_s,
    )


def local_verdict(folder: str | Path, budget_bytes: int, context_length: int) -> Verdict:
    """The verdict for a model on disk, planned by the engine itself
    (``loader.inspect_model(...).plan``: no weights read). Raises what inspect_model
    raises (ValueError for a broken or unsupported checkpoint)."""
    from .loader import inspect_model

    layout = inspect_model(Path(folder), context_length)
    return judge_plan(layout.plan(budget_bytes), layout.moe_layers, layout.experts_per_layer)


def judge_plan(
    plan: BudgetPlan,
    moe_layers: int,
    experts_per_layer: int,
    *,
    disk_bytes_per_s: float = 1e9,
    memory_bytes_per_s: float = 100e9,
    layer_overhead_s: float = MOE_LAYER_OVERHEAD_S,
) -> Verdict:
    """The verdict of a budget plan, with an estimated decode speed.

    The speed is an estimate, not a measurement: per token, the misses
    (``moe_layers * top_k * (1 - hit)``, hit from ``hit_rate_estimate``) are read from
    disk at ``disk_bytes_per_s``, the active weights stream from memory at
    ``memory_bytes_per_s``, and each MoE layer costs ``layer_overhead_s`` (see
    ``MOE_LAYER_OVERHEAD_S``). Apple SSDs reach 2-7 GB/s sequentially, but expert reads
    are random, MiB-sized ``pread``s: 2.8 ms per 2.5 MiB expert was measured
    (~0.9 GB/s), so the default is 1 GB/s. 100 GB/s is an M-series base chip's memory
    bandwidth. With these, Qwen3-30B-A3B at an 8 GB budget comes out near 6 tok/s;
    6.4-7.8 was measured.
    """
    if plan.verdict == "too_large":
        return Verdict("too_large", plan.explain(), plan)
    hit = hit_rate_estimate(plan.expert_fraction, experts_per_layer)
    misses = moe_layers * plan.top_k * (1 - hit)
    active = plan.resident_bytes + moe_layers * plan.top_k * plan.expert_bytes
    seconds = (
        misses * plan.expert_bytes / disk_bytes_per_s
        + active / memory_bytes_per_s
        + moe_layers * layer_overhead_s
    )
    tps = 1 / seconds if seconds > 0 else None
    reason = plan.explain()
    if plan.verdict == "paged" and tps is not None:
        reason += f" Estimated hit rate {hit:.0%}, about {tps:.1f} tokens/s."
    return Verdict(plan.verdict, reason, plan, hit, tps)


# --- planning -------------------------------------------------------------------------


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


def hub_cache_dir(cache_dir: str | Path | None = None) -> Path:
    from huggingface_hub import constants

    return Path(cache_dir or constants.HF_HUB_CACHE)


def disk_free(path: str | Path) -> int:
    """Free bytes on the disk holding ``path`` (or its nearest existing parent)."""
    path = Path(path)
    while not path.exists() and path != path.parent:
        path = path.parent
    return shutil.disk_usage(path).free


def _endpoint(endpoint: str | None) -> str:
    from huggingface_hub import constants

    return (endpoint or constants.ENDPOINT).rstrip("/")


def _storage(cache_dir: Path, repo_id: str) -> Path:
    return cache_dir / f"models--{repo_id.replace('/', '--')}"


def partial_bytes(cache_dir: Path, repo_id: str) -> int:
    """Bytes in ``repo_id``'s unfinished downloads (``blobs/*.incomplete``) in the cache."""
    blobs = _storage(cache_dir, repo_id) / "blobs"
    try:
        return sum(p.stat().st_size for p in blobs.glob("*.incomplete"))
    except OSError:
        return 0


def hub_error(
    error: BaseException,
    repo_id: str,
    endpoint: str,
    revision: str = "main",
    *,
    partial_bytes: int | None = None,
) -> Exception:
    """Hub and network exceptions as a DownloadError that says what to do.

    ``partial_bytes`` is given while planning (nothing fetched yet in this call): what
    earlier downloads left in the cache, so a message only promises a resume when there
    is something to resume.
    """
    import httpx2
    from huggingface_hub import errors

    if isinstance(error, (DownloadError, DownloadCancelled)):
        return error
    if isinstance(error, errors.GatedRepoError) or (
        isinstance(error, errors.HfHubHTTPError)
        and error.response is not None
        and error.response.status_code in (401, 403)
        and not isinstance(error, errors.RepositoryNotFoundError)
    ):
        return ModelGated(
            f"{repo_id} is gated or private: accept its licence at {endpoint}/{repo_id}, "
            "then log in with `hf auth login` (or set HF_TOKEN) and download again."
        )
    if isinstance(error, errors.RevisionNotFoundError):
        return ModelNotFound(
            f"{repo_id} has no revision {revision!r}: check the branch, tag or commit."
        )
    if isinstance(error, errors.RepositoryNotFoundError):
        return ModelNotFound(
            f"No model {repo_id} on the Hub: check the spelling (org/name, as on {endpoint})."
        )
    if isinstance(error, errors.OfflineModeIsEnabled):
        return HubUnreachable("HF_HUB_OFFLINE is set: unset it to download models.")
    if isinstance(error, (httpx2.TransportError, errors.LocalEntryNotFoundError)) or (
        isinstance(error, errors.HfHubHTTPError)
        and error.response is not None
        and error.response.status_code >= 500
    ):
        if partial_bytes == 0:
            return HubUnreachable(
                f"Cannot reach {endpoint} to look up {repo_id}: check your connection and "
                "try again; nothing was downloaded."
            )
        if partial_bytes:
            return HubUnreachable(
                f"Cannot reach {endpoint} to look up {repo_id}: check your connection and "
                f"try again; the {format_bytes(partial_bytes)} already downloaded is kept "
                "and resumes."
            )
        return HubUnreachable(
            f"Cannot reach {endpoint}: check your connection; the partial download is kept "
            "and resumes next time."
        )
    if isinstance(error, OSError) and error.errno == errno.ENOSPC:
        return NotEnoughDisk(
            "The disk is full: free some space (or set HF_HUB_CACHE to a larger disk); the "
            f"partial download is kept and `mlx-pager download {repo_id}` resumes it."
        )
    return DownloadError(f"Downloading {repo_id} failed: {type(error).__name__}: {error}")


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
    try:
        info = api.model_info(repo_id, revision=revision, files_metadata=True)
    except Exception as e:  # noqa: BLE001 - turned into a message that says what to do
        partial = partial_bytes(cache, repo_id)
        raise hub_error(e, repo_id, endpoint, revision, partial_bytes=partial) from None
    wanted = set(
        filter_repo_objects(
            [s.rfilename for s in info.siblings or []], allow_patterns=ALLOW_PATTERNS
        )
    )
    blobs = _storage(cache, repo_id) / "blobs"
    files = []
    for s in info.siblings or []:
        if s.rfilename not in wanted:
            continue
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
    except Exception as e:  # noqa: BLE001 - sizes are a bonus; the plan stands without them
        return replace(plan, sizes_error=f"Could not read the safetensors headers: {e}")


def _head(repo_id: str, name: str, revision: str, endpoint: str, token) -> tuple[str, int]:  # noqa: ANN001
    from huggingface_hub import get_hf_file_metadata, hf_hub_url

    url = hf_hub_url(repo_id, name, revision=revision, endpoint=endpoint)
    meta = get_hf_file_metadata(url, token=token)
    if not meta.etag:
        raise DownloadError(f"{endpoint} gives no ETag for {name} of {repo_id}: cannot cache it.")
    return meta.etag, int(meta.size or 0)


def _remote_sizes(api, repo_id: str, commit: str, names: list[str], token) -> ModelSizes:  # noqa: ANN001
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


# --- downloading ----------------------------------------------------------------------


def download(
    repo_id: str,
    revision: str | None = None,
    endpoint: str | None = None,
    progress: ProgressFn | None = None,
    cancel: threading.Event | None = None,
    *,
    cache_dir: str | Path | None = None,
    token: str | bool | None = None,
    free_space: Callable[[Path], int] = disk_free,
    plan: DownloadPlan | None = None,
) -> Path:
    """Download ``repo_id`` into the Hugging Face cache; returns the snapshot folder.

    ``progress(done_bytes, total_bytes, file)`` is called from this thread as bytes
    arrive (``done`` includes what was cached before). Setting ``cancel`` stops within
    one chunk (256 KB) and raises DownloadCancelled; so does an interrupt. Partial files
    stay as ``blobs/<etag>.incomplete`` and the next call resumes them with ``Range``.
    Raises DownloadError subclasses with messages that say what to do.
    """
    from huggingface_hub import snapshot_download

    cancel = cancel or threading.Event()
    if plan is None:
        plan = plan_download(
            repo_id, revision, endpoint, cache_dir=cache_dir, token=token,
            free_space=free_space, read_sizes=False,
        )  # fmt: skip
    if problem := plan.disk_problem:
        raise NotEnoughDisk(problem)
    state = _Progress(plan.total_bytes, plan.cached_bytes, progress, cancel)
    try:
        for f in plan.files:
            if not f.complete:
                _fetch_file(plan, f, state, token)
        # Every blob is here: this only links snapshots/<commit>/ and writes refs/.
        path = snapshot_download(
            repo_id,
            revision=plan.revision,
            cache_dir=plan.cache_dir,
            endpoint=plan.endpoint,
            token=token,
            allow_patterns=ALLOW_PATTERNS,
            tqdm_class=_tqdm_class(state),
        )
    except DownloadCancelled:
        raise
    except Exception as e:  # noqa: BLE001 - turned into a message that says what to do
        raise hub_error(e, repo_id, plan.endpoint, plan.revision) from None
    state.report(plan.files[-1].name if plan.files else "", force=True)
    return Path(path)


@dataclass
class _Progress:
    total: int
    done: int
    callback: ProgressFn | None
    cancel: threading.Event
    file: str = ""
    last: float = field(default=0.0)

    def add(self, n: int, file: str) -> None:
        self.done += n
        self.file = file
        self.report(file)
        self.check_cancel()

    def check_cancel(self) -> None:
        if self.cancel.is_set():
            raise DownloadCancelled(
                f"Download cancelled: {format_bytes(self.done)} of "
                f"{format_bytes(self.total)} kept; downloading again resumes there."
            )

    def report(self, file: str, force: bool = False) -> None:
        now = time.monotonic()
        if self.callback is not None and (force or now - self.last >= 0.05):
            self.last = now
            self.callback(self.done, self.total, file)


def _fetch_file(plan: DownloadPlan, f: RemoteFile, state: _Progress, token) -> None:  # noqa: ANN001
    """One file into blobs/<etag>.incomplete (resuming it), then moved to its blob."""
    from filelock import FileLock, Timeout
    from huggingface_hub import hf_hub_url
    from huggingface_hub.utils import build_hf_headers, get_session, hf_raise_for_status

    storage = _storage(plan.cache_dir, plan.repo_id)
    blob = storage / "blobs" / f.etag
    part = blob.with_name(f"{f.etag}.incomplete")
    blob.parent.mkdir(parents=True, exist_ok=True)
    lock_path = plan.cache_dir / ".locks" / storage.name / f"{f.etag}.lock"
    lock_path.parent.mkdir(parents=True, exist_ok=True)
    url = hf_hub_url(plan.repo_id, f.name, revision=plan.commit, endpoint=plan.endpoint)
    headers = build_hf_headers(token=token)
    headers["Accept-Encoding"] = "identity"
    try:
        lock = FileLock(str(lock_path), timeout=0)
        lock.acquire()
    except Timeout:
        raise DownloadError(
            f"Another download of {plan.repo_id} is writing {f.name}: wait for it to finish."
        ) from None
    try:
        counted = min(f.cached_bytes, f.size)  # what state.done already includes
        failures = 0  # in a row, without a byte between them
        while failures <= RETRIES:
            have = part.stat().st_size if part.exists() else 0
            if have != counted:  # a partial the plan did not see, or one that was reset
                state.add(have - counted, f.name)
                counted = have
            if have > f.size:
                part.unlink()
                continue
            if have == f.size:
                break
            h = dict(headers)
            if have:
                h["Range"] = f"bytes={have}-"
            try:
                stream = get_session().stream(
                    "GET", url, headers=h, follow_redirects=True, timeout=TIMEOUT_S
                )
                with stream as r:
                    if r.status_code >= 400:
                        r.read()
                        hf_raise_for_status(r)
                    mode = "ab" if r.status_code == 206 else "wb"
                    if mode == "wb" and have:  # the server ignored Range: start over
                        state.add(-have, f.name)
                        counted = 0
                    with open(part, mode) as out:
                        for chunk in r.iter_bytes(CHUNK_BYTES):
                            out.write(chunk)
                            counted += len(chunk)
                            state.add(len(chunk), f.name)
            except _transient_errors() as e:
                state.check_cancel()  # cancelled while the connection stalled: not a failure
                failures = 1 if counted > have else failures + 1
                if failures > RETRIES:
                    raise e
                time.sleep(RETRY_WAIT_S)
                continue
            failures += 1  # a clean but short response: ask again for the rest
        if not part.exists() or part.stat().st_size != f.size:
            got = part.stat().st_size if part.exists() else 0
            raise DownloadError(
                f"{f.name} of {plan.repo_id} arrived with {got} bytes instead of {f.size}: "
                "download again to resume."
            )
        os.replace(part, blob)
    finally:
        lock.release()


def _transient_errors() -> tuple[type[BaseException], ...]:
    import httpx2

    return (httpx2.TransportError,)


def _tqdm_class(state: _Progress) -> type:
    """A tqdm for snapshot_download: forwards any bytes it fetches itself, and cancels."""
    import io

    from tqdm.auto import tqdm

    class Forward(tqdm):
        def __init__(self, *args, **kwargs) -> None:
            kwargs["file"] = io.StringIO()
            kwargs.pop("name", None)
            super().__init__(*args, **kwargs)

        def update(self, n: float | None = 1) -> bool | None:
            if self.unit == "B" and n:
                state.add(int(n), str(self.desc))
            return super().update(n)

    return Forward
