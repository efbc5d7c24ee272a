"""Random-weight checkpoints of every supported architecture, for tests and benchmarks.

Built with mlx-lm's own model classes and saved the way mlx-lm saves them (stacked
experts), or unstacked into the original Hugging Face per-expert layout, optionally
quantised and sharded. A small byte-level BPE tokenizer makes them usable end to end.
"""

from __future__ import annotations

import json
from pathlib import Path

import mlx.core as mx
import mlx.nn as nn
from mlx.utils import tree_flatten
from mlx_lm.models.switch_layers import SwitchLinear
from mlx_lm.utils import _get_classes, quantize_model

from ..storage.expert_map import MIXTRAL_NAMES

VOCAB = 320

_ATTN = {"num_attention_heads": 4, "num_key_value_heads": 2, "head_dim": 16}
_BASE = {"hidden_size": 64, "vocab_size": VOCAB, "rms_norm_eps": 1e-6, "rope_theta": 10000.0,
         "max_position_embeddings": 4096, "tie_word_embeddings": False}  # fmt: skip

ARCH_CONFIGS: dict[str, dict] = {
    "qwen3_moe": {**_BASE, **_ATTN, "num_hidden_layers": 2, "intermediate_size": 128,
                  "num_experts": 8, "num_experts_per_tok": 2, "moe_intermediate_size": 64,
                  "decoder_sparse_step": 1, "mlp_only_layers": [], "norm_topk_prob": True},
    "qwen2_moe": {**_BASE, **_ATTN, "num_hidden_layers": 2, "intermediate_size": 128,
                  "num_experts": 8, "num_experts_per_tok": 2, "moe_intermediate_size": 64,
                  "shared_expert_intermediate_size": 64},
    "mixtral": {**_BASE, **_ATTN, "num_hidden_layers": 2, "intermediate_size": 64,
                "num_local_experts": 8, "num_experts_per_tok": 2},
    "olmoe": {**_BASE, **_ATTN, "num_hidden_layers": 2, "intermediate_size": 64,
              "num_experts": 8, "num_experts_per_tok": 2, "norm_topk_prob": False},
    "deepseek_v2": {**_BASE, "num_hidden_layers": 3, "intermediate_size": 128,
                    "moe_intermediate_size": 64, "num_attention_heads": 4,
                    "num_key_value_heads": 4, "n_shared_experts": 2, "n_routed_experts": 8,
                    "num_experts_per_tok": 2, "kv_lora_rank": 32, "q_lora_rank": None,
                    "qk_rope_head_dim": 8, "v_head_dim": 16, "qk_nope_head_dim": 16,
                    "first_k_dense_replace": 1, "moe_layer_freq": 1, "topk_method": "greedy",
                    "routed_scaling_factor": 1.0,
                    "rope_scaling": {"type": "yarn", "factor": 1.0, "mscale": 0.707,
                                     "mscale_all_dim": 0.707, "beta_fast": 32, "beta_slow": 1,
                                     "original_max_position_embeddings": 4096}},
    "gpt_oss": {**_BASE, **_ATTN, "num_hidden_layers": 2, "intermediate_size": 64,
                "num_local_experts": 8, "num_experts_per_tok": 2, "sliding_window": 8,
                "layer_types": ["sliding_attention", "full_attention"]},
    "qwen3_5_moe": {**_BASE, **_ATTN, "num_hidden_layers": 2, "intermediate_size": 128,
                    "num_experts": 8, "num_experts_per_tok": 2, "moe_intermediate_size": 64,
                    "shared_expert_intermediate_size": 64, "full_attention_interval": 2,
                    "linear_num_value_heads": 4, "linear_num_key_heads": 2,
                    "linear_key_head_dim": 16, "linear_value_head_dim": 16,
                    "linear_conv_kernel_dim": 4, "norm_topk_prob": True},
    # A dense model: no routed experts, runs fully resident.
    "qwen3": {**_BASE, **_ATTN, "num_hidden_layers": 2, "intermediate_size": 128},
    # An MoE whose experts are a list of MLPs, not a Switch layer: mlx-pager refuses it.
    "dbrx": {"vocab_size": VOCAB, "d_model": 64, "n_layers": 2, "n_heads": 4,
             "attn_config": {"kv_n_heads": 2, "clip_qkv": 8.0, "rope_theta": 10000.0},
             "ffn_config": {"ffn_hidden_size": 64, "moe_num_experts": 8, "moe_top_k": 2}},
}  # fmt: skip

# Architectures whose original Hugging Face checkpoints keep one tensor per expert.
PER_EXPERT_ARCHS = ("qwen3_moe", "qwen2_moe", "mixtral", "olmoe", "deepseek_v2")

