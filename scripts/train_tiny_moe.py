"""Train mlx-pager's embedded default model: a tiny Qwen3-MoE language model.

End to end on a CPU-only machine (the training budget plus a few minutes):

    nice -n 5 .venv/bin/python scripts/train_tiny_moe.py --minutes 45

The Linux ``mlx[cpu]`` wheel links the reference (netlib) BLAS, about 45x slower at
float32 matmul than an optimised one; preload MKL from PyPI for the run:

    .venv/bin/pip download --no-deps -d /tmp/mkl mkl && unzip -q /tmp/mkl/mkl-*.whl -d /tmp/mkl
    export MKL_THREADING_LAYER=SEQUENTIAL OMP_NUM_THREADS=1
    export LD_PRELOAD=$(ls /tmp/mkl/mkl-*.data/data/lib/libmkl_rt.so.*)
    export LD_LIBRARY_PATH=$(dirname $LD_PRELOAD)

(SEQUENTIAL: on cores shared with other jobs, threaded BLAS spin-waits and runs slower.)
The cosine schedule follows the wall-time budget (``--minutes``) unless ``--steps`` is
given; ``kill -USR1`` stops training early and still evaluates and exports.

1. splits the corpus folder (--corpus: code, science, encyclopedia, web) into a training split
   and a held-out slice (the last 10% of the distinct documents of each file, never trained on),
2. trains a byte-level BPE tokenizer (4096 tokens) on the training split,
3. trains mlx-lm's own ``qwen3_moe`` model class in float32 with AdamW, warmup + cosine
   and the Switch/Qwen load-balancing loss on the routers,
4. exports a Hugging Face checkpoint (bfloat16, per-expert layout) to assets/tiny-moe,
   the MLX 4-bit variant (mlx_lm.convert) to assets/tiny-moe-4bit, a small held-out
   evaluation slice plus unigram counts for the tests, the calibration prompts, and the
   model card with held-out perplexities and the expert coverage matrix.
"""

import argparse
import json
import math
import random
import re
import shutil
import signal
import textwrap
import time
from functools import partial
from pathlib import Path

import mlx.core as mx
import mlx.nn as nn
import mlx.optimizers as optim
import numpy as np
from mlx.utils import tree_flatten
from mlx_lm.models import qwen3_moe

ROOT = Path(__file__).resolve().parent.parent
DOMAINS = ["code", "science", "encyclopedia", "web"]
SPECIAL_TOKENS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
HELDOUT_FRACTION = 0.10
CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)


def model_config(vocab_size: int) -> dict:
    """The HF config: every Qwen3-MoE field, so both mlx-lm and transformers load it."""
    return {
        "architectures": ["Qwen3MoeForCausalLM"],
        "model_type": "qwen3_moe",
        "vocab_size": vocab_size,
        "hidden_size": 256,
        "intermediate_size": 768,
        "num_hidden_layers": 6,
        "num_attention_heads": 4,
        "num_key_value_heads": 2,
        "head_dim": 64,
        "hidden_act": "silu",
        "max_position_embeddings": 2048,
        "initializer_range": 0.02,
        "rms_norm_eps": 1e-6,
        "use_cache": True,
        "tie_word_embeddings": True,
        "rope_theta": 10000.0,
        "rope_scaling": None,
        "attention_bias": False,
        "attention_dropout": 0.0,
        "use_sliding_window": False,
        "sliding_window": None,
        "max_window_layers": 6,
        "decoder_sparse_step": 1,
        "mlp_only_layers": [],
        "moe_intermediate_size": 64,
        "num_experts": 32,
        "num_experts_per_tok": 4,
        "norm_topk_prob": True,
        "output_router_logits": False,
        "router_aux_loss_coef": 0.01,
        "bos_token_id": 0,
        "eos_token_id": 0,
        "pad_token_id": 0,
        "torch_dtype": "bfloat16",
        "dtype": "bfloat16",
    }


def read_documents(path: Path) -> list[str]:
    """Documents are separated by blank lines; a file without any has one per line."""
    text = path.read_text(encoding="utf-8")
    sep = "\n\n" if "\n\n" in text else "\n"
    return [d.strip("\n") for d in text.split(sep) if d.strip()]


def split_corpus(corpus: Path) -> dict[str, tuple[list[str], list[str]]]:
    """(train, held-out) documents per domain; held-out = the last 10% of each file's
    distinct documents.

    Each corpus file holds most of its documents twice (the second copy far from the
    first), so duplicates go first: split as they stand, nearly every held-out document
    would also be in the training split. A document is dropped from training if it is a
    held-out one or contains one.
    """
    splits = {}
    for domain in DOMAINS:
        docs = list(dict.fromkeys(read_documents(corpus / f"{domain}.txt")))
        n_held = max(1, int(len(docs) * HELDOUT_FRACTION))
        held = docs[-n_held:]
        train = [d for d in docs[:-n_held] if not any(h in d for h in held)]
        splits[domain] = (train, held)
    return splits


