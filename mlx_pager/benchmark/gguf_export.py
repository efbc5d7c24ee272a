"""The same weights as an MLX 4-bit qwen3_moe checkpoint, written as a llama.cpp GGUF.

MLX affine 4-bit (w = scale * q + bias per group of 64) is exactly two Q4_1 blocks of 32
with d = scale and m = bias, so quantised tensors are repacked bit for bit, never
re-quantised: llama.cpp then computes the same function as mlx-lm (up to its 8-bit
activations). Tensors are streamed from memory maps of the safetensors files, one at a
time, so a checkpoint larger than half the machine's memory still exports.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from ..storage.checkpoint import index_checkpoint
from ..storage.expert_map import NUMPY_DTYPES

SUPPORTED_ARCHS = ("qwen3_moe",)
Q4_1_BLOCK = 32  # values per Q4_1 block
Q4_1_BYTES = 20  # fp16 d, fp16 m, 16 bytes of nibbles
_ROWS_PER_CHUNK = 4096  # rows repacked at once: bounds the temporaries, not the output

# What the export reads: floats (bf16 as its raw bits) and packed quantised words.
_ST_DTYPES = {d: NUMPY_DTYPES[d] for d in ("F32", "F16", "BF16", "U32")}

# MLX name inside a layer -> llama.cpp tensor (gguf.MODEL_TENSOR member name).
_LAYER_TENSORS = {
    "input_layernorm": "ATTN_NORM",
    "post_attention_layernorm": "FFN_NORM",
    "self_attn.q_proj": "ATTN_Q",
    "self_attn.k_proj": "ATTN_K",
    "self_attn.v_proj": "ATTN_V",
    "self_attn.o_proj": "ATTN_OUT",
    "self_attn.q_norm": "ATTN_Q_NORM",
    "self_attn.k_norm": "ATTN_K_NORM",
    "mlp.gate": "FFN_GATE_INP",
    "mlp.switch_mlp.gate_proj": "FFN_GATE_EXP",
    "mlp.switch_mlp.up_proj": "FFN_UP_EXP",
    "mlp.switch_mlp.down_proj": "FFN_DOWN_EXP",
}
_TOP_TENSORS = {
    "model.embed_tokens": "TOKEN_EMBD",
    "model.norm": "OUTPUT_NORM",
    "lm_head": "OUTPUT",
}


@dataclass(frozen=True)
class StoredTensor:
    """Where one safetensors tensor lies on disk, so it can be memory-mapped on demand."""

    file: Path
    dtype: str
    shape: tuple[int, ...]
    offset: int  # absolute byte offset of the data in the file

    def array(self) -> np.ndarray:
        """A read-only memory map: nothing is read until it is touched."""
        count = int(np.prod(self.shape)) if self.shape else 1
        flat = np.memmap(self.file, np.dtype(_ST_DTYPES[self.dtype]), "r", self.offset, (count,))
        return flat.reshape(self.shape)


def read_safetensors_index(model_dir: Path) -> dict[str, StoredTensor]:
    """Every tensor of the checkpoint by name, from the safetensors headers alone (read
    and checked by the engine's own ``index_checkpoint``)."""
    out: dict[str, StoredTensor] = {}
    for name, info in index_checkpoint(model_dir).items():
        if info.dtype not in _ST_DTYPES:
            raise ValueError(f"{info.path.name}: {name} has unsupported dtype {info.dtype}")
        out[name] = StoredTensor(info.path, info.dtype, info.shape, info.offset)
    return out


def as_float32(a: np.ndarray, dtype: str) -> np.ndarray:
    """Stored floats (bfloat16 kept as raw uint16) -> float32, exactly."""
    if dtype == "BF16":
        return (np.asarray(a, dtype=np.uint32) << 16).view(np.float32)
    return np.asarray(a, dtype=np.float32)


def exact_float16(a: np.ndarray, dtype: str, name: str) -> np.ndarray:
    """Scales/biases as float16, refusing any value float16 cannot hold exactly."""
    f32 = as_float32(a, dtype)
    f16 = f32.astype(np.float16)
    if not np.array_equal(f16.astype(np.float32), f32):
        raise ValueError(f"{name}: values not exactly representable in float16; cannot repack")
    return f16


def unpack_mlx_4bit(packed: np.ndarray) -> np.ndarray:
    """uint32 words of 8 nibbles (little-endian, low nibble first) -> uint8 values 0..15."""
    as_bytes = np.ascontiguousarray(packed).view(np.uint8)
    values = np.empty((*as_bytes.shape[:-1], as_bytes.shape[-1] * 2), dtype=np.uint8)
    values[..., 0::2] = as_bytes & 0x0F
    values[..., 1::2] = as_bytes >> 4
    return values


def repack_q4_1(packed: np.ndarray, scales: np.ndarray, biases: np.ndarray) -> np.ndarray:
    """One MLX 4-bit group-64 tensor (2-D rows) -> Q4_1 bytes, shape (rows, cols/32*20).

    ``scales``/``biases`` are float16 of shape (rows, cols/64). Q4_1 byte j of a block
    holds value j in its low nibble and value j+16 in its high nibble."""
    rows = packed.shape[0]
    values = unpack_mlx_4bit(packed).reshape(rows, -1, 2, 2, 16)  # group, block, half, j
    blocks = np.empty((rows, values.shape[1], 2, Q4_1_BYTES), dtype=np.uint8)
    blocks[..., 0:2] = np.repeat(scales[..., None], 2, axis=-1)[..., None].view(np.uint8)
    blocks[..., 2:4] = np.repeat(biases[..., None], 2, axis=-1)[..., None].view(np.uint8)
    blocks[..., 4:] = values[..., 0, :] | (values[..., 1, :] << 4)
    return blocks.reshape(rows, -1)


def dequantize_affine(
    packed: np.ndarray, scales: np.ndarray, biases: np.ndarray, bits: int
) -> np.ndarray:
    """MLX affine dequantisation in float32 (exact: scale*q fits float32, one rounding)."""
    as_bytes = np.ascontiguousarray(packed).view(np.uint8)
    per_byte = 8 // bits
    shifts = (np.arange(per_byte, dtype=np.uint8) * bits).astype(np.uint8)
    q = (as_bytes[..., None] >> shifts) & np.uint8((1 << bits) - 1)
    q = q.reshape(*as_bytes.shape[:-1], -1).astype(np.float32)
    group = q.shape[-1] // scales.shape[-1]
    q = q.reshape(*scales.shape, group)
    w = scales.astype(np.float32)[..., None] * q + biases.astype(np.float32)[..., None]
    return w.reshape(*scales.shape[:-1], -1)


@dataclass(frozen=True)
class PlannedTensor:
    """One GGUF tensor: its name, how it is stored and where its MLX parts are."""

    name: str
    kind: str  # "q4_1" (repacked), "dequant" (other quantisation -> F32), "f32", "f16"
    shape: tuple[int, ...]  # numpy order of the dequantised values
    parts: tuple[StoredTensor, ...]  # weight[, scales, biases]
    bits: int = 0

    @property
    def nbytes(self) -> int:
        count = int(np.prod(self.shape))
        if self.kind == "q4_1":
            return count // Q4_1_BLOCK * Q4_1_BYTES
        return count * (2 if self.kind == "f16" else 4)


def gguf_name(mlx_base: str) -> str:
    """MLX module path -> llama.cpp tensor name (without the .weight suffix)."""
    import gguf

    if mlx_base in _TOP_TENSORS:
        member = _TOP_TENSORS[mlx_base]
        return gguf.TENSOR_NAMES[gguf.MODEL_TENSOR[member]]
    parts = mlx_base.split(".", 3)
    if len(parts) == 4 and parts[:2] == ["model", "layers"] and parts[3] in _LAYER_TENSORS:
        member = _LAYER_TENSORS[parts[3]]
        return gguf.TENSOR_NAMES[gguf.MODEL_TENSOR[member]].format(bid=int(parts[2]))
    raise ValueError(f"no qwen3moe GGUF tensor for MLX tensor {mlx_base!r}")


def plan_tensors(stored: dict[str, StoredTensor], config: dict) -> list[PlannedTensor]:
    """Decide each output tensor's type and shape from the headers and the config alone."""
    quant = config.get("quantization") or {}
    plan = []
    for name in sorted(stored, key=_name_order):
        base, leaf = name.rsplit(".", 1)
        if leaf in ("scales", "biases"):
            continue
        if leaf != "weight":
            raise ValueError(f"unsupported tensor {name!r} (qwen3moe has no biases)")
        out_name = gguf_name(base) + ".weight"
        weight = stored[name]
        if f"{base}.scales" not in stored:
            kind = "f16" if weight.dtype == "F16" else "f32"
            plan.append(PlannedTensor(out_name, kind, weight.shape, (weight,)))
            continue
        scales, biases = stored[f"{base}.scales"], stored.get(f"{base}.biases")
        if biases is None:
            raise ValueError(f"{base}: quantised without biases (not affine); unsupported")
        layer_quant = quant.get(base)
        group = (layer_quant if isinstance(layer_quant, dict) else quant).get("group_size", 64)
        bits = weight.shape[-1] * 32 // (scales.shape[-1] * group)
        shape = (*weight.shape[:-1], scales.shape[-1] * group)
        kind = "q4_1" if (bits, group) == (4, 64) else "dequant"
        plan.append(PlannedTensor(out_name, kind, shape, (weight, scales, biases), bits))
    return plan


def _name_order(name: str) -> tuple[int, str]:
    """Layer tensors in layer order (so a streamed GGUF reads front to back)."""
    parts = name.split(".")
    if parts[:2] == ["model", "layers"]:
        return (int(parts[2]) + 1, name)
    return (0 if "embed" in name else 1 << 30, name)


def tensor_data(t: PlannedTensor) -> np.ndarray:
    """The bytes (or floats) llama.cpp expects for one planned tensor, built in row chunks."""
    if t.kind in ("f32", "f16"):
        (w,) = t.parts
        values = as_float32(w.array(), w.dtype)
        return values.astype(np.float16 if t.kind == "f16" else np.float32)
    w, s, b = (p.array() for p in t.parts)
    rows = int(np.prod(t.shape[:-1]))
    w2, s2, b2 = (a.reshape(rows, -1) for a in (w, s, b))
    width = t.nbytes // rows if t.kind == "q4_1" else t.shape[-1]
    out = np.empty((rows, width), dtype=np.uint8 if t.kind == "q4_1" else np.float32)
    for r in range(0, rows, _ROWS_PER_CHUNK):
        sl = slice(r, r + _ROWS_PER_CHUNK)
        scales = exact_float16(s2[sl], t.parts[1].dtype, t.parts[1].file.name + ":" + t.name)
        biases = exact_float16(b2[sl], t.parts[2].dtype, t.parts[2].file.name + ":" + t.name)
        if t.kind == "q4_1":
            out[sl] = repack_q4_1(np.asarray(w2[sl]), scales, biases)
        else:
            out[sl] = dequantize_affine(np.asarray(w2[sl]), scales, biases, t.bits)
    return out.reshape(*t.shape[:-1], width)


def check_supported(config: dict) -> None:
    """Refuse what llama.cpp's qwen3moe graph would compute differently."""
    arch = config.get("model_type")
    if arch not in SUPPORTED_ARCHS:
        raise ValueError(
            f"GGUF export supports model_type {', '.join(SUPPORTED_ARCHS)} only, got {arch!r}"
        )
    if not config.get("norm_topk_prob", True):
        raise ValueError("qwen3moe in llama.cpp always renormalises top-k weights")
    if config.get("mlp_only_layers") or config.get("decoder_sparse_step", 1) != 1:
        raise ValueError("qwen3moe in llama.cpp needs every layer to be a MoE layer")


def write_metadata(writer, config: dict, name: str) -> None:
    """The hyper-parameters llama.cpp reads for qwen3moe."""
    import gguf

    heads = config["num_attention_heads"]
    head_dim = config.get("head_dim") or config["hidden_size"] // heads
    writer.add_name(name)
    writer.add_context_length(config.get("max_position_embeddings", 4096))
    writer.add_embedding_length(config["hidden_size"])
    writer.add_block_count(config["num_hidden_layers"])
    writer.add_feed_forward_length(config.get("intermediate_size", 0))
    writer.add_expert_feed_forward_length(config["moe_intermediate_size"])
    writer.add_expert_count(config["num_experts"])
    writer.add_expert_used_count(config["num_experts_per_tok"])
    writer.add_head_count(heads)
    writer.add_head_count_kv(config.get("num_key_value_heads", heads))
    writer.add_key_length(head_dim)
    writer.add_value_length(head_dim)
    writer.add_rope_freq_base(float(config.get("rope_theta", 1_000_000.0)))
    writer.add_layer_norm_rms_eps(float(config.get("rms_norm_eps", 1e-6)))
    writer.add_file_type(gguf.LlamaFileType.MOSTLY_Q4_1)
    writer.add_quantization_version(gguf.GGML_QUANT_VERSION)


def write_tokenizer(writer, model_dir: Path, vocab_size: int) -> None:
    """tokenizer.json as a gpt2-style BPE, padded with unused tokens to the model's vocab."""
    import gguf

    tok = json.loads((model_dir / "tokenizer.json").read_text())
    if tok["model"].get("type") != "BPE":
        raise ValueError("GGUF export needs a BPE tokenizer.json")
    by_id: dict[int, tuple[str, int]] = {
        i: (t, gguf.TokenType.NORMAL) for t, i in tok["model"]["vocab"].items()
    }
    for added in tok.get("added_tokens", []):
        kind = gguf.TokenType.CONTROL if added.get("special") else gguf.TokenType.USER_DEFINED
        by_id[added["id"]] = (added["content"], kind)
    if max(by_id) >= vocab_size:
        raise ValueError(f"tokenizer has id {max(by_id)} beyond the model's vocab {vocab_size}")
    tokens, types = [], []
    for i in range(vocab_size):
        text, kind = by_id.get(i, (f"[PAD{i}]", gguf.TokenType.UNUSED))
        tokens.append(text)
        types.append(kind)
    merges = [m if isinstance(m, str) else " ".join(m) for m in tok["model"].get("merges", [])]
    writer.add_tokenizer_model("gpt2")
    writer.add_tokenizer_pre("qwen2")
    writer.add_token_list(tokens)
    writer.add_token_types(types)
    writer.add_token_merges(merges)
    ids = {text: i for i, (text, _) in by_id.items()}
    special = _special_tokens(model_dir)
    eos = ids.get(special.get("eos_token") or "", ids.get("<|im_end|>", 0))
    bos = ids.get(special.get("bos_token") or "", ids.get("<|endoftext|>", eos))
    writer.add_eos_token_id(eos)
    writer.add_bos_token_id(bos)
    if special.get("pad_token") in ids:
        writer.add_pad_token_id(ids[special["pad_token"]])
    writer.add_add_bos_token(False)


def _special_tokens(model_dir: Path) -> dict[str, str | None]:
    path = model_dir / "tokenizer_config.json"
    conf = json.loads(path.read_text()) if path.exists() else {}
    out = {}
    for key in ("eos_token", "bos_token", "pad_token"):
        value = conf.get(key)
        out[key] = value.get("content") if isinstance(value, dict) else value
    return out


def export_gguf(model_dir: Path, out: Path) -> Path:
    """Write ``out`` (a qwen3moe GGUF) from an mlx-community qwen3_moe checkpoint."""
    import gguf

    model_dir, out = Path(model_dir), Path(out)
    config = json.loads((model_dir / "config.json").read_text())
    check_supported(config)
    plan = plan_tensors(read_safetensors_index(model_dir), config)
    writer = gguf.GGUFWriter(out, gguf.MODEL_ARCH_NAMES[gguf.MODEL_ARCH.QWEN3MOE])
    write_metadata(writer, config, model_dir.name)
    write_tokenizer(writer, model_dir, config["vocab_size"])
    for t in plan:
        if t.kind == "q4_1":
            byte_shape = (*t.shape[:-1], t.shape[-1] // Q4_1_BLOCK * Q4_1_BYTES)
            q = gguf.GGMLQuantizationType.Q4_1
            writer.add_tensor_info(t.name, byte_shape, np.dtype(np.uint8), t.nbytes, raw_dtype=q)
        else:
            dtype = np.dtype(np.float16 if t.kind == "f16" else np.float32)
            writer.add_tensor_info(t.name, t.shape, dtype, t.nbytes)
    tmp = out.with_name(out.name + ".partial")
    try:
        writer.write_header_to_file(tmp)
        writer.write_kv_data_to_file()
        writer.write_ti_data_to_file()
        for t in plan:
            writer.write_tensor_data(tensor_data(t))
        writer.close()
        tmp.replace(out)
    finally:
        writer.close()
        tmp.unlink(missing_ok=True)
    return out
