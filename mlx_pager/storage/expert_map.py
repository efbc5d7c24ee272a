"""Where each routed expert lives on disk: file, byte offset and length of every piece.

Two layouts are found from the safetensors headers alone:
- stacked (MLX-converted, mlx-community): one tensor ``...switch_mlp.gate_proj.weight``
  of shape ``[experts, out, in]``, so expert ``e`` is the contiguous range
  ``offset + e * stride``; quantised checkpoints add ``scales`` and ``biases`` the same way;
- per-expert (original Hugging Face): ``...experts.{e}.gate_proj.weight`` (Mixtral:
  ``...experts.{e}.w1.weight``), one tensor per expert.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from .checkpoint import DTYPE_SIZES, CheckpointError, TensorInfo

# Safetensors dtypes -> the numpy dtype that holds their bits (bf16 travels as uint16).
NUMPY_DTYPES = {
    "F32": np.float32, "F16": np.float16, "BF16": np.uint16, "U32": np.uint32,
    "U8": np.uint8, "I8": np.int8, "I32": np.int32, "U16": np.uint16, "I16": np.int16,
}  # fmt: skip

# mlx-lm's projection names -> Mixtral's original per-expert names.
MIXTRAL_NAMES = {"gate_proj": "w1", "down_proj": "w2", "up_proj": "w3"}


@dataclass(frozen=True)
class Piece:
    """One expert's share of one stacked parameter, as bytes in one file."""

    path: Path
    offset: int
    nbytes: int
    dtype: str  # safetensors dtype of the bytes on disk
    shape: tuple[int, ...]


@dataclass
class ExpertMap:
    """``pieces[layer][param][expert]`` for every paged layer, e.g. param 'gate_proj.weight'."""

    layer_paths: list[str]
    params: list[str]
    num_experts: int
    pieces: list[dict[str, list[Piece]]]

    def expert_pieces(self, layer: int, expert: int) -> dict[str, Piece]:
        return {p: self.pieces[layer][p][expert] for p in self.params}

    def expert_disk_bytes(self, layer: int = 0, expert: int = 0) -> int:
        return sum(piece.nbytes for piece in self.expert_pieces(layer, expert).values())

    def files(self) -> list[Path]:
        return sorted({pc.path for layer in self.pieces for ps in layer.values() for pc in ps})


def _stacked(info: TensorInfo, num_experts: int, shape: tuple[int, ...]) -> list[Piece]:
    if info.shape != (num_experts, *shape):
        raise CheckpointError(
            f"{info.name} in {info.path.name} has shape {info.shape}, but the model config "
            f"expects {(num_experts, *shape)}: config.json and the weights disagree."
        )
    stride = info.nbytes // num_experts
    return [
        Piece(info.path, info.offset + e * stride, stride, info.dtype, shape)
        for e in range(num_experts)
    ]


def _per_expert(
    tensors: dict[str, TensorInfo], parent: str, param: str, num_experts: int
) -> list[Piece] | None:
    proj, leaf = param.split(".", 1)
    for name in dict.fromkeys((proj, MIXTRAL_NAMES.get(proj, proj))):
        keys = [f"{parent}.experts.{e}.{name}.{leaf}" for e in range(num_experts)]
        if keys[0] in tensors:
            missing = [k for k in keys if k not in tensors]
            if missing:
                raise CheckpointError(
                    f"The checkpoint has {keys[0]} but not {missing[0]}: some experts are "
                    "missing; download the model again."
                )
            infos = [tensors[k] for k in keys]
            return [Piece(i.path, i.offset, i.nbytes, i.dtype, i.shape) for i in infos]
    return None


def build_expert_map(
    layers: list[tuple[str, dict[str, tuple[int, ...]]]],
    num_experts: int,
    tensors: dict[str, TensorInfo],
) -> ExpertMap:
    """Locate every parameter of every paged layer.

    ``layers`` lists, per MoE layer, the module path of its switch layer (as mlx-lm names
    it) and the per-expert shape of each of its parameters.
    """
    params = list(layers[0][1])
    pieces = []
    for path, shapes in layers:
        if list(shapes) != params:
            raise CheckpointError(f"MoE layers differ in their expert parameters at {path}.")
        parent = path.rsplit(".", 1)[0]
        found: dict[str, list[Piece]] = {}
        for param, shape in shapes.items():
            stacked_name = f"{path}.{param}"
            if stacked_name in tensors:
                found[param] = _stacked(tensors[stacked_name], num_experts, shape)
                continue
            per_expert = _per_expert(tensors, parent, param, num_experts)
            if per_expert is None:
                raise CheckpointError(
                    f"Cannot find the experts of {stacked_name} in the checkpoint (neither "
                    f"stacked as {stacked_name} nor per expert as "
                    f"{parent}.experts.N.{param}). This layout is not supported: convert the "
                    "model with `mlx_lm.convert` and open the converted folder."
                )
            for piece in per_expert:
                if math.prod(piece.shape) != math.prod(shape):
                    raise CheckpointError(
                        f"Experts of {stacked_name} have shape {piece.shape} on disk, the "
                        f"model expects {shape}: config.json and the weights disagree."
                    )
                if piece.nbytes != math.prod(piece.shape) * DTYPE_SIZES[piece.dtype]:
                    raise CheckpointError(f"Inconsistent tensor size for {stacked_name}.")
            found[param] = per_expert
        pieces.append(found)
    return ExpertMap([p for p, _ in layers], params, num_experts, pieces)