def train_tokenizer(texts: list[str], vocab_size: int, out_dir: Path):
    """Byte-level BPE (GPT-2 style) with the ChatML special tokens."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.post_processor = processors.ByteLevel(trim_offsets=False)
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=SPECIAL_TOKENS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        min_frequency=2,
    )
    tok.train_from_iterator(texts, trainer=trainer)
    out_dir.mkdir(parents=True, exist_ok=True)
    tok.save(str(out_dir / "tokenizer.json"))
    tok_config = {
        "tokenizer_class": "PreTrainedTokenizerFast",
        "model_max_length": 2048,
        "bos_token": None,
        "eos_token": "<|im_end|>",
        "pad_token": "<|endoftext|>",
        "unk_token": None,
        "add_bos_token": False,
        "add_eos_token": False,
        "clean_up_tokenization_spaces": False,
        "added_tokens_decoder": {
            str(tok.token_to_id(t)): {
                "content": t,
                "lstrip": False,
                "normalized": False,
                "rstrip": False,
                "single_word": False,
                "special": True,
            }
            for t in SPECIAL_TOKENS
        },
        "additional_special_tokens": ["<|im_start|>", "<|im_end|>"],
        "chat_template": CHAT_TEMPLATE,
    }
    (out_dir / "tokenizer_config.json").write_text(json.dumps(tok_config, indent=2) + "\n")
    special_map = {
        "eos_token": "<|im_end|>",
        "pad_token": "<|endoftext|>",
        "additional_special_tokens": ["<|im_start|>", "<|im_end|>"],
    }
    (out_dir / "special_tokens_map.json").write_text(json.dumps(special_map, indent=2) + "\n")
    return tok


def encode_docs(tok, docs: list[str]) -> np.ndarray:
    """One token stream: every document starts with <|endoftext|> (id 0)."""
    ids = []
    for enc in tok.encode_batch(docs):
        ids.append(0)
        ids.extend(enc.ids)
    return np.array(ids, dtype=np.int32)


def as_chat(doc: str, short: bool = False, max_prompt_chars: int = 300) -> str:
    """A document as one ChatML turn: its opening as the user's message, the rest as the
    reply, ended by <|im_end|>.

    mlx-pager applies the chat template by default; trained on raw text only, the model
    would meet <|im_start|> and <|im_end|> first at inference (untrained embeddings) and
    never learn to end a reply. ``short``: the opening is the first line or sentence, as
    people type prompts ("def fibonacci(n):"); else up to a third of the document. The
    reply starts at its first non-blank character: the template's generation prompt ends
    in a bare newline token, and a reply that began with spaces would merge them into that
    newline in training, a token the model would then never see at inference.
    """
    cut = max(1, min(max_prompt_chars, len(doc) // 3))
    ends = [doc.find("\n"), doc.find(". ") + 1] if short else []
    ends = [i for i in ends if 0 < i <= 200]
    # The first line or sentence; else the last line or sentence break before the cut;
    # else the first word break after it.
    stop = min(ends) if ends else max(doc.rfind("\n", 0, cut), doc.rfind(". ", 0, cut) + 1)
    if stop <= 0:
        stop = doc.find(" ", cut)
    prompt, reply = doc[: max(stop, 0)].strip(), doc[max(stop, 0) :].lstrip()
    if stop <= 0 or not (prompt and reply):
        return doc  # too short to split
    return f"<|im_start|>user\n{prompt}<|im_end|>\n<|im_start|>assistant\n{reply}<|im_end|>\n"


def chat_share(docs: list[str], share: float, seed: int) -> list[str]:
    """``share`` of the documents (drawn with ``seed``) rewritten as chat turns, half of
    them with a one-line prompt."""
    rng = random.Random(seed)
    return [as_chat(d, short=rng.random() < 0.5) if rng.random() < share else d for d in docs]


class RecordingGate(nn.Linear):
    """The router Linear, unchanged in name and weights, that also keeps its logits.

    The load-balancing loss needs the router logits of every layer; recording them here
    leaves mlx-lm's module tree (and so the saved parameter names) exactly as it is.
    """

    records: list = []

    def __call__(self, x: mx.array) -> mx.array:
        logits = super().__call__(x)
        RecordingGate.records.append(logits)
        return logits


def build_model(config: dict) -> qwen3_moe.Model:
    """mlx-lm's Qwen3-MoE, float32, with recording routers (names and shapes unchanged)."""
    args = qwen3_moe.ModelArgs.from_dict(config)
    model = qwen3_moe.Model(args)
    for layer in model.model.layers:
        gate = RecordingGate(args.hidden_size, args.num_experts, bias=False)
        gate.weight = layer.mlp.gate.weight
        layer.mlp.gate = gate
    return model


