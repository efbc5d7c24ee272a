"""The embedded default model (assets/tiny-moe) is a real, specialised, portable MoE LM.

Held-out token windows and the training-split unigram counts ship in assets/tiny-moe/eval/
(the corpus itself is not in the repository); scripts/train_tiny_moe.py writes them.
"""

import json
import math
import os
from functools import cache
from pathlib import Path

import mlx.core as mx
import mlx.nn as nn
import numpy as np
import pytest
from mlx.utils import tree_map
from script_loader import load_script

ROOT = Path(__file__).resolve().parent.parent
MODEL = ROOT / "assets" / "tiny-moe"
MODEL_4BIT = ROOT / "assets" / "tiny-moe-4bit"
PROMPTS = ROOT / "assets" / "prompts" / "calibration.jsonl"
DOMAINS = ["code", "science", "encyclopedia", "web"]
SEQ = 256  # the training sequence length: evaluate in windows no longer than that
GREEDY_PROMPTS = ["def fibonacci(n):", "The history of the city", "\\begin{equation}"]


@cache
def mlx_model():
    """The bf16 checkpoint through stock mlx_lm.load, cast to float32 (CPU gather_mm)."""
    import mlx_lm

    model, tokenizer = mlx_lm.load(str(MODEL))
    model.update(tree_map(lambda a: a.astype(mx.float32), model.parameters()))
    mx.eval(model.parameters())
    return model, tokenizer


@cache
def heldout_windows() -> dict[str, dict[str, np.ndarray]]:
    """Per domain, "learn" and "measure" windows [n, SEQ] of held-out token ids,
    alternating over the whole held-out slice (many documents, never trained on)."""
    raw = json.loads((MODEL / "eval" / "heldout-windows.json").read_text())
    return {d: {h: np.array(w, dtype=np.int32) for h, w in v.items()} for d, v in raw.items()}


def router_logits(model, tokens: np.ndarray) -> list[np.ndarray]:
    """Per-layer router logits [tokens, experts], from a forward pass over the layers."""
    from mlx_lm.models.base import create_attention_mask

    h = model.model.embed_tokens(mx.array(tokens))
    mask = create_attention_mask(h, None)
    out = []
    layers = model.model.layers
    for i, layer in enumerate(layers):
        h = h + layer.self_attn(layer.input_layernorm(h), mask)
        x = layer.post_attention_layernorm(h)
        out.append(np.array(layer.mlp.gate(x).reshape(-1, model.args.num_experts)))
        if i + 1 < len(layers):  # the last layer's experts do not change any routing
            h = h + layer.mlp(x)
    return out


def expert_counts(model, tokens: np.ndarray, top_k: int) -> np.ndarray:
    """Selection counts [layers, experts] of the top-k routed experts."""
    return np.stack(
        [
            np.bincount(np.argsort(-lg, axis=-1)[:, :top_k].ravel(), minlength=lg.shape[-1])
            for lg in router_logits(model, tokens)
        ]
    )


def greedy_mlx(prompt: str, n: int) -> tuple[list[int], np.ndarray]:
    """n greedy tokens from mlx-lm (float32, full recompute) and their logits [n, vocab]."""
    model, tokenizer = mlx_model()
    ids = tokenizer.encode(prompt, add_special_tokens=False)
    tokens, logits = [], []
    for _ in range(n):
        last = model(mx.array([ids + tokens]))[0, -1]
        logits.append(np.array(last))
        tokens.append(int(mx.argmax(last).item()))
    return tokens, np.stack(logits)


@cache
def transformers_model():
    """The same checkpoint through transformers on PyTorch (CPU, float32)."""
    torch = pytest.importorskip("torch", reason="the cross-check needs torch (crosscheck extra)")
    from transformers import AutoModelForCausalLM, AutoTokenizer

    torch.set_num_threads(2)
    model = AutoModelForCausalLM.from_pretrained(str(MODEL), dtype=torch.float32)
    model.eval()
    return model, AutoTokenizer.from_pretrained(str(MODEL))


