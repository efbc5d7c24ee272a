"""`mlx-pager bench`: stock mlx-lm against mlx-pager, side by side in one run."""

from __future__ import annotations

import argparse
import json
import tempfile
from pathlib import Path

from .ranges import MAX_TOKENS_ARG, fractions, whole


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--model", help="checkpoint folder (default: build a 0.6 GB one)")
    parser.add_argument("--max-tokens", type=MAX_TOKENS_ARG, default=48)
    parser.add_argument(
        "--fractions", type=fractions, default="1.0,0.5,0.25", help="expert shares to hold"
    )
    parser.add_argument(
        "--read-samples", type=whole(1, 100_000), default=64, help="experts per read test"
    )
    parser.add_argument(
        "--policies", action="store_true", help="also compare cache policies in the live engine"
    )
    parser.add_argument(
        "--corpus", metavar="DIR", help="folder of *.txt documents for the policy prompts"
    )
    parser.add_argument(
        "--chat-fraction",
        type=float,
        default=0.25,
        help="expert share for the five-turn chat (KV cache kept against fresh); 0 skips it",
    )
    parser.add_argument(
        "--repeats", type=int, default=5, help="interleaved rounds, stock and paged resident"
    )
    parser.add_argument("--json", action="store_true")


def run(args: argparse.Namespace) -> int:
    from ..sim.bench import (
        BENCH_MODEL,
        bench_chat,
        bench_paged,
        bench_policies,
        bench_reads,
        bench_resident,
        bench_stock,
        corpus_prompts,
    )
    from ..sim.synthetic import make_checkpoint

    with tempfile.TemporaryDirectory() as tmp:
        if args.model:
            path = Path(args.model)
        else:
            spec = dict(BENCH_MODEL)
            path = make_checkpoint(Path(tmp) / "bench", spec.pop("arch"), **spec)
        reads = bench_reads(path, args.read_samples)
        default = "pread" if reads["pread_cold_ms"] <= reads["mmap_cold_ms"] else "mmap"
        stock = bench_stock(path, args.max_tokens)
        resident = bench_resident(path, args.max_tokens, args.repeats)
        shares = args.fractions
        paged = [bench_paged(path, f, args.max_tokens, default) for f in shares]
        prefetch = bench_paged(path, min(shares), args.max_tokens, default, prefetch=True)
        chat = None
        if args.chat_fraction > 0:
            chat = bench_chat(path, args.chat_fraction, args.max_tokens)
        policies = None
        if args.policies:
            prompts = corpus_prompts(args.corpus, 12)
            policies = bench_policies(path, min(shares), prompts, args.max_tokens)
    report = {
        "model": str(args.model or "synthetic"),
        "stock": stock,
        "resident": resident,
        "paged": paged,
        "prefetch": prefetch,
        "policies": policies,
        "chat": chat,
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
    print(
        f"every expert resident, {resident['repeats']} interleaved rounds: stock "
        f"{resident['stock_tps']:.1f}, paged {resident['paged_tps']:.1f} decode tok/s, "
        f"{resident['ratio']:.2f}x stock; pager host time {resident['host_us_per_layer']:.0f} us "
        "per MoE layer and token (outside its sync, its reads and mlx-lm's computation)"
    )
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
        f"{prefetch['prefetch_precision']:.1%}; guesses used "
        f"{prefetch['prefetch_used']}/{prefetch['prefetch_issued']}"
    )
    if chat:
        print(
            f"five-turn chat at {chat['fraction']:.0%} of experts, time to first token (s), "
            "KV cache kept vs prefill from scratch:"
        )
        for turn, (k, f) in enumerate(zip(chat["ttft_kept"], chat["ttft_fresh"], strict=True)):
            print(
                f"  turn {turn + 1}: {k:.3f} vs {f:.3f} ({f / k:.2f}x), "
                f"{chat['prompt_reused_tokens'][turn]} tokens kept, "
                f"{chat['prompt_fed_tokens'][turn]} fed"
            )
    if policies:
        print(f"live hit rate per policy at {min(shares):.0%} of experts, corpus prompts:")
        for name, hit in sorted(policies.items(), key=lambda kv: -kv[1]):
            print(f"  {name:>8}: {hit:.1%}")
    print(f"one expert = {reads['expert_bytes'] / 1e6:.2f} MB; median read time (ms):")
    for name in ("pread", "mmap"):
        print(
            f"  {name:>5}: cold {reads[f'{name}_cold_ms']:.3f}  warm {reads[f'{name}_warm_ms']:.3f}"
        )
    print(f"faster cold read path here: {default}")
    return 0
