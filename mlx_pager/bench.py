"""`mlx-pager bench`: stock mlx-lm against mlx-pager, side by side in one run.

Decode tokens/s fully resident (stock mlx-lm) and paged at budgets holding 100%, 50% and
25% of the experts; disk bytes per token; the read time of one expert through pread and
mmap, cold (dropped from the page cache) and warm. Ratios are taken within the run.
"""

from __future__ import annotations

import argparse
import json
import statistics
import tempfile
import time
from pathlib import Path

import mlx.core as mx
from mlx_lm import load, stream_generate

from .disk import make_reader
from .engine import Engine, ban_tokens
from .loader import cast_floating, inspect_model, load_paged
from .synthetic import make_checkpoint

PROMPT = "Mixture of experts models route every token to a few experts in each layer. " * 4
WARMUP = "A cache holds the experts that fire most; the rest are read from the disk. " * 4

# Large enough that reads matter: 8 layers x 64 experts of ~1.2 MB (4-bit) = 0.6 GB.
BENCH_MODEL = dict(
    arch="qwen3_moe",
    quantize_bits=4,
    hidden_size=1024,
    moe_intermediate_size=768,
    intermediate_size=1024,
    num_experts=64,
    num_experts_per_tok=8,
    num_hidden_layers=8,
    num_attention_heads=8,
    num_key_value_heads=4,
    head_dim=128,
)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--model", help="checkpoint folder (default: build a 0.6 GB one)")
    parser.add_argument("--max-tokens", type=int, default=48)
    parser.add_argument("--fractions", default="1.0,0.5,0.25", help="expert shares to hold")
    parser.add_argument("--read-samples", type=int, default=64, help="experts per read test")
    parser.add_argument(
        "--policies", action="store_true", help="also compare cache policies in the live engine"
    )
    parser.add_argument("--json", action="store_true")


def _decode_tps(responses) -> tuple[float, int]:
    *_, last = responses
    return last.generation_tps, last.generation_tokens


def bench_stock(path: Path, max_tokens: int) -> dict:
    model, tokenizer = load(str(path))
    model.update(cast_floating(model.parameters(), mx.float32))  # as the engine on a CPU
    tokens = tokenizer.encode(PROMPT)
    no_eos = [ban_tokens(tokenizer.eos_token_ids)]  # both sides time the same token count
    responses = stream_generate(
        model, tokenizer, tokens, max_tokens=max_tokens, logits_processors=no_eos
    )
    tps, n = _decode_tps(responses)
    return {"decode_tps": tps, "tokens": n, "peak_mlx_bytes": mx.get_peak_memory()}


def bench_paged(
    path: Path, fraction: float, max_tokens: int, read_path: str, prefetch: bool = False
) -> dict:
    layout = inspect_model(path, 4096)
    n_experts = layout.moe_layers * layout.experts_per_layer
    slots = max(layout.top_k, round(fraction * n_experts))
    budget = layout.plan(0).fixed_bytes + slots * layout.expert_bytes
    paged = load_paged(path, budget, read_path=read_path, prefetch=prefetch)
    engine = Engine(paged, str(path), 4096)
    try:
        for _ in engine.generate(WARMUP, max_tokens, chat_template=False, ignore_eos=True):
            pass
        cold_hit_rate = engine.stats.hit_rate  # the first run fills an empty cache
        for _ in engine.generate(PROMPT, max_tokens, chat_template=False, ignore_eos=True):
            pass
        s = engine.stats
        return {
            "fraction": fraction,
            "slots": s.slots,
            "budget_bytes": budget,
            "decode_tps": s.decode_tps,
            "prompt_tps": s.prompt_tps,
            "hit_rate": s.hit_rate,
            "cold_hit_rate": cold_hit_rate,
            "bytes_per_token": s.bytes_per_token,
            "read_seconds": s.read_seconds,
            "tokens": s.prompt_tokens + s.generation_tokens,
            "prefetch": prefetch,
            "prefetch_recall": s.prefetch_recall,
            "prediction_precision": s.prediction_precision,
            "prefetch_used": s.prefetch_used,
            "prefetch_issued": s.prefetch_issued,
        }
    finally:
        engine.close()


def bench_policies(path: Path, fraction: float, prompts: list[str], max_tokens: int) -> dict:
    """The live engine's hit rate per cache policy: same prompts, same budget, one run."""
    from .policies import POLICIES

    layout = inspect_model(path, 4096)
    slots = max(layout.top_k, round(fraction * layout.moe_layers * layout.experts_per_layer))
    budget = layout.plan(0).fixed_bytes + slots * layout.expert_bytes
    result = {}
    for name in POLICIES:
        engine = Engine(load_paged(path, budget, policy=name), str(path), 4096)
        hits = misses = 0
        try:
            for prompt in prompts:
                for _ in engine.generate(prompt, max_tokens, chat_template=False, ignore_eos=True):
                    pass
                hits += engine.stats.hits
                misses += engine.stats.misses
        finally:
            engine.close()
        result[name] = hits / max(1, hits + misses)
    return result


