"""Do mlx-lm on the MLX checkpoint and llama.cpp on its GGUF compute the same function?

Same token ids into both: next-token top-1 agreement per position, the logits' distance,
and which experts each engine routes the first tokens to in every layer. llama.cpp
quantises activations to 8 bits for Q4_1 products, so near-ties may differ: the result is
a share, not a pass/fail.
"""

from __future__ import annotations

import ctypes
from pathlib import Path

import numpy as np

from .llama_arm import open_llama

_TOPK_PREFIX = b"ffn_moe_topk-"


class _GgmlTensorHead(ctypes.Structure):
    """The leading fields of ggml's struct ggml_tensor (stable across ggml versions)."""

    _fields_ = [
        ("type", ctypes.c_int),
        ("buffer", ctypes.c_void_p),
        ("ne", ctypes.c_int64 * 4),
        ("nb", ctypes.c_size_t * 4),
    ]


def llama_routing(gguf: Path, tokens: list[int], threads: int = 2) -> tuple[np.ndarray, dict]:
    """llama.cpp's logits (tokens x vocab) and top-k expert ids per layer (tokens x k)."""
    import llama_cpp

    lib_dir = Path(llama_cpp.__file__).parent / "lib"
    base = ctypes.CDLL(str(lib_dir / "libggml-base.so"))
    cpu = ctypes.CDLL(str(lib_dir / "libggml-cpu.so"))
    base.ggml_get_name.restype = ctypes.c_char_p
    base.ggml_get_name.argtypes = [ctypes.c_void_p]
    cpu.ggml_get_i32_nd.restype = ctypes.c_int32
    cpu.ggml_get_i32_nd.argtypes = [ctypes.c_void_p] + [ctypes.c_int] * 4
    routed: dict[int, np.ndarray] = {}

    def observe(tensor: int, ask: bool, _user: int) -> bool:
        name = base.ggml_get_name(tensor) or b""
        if not name.startswith(_TOPK_PREFIX):
            return not ask  # ask: "do you want this one?"; otherwise: "continue?"
        if ask:
            return True
        head = _GgmlTensorHead.from_address(tensor)
        k, n = head.ne[0], head.ne[1]
        ids = [[cpu.ggml_get_i32_nd(tensor, i, t, 0, 0) for i in range(k)] for t in range(n)]
        routed[int(name[len(_TOPK_PREFIX) :])] = np.array(ids, dtype=np.int32)
        return True

    callback = llama_cpp.ggml_backend_sched_eval_callback(observe)
    llm = open_llama(
        gguf, n_ctx=len(tokens) + 8, threads=threads, logits_all=True, cb_eval=callback
    )
    llm.eval(tokens)
    logits = np.array(llm.scores[: len(tokens)], dtype=np.float32)
    llm.close()
    return logits, routed


def mlx_routing(
    model_dir: Path, tokens: list[int], float32: bool = False
) -> tuple[np.ndarray, dict]:
    """Stock mlx-lm's logits and the expert ids each layer's SwitchGLU was handed.

    ``float32`` computes in float32 rather than the checkpoint's dtype (bfloat16 for
    mlx-community): scales cast exactly, so only the activations' precision changes."""
    import mlx.core as mx
    import mlx.nn as nn
    from mlx_lm import load

    model, _ = load(str(model_dir))
    if float32:
        model.set_dtype(mx.float32)
    routed: dict[int, np.ndarray] = {}

    class Capture(nn.Module):
        def __init__(self, inner: nn.Module, layer: int) -> None:
            super().__init__()
            self.inner, self.layer = inner, layer

        def __call__(self, x: mx.array, indices: mx.array) -> mx.array:
            routed[self.layer] = np.array(indices.reshape(-1, indices.shape[-1]))
            return self.inner(x, indices)

    for i, layer in enumerate(model.layers):
        layer.mlp.switch_mlp = Capture(layer.mlp.switch_mlp, i)
    logits = model(mx.array([tokens]))[0].astype(mx.float32)
    return np.array(logits), routed


def routing_agreement(
    model_dir: Path, gguf: Path, tokens: list[int], *, first: int = 8, mlx_float32: bool = False
) -> dict:
    """Both engines on ``tokens``: top-1 agreement, logits distance, expert agreement.

    Experts are compared on the first ``first`` tokens of every layer, as sets (the order
    of the top-k is engine-specific). llama.cpp computes in float32 (8-bit activations in
    Q4_1 products); ``mlx_float32`` lifts mlx-lm from bfloat16 to match."""
    ref, ref_routes = mlx_routing(Path(model_dir), tokens, mlx_float32)
    got, got_routes = llama_routing(Path(gguf), tokens)
    top1 = ref.argmax(-1) == got.argmax(-1)
    same_sets, overlap, total = 0, 0, 0
    for layer, ref_ids in ref_routes.items():
        got_ids = got_routes.get(layer)
        if got_ids is None:
            continue
        for t in range(min(first, len(tokens))):
            a, b = set(ref_ids[t].tolist()), set(got_ids[t].tolist())
            same_sets += a == b
            overlap += len(a & b)
            total += len(a)
    pairs = len(ref_routes) * min(first, len(tokens)) if got_routes else 0
    return {
        "positions": len(tokens),
        "top1_agreement": float(top1.mean()),
        "top1_per_position": top1.tolist(),
        "logits_max_abs_diff": float(np.abs(ref - got).max()),
        "logits_correlation": float(np.corrcoef(ref.ravel(), got.ravel())[0, 1]),
        "layers_routed": {"mlx": len(ref_routes), "llama_cpp": len(got_routes)},
        "expert_set_agreement": same_sets / pairs if pairs else None,
        "expert_slot_agreement": overlap / total if total else None,
    }


def expert_agreement(ours: dict[int, np.ndarray], theirs: dict[int, np.ndarray], first: int):
    """Share of (layer, token) pairs among the first ``first`` tokens whose expert sets are
    equal, and share of experts in common: both engines' routing of the same tokens."""
    same, common, total, pairs = 0, 0, 0, 0
    for layer, a_ids in ours.items():
        b_ids = theirs.get(layer)
        if b_ids is None:
            continue
        for t in range(min(first, len(a_ids), len(b_ids))):
            a, b = set(np.asarray(a_ids[t]).tolist()), set(np.asarray(b_ids[t]).tolist())
            same += a == b
            common += len(a & b)
            total += len(a)
            pairs += 1
    return {
        "tokens_compared": first,
        "layers_compared": len(set(ours) & set(theirs)),
        "expert_set_agreement": same / pairs if pairs else None,
        "expert_slot_agreement": common / total if total else None,
    }


def main(argv: list[str] | None = None) -> int:
    """``python -m mlx_pager.benchmark.gguf_agreement GGUF TOKENS_JSON FIRST``: llama.cpp's
    routing of the first tokens and its greedy next token at each, as one JSON line (run in
    a process of its own, as the harness's arms are)."""
    import json
    import sys

    gguf, tokens_file, first = (argv if argv is not None else sys.argv[1:])[:3]
    tokens = [int(t) for t in json.loads(Path(tokens_file).read_text())][: int(first)]
    logits, routed = llama_routing(Path(gguf), tokens)
    out = {
        "routed": {str(layer): ids.tolist() for layer, ids in routed.items()},
        "top1": logits.argmax(-1).tolist(),
    }
    print(json.dumps(out), flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
