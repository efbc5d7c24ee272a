"""Random-weight checkpoints of a real model's exact shape, written one layer at a time.

The layout is mlx-community's, as ``mlx_lm.convert -q`` writes it: stacked ``switch_mlp``
experts, 4-bit affine in groups of 64, the router at 8 bits (the model class's own
``quant_predicate``), scales and biases in bfloat16. Codes are drawn directly (no float
weights are ever made) and every scale is a power of two, so each one is exact in float16
too and the GGUF export repacks it bit for bit. Nothing larger than one layer is held.

The routers are fitted while the file is written: the calibration tokens run through each
layer as written (mlx-lm's own decoder layer), and each expert's router row gets a
component along the tokens' mean direction whose strength is tuned until the layer's
expert popularity follows a measured coverage curve.
"""

from __future__ import annotations

import json
import math
import shutil
import struct
import time
from pathlib import Path

import numpy as np

from .shapes import REFERENCE_OVERLAP, TARGET_COVERAGE, shape_config

GROUP_SIZE = 64
BITS = 4
ROUTER_BITS = 8
SHARD_BYTES = 5_000_000_000
CALIBRATION_TEXT = (
    "def read_config(path):\n    with open(path) as f:\n        return json.load(f)\n"
    "The tide came in slowly over the flat grey sand, and the gulls rose as one.\n"
    "Let x be a real number with x^2 = 2; then x is irrational, since otherwise ...\n"
    "Photosynthesis converts light energy into chemical energy stored in glucose.\n"
)


def target_shares(num_experts: int, top_k: int, target: dict[float, float]) -> np.ndarray:
    """Each expert's share of a layer's activations, most popular first, following the
    coverage curve (piecewise linear between its points) and never above 1/top_k: an
    expert is picked at most once per token."""
    xs = [0.0, *sorted(target), 1.0]
    ys = [0.0, *(target[x] for x in sorted(target)), 1.0]
    edges = np.interp(np.arange(num_experts + 1) / num_experts, xs, ys)
    shares = np.diff(edges)
    cap = 1.0 / top_k
    for _ in range(num_experts):
        over = shares > cap
        if not over.any():
            break
        excess = (shares[over] - cap).sum()
        shares[over] = cap
        free = ~over & (shares < cap)
        shares[free] += excess * shares[free] / shares[free].sum()
    return shares / shares.sum()


def coverage_of(counts: np.ndarray, points) -> dict[float, float]:
    """The share of activations the top ``x`` of experts take, for each point x."""
    ordered = np.sort(counts)[::-1].astype(np.float64)
    cumulative = np.concatenate([[0.0], np.cumsum(ordered)]) / max(ordered.sum(), 1)
    n = len(counts)
    return {x: float(np.interp(x * n, np.arange(n + 1), cumulative)) for x in points}


def _bf16(values: np.ndarray) -> np.ndarray:
    """float32 -> bfloat16 bit patterns (round to nearest even), as uint16."""
    bits = np.ascontiguousarray(values, dtype=np.float32).view(np.uint32)
    rounded = bits + 0x7FFF + ((bits >> 16) & 1)
    return (rounded >> 16).astype(np.uint16)


def _power_of_two(x: float) -> float:
    return float(2.0 ** round(math.log2(x)))


class _Plan:
    """Every tensor's name, dtype and shape in file order, split into shards."""

    def __init__(self, entries: list[tuple[str, str, tuple[int, ...]]], shard_bytes: int):
        self.entries = entries
        itemsize = {"U32": 4, "BF16": 2}
        self.shards: list[list[tuple[str, str, tuple[int, ...]]]] = [[]]
        size = 0
        for name, dtype, shape in entries:
            nbytes = itemsize[dtype] * math.prod(shape)
            if self.shards[-1] and size + nbytes > shard_bytes:
                self.shards.append([])
                size = 0
            self.shards[-1].append((name, dtype, shape))
            size += nbytes
        self.total_bytes = sum(itemsize[d] * math.prod(s) for _, d, s in entries)


