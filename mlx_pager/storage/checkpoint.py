"""Safetensors headers read without touching tensor data: where every tensor lives on disk.

Every check here exists so that a broken download fails with a sentence that says what
to do, instead of a crash deep inside a forward pass.
"""

from __future__ import annotations

import json
import math
import struct
from collections.abc import Callable
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


def _counts(value: object) -> bool:
    """A JSON list of non-negative whole numbers (not booleans, not floats)."""
    return isinstance(value, list) and all(type(v) is int and v >= 0 for v in value)


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
        raise _broken(path, f"header is not JSON: {e}") from None
    except RecursionError:
        raise _broken(path, "header JSON is nested too deeply") from None
    if not isinstance(header, dict):
        raise _broken(path, "header is not a JSON object")
    data_start = 8 + header_len
    tensors = {}
    for name, entry in header.items():
        if name == "__metadata__":
            continue
        try:
            dtype, shape, offsets = entry["dtype"], entry["shape"], entry["data_offsets"]
        except (KeyError, TypeError):
            raise _broken(path, f"entry {name!r} lacks dtype, shape or data_offsets") from None
        if not (_counts(shape) and _counts(offsets) and len(offsets) == 2):
            raise _broken(
                path, f"tensor {name!r} needs a shape and two data_offsets of whole numbers"
            )
        shape, (begin, end) = tuple(shape), offsets
        if not isinstance(dtype, str) or dtype not in DTYPE_SIZES:
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
        names = shard_names(index)
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


def _shard_problem(name: object) -> str:
    if not isinstance(name, str) or not name:
        return f"shard name {name!r} is not a file name"
    if name.startswith(("/", "\\")) or ".." in Path(name).parts or ":" in name or "\\" in name:
        return f"shard {name!r} is outside the model folder"
    if not name.endswith(".safetensors"):
        return f"shard {name!r} is not a .safetensors file"
    return ""


def _read_json(path: Path, broken: Callable[[str], CheckpointError]) -> object:
    """A small JSON file of a model folder: size capped before reading, every way it can
    be malformed turned into ``broken(what)``."""
    if path.stat().st_size > MAX_HEADER_BYTES:
        raise broken(f"larger than {MAX_HEADER_BYTES // 2**20} MiB")
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise broken(f"not JSON: {e}") from None
    except RecursionError:
        raise broken("JSON nested too deeply") from None


def shard_names(index: Path) -> list[str]:
    """The shards a ``model.safetensors.index.json`` names: plain file names inside the
    model folder, never a path that climbs out of it."""

    def broken(what: str) -> CheckpointError:
        return CheckpointError(
            f"{index} is not a valid shard index ({what}): delete it and download the "
            "model again (mlx-pager download ID)."
        )

    data = _read_json(index, broken)
    weight_map = data.get("weight_map") if isinstance(data, dict) else None
    if not isinstance(weight_map, dict) or not weight_map:
        raise broken("no weight_map object of tensor names to files")
    for name in weight_map.values():
        if problem := _shard_problem(name):
            raise broken(problem)
    return sorted(set(weight_map.values()))


# config.json fields the engine reads itself (mlx-lm builds the model from the rest):
# each absent, or a whole number in this range.
CONFIG_COUNTS = {
    "num_hidden_layers": (1, 4096),
    "hidden_size": (1, 2**20),
    "num_attention_heads": (1, 2**16),
    "num_key_value_heads": (1, 2**16),
    "head_dim": (1, 2**16),
    "kv_lora_rank": (0, 2**20),
    "qk_nope_head_dim": (0, 2**16),
    "qk_rope_head_dim": (0, 2**16),
    "v_head_dim": (0, 2**16),
    "num_experts": (0, 2**16),
    "num_local_experts": (0, 2**16),
    "n_routed_experts": (0, 2**16),
    "moe_num_experts": (0, 2**16),
    "num_experts_per_tok": (0, 2**16),
    "moe_top_k": (0, 2**16),
    "top_k": (0, 2**16),
    "experts_per_token": (0, 2**16),
    "linear_num_value_heads": (0, 2**16),
    "linear_value_head_dim": (0, 2**16),
    "linear_num_key_heads": (0, 2**16),
    "linear_key_head_dim": (0, 2**16),
    "linear_conv_kernel_dim": (1, 2**10),
}


def read_config(model_dir: Path) -> dict:
    """``config.json``, with the fields the engine sizes memory from checked: a JSON
    object, each count a whole number in range, ``text_config`` an object."""
    path = Path(model_dir) / "config.json"

    def broken(what: str) -> CheckpointError:
        return CheckpointError(
            f"{path} is not a usable model config ({what}): delete it and download the "
            "model again (mlx-pager download ID)."
        )

    config = _read_json(path, broken)
    if not isinstance(config, dict):
        raise broken("not a JSON object")
    if not isinstance(config.get("text_config") or {}, dict):
        raise broken("text_config is not an object")
    if not isinstance(config.get("model_type", ""), str):
        raise broken("model_type is not text")
    for scope in (config, config.get("text_config") or {}):
        for key, (low, high) in CONFIG_COUNTS.items():
            value = scope.get(key)
            if value is None:
                continue
            if type(value) is not int or not low <= value <= high:
                raise broken(f"{key} is {value!r}, not a whole number from {low} to {high}")
    cfg = text_config(config)
    needs = [("head_dim", "hidden_size")]  # each: one of these sizes the KV cache
    if cfg.get("kv_lora_rank"):  # MLA: key and value sizes come from their own fields
        needs = [("qk_nope_head_dim",), ("qk_rope_head_dim",), ("v_head_dim",)]
    for any_of in needs:
        if cfg.get("num_attention_heads") and not any(cfg.get(k) for k in any_of):
            raise broken(f"num_attention_heads is given but not {' or '.join(any_of)}")
    return config


def index_checkpoint(model_dir: Path) -> dict[str, TensorInfo]:
    """Every tensor of the checkpoint by name, across shards."""
    tensors: dict[str, TensorInfo] = {}
    for path in weight_files(model_dir):
        tensors.update(read_header(path))
    return tensors
