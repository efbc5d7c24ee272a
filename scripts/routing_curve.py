"""The cache-aware routing curve: misses per token against held-out perplexity and top-1
agreement with exact routing, one row per margin, at a share of the experts resident.

    python scripts/routing_curve.py MODEL CORPUS [--fraction 0.25] [--margins 0 0.05 ...]

MODEL is a checkpoint folder; CORPUS a folder of the domain files (code, science,
encyclopedia, web .txt), whose held-out slice (the last 10% of each file's distinct
documents, as scripts/train_tiny_moe.py splits it) is fed a token at a time
(mlx_pager/benchmark/quality.py). Every margin runs on the same windows, from an empty
cache, in one process. Prints a markdown table; --json writes the rows.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from train_tiny_moe import split_corpus

from mlx_pager.benchmark.quality import heldout_windows, slots_budget, teacher_forced
from mlx_pager.paging.loader import load_paged

MARGINS = [0.0, 0.02, 0.05, 0.1, 0.15, 0.2, 0.3, 0.5]
CONTEXT = 1024


def curve(model: Path, corpus: Path, fraction: float, margins: list[float], n: int, seq: int):
    budget = slots_budget(model, fraction, CONTEXT)
    held = {domain: docs for domain, (_, docs) in split_corpus(corpus).items()}
    rows, exact = [], None
    for margin in sorted(set([0.0, *margins])):
        paged = load_paged(model, budget, CONTEXT, route_margin=margin)
        try:
            windows = heldout_windows(paged.tokenizer, held, n, seq)
            result = teacher_forced(paged, windows)
        finally:
            paged.close()
        exact = exact or result
        rows.append({"margin": margin, "slots": paged.stats.slots, **result.row(exact)})
        print(f"margin {margin}: {rows[-1]}", file=sys.stderr, flush=True)
    return rows


def markdown(rows: list[dict]) -> str:
    lines = [
        "| margin | misses / token | fewer misses | perplexity | change | top-1 agreement "
        "| routes changed / token | ms / token |",
        "| --- | --- | --- | --- | --- | --- | --- | --- |",
    ]
    for r in rows:
        lines.append(
            f"| {r['margin']:g} | {r['misses_per_token']:.2f} | {r['miss_reduction']:.0%} "
            f"| {r['perplexity']:.2f} | {r['perplexity_change']:+.2%} "
            f"| {r['top1_agreement']:.1%} | {r['rerouted_per_token']:.2f} "
            f"| {r['ms_per_token']:.0f} |"
        )
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("model", type=Path)
    parser.add_argument("corpus", type=Path)
    parser.add_argument("--fraction", type=float, default=0.25, help="experts resident")
    parser.add_argument("--margins", type=float, nargs="+", default=MARGINS)
    parser.add_argument("--windows", type=int, default=4, help="per domain")
    parser.add_argument("--window-tokens", type=int, default=256)
    parser.add_argument("--json", type=Path)
    args = parser.parse_args()
    rows = curve(args.model, args.corpus, args.fraction, args.margins, args.windows,
                 args.window_tokens)  # fmt: skip
    print(f"{args.model.name}, {rows[0]['slots']} slots ({args.fraction:.0%} of the experts), "
          f"{args.windows} x {args.window_tokens} held-out tokens per domain\n")  # fmt: skip
    print(markdown(rows))
    if args.json:
        args.json.write_text(json.dumps(rows, indent=2))


if __name__ == "__main__":
    main()
