"""The KV cache a context needs: the one estimator the budget and the verdicts use.

Full-attention layers grow with the context, sliding windows stop at their size, and
linear-attention layers (Qwen3.5 / Qwen3-Next) hold a fixed state. The loader reads each
layer's kind from the caches mlx-lm's model makes; before a download (no model built,
no MLX imported) the kinds come from the config. Same formula either way.
"""

from __future__ import annotations

from ..storage.checkpoint import kv_bytes_per_layer_token, text_config

LayerKind = tuple[str, int]  # ("full", 0) | ("window", size) | ("state", 0)


def config_kinds(config: dict) -> list[LayerKind]:
    """Each layer's cache kind, from the config alone."""
    cfg = text_config(config)
    layers = int(cfg.get("num_hidden_layers") or 0)
    window = int(cfg.get("sliding_window") or 0)
    if cfg.get("layer_types"):
        kinds = []
        for kind in cfg["layer_types"]:
            if kind == "full_attention":
                kinds.append(("full", 0))
            elif kind == "sliding_attention" and window:
                kinds.append(("window", window))
            else:
                kinds.append(("state", 0))
        return kinds
    if cfg.get("full_attention_interval"):
        every = int(cfg["full_attention_interval"])
        return [("full", 0) if (i + 1) % every == 0 else ("state", 0) for i in range(layers)]
    return [("full", 0)] * layers


def recurrent_state_bytes(config: dict, itemsize: int) -> int:
    """One linear-attention layer's fixed state (Qwen3.5 / Qwen3-Next gated delta net): the
    float32 state [value heads, value dim, key dim] plus the convolution's last inputs.
    About 2 MiB a layer on Qwen3.5-35B-A3B; 1 MiB when the config does not say."""
    cfg = text_config(config)
    hv, dv = cfg.get("linear_num_value_heads"), cfg.get("linear_value_head_dim")
    hk, dk = cfg.get("linear_num_key_heads"), cfg.get("linear_key_head_dim")
    if not (hv and dv and hk and dk):
        return 2**20
    conv = (cfg.get("linear_conv_kernel_dim", 4) - 1) * (2 * hk * dk + hv * dv) * itemsize
    return hv * dv * dk * 4 + conv


def kv_cache_bytes(
    config: dict, context: int, itemsize: int, kinds: list[LayerKind] | None = None
) -> int:
    """The KV cache (and fixed states) at ``context`` tokens; ``kinds`` from the model's
    own caches when it is built, else from the config."""
    per_token = kv_bytes_per_layer_token(config, itemsize)
    total = 0
    for kind, size in config_kinds(config) if kinds is None else kinds:
        if kind == "full":
            total += context * per_token
        elif kind == "window":
            total += min(context, size) * per_token
        else:
            total += recurrent_state_bytes(config, itemsize)
    return total


def kv_bytes_per_token(config: dict, itemsize: int = 2) -> int:
    """What each further token adds: the full-attention layers' keys and values (windows
    and states are bounded). The verdicts before a download scale this by the context."""
    per_token = kv_bytes_per_layer_token(config, itemsize)
    return per_token * sum(kind == "full" for kind, _ in config_kinds(config))