def load_balancing_loss(logits: mx.array, top_k: int) -> mx.array:
    """Switch/Qwen aux loss: E * sum_i f_i * P_i (1.0 when routing is uniform)."""
    num_experts = logits.shape[-1]
    logits = logits.reshape(-1, num_experts)
    probs = mx.softmax(logits, axis=-1, precise=True)
    inds = mx.stop_gradient(mx.argpartition(-logits, kth=top_k - 1, axis=-1)[:, :top_k])
    counts = mx.zeros((num_experts,)).at[inds.reshape(-1)].add(1.0)
    f = counts / (logits.shape[0] * top_k)
    p = probs.mean(axis=0)
    return num_experts * mx.sum(f * p)


def loss_fn(model, inputs, targets, top_k: int, aux_coef: float):
    RecordingGate.records.clear()
    logits = model(inputs)
    ce = nn.losses.cross_entropy(logits, targets, reduction="mean")
    aux = sum(load_balancing_loss(r, top_k) for r in RecordingGate.records)
    aux = aux / max(1, len(RecordingGate.records))
    RecordingGate.records.clear()
    return ce + aux_coef * aux, (ce, aux)


def sample_batch(streams: list[np.ndarray], batch: int, seq: int, rng: np.random.Generator):
    """Windows of seq+1 tokens, each from one domain, domains drawn uniformly."""
    rows = []
    for _ in range(batch):
        s = streams[rng.integers(len(streams))]
        start = rng.integers(0, len(s) - seq - 1)
        rows.append(s[start : start + seq + 1])
    arr = mx.array(np.stack(rows))
    return arr[:, :-1], arr[:, 1:]


def lr_schedule(step: int, progress: float, peak: float, warmup: int) -> float:
    """Linear warmup over the first steps, then cosine (over progress 0..1) to 10%."""
    if step < warmup:
        return peak * (step + 1) / warmup
    t = min(1.0, max(0.0, progress))
    return peak * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * t)))


def evaluate_loss(model, stream: np.ndarray, seq: int, max_tokens: int) -> float:
    """Mean next-token loss over up to max_tokens of a stream, in seq-long windows."""
    stream = stream[: max_tokens + 1]
    total, count = 0.0, 0
    for start in range(0, len(stream) - 1, seq):
        chunk = stream[start : start + seq + 1]
        if len(chunk) < 2:
            break
        x = mx.array(chunk[None, :-1])
        y = mx.array(chunk[None, 1:])
        loss = nn.losses.cross_entropy(model(x), y, reduction="sum")
        total += loss.item()
        count += y.size
    return total / count


def unigram_loss(counts: np.ndarray, stream: np.ndarray) -> float:
    """Add-one smoothed unigram cross-entropy (nats/token) of the next tokens."""
    probs = (counts + 1.0) / (counts.sum() + len(counts))
    return float(-np.log(probs[stream[1:]]).mean())


def routing_counts(model, stream: np.ndarray, seq: int, top_k: int) -> np.ndarray:
    """Expert selection counts [layers, experts] over a stream, from the router logits."""
    counts = None
    for start in range(0, len(stream), seq):
        chunk = stream[start : start + seq]
        RecordingGate.records.clear()
        model(mx.array(chunk[None]))
        layer_counts = []
        for logits in RecordingGate.records:
            logits = np.array(logits.reshape(-1, logits.shape[-1]))
            top = np.argsort(-logits, axis=-1)[:, :top_k]
            layer_counts.append(np.bincount(top.reshape(-1), minlength=logits.shape[-1]))
        c = np.stack(layer_counts)
        counts = c if counts is None else counts + c
    RecordingGate.records.clear()
    return counts


def spread_windows(stream: np.ndarray, n: int, seq: int) -> np.ndarray:
    """n windows of seq tokens evenly spaced over a stream: many documents, not one."""
    starts = np.linspace(0, len(stream) - seq, n).astype(int)
    return np.stack([stream[i : i + seq] for i in starts])


def eval_windows(held: dict[str, np.ndarray], seq: int, n: int = 16) -> dict:
    """Per domain, 2n windows spread over its whole held-out slice, alternately "learn"
    (where the coverage test finds a domain's top experts) and "measure" (where it checks
    them). Alternating, not first half / second half: the held-out slices run in corpus
    order (code: Go, then PHP, then JavaScript), so halves would measure how well one
    project's experts transfer to another's, not whether a domain has its experts."""
    out = {}
    for d, s in held.items():
        if len(s) < 2 * n * seq:
            raise SystemExit(f"held-out {d} has {len(s)} tokens: {2 * n} windows of {seq} "
                             "would overlap; hold out more (HELDOUT_FRACTION)")  # fmt: skip
        windows = spread_windows(s, 2 * n, seq)
        out[d] = {"learn": windows[0::2], "measure": windows[1::2]}
    return out