class _ShardWriter:
    """Streams tensors, in plan order, into safetensors shards whose headers are written
    first: a tensor is on disk, and out of memory, as soon as it is made."""

    def __init__(self, folder: Path, plan: _Plan):
        self.folder = folder
        self.plan = plan
        self.names = [
            f"model-{i + 1:05d}-of-{len(plan.shards):05d}.safetensors"
            for i in range(len(plan.shards))
        ]
        self.order = [(i, e[0]) for i, shard in enumerate(plan.shards) for e in shard]
        self.position = 0
        self.file = None
        self.shard = -1

    def _open(self, index: int) -> None:
        if self.file:
            self.file.close()
        header: dict = {"__metadata__": {"format": "mlx"}}
        offset = 0
        itemsize = {"U32": 4, "BF16": 2}
        for name, dtype, shape in self.plan.shards[index]:
            nbytes = itemsize[dtype] * math.prod(shape)
            header[name] = {"dtype": dtype, "shape": list(shape),
                            "data_offsets": [offset, offset + nbytes]}  # fmt: skip
            offset += nbytes
        blob = json.dumps(header, separators=(",", ":")).encode()
        blob += b" " * (-len(blob) % 8)
        self.file = open(self.folder / self.names[index], "wb")
        self.file.write(struct.pack("<Q", len(blob)) + blob)
        self.shard = index

    def write(self, name: str, array: np.ndarray) -> None:
        shard, expected = self.order[self.position]
        if name != expected:
            raise RuntimeError(f"tensor {name} written out of order (expected {expected})")
        if shard != self.shard:
            self._open(shard)
        self.file.write(np.ascontiguousarray(array).tobytes())
        self.position += 1

    def close(self) -> None:
        if self.file:
            self.file.close()
        weight_map = {name: self.names[i] for i, name in self.order}
        index = {"metadata": {"total_size": self.plan.total_bytes}, "weight_map": weight_map}
        (self.folder / "model.safetensors.index.json").write_text(json.dumps(index, indent=2))


def _build(config: dict):
    """The model class's lazily built, quantised model (nothing is evaluated: its arrays are
    never materialised), its tensors in file order, and the quantization config, exactly as
    mlx-lm's quantize_model (the model's own quant_predicate included) leaves them."""
    import mlx.core as mx
    from mlx.utils import tree_flatten
    from mlx_lm.utils import _get_classes, quantize_model

    model_class, args_class = _get_classes(config)
    model = model_class(args_class.from_dict(config))
    model, quantized = quantize_model(model, dict(config), group_size=GROUP_SIZE, bits=BITS)
    entries = []
    for name, value in tree_flatten(model.parameters()):
        dtype = "U32" if value.dtype == mx.uint32 else "BF16"
        entries.append((name, dtype, tuple(value.shape)))

    def order(entry) -> tuple[int, int]:
        # Embeddings, then the layers front to back, then the rest (final norm, lm_head):
        # the writer makes the embeddings first, as the calibration pass needs them.
        parts = entry[0].split(".")
        if parts[:2] == ["model", "layers"]:
            return (1, int(parts[2]))
        return (0 if parts[:2] == ["model", "embed_tokens"] else 2, 0)

    entries.sort(key=order)  # stable: each layer's tensors keep the model's order
    return model, entries, quantized


def _layout(config: dict) -> tuple[list[tuple[str, str, tuple[int, ...]]], dict]:
    """Tensor names, dtypes and shapes in file order, and the quantization config."""
    _, entries, quantized = _build(config)
    return entries, quantized


def _tensor(rng, name: str, dtype: str, shape: tuple[int, ...], scales: dict) -> np.ndarray:
    """One tensor's values: random codes, power-of-two scales (biases -7.5 x scale, so a
    4-bit weight is scale x (q - 7.5), mean zero), norms of one, and the rare matrix left
    unquantised (an input width no group divides) gaussian with std 1/sqrt(fan_in)."""
    if dtype == "U32":
        return rng.integers(0, 2**32, size=shape, dtype=np.uint32)
    base = name.rsplit(".", 1)[0]
    if name.endswith(".scales"):
        return np.full(shape, _bf16(np.float32(scales[base]))[()], dtype=np.uint16)
    if name.endswith(".biases"):
        return np.full(shape, _bf16(np.float32(-7.5 * scales[base]))[()], dtype=np.uint16)
    if len(shape) >= 2:
        return _bf16(rng.standard_normal(shape, dtype=np.float32) / math.sqrt(shape[-1]))
    return np.full(shape, 0x3F80, dtype=np.uint16)  # bfloat16 1.0


ARCHITECTURES = ("qwen3_moe", "olmoe", "deepseek_v2")


