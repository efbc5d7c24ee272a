"""The cold-precision decision: low-bit copies of unimportant misses (2, 3, 4 bits; by
router weight, by profile frequency, by both) against exact, at a share of the experts.

    python scripts/cold_precision.py MODEL CORPUS [--fraction 0.25] [--json out.json]

MODEL is a checkpoint folder; CORPUS a folder of the domain files, split as
scripts/train_tiny_moe.py splits it: the access profile ("frequency") is learned on
windows of the training split, quality is measured on the held-out slice fed a token at
a time (mlx_pager/benchmark/quality.py), every arm on the same windows from an empty
cache, in one process. Per arm: perplexity change and top-1 agreement against exact,
slots (full + low-bit) against exact's, disk reads and bytes per token, ms per token.
Prints a markdown table; --json writes the rows.
"""

from __future__ import annotations

import argparse
import json
import sys
from contextlib import contextmanager
from pathlib import Path

import mlx.core as mx

sys.path.insert(0, str(Path(__file__).resolve().parent))

from train_tiny_moe import split_corpus

from mlx_pager.benchmark.quality import heldout_windows, slots_budget, teacher_forced
from mlx_pager.paging import loader
from mlx_pager.paging.cold_tier import (
    IMPORTANCE,
    LowBitFormat,
    cold_eligible,
    slot_bytes,
)
from mlx_pager.paging.loader import load_paged

CONTEXT = 1024


def slot_density(paged, bits: int) -> dict:
    """Low-bit slots per full slot: here (the pools' dtype) and with bfloat16 pools (a Mac
    keeps the checkpoint's dtype)."""
    fmt = paged.cache.format
    out = {}
    for where, dtype in (("here", None), ("bf16", mx.bfloat16)):
        dtypes = {p: (dtype if dtype and mx.issubdtype(d, mx.floating) else d)
                  for p, d in fmt.dtypes.items()}  # fmt: skip
        full = sum(int(mx.zeros(fmt.shapes[p], dtypes[p]).nbytes) for p in fmt.params)
        low = LowBitFormat(fmt.projections, fmt.params, fmt.shapes, dtypes, bits)
        out[where] = full / slot_bytes(low.layout())
    return out


@contextmanager
def cold_density(factor: float):
    """The loader sizes the cold tier as if each low-bit slot took ``factor`` x its bytes:
    ``--density bf16`` gives the count of cold slots bfloat16 pools would (a Mac keeps the
    checkpoint's dtype, so its full slots are smaller and low-bit copies gain less)."""
    original = loader.slot_bytes
    loader.slot_bytes = lambda layout: round(original(layout) * factor)
    try:
        yield
    finally:
        loader.slot_bytes = original


def decide(model: Path, corpus: Path, fraction: float, n: int, seq: int, bits_list, importance,
           density: str = "here"):  # fmt: skip
    budget = slots_budget(model, fraction, CONTEXT)
    split = split_corpus(corpus)
    held = {d: docs for d, (_, docs) in split.items()}
    train = {d: docs[:200] for d, (docs, _) in split.items()}
    rows = []
    exact = load_paged(model, budget, CONTEXT)
    try:
        teacher_forced(exact, heldout_windows(exact.tokenizer, train, n, seq))
        profile = exact.stats.expert_counts.copy()  # what the access profiler learned
        windows = heldout_windows(exact.tokenizer, held, n, seq)
        base = teacher_forced(exact, windows)
        if not cold_eligible(exact.cache.projections, max(bits_list)):
            print("(experts stored at few bits: only lower cold precisions apply)",
                  file=sys.stderr)  # fmt: skip
        base_slots = exact.stats.slots
        rows.append({"arm": "exact", "bits": None, "importance": "", "slots": base_slots,
                     "cold_slots": 0, **base.row(base)})  # fmt: skip
        print(rows[-1], file=sys.stderr, flush=True)
        dense = {b: slot_density(exact, b) for b in bits_list}
    finally:
        exact.close()
    for bits in bits_list:
        for how in importance:
            factor = dense[bits]["here"] / dense[bits][density]
            with cold_density(factor):
                paged = load_paged(model, budget, CONTEXT, cold_precision=f"{bits}bit")
            try:
                if paged.cold is None:
                    print(f"{bits} bits: not below the stored precision, skipped",
                          file=sys.stderr)  # fmt: skip
                    break
                paged.cold.format.importance = how
                paged.cold.format.set_profile(profile)
                result = teacher_forced(paged, windows)
                s = paged.stats
                rows.append({
                    "arm": f"{bits}-bit, {how}" + (", bf16 density" if density == "bf16" else ""),
                    "bits": bits, "importance": how, "density": density,
                    "slots": s.slots, "cold_slots": s.cold_slots,
                    "slots_gained": s.slots + s.cold_slots - base_slots,
                    "bf16_slots_per_full": dense[bits]["bf16"],
                    "here_slots_per_full": dense[bits]["here"],
                    **result.row(base),
                })  # fmt: skip
                print(rows[-1], file=sys.stderr, flush=True)
            finally:
                paged.close()
    return rows