def coverage_matrix(model, windows: dict, seq: int, top_k: int, frac=0.25):
    """[layers, set domain, eval domain]: share of eval activations the set covers.

    Each domain's set is its top-25% most selected experts per layer on its "learn"
    windows; coverage is measured on every domain's "measure" windows.
    """
    first = {
        d: routing_counts(model, w["learn"].reshape(-1), seq, top_k) for d, w in windows.items()
    }
    second = {
        d: routing_counts(model, w["measure"].reshape(-1), seq, top_k) for d, w in windows.items()
    }
    n_layers, n_experts = first[DOMAINS[0]].shape
    k = int(n_experts * frac)
    cov = np.zeros((n_layers, len(windows), len(windows)))
    for i, d in enumerate(windows):
        for layer in range(n_layers):
            top = np.argsort(-first[d][layer])[:k]
            for j, e in enumerate(windows):
                cov[layer, i, j] = second[e][layer, top].sum() / second[e][layer].sum()
    return cov


def hf_weights(model, dtype=mx.bfloat16) -> dict[str, mx.array]:
    """mlx-lm parameters in the original HF per-expert layout (switch_mlp unstacked)."""
    out = {}
    for name, w in tree_flatten(model.parameters()):
        if ".switch_mlp." in name:
            prefix, proj = name.split(".switch_mlp.")
            proj = proj.removesuffix(".weight")
            for e in range(w.shape[0]):
                out[f"{prefix}.experts.{e}.{proj}.weight"] = w[e].astype(dtype)
        else:
            out[name] = w.astype(dtype)
    return out


def export(model, config: dict, tok_dir: Path, out_dir: Path, out_4bit: Path):
    """HF checkpoint (bf16, per-expert) plus the MLX 4-bit variant via mlx_lm.convert."""
    out_dir.mkdir(parents=True, exist_ok=True)
    weights = hf_weights(model)
    mx.save_safetensors(str(out_dir / "model.safetensors"), weights, metadata={"format": "pt"})
    (out_dir / "config.json").write_text(json.dumps(config, indent=2) + "\n")
    gen = {
        "bos_token_id": 0,
        "eos_token_id": [2, 0],
        "pad_token_id": 0,
        "do_sample": False,
    }
    (out_dir / "generation_config.json").write_text(json.dumps(gen, indent=2) + "\n")
    if tok_dir != out_dir:
        for f in ["tokenizer.json", "tokenizer_config.json", "special_tokens_map.json"]:
            shutil.copy(tok_dir / f, out_dir / f)
    from mlx_lm import convert

    if out_4bit.exists():
        shutil.rmtree(out_4bit)
    convert(str(out_dir), str(out_4bit), quantize=True, q_bits=4, q_group_size=64)


def code_prompts(docs: list[str], n: int, rng: random.Random) -> list[str]:
    """Code blocks of a few lines that look like code (brackets, keywords, indents)."""
    keep = []
    for d in docs:
        lines = d.splitlines()
        if 3 <= len(lines) <= 25 and 80 <= len(d) <= 700:
            if re.search(r"[(){};=]|def |class |import |#include|function", d):
                keep.append(textwrap.dedent(d))
    return rng.sample(keep, n)


def prose_prompts(docs: list[str], n: int, rng: random.Random) -> list[str]:
    """A few sentences of plain prose (no digits-heavy or markup-heavy paragraphs)."""
    keep = []
    for d in docs:
        d = " ".join(d.split())
        if 150 <= len(d) and not re.search(r"[{}\\$<>|=]", d):
            sentences = re.split(r"(?<=[.!?]) ", d)
            text = " ".join(sentences[:3])
            if 120 <= len(text) <= 600:
                keep.append(text)
    return rng.sample(keep, n)


def math_prompts_from_latex(docs: list[str], n: int, rng: random.Random) -> list[str]:
    """Display equations from the arXiv sources, as short LaTeX math prompts."""
    pat = re.compile(r"\\begin\{(equation|align)\*?\}(.*?)\\end\{\1\*?\}", re.S)
    keep = []
    for d in docs:
        for m in pat.finditer(d):
            body = re.sub(r"\\(label|nonumber|notag)(\{[^{}]*\})?", " ", m.group(2))
            body = " ".join(body.split())
            if 30 <= len(body) <= 300 and "=" in body:
                keep.append(body)
    return rng.sample(keep, n)