CHAT_TEMPLATE = (
    "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n"
    "{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)


def write_tokenizer(path: Path, vocab_size: int = VOCAB) -> None:
    """A byte-level BPE tokenizer trained on a few sentences: tiny, real, deterministic."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    specials = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=specials,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    text = [
        "def fibonacci(n):\n    return n if n < 2 else fibonacci(n - 1) + fibonacci(n - 2)\n",
        "The quick brown fox jumps over the lazy dog. Experts are paged from disk.\n",
        "Mixture of experts models route each token to a few experts per layer.\n",
    ] * 20
    tok.train_from_iterator(text, trainer)
    tok.save(str(path / "tokenizer.json"))
    config = {
        "tokenizer_class": "PreTrainedTokenizerFast",
        "eos_token": "<|im_end|>",
        "bos_token": None,
        "pad_token": "<|endoftext|>",
        "chat_template": CHAT_TEMPLATE,
    }
    (path / "tokenizer_config.json").write_text(json.dumps(config, indent=2))


def _unstack(weights: dict[str, mx.array], arch: str) -> dict[str, mx.array]:
    """mlx-lm's stacked ``switch_mlp`` tensors -> the original per-expert tensors."""
    out = {}
    for name, value in weights.items():
        if ".switch_mlp." not in name:
            out[name] = value
            continue
        parent, rest = name.split(".switch_mlp.")
        proj, leaf = rest.split(".")
        if arch == "mixtral":
            proj = MIXTRAL_NAMES[proj]
        for e in range(value.shape[0]):
            out[f"{parent}.experts.{e}.{proj}.{leaf}"] = value[e]
    return out


def make_checkpoint(
    path: Path,
    arch: str = "qwen3_moe",
    *,
    quantize_bits: int | None = None,
    per_expert: bool = False,
    shards: int = 1,
    seed: int = 0,
    dtype: mx.Dtype = mx.float32,
    quantize_mode: str = "affine",
    **overrides,
) -> Path:
    """Write a random checkpoint folder mlx-lm can load; returns its path.

    ``quantize_mode="mxfp4"`` quantises the routed experts as gpt-oss ships them (MXFP4,
    groups of 32, no biases) and the rest at ``quantize_bits`` affine, as the
    mlx-community gpt-oss checkpoints do. ``quantize_mode="mixed"`` quantises per module as
    the embedded model ships: embedding 8-bit, other linear layers ``quantize_bits`` in
    groups of 32, routers left in float."""
    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    config = {"model_type": arch, **ARCH_CONFIGS.get(arch, {}), **overrides}
    mx.random.seed(seed)
    model_class, args_class = _get_classes(config)
    model = model_class(args_class.from_dict(config))
    # Larger router weights than the default init, so routing varies token to token.
    params = dict(tree_flatten(model.parameters()))
    params = {
        k: (v * 8 if k.endswith((".gate.weight", ".router.weight")) else v).astype(dtype)
        if mx.issubdtype(v.dtype, mx.floating)
        else v
        for k, v in params.items()
    }
    model.load_weights(list(params.items()))
    if quantize_bits:
        predicate = None
        if quantize_mode == "mixed":

            def predicate(name: str, module: nn.Module) -> bool | dict:
                if isinstance(module, nn.Embedding):
                    return {"group_size": 32, "bits": 8, "mode": "affine"}
                if name.endswith((".gate", ".router")):
                    return False
                return {"group_size": 32, "bits": quantize_bits, "mode": "affine"}

        elif quantize_mode != "affine":

            def predicate(name: str, module: nn.Module) -> bool | dict:
                if isinstance(module, SwitchLinear):
                    return {"group_size": 32, "bits": 4, "mode": quantize_mode}
                return hasattr(module, "to_quantized")

        model, config = quantize_model(
            model, config, group_size=64, bits=quantize_bits, quant_predicate=predicate
        )
    weights = dict(tree_flatten(model.parameters()))
    mx.eval(weights)
    if per_expert:
        if quantize_bits or arch not in PER_EXPERT_ARCHS:
            raise ValueError(f"{arch} has no per-expert layout here (or it is quantised).")
        weights = _unstack(weights, arch)
    _save_weights(path, weights, shards)
    (path / "config.json").write_text(json.dumps(config, indent=2))
    write_tokenizer(path, config.get("vocab_size", VOCAB))
    return path


def _save_weights(path: Path, weights: dict[str, mx.array], shards: int) -> None:
    names = sorted(weights)
    if shards == 1:
        mx.save_safetensors(str(path / "model.safetensors"), weights, {"format": "mlx"})
        return
    weight_map = {}
    for i in range(shards):
        part = names[i::shards]
        file = f"model-{i + 1:05d}-of-{shards:05d}.safetensors"
        mx.save_safetensors(str(path / file), {n: weights[n] for n in part}, {"format": "mlx"})
        weight_map.update(dict.fromkeys(part, file))
    index = {"metadata": {}, "weight_map": weight_map}
    (path / "model.safetensors.index.json").write_text(json.dumps(index, indent=2))