def speed(model: Path, corpus: Path, fraction: float, seq: int, bits: int, how: str,
          repeats: int) -> dict:  # fmt: skip
    """Decode ms per token, exact against one arm, alternating ``repeats`` times over one
    window per domain (a busy machine slows both alike); medians."""
    import statistics

    budget = slots_budget(model, fraction, CONTEXT)
    split = split_corpus(corpus)
    train = {d: docs[:200] for d, (docs, _) in split.items()}
    held = {d: docs for d, (_, docs) in split.items()}
    exact = load_paged(model, budget, CONTEXT)
    cold = load_paged(model, budget, CONTEXT, cold_precision=f"{bits}bit")
    try:
        teacher_forced(exact, heldout_windows(exact.tokenizer, train, 1, seq))
        cold.cold.format.importance = how
        cold.cold.format.set_profile(exact.stats.expert_counts.copy())
        windows = heldout_windows(exact.tokenizer, held, 1, seq)
        times: dict[str, list[float]] = {"exact": [], "cold": []}
        for r in range(repeats):
            arms = [("exact", exact), ("cold", cold)]
            for name, paged in arms if r % 2 == 0 else arms[::-1]:
                times[name].append(teacher_forced(paged, windows).seconds / (len(windows) * seq))
    finally:
        exact.close()
        cold.close()
    return {k: 1e3 * statistics.median(v) for k, v in times.items()}


def markdown(rows: list[dict]) -> str:
    lines = [
        "| arm | slots (full + cold) | gained | misses / token | bytes / token "
        "| cold routes / token | perplexity | change | top-1 agreement | ms / token |",
        "| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |",
    ]
    for r in rows:
        slots = f"{r['slots']} + {r['cold_slots']}"
        lines.append(
            f"| {r['arm']} | {slots} | {r.get('slots_gained', 0):+d} "
            f"| {r['misses_per_token']:.2f} | {r['bytes_per_token'] / 1e3:,.0f} kB "
            f"| {r['cold_per_token']:.2f} | {r['perplexity']:.2f} "
            f"| {r['perplexity_change']:+.2%} | {r['top1_agreement']:.1%} "
            f"| {r['ms_per_token']:.0f} |"
        )
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("model", type=Path)
    parser.add_argument("corpus", type=Path)
    parser.add_argument("--fraction", type=float, default=0.25, help="experts resident")
    parser.add_argument("--bits", type=int, nargs="+", default=[4, 3, 2], choices=[2, 3, 4])
    parser.add_argument("--importance", nargs="+", default=list(IMPORTANCE), choices=IMPORTANCE)
    parser.add_argument("--density", choices=["here", "bf16"], default="here",
                        help="cold slots as here, or as bfloat16 pools give")  # fmt: skip
    parser.add_argument("--windows", type=int, default=3, help="per domain")
    parser.add_argument("--window-tokens", type=int, default=256)
    parser.add_argument("--speed", type=int, default=0, metavar="N",
                        help="only time exact against the first arm, N times each")  # fmt: skip
    parser.add_argument("--json", type=Path)
    args = parser.parse_args()
    if args.speed:
        ms = speed(args.model, args.corpus, args.fraction, args.window_tokens, args.bits[0],
                   args.importance[0], args.speed)  # fmt: skip
        arm = f"{args.bits[0]}-bit {args.importance[0]}"
        print(f"decode ms per token, medians of {args.speed} alternating passes: exact "
              f"{ms['exact']:.1f}, {arm} {ms['cold']:.1f}")  # fmt: skip
        return
    rows = decide(args.model, args.corpus, args.fraction, args.windows, args.window_tokens,
                  args.bits, args.importance, args.density)  # fmt: skip
    print(f"{args.model.name}, {args.fraction:.0%} of the experts, {args.windows} x "
          f"{args.window_tokens} held-out tokens per domain\n")  # fmt: skip
    print(markdown(rows))
    cold = [r for r in rows if r["bits"]]
    if cold:
        print("\nlow-bit slots per full slot: "
              + ", ".join(f"{r['bits']} bits {r['here_slots_per_full']:.1f}x here, "
                          f"{r['bf16_slots_per_full']:.1f}x with bfloat16 pools"
                          for r in {r["bits"]: r for r in cold}.values()))  # fmt: skip
    if args.json:
        args.json.write_text(json.dumps(rows, indent=2))


if __name__ == "__main__":
    main()