def write_prompts(splits, out: Path, n: int = 80, seed: int = 0):
    """calibration.jsonl: corpus-derived code/prose/math plus the written math/chat ones."""
    rng = random.Random(seed)
    written = [json.loads(line) for line in (out / "written.jsonl").read_text().splitlines()]
    rows = [{"task": "code", "text": t} for t in code_prompts(splits["code"][0], n, rng)]
    prose_docs = splits["encyclopedia"][0] + splits["web"][0]
    rows += [{"task": "prose", "text": t} for t in prose_prompts(prose_docs, n, rng)]
    written_math = [r for r in written if r["task"] == "math"]
    n_latex = max(0, n - len(written_math))
    latex = math_prompts_from_latex(splits["science"][0], n_latex, rng)
    rows += written_math + [{"task": "math", "text": t} for t in latex]
    rows += [r for r in written if r["task"] == "chat"]
    with open(out / "calibration.jsonl", "w") as f:
        for r in rows:
            f.write(json.dumps(r, ensure_ascii=False) + "\n")


def crosscheck_transformers(out_dir: Path, prompts: list[str], n: int = 16) -> dict | None:
    """Greedy tokens and logits of mlx-lm vs transformers (both float32) on the export."""
    try:
        import torch
        from transformers import AutoModelForCausalLM
    except ImportError:
        return None
    import mlx_lm
    from mlx.utils import tree_map

    model, tokenizer = mlx_lm.load(str(out_dir))
    model.update(tree_map(lambda a: a.astype(mx.float32), model.parameters()))
    hf = AutoModelForCausalLM.from_pretrained(str(out_dir), dtype=torch.float32).eval()
    return greedy_agreement(model, tokenizer, hf, prompts, n)


def greedy_agreement(model, tokenizer, hf, prompts: list[str], n: int) -> dict:
    """mlx-lm and transformers fed the same greedy continuations: how many prompts agree
    token for token over ``n`` steps, and the largest logit difference seen."""
    import mlx.core as mx
    import torch

    worst, agree = 0.0, 0
    for prompt in prompts:
        ids = tokenizer.encode(prompt, add_special_tokens=False)
        m_tok, t_tok = [], []
        for _ in range(n):
            m_last = np.array(model(mx.array([ids + m_tok]))[0, -1])
            with torch.no_grad():
                t_last = hf(torch.tensor([ids + m_tok])).logits[0, -1].float().numpy()
            worst = max(worst, float(np.abs(m_last - t_last).max()))
            m_tok.append(int(m_last.argmax()))
            t_tok.append(int(t_last.argmax()))
        agree += int(m_tok == t_tok)
    return {"prompts": len(prompts), "tokens": n, "agree": agree, "max_logit_diff": worst}


