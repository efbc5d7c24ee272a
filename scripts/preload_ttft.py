"""Task preloading where it can pay: the time to the first token of the first reply after
a task switch, the hot set preloaded while the user types against not, per model, at a
share of the experts, side by side in one run.

    python scripts/preload_ttft.py [MODEL ...] [--fixture small] [--fraction 0.25]

MODEL is a checkpoint folder (default: the embedded model); --fixture writes a
real-shaped random checkpoint (mlx_pager/benchmark/fixture.py) into --work and measures
it too. Each model learns its task profile from the calibration prompts and is measured
on the held-out fifth, the task changing every prompt, as `mlx-pager profile
--measure-preload` does (the same code: mlx_pager/cli/profile.py). Profiles go to a
scratch data folder unless --save, which keeps them (and so the verdict the app shows)
in the user's. Prints a markdown table; --json writes the rows.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
from pathlib import Path

from mlx_pager.cli.profile import TYPING_SECONDS

CONTEXT = 4096


def measure(
    path: Path,
    fraction: float,
    repeats: int,
    decode_tokens: int,
    limit: int,
    typing: list,
    train_limit: int = 0,
) -> list[dict]:
    from mlx_pager.assets import asset_path

    from mlx_pager.benchmark.quality import slots_budget
    from mlx_pager.cli.profile import interleave, measure_preload, read_prompts, run_prompts
    from mlx_pager.engine import Engine
    from mlx_pager.paging.loader import load_paged
    from mlx_pager.tasks.classifier import split_held_out

    engine = Engine(load_paged(path, slots_budget(path, fraction, CONTEXT), CONTEXT),
                    path.name, CONTEXT)  # fmt: skip
    try:
        pairs = read_prompts(asset_path("prompts", "calibration.jsonl"), engine.classify)
        train, held = split_held_out(pairs)
        if train_limit:  # a smaller profile, every task in it, where compute is slow
            train = interleave(train)[:train_limit]
        run_prompts(engine, train, 16)
        held = interleave(held)[:limit] if limit else held  # the task changes every prompt
        rows = []
        for pause in typing:  # the last one is saved: the verdict the app shows
            result = measure_preload(engine, held, decode_tokens, repeats, pause)
            engine.profiles.preload_hit = {k: result[k] for k in ("without", "with")}
            engine.profiles.preload_ttft = {k: v for k, v in result.items()
                                            if k not in ("without", "with")}  # fmt: skip
            engine.profiles.save()
            rows.append({
                "model": path.name,
                "slots": engine.stats.slots,
                "experts": engine.info.moe_layers * engine.info.experts_per_layer,
                "expert_bytes": engine.paged.cache.map.expert_disk_bytes(),
                "held_out_prompts": len(held),
                "typing_seconds": pause,
                **result,
                "status": engine.preload_status,
            })  # fmt: skip
        return rows
    finally:
        engine.close()


def markdown(rows: list[dict]) -> str:
    lines = [
        "| model | slots | expert | typing | first token, without | with | sooner (paired) "
        "| reads before it, without | with | preload took | decode hit, without | with "
        "| verdict |",
        "| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |",
    ]
    for r in rows:
        sooner = 1 - r.get("ttft_ratio", r["ttft_with"] / r["ttft_without"])
        lines.append(
            f"| {r['model']} | {r['slots']} of {r['experts']} | {r['expert_bytes'] / 1e6:.2f} MB "
            f"| {r['typing_seconds']:g} s | {r['ttft_without']:.3f} s "
            f"| {r['ttft_with']:.3f} s | {sooner:+.0%} | {r['prompt_misses_without']} "
            f"| {r['prompt_misses_with']} | {r['preload_seconds']:.3f} s "
            f"| {r['without']:.1%} | {r['with']:.1%} | {r['status']} |"
        )
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("models", type=Path, nargs="*")
    parser.add_argument("--fixture", nargs="*", default=[], help="shapes to write, e.g. small")
    parser.add_argument("--fixture-layers", type=int, help="cut a fixture to its first layers")
    parser.add_argument("--work", type=Path, help="where fixtures are written (kept)")
    parser.add_argument("--fraction", type=float, default=0.25, help="experts resident")
    parser.add_argument("--repeats", type=int, default=3, help="passes per arm, alternating")
    parser.add_argument("--decode-tokens", type=int, default=16)
    parser.add_argument("--limit", type=int, default=0, help="held-out prompts (0: all)")
    parser.add_argument("--train-limit", type=int, default=0,
                        help="calibration prompts the profile learns from (0: all)")  # fmt: skip
    parser.add_argument("--typing", type=float, nargs="+", default=[TYPING_SECONDS],
                        help="seconds idle before each reply, preload or not")  # fmt: skip
    parser.add_argument("--save", action="store_true", help="keep the verdicts in the profile")
    parser.add_argument("--json", type=Path)
    args = parser.parse_args()
    if not args.save:
        os.environ["MLX_PAGER_DATA_DIR"] = tempfile.mkdtemp(prefix="preload-ttft-")
    from mlx_pager.assets import embedded_model

    from mlx_pager.benchmark.fixture import make_model

    models = list(args.models) or [embedded_model()]
    work = args.work or Path(tempfile.mkdtemp(prefix="preload-fixtures-"))
    for shape in args.fixture:
        folder = work / (shape + (f"-{args.fixture_layers}l" if args.fixture_layers else ""))
        if not (folder / "config.json").exists():
            report = make_model(shape, folder, num_layers=args.fixture_layers)
            print(f"wrote {folder}: {report['bytes'] / 1e6:.0f} MB", file=sys.stderr)
        models.append(folder)
    rows = []
    for path in models:
        rows += measure(Path(path), args.fraction, args.repeats, args.decode_tokens,
                        args.limit, args.typing, args.train_limit)  # fmt: skip
        print(rows[-1], file=sys.stderr, flush=True)
    print(f"{args.fraction:.0%} of the experts, {args.repeats} passes per arm; first token: "
          "from sending the prompt, medians over the held-out prompts\n")  # fmt: skip
    print(markdown(rows))
    if args.json:
        args.json.write_text(json.dumps(rows, indent=2))


if __name__ == "__main__":
    main()
