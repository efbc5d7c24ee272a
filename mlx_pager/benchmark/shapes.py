"""The exact shapes of the MoE models users bring, as their Hugging Face config.json has
them, and the expert popularity a real model's routing shows."""

from __future__ import annotations

SHAPES: dict[str, dict] = {
    # Qwen/Qwen3-30B-A3B: 48 layers x 128 experts of 2.65 MB at 4 bits, 17.2 GB.
    "qwen3-30b-a3b": {
        "model_type": "qwen3_moe", "hidden_size": 2048, "num_hidden_layers": 48,
        "num_attention_heads": 32, "num_key_value_heads": 4, "head_dim": 128,
        "intermediate_size": 6144, "moe_intermediate_size": 768, "num_experts": 128,
        "num_experts_per_tok": 8, "norm_topk_prob": True, "decoder_sparse_step": 1,
        "mlp_only_layers": [], "vocab_size": 151936, "rms_norm_eps": 1e-6,
        "rope_theta": 1000000.0, "max_position_embeddings": 40960,
        "tie_word_embeddings": False,
    },
    # allenai/OLMoE-1B-7B-0924: 16 layers x 64 experts of 3.5 MB at 4 bits.
    "olmoe-1b-7b": {
        "model_type": "olmoe", "hidden_size": 2048, "num_hidden_layers": 16,
        "num_attention_heads": 16, "num_key_value_heads": 16, "intermediate_size": 1024,
        "num_experts": 64, "num_experts_per_tok": 8, "norm_topk_prob": False,
        "vocab_size": 50304, "rms_norm_eps": 1e-5, "rope_theta": 10000.0,
        "max_position_embeddings": 4096, "tie_word_embeddings": False,
    },
    # deepseek-ai/DeepSeek-V2-Lite: 27 layers (the first dense) x 64 routed experts + 2
    # shared, top-6, multi-head latent attention.
    "deepseek-v2-lite": {
        "model_type": "deepseek_v2", "hidden_size": 2048, "num_hidden_layers": 27,
        "num_attention_heads": 16, "num_key_value_heads": 16, "intermediate_size": 10944,
        "moe_intermediate_size": 1408, "n_routed_experts": 64, "n_shared_experts": 2,
        "num_experts_per_tok": 6, "first_k_dense_replace": 1, "moe_layer_freq": 1,
        "kv_lora_rank": 512, "q_lora_rank": None, "qk_rope_head_dim": 64,
        "qk_nope_head_dim": 128, "v_head_dim": 128, "topk_method": "greedy",
        "routed_scaling_factor": 1.0, "vocab_size": 102400, "rms_norm_eps": 1e-6,
        "rope_theta": 10000.0, "max_position_embeddings": 163840,
        "rope_scaling": {"type": "yarn", "factor": 40, "original_max_position_embeddings": 4096,
                         "beta_fast": 32, "beta_slow": 1, "mscale": 0.707,
                         "mscale_all_dim": 0.707},
        "tie_word_embeddings": False,
    },
    # A few MB, the same architecture as the headline shape: for tests.
    "small": {
        "model_type": "qwen3_moe", "hidden_size": 256, "num_hidden_layers": 4,
        "num_attention_heads": 4, "num_key_value_heads": 2, "head_dim": 64,
        "intermediate_size": 512, "moe_intermediate_size": 128, "num_experts": 32,
        "num_experts_per_tok": 4, "norm_topk_prob": True, "decoder_sparse_step": 1,
        "mlp_only_layers": [], "vocab_size": 1024, "rms_norm_eps": 1e-6,
        "rope_theta": 1000000.0, "max_position_embeddings": 4096,
        "tie_word_embeddings": False,
    },
    # The other two architectures at the same tiny size: tests of the writer and the engine.
    "small-olmoe": {
        "model_type": "olmoe", "hidden_size": 256, "num_hidden_layers": 3,
        "num_attention_heads": 4, "num_key_value_heads": 4, "intermediate_size": 128,
        "num_experts": 32, "num_experts_per_tok": 4, "norm_topk_prob": False,
        "vocab_size": 1024, "rms_norm_eps": 1e-5, "rope_theta": 10000.0,
        "max_position_embeddings": 4096, "tie_word_embeddings": False,
    },
    "small-deepseek": {
        "model_type": "deepseek_v2", "hidden_size": 256, "num_hidden_layers": 3,
        "num_attention_heads": 4, "num_key_value_heads": 4, "intermediate_size": 512,
        "moe_intermediate_size": 128, "n_routed_experts": 32, "n_shared_experts": 1,
        "num_experts_per_tok": 4, "first_k_dense_replace": 1, "moe_layer_freq": 1,
        "kv_lora_rank": 128, "q_lora_rank": None, "qk_rope_head_dim": 64,
        "qk_nope_head_dim": 64, "v_head_dim": 64, "topk_method": "greedy",
        "routed_scaling_factor": 1.0, "vocab_size": 1024, "rms_norm_eps": 1e-6,
        "rope_theta": 10000.0, "max_position_embeddings": 4096,
        "rope_scaling": {"type": "yarn", "factor": 40, "original_max_position_embeddings": 4096,
                         "beta_fast": 32, "beta_slow": 1, "mscale": 0.707,
                         "mscale_all_dim": 0.707},
        "tie_word_embeddings": False,
    },
}  # fmt: skip

# Share of a layer's activations taken by its most popular experts: the top 1/5/10/20% of
# experts take 20/50/70/85% (one user's measurement on Qwen3.6-35B over a coding session).
TARGET_COVERAGE: dict[float, float] = {0.01: 0.20, 0.05: 0.50, 0.10: 0.70, 0.20: 0.85}

# How much of a token's expert set the next token shares, a real model's: the mean over
# layers and consecutive token pairs of |S_t & S_t+1| / k on the DeepSeek-V2-Lite prefill
# trace (97,802 tokens, 26 layers, top-6 of 64): 0.275, 2.9x the 0.094 of random routing.
REFERENCE_OVERLAP = {"overlap": 0.275, "uniform_overlap": 6 / 64, "source": (
    "DeepSeek-V2-Lite prefill trace (deepseek-v2-lite-prefill-dev.npz), mean over layers "
    "and consecutive tokens of the shared top-k share")}  # fmt: skip


def shape_config(name: str, num_layers: int | None = None) -> dict:
    """A copy of a shape's config, optionally cut to its first ``num_layers`` layers."""
    if name not in SHAPES:
        raise ValueError(f"Unknown shape {name!r}: choose one of {', '.join(SHAPES)}.")
    config = dict(SHAPES[name])
    if num_layers is not None:
        if not 1 <= num_layers <= config["num_hidden_layers"]:
            raise ValueError(f"--layers must be 1 to {config['num_hidden_layers']} for {name}.")
        config["num_hidden_layers"] = num_layers
    return config