def greedy_transformers(prompt: str, n: int) -> tuple[list[int], np.ndarray]:
    """n greedy tokens from transformers (float32, full recompute) and their logits."""
    import torch

    model, tokenizer = transformers_model()
    ids = tokenizer(prompt, add_special_tokens=False).input_ids
    tokens, logits = [], []
    with torch.no_grad():
        for _ in range(n):
            last = model(torch.tensor([ids + tokens])).logits[0, -1].float()
            logits.append(last.numpy())
            tokens.append(int(last.argmax()))
    return tokens, np.stack(logits)


def test_checkpoint_layout_and_size():
    config = json.loads((MODEL / "config.json").read_text())
    assert config["model_type"] == "qwen3_moe"
    assert config["architectures"] == ["Qwen3MoeForCausalLM"]
    assert config["hidden_size"] % 64 == 0 and config["moe_intermediate_size"] % 64 == 0
    assert 32 <= config["num_experts"] <= 64 and 2 <= config["num_experts_per_tok"] <= 4
    assert config["vocab_size"] <= 8192
    header = mx.load(str(MODEL / "model.safetensors"))
    assert "model.layers.0.mlp.experts.0.gate_proj.weight" in header
    assert "model.layers.0.mlp.gate.weight" in header
    assert not any("switch_mlp" in k for k in header)
    assert {v.dtype for v in header.values()} == {mx.bfloat16}
    q = mx.load(str(MODEL_4BIT / "model.safetensors"))
    assert "model.layers.0.mlp.switch_mlp.gate_proj.scales" in q
    assert json.loads((MODEL_4BIT / "config.json").read_text())["quantization"]["bits"] == 4
    size = sum(f.stat().st_size for f in (ROOT / "assets").rglob("*") if f.is_file())
    assert size <= 40e6, f"assets/ is {size / 1e6:.1f} MB"
    tok_config = json.loads((MODEL / "tokenizer_config.json").read_text())
    assert "<|im_start|>" in tok_config["chat_template"]


def test_loads_in_mlx_lm_with_chat_template():
    model, tokenizer = mlx_model()
    text = tokenizer.apply_chat_template(
        [{"role": "user", "content": "Hi"}], add_generation_prompt=True, tokenize=False
    )
    assert text.endswith("<|im_start|>assistant\n")
    assert tokenizer.eos_token_ids >= {tokenizer.convert_tokens_to_ids("<|im_end|>")}
    import mlx_lm

    model4, tok4 = mlx_lm.load(str(MODEL_4BIT))
    logits = model4(mx.array([tok4.encode("def main():")]))
    assert logits.shape[-1] == model.args.vocab_size and not mx.isnan(logits).any()


def test_calibration_prompts():
    rows = [json.loads(line) for line in PROMPTS.read_text().splitlines()]
    for task in ["code", "math", "prose", "chat"]:
        texts = [r["text"] for r in rows if r["task"] == task]
        assert len(texts) >= 60, task
        assert len(set(texts)) == len(texts), task


def test_heldout_perplexity_beats_unigram():
    """A language model: held-out perplexity (~1k tokens a domain, text it never saw) far
    below a unigram's."""
    model, _ = mlx_model()
    counts = np.array(json.loads((MODEL / "eval" / "unigram-counts.json").read_text()))
    probs = (counts + 1.0) / (counts.sum() + len(counts))
    report = {}
    for domain in DOMAINS:
        rows = heldout_windows()[domain]["learn"][:4]  # ~1k tokens: netlib BLAS in CI
        x, y = mx.array(rows[:, :-1]), mx.array(rows[:, 1:])
        loss = nn.losses.cross_entropy(model(x), y, reduction="mean").item()
        uni = float(-np.log(probs[np.array(y).ravel()]).mean())
        report[domain] = (math.exp(loss), math.exp(uni))
    print("held-out perplexity (model, unigram):", report)
    for domain, (ppl, uni) in report.items():  # measured 6x (web) to 28x (encyclopedia)
        assert ppl < uni / 4, (domain, ppl, uni)