def make_model(
    shape: str,
    folder: Path,
    *,
    seed: int = 0,
    num_layers: int | None = None,
    calibration_tokens: int = 128,
    shard_bytes: int = SHARD_BYTES,
) -> dict:
    """Write a random checkpoint of ``shape`` (a name in ``shapes.SHAPES``) to ``folder``;
    returns (and writes as ``fixture.json``) its report: size, time, and the routing's
    coverage and per-token overlap against the target."""
    import mlx.core as mx

    from ..sim.synthetic import write_tokenizer

    config = shape_config(shape, num_layers)
    if config["model_type"] not in ARCHITECTURES:
        raise ValueError(
            f"{shape} ({config['model_type']}) cannot be written: the fixture writer builds "
            f"{', '.join(ARCHITECTURES)}."
        )
    start = time.perf_counter()
    folder = Path(folder)
    model, entries, quantized = _build(config)
    plan = _Plan(entries, shard_bytes)
    folder.mkdir(parents=True, exist_ok=True)
    free = shutil.disk_usage(folder).free
    if plan.total_bytes > free * 0.95:
        raise OSError(
            f"{shape} needs {plan.total_bytes / 1e9:.1f} GB and {folder} has "
            f"{free / 1e9:.1f} GB free: free some space or write fewer layers (--layers)."
        )
    rng = np.random.default_rng(seed)
    # A weight's std is scale x 4.6 (codes uniform over 16 levels): 1/sqrt(fan_in).
    scales = {
        name.rsplit(".", 1)[0]: _power_of_two(1 / (4.6 * math.sqrt(shape_[-1] * 32 // BITS)))
        for name, dtype, shape_ in entries
        if name.endswith(".weight") and dtype == "U32"
    }
    scales["model.embed_tokens"] = 2.0**-4
    write_tokenizer(folder, min(config["vocab_size"], 1024))
    tokens = _calibration_tokens(folder, calibration_tokens)
    writer = _ShardWriter(folder, plan)
    by_layer: dict[int | None, list] = {}
    for entry in entries:
        name = entry[0]
        layer = int(name.split(".")[2]) if name.startswith("model.layers.") else None
        by_layer.setdefault(layer, []).append(entry)

    embed = {}
    for name, dtype, shape_ in by_layer[None]:
        if name.startswith("model.embed_tokens."):
            embed[name] = _tensor(rng, name, dtype, shape_, scales)
            writer.write(name, embed[name])
    x = _embed(embed, tokens)
    del embed
    layers_report = []
    for index in range(config["num_hidden_layers"]):
        layer = model.model.layers[index]
        x, report = _write_layer(writer, rng, layer, index, by_layer[index], scales, x, config)
        model.model.layers[index] = None  # its weights go with it: one layer held at a time
        if report is not None:
            layers_report.append(report)
    for name, dtype, shape_ in by_layer[None]:
        if not name.startswith("model.embed_tokens."):
            writer.write(name, _tensor(rng, name, dtype, shape_, scales))
    writer.close()
    config["quantization"] = quantized["quantization"]
    config["quantization_config"] = quantized["quantization"]
    (folder / "config.json").write_text(json.dumps(config, indent=2))
    mx.clear_cache()
    coverage = {
        x: float(np.mean([r["coverage"][x] for r in layers_report])) for x in TARGET_COVERAGE
    }
    top_k = config["num_experts_per_tok"]
    experts = config.get("num_experts") or config["n_routed_experts"]
    moe_layer = next(i for i in range(config["num_hidden_layers"]) if _is_moe(by_layer[i]))
    one_expert = sum(
        4 * math.prod(s[1:]) if d == "U32" else 2 * math.prod(s[1:])
        for n, d, s in by_layer[moe_layer]
        if ".switch_mlp." in n
    )
    report = {
        "shape": shape,
        "seed": seed,
        "layers": config["num_hidden_layers"],
        "moe_layers": len(layers_report),
        "bytes": plan.total_bytes,
        "expert_bytes": one_expert,
        "seconds": time.perf_counter() - start,
        "coverage": {str(k): v for k, v in coverage.items()},
        "target_coverage": {str(k): v for k, v in TARGET_COVERAGE.items()},
        "overlap": float(np.mean([r["overlap"] for r in layers_report])),
        "uniform_overlap": top_k / experts,
        "reference_overlap": REFERENCE_OVERLAP,
        "measured": (
            f"in the writer's calibration pass: {len(tokens)} tokens through mlx-lm's "
            "decoder layers with the final routers as stored"
        ),
    }
    (folder / "fixture.json").write_text(json.dumps(report, indent=2))
    return report


def _is_moe(entries) -> bool:
    return any(".switch_mlp." in name for name, _, _ in entries)


def _calibration_tokens(folder: Path, count: int) -> list[int]:
    from tokenizers import Tokenizer

    tokenizer = Tokenizer.from_file(str(folder / "tokenizer.json"))
    ids = tokenizer.encode(CALIBRATION_TEXT * 8).ids
    return ids[:count]


def _embed(weights: dict[str, np.ndarray], tokens: list[int]):
    import mlx.core as mx

    rows = np.asarray(tokens)
    q = mx.array(weights["model.embed_tokens.weight"][rows])
    s = mx.array(weights["model.embed_tokens.scales"][rows]).view(mx.bfloat16)
    b = mx.array(weights["model.embed_tokens.biases"][rows]).view(mx.bfloat16)
    return mx.dequantize(q, s, b, GROUP_SIZE, BITS).astype(mx.float32)[None]


def _fit_router(m: np.ndarray, experts: int, top_k: int, rng) -> np.ndarray:
    """Router rows whose top-k picks on ``m`` (tokens x hidden) follow the target shares:
    random rows plus a per-expert strength along the tokens' mean direction."""
    hidden = m.shape[1]
    direction = m.mean(axis=0)
    direction /= np.linalg.norm(direction) + 1e-9
    along = m @ direction  # per token
    spread = along.std() + 1e-6
    rows = rng.standard_normal((experts, hidden)).astype(np.float32) / math.sqrt(hidden)
    rows *= 2.0 / (np.linalg.norm(m, axis=1).mean() / math.sqrt(hidden) + 1e-9)
    base = m @ rows.T
    target = target_shares(experts, top_k, TARGET_COVERAGE)[rng.permutation(experts)]
    strength = np.zeros(experts, dtype=np.float32)
    scale = np.sign(along.mean()) * max(abs(along.mean()), spread)
    for _ in range(200):
        logits = base + np.outer(along, strength)
        picked = np.argpartition(-logits, top_k - 1, axis=1)[:, :top_k]
        counts = np.bincount(picked.ravel(), minlength=experts) / picked.size
        strength += 0.5 * (np.log(target + 1e-4) - np.log(counts + 1e-4)) / scale
    return rows + np.outer(strength, direction)


def _router_rows(gate, rows: np.ndarray, prefix: str) -> dict[str, np.ndarray]:
    """The fitted router rows as the model stores its router: quantised at the gate's own
    bits (qwen3_moe's 8, olmoe's 4), or bfloat16 (a plain Linear, deepseek's MoEGate)."""
    import mlx.core as mx
    import mlx.nn as nn

    if isinstance(gate, nn.QuantizedLinear):
        w, s, b = mx.quantize(mx.array(rows).astype(mx.bfloat16), gate.group_size, gate.bits)
        return {
            prefix + "weight": np.array(w),
            prefix + "scales": np.array(s.view(mx.uint16)),
            prefix + "biases": np.array(b.view(mx.uint16)),
        }
    return {prefix + "weight": _bf16(rows)}


def _routed(gate, m, top_k: int) -> np.ndarray:
    """The experts the stored router picks for each calibration token (tokens x k)."""
    import mlx.core as mx

    out = gate(m)
    if isinstance(out, tuple):  # deepseek's MoEGate returns (indices, scores)
        return np.array(out[0][0])
    logits = np.array(out.astype(mx.float32)[0])
    return np.argpartition(-logits, top_k - 1, axis=1)[:, :top_k]


def _write_layer(writer, rng, layer, index, entries, scales, x, config):
    """Make layer ``index``'s tensors, fit its router (if it has one) on the calibration
    states ``x``, write them, and return the states after the layer with the routing's
    report (None for a dense layer)."""
    import mlx.core as mx

    prefix = f"model.layers.{index}."
    moe = _is_moe(entries)
    router = prefix + "mlp.gate."
    tensors = {
        name: _tensor(rng, name, dtype, shape_, scales)
        for name, dtype, shape_ in entries
        if not (moe and name.startswith(router))
    }

    def as_mx(a: np.ndarray):
        return mx.array(a) if a.dtype == np.uint32 else mx.array(a).view(mx.bfloat16)

    def load(names: dict[str, np.ndarray]) -> None:
        # float32 compute, as both MLX engines run on this CPU (bfloat16 matmuls are slow
        # here); scales and norms are powers of two, exact in either.
        weights = [(n[len(prefix) :], as_mx(a)) for n, a in names.items()]
        layer.load_weights(
            [(n, a.astype(mx.float32) if a.dtype == mx.bfloat16 else a) for n, a in weights],
            strict=False,
        )

    load(tensors)
    mask = "causal"
    report = None
    if moe:
        top_k = config["num_experts_per_tok"]
        experts = config.get("num_experts") or config["n_routed_experts"]
        h = x + layer.self_attn(layer.input_layernorm(x), mask, None)
        m = layer.post_attention_layernorm(h).astype(mx.float32)
        rows = _fit_router(np.array(m[0]), experts, top_k, rng)
        fitted = _router_rows(layer.mlp.gate, rows, router)
        load(fitted)
        tensors.update(fitted)
        picked = _routed(layer.mlp.gate, m, top_k)
        counts = np.bincount(picked.ravel(), minlength=experts)
        sets = [set(p) for p in picked]
        overlap = np.mean([len(a & b) / top_k for a, b in zip(sets, sets[1:], strict=False)])
        report = {"coverage": coverage_of(counts, TARGET_COVERAGE), "overlap": float(overlap)}
    for name, _, _ in entries:
        writer.write(name, tensors[name])
    out = layer(x, mask, None)
    mx.eval(out)
    return out, report
