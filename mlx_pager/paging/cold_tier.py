"""Cold experts at lower precision: a small pool of low-bit copies, made as they are read.

HOBBIT (arXiv 2411.01433) found that serving only the *less important* misses (low
router weight) at low precision costs little accuracy. Here a miss judged unimportant
(``unimportant``) goes to this pool instead of the full-precision one: a 4-bit slot of a
float32 expert takes about a sixth of the memory, so the same bytes keep several times
more of those experts resident. Measured (docs/cold-precision.md), "unimportant" pays
when it means *rarely used* (the access profile's frequency) rather than low router
weight: the rare experts are the misses, and their low-bit copies stay resident. The
bytes read from disk are the checkpoint's own (no second copy on disk is made); the
saving is in misses. It changes the output, so it is off unless the user turns it on
(``cold_precision``).
"""

from __future__ import annotations

import math

import mlx.core as mx
import numpy as np

from ..storage.expert_map import Piece
from .expert_cache import piece_to_mx
from .paged_switch import Projection

BITS = 4
GROUP_SIZE = 64
IMPORTANCE = ("weight", "frequency", "both")


def precision_bits(cold_precision: str) -> int | None:
    """The bits of a cold precision ("4bit": 4, also "3bit", "2bit"); "full": None."""
    if cold_precision == "full":
        return None
    if cold_precision not in ("2bit", "3bit", "4bit"):
        raise ValueError(
            f"cold_precision must be full, 4bit, 3bit or 2bit, not {cold_precision!r}."
        )
    return int(cold_precision[0])


def cold_eligible(source: dict[str, Projection], bits: int = BITS) -> bool:
    """Worth it only where the experts are stored at more than ``bits`` bits."""
    return all(not spec.quantized or spec.bits > bits for spec in source.values())


def unimportant(
    routed: np.ndarray,
    experts: np.ndarray,
    probs: np.ndarray,
    by: str = "weight",
    shares: np.ndarray | None = None,
) -> np.ndarray:
    """Which of a layer's ``experts`` are unimportant to the tokens ``routed`` [..., k].

    "weight" (HOBBIT's): the normalised router weight (``probs``, the layer's softmax) is
    below half an even share for every token routed to it. "frequency": its share of the
    layer's activations in the access profile (``shares``, summing to 1) is below an
    even share. "both": the two at once. Without a profile, nothing is rare."""
    mask = np.ones(len(experts), bool)
    if by in ("weight", "both"):
        k = routed.shape[-1]
        weights = np.take_along_axis(probs.reshape(-1, probs.shape[-1]),
                                     routed.reshape(-1, k), -1)  # fmt: skip
        weights /= weights.sum(-1, keepdims=True)
        top = np.zeros(probs.shape[-1])
        np.maximum.at(top, routed.reshape(-1), weights.reshape(-1))
        mask &= top[experts] < 0.5 / k
    if by in ("frequency", "both"):
        if shares is None:
            return np.zeros(len(experts), bool)
        mask &= shares[experts] < 1.0 / len(shares)
    return mask


def low_bit_layout(
    source: dict[str, Projection],
    shapes: dict[str, tuple[int, ...]],
    dtypes: dict[str, mx.Dtype],
    bits: int = BITS,
) -> dict[str, tuple[tuple[int, ...], mx.Dtype]]:
    """Shape and dtype of one low-bit slot, from how the checkpoint stores the expert."""
    float_dtype = next(d for d in dtypes.values() if mx.issubdtype(d, mx.floating))
    layout = {}
    for name, spec in source.items():
        out_dim, in_dim = shapes[f"{name}.weight"]
        if spec.quantized:  # packed: recover the input width from the scales
            in_dim = shapes[f"{name}.scales"][1] * spec.group_size
        layout[f"{name}.weight"] = ((out_dim, in_dim * bits // 32), mx.uint32)
        layout[f"{name}.scales"] = ((out_dim, in_dim // GROUP_SIZE), float_dtype)
        layout[f"{name}.biases"] = ((out_dim, in_dim // GROUP_SIZE), float_dtype)
        if spec.has_bias:
            layout[f"{name}.bias"] = ((out_dim,), dtypes[f"{name}.bias"])
    return layout


def slot_bytes(layout: dict[str, tuple[tuple[int, ...], mx.Dtype]]) -> int:
    return sum(math.prod(shape) * dtype.size for shape, dtype in layout.values())


class LowBitFormat:
    """Slots that hold a low-bit copy of an expert, made as it is read: the cold tier is an
    ``ExpertCache`` with this format (and its own policy and counts). It also says which
    misses it takes (``unimportant``, by ``importance``)."""

    def __init__(
        self,
        source: dict[str, Projection],
        params: list[str],
        shapes: dict[str, tuple[int, ...]],
        dtypes: dict[str, mx.Dtype],
        bits: int = BITS,
        importance: str = "frequency",
    ):
        if importance not in IMPORTANCE:
            raise ValueError(f"importance must be one of {', '.join(IMPORTANCE)}.")
        self.source = source  # how the checkpoint stores each projection
        self.params = params
        self.shapes = shapes
        self.dtypes = dtypes
        self.bits = bits
        self.importance = importance
        self.shares: np.ndarray | None = None  # [layer, expert] profile shares ("frequency")
        self.projections = {
            name: Projection(True, spec.has_bias, GROUP_SIZE, bits, "affine")
            for name, spec in source.items()
        }

    def layout(self) -> dict[str, tuple[tuple[int, ...], mx.Dtype]]:
        return low_bit_layout(self.source, self.shapes, self.dtypes, self.bits)

    def set_profile(self, counts: np.ndarray) -> None:
        """The access profile's counts [layer, expert]: each expert's share of its layer
        (an even share where a layer has no counts yet: none of its experts is rare)."""
        counts = np.asarray(counts, np.float64)
        totals = counts.sum(-1, keepdims=True)
        even = np.full_like(counts, 1 / counts.shape[-1])
        self.shares = np.where(totals > 0, counts / np.maximum(totals, 1), even)

    def unimportant(
        self, layer: int, routed: np.ndarray, experts: np.ndarray, probs: np.ndarray
    ) -> np.ndarray:
        shares = None if self.shares is None else self.shares[layer]
        return unimportant(routed, experts, probs, self.importance, shares)

    def write(
        self, pools: dict[str, mx.array], slot: int, pieces: dict[str, Piece], buffers: list
    ) -> None:
        """Dequantise (if stored quantised) and requantise to low bits, into the slot."""
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
            q, scales, biases = mx.quantize(weight.astype(scales_dtype), GROUP_SIZE, self.bits)
            pools[f"{name}.weight"][slot] = q
            pools[f"{name}.scales"][slot] = scales
            pools[f"{name}.biases"][slot] = biases
            if spec.has_bias:
                pools[f"{name}.bias"][slot] = arrays[f"{name}.bias"]