def corpus_prompts(n: int, chars: int = 400) -> list[str]:
    """Openings of documents from the shared corpus, alternating domains."""
    corpus = Path(__file__).resolve().parent.parent.parent / "shared" / "corpus"
    domains = []
    for file in sorted(corpus.glob("*.txt")):
        text = file.read_text()
        docs = text.split("\n\n")
        docs = docs if len(docs) > 100 else text.splitlines()  # web.txt: a document a line
        domains.append([d for d in docs[100:] if len(d) > 100])
    if not domains:
        return [PROMPT, WARMUP] * (n // 2)
    docs = [d for group in zip(*domains, strict=False) for d in group]
    return [d[:chars] for d in docs][:n]


def bench_reads(path: Path, samples: int) -> dict:
    """Median milliseconds to read one whole expert, per read path, cold and warm."""
    expert_map = inspect_model(path, 4096).expert_map
    keys = [
        (layer, e)
        for layer in range(len(expert_map.layer_paths))
        for e in range(expert_map.num_experts)
    ][:samples]
    result = {"expert_bytes": expert_map.expert_disk_bytes()}
    for name in ("pread", "mmap"):
        for state in ("cold", "warm"):
            reader = make_reader(name, expert_map.files(), drop_cache=False)
            reader.drop()
            if state == "warm":  # fill the page cache first
                for key in keys:
                    reader.read(list(expert_map.expert_pieces(*key).values()))
            times = []
            for key in keys:
                start = time.perf_counter()
                reader.read(list(expert_map.expert_pieces(*key).values()))
                times.append(time.perf_counter() - start)
            reader.drop()
            reader.close()
            result[f"{name}_{state}_ms"] = 1e3 * statistics.median(times)
    return result


def run(args: argparse.Namespace) -> int:
    with tempfile.TemporaryDirectory() as tmp:
        if args.model:
            path = Path(args.model)
        else:
            spec = dict(BENCH_MODEL)
            path = make_checkpoint(Path(tmp) / "bench", spec.pop("arch"), **spec)
        reads = bench_reads(path, args.read_samples)
        default = "pread" if reads["pread_cold_ms"] <= reads["mmap_cold_ms"] else "mmap"
        stock = bench_stock(path, args.max_tokens)
        fractions = [float(f) for f in args.fractions.split(",")]
        paged = [bench_paged(path, f, args.max_tokens, default) for f in fractions]
        prefetch = bench_paged(path, min(fractions), args.max_tokens, default, prefetch=True)
        policies = None
        if args.policies:
            prompts = corpus_prompts(12)
            policies = bench_policies(path, min(fractions), prompts, args.max_tokens)
    report = {
        "model": str(args.model or "synthetic"),
        "stock": stock,
        "paged": paged,
        "prefetch": prefetch,
        "policies": policies,
        "reads": reads,
        "faster_read_path": default,
    }
    if args.json:
        print(json.dumps(report, indent=2))
        return 0
    print(f"stock mlx-lm, fully resident: {stock['decode_tps']:.1f} decode tok/s")
    print(
        f"{'experts held':>12} {'slots':>6} {'decode tok/s':>13} {'x stock':>8} "
        f"{'hit rate':>9} {'1st run':>8} {'disk MB/token':>14} {'read s':>7}"
    )
    for p in paged:
        print(
            f"{p['fraction']:>12.0%} {p['slots']:>6} {p['decode_tps']:>13.1f} "
            f"{p['decode_tps'] / stock['decode_tps']:>8.2f} {p['hit_rate']:>9.1%} "
            f"{p['cold_hit_rate']:>8.1%} {p['bytes_per_token'] / 1e6:>14.2f} "
            f"{p['read_seconds']:>7.2f}"
        )
    print("(hit rate and speed: second prompt, cache warm; 1st run: filling an empty cache)")
    base = next(p for p in paged if p["fraction"] == prefetch["fraction"])
    print(f"prefetch at {prefetch['fraction']:.0%} of experts (without -> with):")
    for key, label, scale in (
        ("decode_tps", "decode tok/s", 1),
        ("read_seconds", "seconds stalled on reads", 1),
        ("bytes_per_token", "disk MB/token", 1e-6),
        ("hit_rate", "hit rate", 1),
    ):
        print(f"  {label:>26}: {base[key] * scale:.3f} -> {prefetch[key] * scale:.3f}")
    print(
        f"  prediction recall {prefetch['prefetch_recall']:.1%}, precision "
        f"{prefetch['prediction_precision']:.1%}; guesses used "
        f"{prefetch['prefetch_used']}/{prefetch['prefetch_issued']}"
    )
    if policies:
        print(f"live hit rate per policy at {min(fractions):.0%} of experts, corpus prompts:")
        for name, hit in sorted(policies.items(), key=lambda kv: -kv[1]):
            print(f"  {name:>8}: {hit:.1%}")
    print(f"one expert = {reads['expert_bytes'] / 1e6:.2f} MB; median read time (ms):")
    for name in ("pread", "mmap"):
        print(
            f"  {name:>5}: cold {reads[f'{name}_cold_ms']:.3f}  warm {reads[f'{name}_warm_ms']:.3f}"
        )
    print(f"faster cold read path here: {default}")
    return 0
