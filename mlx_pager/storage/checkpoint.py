"""Safetensors headers read without touching tensor data: where every tensor lives on disk.

Every check here exists so that a broken download fails with a sentence that says what
to do, instead of a crash deep inside a forward pass.
"""

from __future__ import annotations

import json
import math
import struct
from dataclasses import dataclass
from pathlib import Path

# Bytes per element of each safetensors dtype.
DTYPE_SIZES = {
    "BOOL": 1, "U8": 1, "I8": 1, "F8_E4M3": 1, "F8_E5M2": 1, "F8_E8M0": 1,
    "U16": 2, "I16": 2, "F16": 2, "BF16": 2,
    "U32": 4, "I32": 4, "F32": 4,
    "U64": 8, "I64": 8, "F64": 8,
}  # fmt: skip

MAX_HEADER_BYTES = 100 * 2**20


class CheckpointError(ValueError):
    """A checkpoint file is broken; the message names the file and the way out."""


@dataclass(frozen=True)
class TensorInfo:
    name: str
    path: Path
    dtype: str
    shape: tuple[int, ...]
    offset: int  # absolute byte offset in the file
    nbytes: int


def text_config(config: dict) -> dict:
    """The language model's config, also for multimodal configs that nest it."""
    return {**config, **(config.get("text_config") or {})}


# Config keys that announce routed experts, and experts per token, whatever the
# architecture calls them: the one table the loader and the size estimate both read.
EXPERT_COUNT_KEYS = ("num_experts", "num_local_experts", "n_routed_experts", "moe_num_experts")
TOP_K_KEYS = (
    "num_experts_per_tok", "num_experts_per_token", "experts_per_token", "moe_top_k", "top_k",
)  # fmt: skip


def _config_int(scope: dict, keys: tuple[str, ...]) -> int:
    for key in keys:
        value = scope.get(key)
        if isinstance(value, int) and not isinstance(value, bool) and value > 0:
            return value
    return 0


def declared_experts(config: dict) -> int:
    """Routed experts per layer the config announces, also nested one level down (DBRX
    keeps ``moe_num_experts`` in ``ffn_config``); 0 for a dense model."""
    cfg = text_config(config)
    for scope in [cfg, *(v for v in cfg.values() if isinstance(v, dict))]:
        value = _config_int(scope, EXPERT_COUNT_KEYS)
        if value > 1:
            return value
    return 0


def declared_top_k(config: dict) -> int:
    """Experts each token is routed to, as the config says; 0 when it does not say."""
    cfg = text_config(config)
    for scope in [cfg, *(v for v in cfg.values() if isinstance(v, dict))]:
        if value := _config_int(scope, TOP_K_KEYS):
            return value
    return 0


def kv_bytes_per_layer_token(config: dict, itemsize: int) -> int:
    """Keys and values of one token in one full-attention layer, as mlx-lm caches them."""
    cfg = text_config(config)
    heads = cfg.get("num_attention_heads")
    if not heads:
        return 0
    if cfg.get("kv_lora_rank"):  # MLA (DeepSeek-V2): mlx-lm caches full keys and values
        k = heads * (cfg["qk_nope_head_dim"] + cfg["qk_rope_head_dim"])
        return (k + heads * cfg["v_head_dim"]) * itemsize
    kv_heads = cfg.get("num_key_value_heads") or heads
    head_dim = cfg.get("head_dim") or cfg["hidden_size"] // heads
    return 2 * kv_heads * head_dim * itemsize


def _broken(path: Path, what: str) -> CheckpointError:
    # In the Hugging Face cache the snapshot entry is a link to a blob: the blob is what
    # must go, or the next download finds it and links the same broken bytes again.
    target = path.resolve()
    where = f"{target} (the file behind {path})" if target != path.absolute() else str(path)
    return CheckpointError(
        f"{path.name} is not a valid safetensors file ({what}). The download is probably "
        f"incomplete or corrupt: delete {where} and download the model again "
        "(mlx-pager download ID)."
    )


def read_header(path: Path) -> dict[str, TensorInfo]:
    """Parse one file's header and check every tensor lies inside the file."""
    path = Path(path)
    size = path.stat().st_size
    with open(path, "rb") as f:
        head = f.read(8)
        if len(head) < 8:
            raise _broken(path, f"only {size} bytes, shorter than a header")
        (header_len,) = struct.unpack("<Q", head)
        if header_len > MAX_HEADER_BYTES or 8 + header_len > size:
            raise _broken(path, f"header length {header_len} does not fit in {size} bytes")
        raw = f.read(header_len)
    try:
        header = json.loads(raw)
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise _broken(path, f"header is not JSON: {e}") from e
    if not isinstance(header, dict):
        raise _broken(path, "header is not a JSON object")
    data_start = 8 + header_len
    tensors = {}
    for name, entry in header.items():
        if name == "__metadata__":
            continue
        try:
            dtype, shape = entry["dtype"], tuple(int(d) for d in entry["shape"])
            begin, end = (int(o) for o in entry["data_offsets"])
        except (KeyError, TypeError, ValueError) as e:
            raise _broken(path, f"entry {name!r} lacks dtype, shape or data_offsets") from e
        if dtype not in DTYPE_SIZES:
            raise _broken(path, f"tensor {name!r} has unknown dtype {dtype!r}")
        expected = math.prod(shape) * DTYPE_SIZES[dtype]
        if end - begin != expected or begin < 0:
            raise _broken(path, f"tensor {name!r} spans {end - begin} bytes, expected {expected}")
        if data_start + end > size:
            raise _broken(
                path,
                f"tensor {name!r} ends at byte {data_start + end}, past the end of the "
                f"file ({size} bytes)",
            )
        tensors[name] = TensorInfo(name, path, dtype, shape, data_start + begin, expected)
    return tensors


def weight_files(model_dir: Path) -> list[Path]:
    """The checkpoint's safetensors files, from the shard index when there is one."""
    model_dir = Path(model_dir)
    index = model_dir / "model.safetensors.index.json"
    if index.exists():
        try:
            weight_map = json.loads(index.read_text())["weight_map"]
        except (json.JSONDecodeError, KeyError) as e:
            raise CheckpointError(
                f"{index} is not a valid shard index ({e}): download the model again."
            ) from e
        names = sorted(set(weight_map.values()))
        missing = [n for n in names if not (model_dir / n).exists()]
        if missing:
            raise FileNotFoundError(
                f"The model in {model_dir} is missing {len(missing)} of {len(names)} weight "
                f"shards ({', '.join(missing[:3])}{'...' if len(missing) > 3 else ''}). "
                "Run `mlx-pager download ID` again to fetch them; finished files are kept."
            )
        return [model_dir / n for n in names]
    files = sorted(model_dir.glob("model*.safetensors"))
    if not files:
        raise FileNotFoundError(
            f"No model*.safetensors files in {model_dir}: this is not an MLX-loadable "
            "checkpoint, or its download has not finished (mlx-pager download ID)."
        )
    return files


def index_checkpoint(model_dir: Path) -> dict[str, TensorInfo]:
    """Every tensor of the checkpoint by name, across shards."""
    tensors: dict[str, TensorInfo] = {}
    for path in weight_files(model_dir):
        tensors.update(read_header(path))
    return tensors