def model_card(out_dir: Path, info: dict):
    """README.md with the numbers of this run."""
    c = info["config"]
    dom = DOMAINS
    ppl_rows = "\n".join(
        f"| {d} | {info['heldout_tokens'][d]:,} | {math.exp(info['heldout_loss'][d]):.1f} "
        f"| {math.exp(info['unigram_loss'][d]):.1f} |"
        for d in dom
    )
    cov = np.array(info["coverage"])
    n_win = info["coverage_windows"]
    mean = cov.mean(axis=0)
    cov_rows = "\n".join(
        f"| {d} | " + " | ".join(f"{mean[i, j]:.2f}" for j in range(len(dom))) + " |"
        for i, d in enumerate(dom)
    )
    per_layer = "\n".join(
        f"| {layer} | "
        + " | ".join(f"{cov[layer, i, i]:.2f}" for i in range(len(dom)))
        + " | "
        + " | ".join(
            f"{max(cov[layer, i, j] for j in range(len(dom)) if j != i):.2f}"
            for i in range(len(dom))
        )
        + " |"
        for layer in range(cov.shape[0])
    )
    weak = [
        d
        for i, d in enumerate(dom)
        if any(
            cov[layer, i, i] <= max(cov[layer, i, j] for j in range(len(dom)) if j != i)
            for layer in range(cov.shape[0])
        )
    ]
    if weak:
        verdict = (
            f"Not yet specialised in every layer: {', '.join(weak)} (its set covers another "
            "domain as well or better in some layer; a longer run should help)."
        )
    else:
        verdict = "Every domain's set covers its own domain best, in every layer."
    cc = info.get("crosscheck")
    if cc:
        crosscheck = (
            f"The same bf16 checkpoint loaded by mlx-lm and by transformers (PyTorch, CPU), both "
            f"cast to float32: {cc['agree']} of {cc['prompts']} prompts give identical greedy "
            f"continuations of {cc['tokens']} tokens; the largest logit difference over all "
            f"steps is {cc['max_logit_diff']:.1e} (`tests/test_embedded_model.py` checks it)."
        )
    else:
        crosscheck = "Not run (torch not installed); `tests/test_embedded_model.py` checks it."
    text = f"""---
license: apache-2.0
library_name: mlx
tags: [mlx, moe, qwen3_moe]
---

# tiny-moe: mlx-pager's embedded default model

A small mixture-of-experts language model trained from scratch for mlx-pager, so that
`mlx-pager generate` works offline and expert paging is visible on a laptop. It is a
real language model of its training text, not a chat assistant: expect fluent-looking
code, LaTeX and encyclopedia/web prose, not answers. {info["chat_share"]:.0%} of its training
documents were written as one ChatML turn (the opening lines as the user's message, the
rest as the reply), so the chat template's tokens are trained and a reply ends with
`<|im_end|>`.

## Architecture

mlx-lm's `qwen3_moe` model class (transformers `Qwen3MoeForCausalLM`), every layer MoE:

| field | value |
| --- | --- |
| layers | {c["num_hidden_layers"]} |
| hidden size | {c["hidden_size"]} |
| attention heads / kv heads | {c["num_attention_heads"]} / {c["num_key_value_heads"]} |
| head dim | {c["head_dim"]} |
| routed experts per layer | {c["num_experts"]} |
| experts per token | {c["num_experts_per_tok"]} (normalised top-k) |
| expert (moe) intermediate size | {c["moe_intermediate_size"]} |
| vocabulary | {c["vocab_size"]} (byte-level BPE, `tokenizers`) |
| tied embeddings | {c["tie_word_embeddings"]} |
| parameters | {info["params"]:,} total, {info["active_params"]:,} active per token |

Files: `assets/tiny-moe/` is the Hugging Face checkpoint (bfloat16, original per-expert
layout `model.layers.L.mlp.experts.E.{{gate,up,down}}_proj.weight`, router
`model.layers.L.mlp.gate.weight`; {info["size_mb"]:.1f} MB). `assets/tiny-moe-4bit/` is the
MLX 4-bit variant made with `mlx_lm.convert(quantize=True, q_bits=4, q_group_size=64)`
(stacked `switch_mlp` layout, routers at 8 bits as mlx-lm does; {info["size_4bit_mb"]:.1f} MB).
The tokenizer has the special tokens `<|endoftext|>` (0, document separator and bos),
`<|im_start|>` (1) and `<|im_end|>` (2), and a ChatML chat template.

## Data

The four domain samples of the project's shared corpus (the inputs of OLMoE's routing
analysis: The Stack code, arXiv LaTeX, Wikipedia, C4 web). Documents are separated by
blank lines (one per line in `web.txt`); duplicate documents are dropped (each file holds most
of its documents twice), then the last 10% of the distinct documents of each file are
held out and never trained on (also not used for the tokenizer). `eval/` holds, per
domain, {n_win} "learn" and {n_win} "measure" windows of {info["seq"]} held-out tokens, alternating
over the whole held-out slice (token ids), and the training-split unigram counts, for the
tests.

## Training

{info["steps"]} steps of {info["batch"]} x {info["seq"]} tokens ({info["tokens_seen"] / 1e6:.1f}M
tokens, domains sampled uniformly, {info["chat_share"]:.0%} of the documents as chat turns),
AdamW (lr {info["lr"]}, weight decay 0.1, betas 0.9/0.95),
{info["warmup"]} warmup steps then cosine to 10%, gradient clipping 1.0, float32, plus the
Switch/Qwen load-balancing loss `E * sum_i f_i P_i` per layer with coefficient
{info["aux_coef"]}. Wall time {info["train_minutes"]:.0f} minutes on 2 shared x86-64 CPU cores
(MLX CPU). Final train loss {info["final_train_loss"]:.3f} (smoothed), final aux loss
{info["final_aux"]:.3f} (1.0 = perfectly balanced).

```sh
# MLX's Linux CPU wheel links the reference BLAS; the run preloads MKL from PyPI (see the
# script's docstring), about 45x faster float32 matmul.
nice -n 5 .venv/bin/python scripts/train_tiny_moe.py --minutes {info["minutes_arg"]:g} \\
    --batch {info["batch"]} --warmup {info["warmup"]} --eval-max-tokens {info["eval_max_tokens"]}
# The cosine follows the wall time; `--steps {info["steps"]}` runs a step schedule of the
# same length on any machine.
```

## Held-out perplexity

Full held-out slice (first {info["eval_max_tokens"]:,} tokens per domain at most), MLX float32,
against an add-one smoothed unigram model fitted on the training split:

| domain | tokens | tiny-moe | unigram |
| --- | --- | --- | --- |
{ppl_rows}

## Expert specialisation

For each layer, each domain's top-25% set (the experts it selects most on its "learn"
windows, {n_win * info["seq"]:,} held-out tokens) and the share of each domain's activations on
its "measure" windows (another {n_win * info["seq"]:,} tokens, interleaved with the first) that
the set covers. The windows alternate rather than split the slice in halves: the held-out
code runs in corpus order (Go, then PHP, then JavaScript), so halves would test whether
one project's experts transfer to another's.
Averaged over the {cov.shape[0]} layers (rows: the set's domain, columns: the evaluated
domain):

| set \\ eval | {" | ".join(dom)} |
| --- | {" | ".join("---" for _ in dom)} |
{cov_rows}

Per layer, own-domain coverage and the best other domain:

| layer | {" | ".join(d + " (own)" for d in dom)} | {" | ".join(d + " (best other)" for d in dom)} |
| --- | {" | ".join("---" for _ in dom)} | {" | ".join("---" for _ in dom)} |
{per_layer}

{verdict}

For comparison, OLMoE-1B-7B (64 experts, top-8): a code set covers 0.60 of code and 0.11
of books; a uniform router gives 0.25 everywhere.

## Cross-check with transformers

{crosscheck}

## Using it

```python
import mlx_lm
model, tokenizer = mlx_lm.load("assets/tiny-moe")        # bfloat16 as stored
model, tokenizer = mlx_lm.load("assets/tiny-moe-4bit")   # MLX 4-bit
```

On Linux (MLX CPU) the expert matmul (`gather_mm`) supports only float32: cast the bf16
checkpoint after loading (`model.update(tree_map(lambda a: a.astype(mx.float32),
model.parameters()))`). The 4-bit variant runs as is. In transformers:
`AutoModelForCausalLM.from_pretrained("assets/tiny-moe")` and `AutoTokenizer`.
"""
    (out_dir / "README.md").write_text(text)


