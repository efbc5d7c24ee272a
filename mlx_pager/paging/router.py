"""The router of an MoE block: its scores, as the paged layer and the prefetcher read them.

mlx-lm's MoE blocks call their router ``gate`` (``router`` in gpt-oss); DeepSeek's
``MoEGate`` returns its choices rather than logits, so its weight is applied directly.
"""

from __future__ import annotations

import mlx.core as mx
import mlx.nn as nn


def router_scores(router: nn.Module, x: mx.array) -> mx.array:
    """Router logits for ``x``; DeepSeek's MoEGate returns choices, so use its weight."""
    if isinstance(router, (nn.Linear, nn.QuantizedLinear)):
        return router(x)
    return x @ router.weight.T


def find_router(moe_block: nn.Module) -> nn.Module | None:
    for name in ("gate", "router"):
        if name in moe_block and isinstance(moe_block[name], nn.Module):
            return moe_block[name]
    return None