SHARED = os.environ.get("MLX_PAGER_SHARED")  # the shared material, where CI lays it
CORPUS = Path(SHARED or "/nonexistent") / "corpus"


def training_split() -> dict[str, tuple[list[str], list[str]]]:
    """The training script's own split of the corpus (train, held-out) per domain."""
    return load_script("train_tiny_moe").split_corpus(CORPUS)


@pytest.mark.skipif(not CORPUS.exists(), reason="set MLX_PAGER_SHARED to the shared folder")
def test_heldout_windows_were_never_trained_on():
    """The corpus holds most documents twice: the evaluation text must be in no training
    document, or perplexity and specialisation would be measured on memorised text."""
    from tokenizers import Tokenizer

    tokenizer = Tokenizer.from_file(str(MODEL / "tokenizer.json"))
    splits = training_split()
    trained = "\n".join(doc for train, _ in splits.values() for doc in train)
    for domain in DOMAINS:
        held = "\n".join(splits[domain][1])
        seen, stretches = 0, 0
        for window in heldout_windows()[domain].values():
            for row in window:
                for piece in tokenizer.decode(row.tolist(), skip_special_tokens=False).split(
                    "<|endoftext|>"
                ):
                    if len(piece) < 120:
                        continue
                    middle = piece[len(piece) // 2 - 40 : len(piece) // 2 + 40]
                    assert middle in held, (domain, middle)  # it is held-out text
                    stretches += 1
                    seen += middle in trained
        # An 80-character stretch may recur by chance (a licence line, LaTeX preamble).
        assert seen <= 0.05 * stretches, (domain, seen, stretches)


@cache
def coverage() -> np.ndarray:
    """[layers, set domain, eval domain]: each domain's top-25% experts per layer (learned
    on its "learn" windows) and the share of each domain's activations on the "measure"
    windows that they cover."""
    model, _ = mlx_model()
    top_k = model.args.num_experts_per_tok
    k = model.args.num_experts // 4
    learn, measure = {}, {}
    for domain in DOMAINS:
        w = heldout_windows()[domain]
        learn[domain] = expert_counts(model, w["learn"], top_k)
        measure[domain] = expert_counts(model, w["measure"], top_k)
    n_layers = learn[DOMAINS[0]].shape[0]
    cov = np.zeros((n_layers, len(DOMAINS), len(DOMAINS)))
    for layer in range(n_layers):
        for i, d in enumerate(DOMAINS):
            top = np.argsort(-learn[d][layer])[:k]
            for j, e in enumerate(DOMAINS):
                cov[layer, i, j] = measure[e][layer, top].sum() / measure[e][layer].sum()
    print("coverage, mean over layers (rows: set domain):\n", np.round(cov.mean(0), 2))
    return cov


def assert_specialised(domain: str):
    cov = coverage()
    i = DOMAINS.index(domain)
    for layer in range(cov.shape[0]):
        others = [cov[layer, i, j] for j in range(len(DOMAINS)) if j != i]
        assert cov[layer, i, i] > max(others), (layer, domain, np.round(cov[layer], 2))


@pytest.mark.parametrize("domain", DOMAINS)
def test_experts_specialise_by_domain(domain):
    """A domain's top-25% experts cover its own held-out routing best, in every layer."""
    assert_specialised(domain)
    # Not flattened by the load-balancing loss: the set covers well above uniform (25%).
    i = DOMAINS.index(domain)
    assert coverage()[:, i, i].mean() > 0.35


def test_transformers_agrees_with_mlx_lm():
    """An independent implementation gives the same greedy tokens and logits."""
    transformers_model()
    worst = 0.0
    for prompt in GREEDY_PROMPTS:
        t_tokens, t_logits = greedy_transformers(prompt, 16)
        m_tokens, m_logits = greedy_mlx(prompt, 16)
        assert t_tokens == m_tokens, prompt
        worst = max(worst, float(np.abs(t_logits - m_logits).max()))
    print(f"max |logit difference| transformers vs mlx-lm: {worst:.2e}")
    assert worst < 1e-3