def train_model(model, config: dict, train: dict[str, np.ndarray], args) -> dict:
    """The training loop; returns the run's statistics for the model card."""
    rng = np.random.default_rng(args.seed)
    opt = optim.AdamW(learning_rate=args.lr, betas=[0.9, 0.95], weight_decay=0.1)
    state = [model.state, opt.state]
    top_k = config["num_experts_per_tok"]

    @partial(mx.compile, inputs=state, outputs=state)
    def step(x, y, lr):
        opt.learning_rate = lr
        vg = nn.value_and_grad(model, partial(loss_fn, top_k=top_k, aux_coef=args.aux_coef))
        (loss, (ce, aux)), grads = vg(model, x, y)
        grads, _ = optim.clip_grad_norm(grads, 1.0)
        opt.update(model, grads)
        return loss, ce, aux

    streams = [train[d] for d in DOMAINS]
    budget = args.minutes * 60
    stop = []
    # SIGUSR1 ends training early but still saves, evaluates and exports.
    signal.signal(signal.SIGUSR1, lambda *_: stop.append(True))
    t_train = time.time()
    s = 0
    ce_avg, aux_avg = None, None
    while True:
        # A fixed --steps gives a step-based schedule; otherwise the cosine runs over the
        # wall-time budget, so a machine shared with other jobs still ends annealed on time.
        elapsed = time.time() - t_train
        if args.steps is not None:
            progress = s / args.steps
        else:
            progress = elapsed / budget
        if progress >= 1.0 or stop:
            break
        x, y = sample_batch(streams, args.batch, args.seq, rng)
        lr = lr_schedule(s, progress, args.lr, args.warmup)
        loss, ce, aux = step(x, y, mx.array(lr, dtype=mx.float32))
        mx.eval(state, loss, ce, aux)
        ce_v, aux_v = ce.item(), aux.item()
        ce_avg = ce_v if ce_avg is None else 0.95 * ce_avg + 0.05 * ce_v
        aux_avg = aux_v if aux_avg is None else 0.95 * aux_avg + 0.05 * aux_v
        s += 1
        if s % 25 == 0:
            el = time.time() - t_train
            tps = s * args.batch * args.seq / el
            print(
                f"step {s} ({progress:.0%}) ce {ce_avg:.3f} aux {aux_avg:.3f} lr {lr:.2e} "
                f"{tps:,.0f} tok/s {el / 60:.1f} min",
                flush=True,
            )
    return {
        "steps": s,
        "batch": args.batch,
        "seq": args.seq,
        "tokens_seen": s * args.batch * args.seq,
        "lr": args.lr,
        "warmup": args.warmup,
        "aux_coef": args.aux_coef,
        "train_minutes": (time.time() - t_train) / 60,
        "minutes_arg": args.minutes,
        "final_train_loss": ce_avg,
        "final_aux": aux_avg,
    }


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument(
        "--corpus", type=Path, required=True, help="folder of code/science/encyclopedia/web .txt"
    )
    p.add_argument("--out", type=Path, default=ROOT / "assets" / "tiny-moe")
    p.add_argument("--out-4bit", type=Path, default=ROOT / "assets" / "tiny-moe-4bit")
    p.add_argument("--prompts", type=Path, default=ROOT / "assets" / "prompts")
    p.add_argument("--ckpt", type=Path, default=Path("/tmp/tiny-moe-train/weights.safetensors"))
    p.add_argument("--eval-only", action="store_true", help="load --ckpt, skip training")
    p.add_argument("--minutes", type=float, default=45.0, help="training wall-time budget")
    p.add_argument("--steps", type=int, default=None, help="fixed step count (else timed)")
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--seq", type=int, default=256)
    p.add_argument("--lr", type=float, default=2e-3)
    p.add_argument("--warmup", type=int, default=30)
    p.add_argument("--aux-coef", type=float, default=0.01)
    p.add_argument("--vocab", type=int, default=4096)
    p.add_argument("--eval-max-tokens", type=int, default=16384)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--chat-share", type=float, default=0.25,
                   help="share of training documents wrapped as ChatML turns")  # fmt: skip
    args = p.parse_args()

    mx.random.seed(args.seed)
    t0 = time.time()
    splits = split_corpus(args.corpus)
    train_texts = [d for dom in DOMAINS for d in splits[dom][0]]
    tok = train_tokenizer(train_texts, args.vocab, args.out)
    train = {
        d: encode_docs(tok, chat_share(splits[d][0], args.chat_share, args.seed)) for d in DOMAINS
    }
    held = {d: encode_docs(tok, splits[d][1]) for d in DOMAINS}
    for d in DOMAINS:
        print(f"{d}: train {len(train[d]):,} tokens, held-out {len(held[d]):,} tokens")
    print(f"tokenizer + data: {time.time() - t0:.0f}s", flush=True)

    config = model_config(tok.get_vocab_size())
    model = build_model(config)
    n_params = sum(v.size for _, v in tree_flatten(model.parameters()))
    per_expert = 3 * config["hidden_size"] * config["moe_intermediate_size"]
    n_active = n_params - config["num_hidden_layers"] * per_expert * (
        config["num_experts"] - config["num_experts_per_tok"]
    )
    print(f"params {n_params:,}, active {n_active:,}", flush=True)
    stats_path = args.ckpt.with_suffix(".json")
    if args.eval_only:
        model.load_weights(str(args.ckpt))
        stats = json.loads(stats_path.read_text())
    else:
        stats = train_model(model, config, train, args)
        args.ckpt.parent.mkdir(parents=True, exist_ok=True)
        mx.save_safetensors(str(args.ckpt), dict(tree_flatten(model.parameters())))
        stats_path.write_text(json.dumps(stats, indent=2) + "\n")
    top_k = config["num_experts_per_tok"]

    # Evaluate in float32 on the held-out slices, in windows of the training length.
    counts = np.bincount(np.concatenate(list(train.values())), minlength=config["vocab_size"])
    heldout_loss, uni_loss, n_tok = {}, {}, {}
    for d in DOMAINS:
        stream = held[d][: args.eval_max_tokens + 1]
        heldout_loss[d] = evaluate_loss(model, stream, args.seq, args.eval_max_tokens)
        uni_loss[d] = unigram_loss(counts, stream)
        n_tok[d] = len(stream) - 1
        print(
            f"held-out {d}: loss {heldout_loss[d]:.3f} ppl {math.exp(heldout_loss[d]):.1f} "
            f"(unigram {math.exp(uni_loss[d]):.1f})",
            flush=True,
        )
    windows = eval_windows(held, args.seq)
    cov = coverage_matrix(model, windows, args.seq, top_k)
    print("coverage (mean over layers):\n", np.round(cov.mean(0), 2), flush=True)

    # Ship the evaluation windows (token ids) and the unigram counts for the tests.
    eval_dir = args.out / "eval"
    if eval_dir.exists():
        shutil.rmtree(eval_dir)
    eval_dir.mkdir(parents=True)
    ids = {d: {h: w[h].tolist() for h in w} for d, w in windows.items()}
    (eval_dir / "heldout-windows.json").write_text(json.dumps(ids) + "\n")
    (eval_dir / "unigram-counts.json").write_text(json.dumps(counts.tolist()) + "\n")

    export(model, config, args.out, args.out, args.out_4bit)
    write_prompts(splits, args.prompts, seed=args.seed)
    info = {
        "config": config,
        "params": int(n_params),
        "active_params": int(n_active),
        "size_mb": (args.out / "model.safetensors").stat().st_size / 1e6,
        "size_4bit_mb": sum(f.stat().st_size for f in args.out_4bit.glob("*.safetensors")) / 1e6,
        **stats,
        "eval_max_tokens": args.eval_max_tokens,
        "heldout_tokens": n_tok,
        "heldout_loss": heldout_loss,
        "unigram_loss": uni_loss,
        "coverage": cov.tolist(),
        "coverage_windows": len(windows[DOMAINS[0]]["learn"]),
        "chat_share": args.chat_share,
    }
    (eval_dir / "train-info.json").write_text(json.dumps(info, indent=2) + "\n")
    info["crosscheck"] = crosscheck_transformers(
        args.out, ["def fibonacci(n):", "The history of the city", "\\begin{equation}"]
    )
    (eval_dir / "train-info.json").write_text(json.dumps(info, indent=2) + "\n")
    model_card(args.out, info)
    print(f"done in {(time.time() - t0) / 60:.1f} min", flush=True)


if __name__ == "__main__":
    main()
