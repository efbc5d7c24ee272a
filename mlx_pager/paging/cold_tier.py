"""Cold experts at lower precision: a small pool of 4-bit copies, made as they are read.

HOBBIT (arXiv 2411.01433) found that serving only the *less important* misses (low
router weight) at low precision costs little accuracy. Here a miss whose router weight
is low for every token routed to it goes to this pool instead of the full-precision one:
a 4-bit slot of a float32 expert takes about a sixth of the memory, so the same bytes
keep several times more of those experts resident. The bytes read from disk are the
checkpoint's own (no second copy on disk is made); the saving is in misses. It changes
the output, so it is off unless the user turns it on (``cold_precision = "4bit"``).
"""

from __future__ import annotations

import math

import mlx.core as mx

from ..storage.expert_map import Piece
from .expert_cache import piece_to_mx
from .paged_switch import Projection

BITS = 4
GROUP_SIZE = 64


def cold_eligible(source: dict[str, Projection]) -> bool:
    """Worth it only where the experts are stored at more than 4 bits."""
    return all(not spec.quantized or spec.bits > BITS for spec in source.values())


def low_bit_layout(
    source: dict[str, Projection],
    shapes: dict[str, tuple[int, ...]],
    dtypes: dict[str, mx.Dtype],
) -> dict[str, tuple[tuple[int, ...], mx.Dtype]]:
    """Shape and dtype of one 4-bit slot, from how the checkpoint stores the expert."""
    float_dtype = next(d for d in dtypes.values() if mx.issubdtype(d, mx.floating))
    layout = {}
    for name, spec in source.items():
        out_dim, in_dim = shapes[f"{name}.weight"]
        if spec.quantized:  # packed: recover the input width from the scales
            in_dim = shapes[f"{name}.scales"][1] * spec.group_size
        layout[f"{name}.weight"] = ((out_dim, in_dim * BITS // 32), mx.uint32)
        layout[f"{name}.scales"] = ((out_dim, in_dim // GROUP_SIZE), float_dtype)
        layout[f"{name}.biases"] = ((out_dim, in_dim // GROUP_SIZE), float_dtype)
        if spec.has_bias:
            layout[f"{name}.bias"] = ((out_dim,), dtypes[f"{name}.bias"])
    return layout


def slot_bytes(layout: dict[str, tuple[tuple[int, ...], mx.Dtype]]) -> int:
    return sum(math.prod(shape) * dtype.size for shape, dtype in layout.values())


class LowBitFormat:
    """Slots that hold a 4-bit copy of an expert, made as it is read: the cold tier is an
    ``ExpertCache`` with this format (and its own policy and counts)."""

    def __init__(
        self,
        source: dict[str, Projection],
        params: list[str],
        shapes: dict[str, tuple[int, ...]],
        dtypes: dict[str, mx.Dtype],
    ):
        self.source = source  # how the checkpoint stores each projection
        self.params = params
        self.shapes = shapes
        self.dtypes = dtypes
        self.projections = {
            name: Projection(True, spec.has_bias, GROUP_SIZE, BITS, "affine")
            for name, spec in source.items()
        }

    def layout(self) -> dict[str, tuple[tuple[int, ...], mx.Dtype]]:
        return low_bit_layout(self.source, self.shapes, self.dtypes)

    def write(
        self, pools: dict[str, mx.array], slot: int, pieces: dict[str, Piece], buffers: list
    ) -> None:
        """Dequantise (if stored quantised) and requantise to 4 bits, into the slot."""
        arrays = {
            p: piece_to_mx(buf, pieces[p], self.shapes[p], self.dtypes[p])
            for p, buf in zip(self.params, buffers, strict=True)
        }
        for name, spec in self.source.items():
            weight = arrays[f"{name}.weight"]
            if spec.quantized:
                weight = mx.dequantize(
                    weight,
                    arrays[f"{name}.scales"],
                    arrays.get(f"{name}.biases"),
                    spec.group_size,
                    spec.bits,
                    mode=spec.mode,
                )
            scales_dtype = pools[f"{name}.scales"].dtype
            q, scales, biases = mx.quantize(weight.astype(scales_dtype), GROUP_SIZE, BITS)
            pools[f"{name}.weight"][slot] = q
            pools[f"{name}.scales"][slot] = scales
            pools[f"{name}.biases"][slot] = biases
            if spec.has_bias:
                pools[f"{name}.bias"][slot] = arrays[f"{name}.bias"]
