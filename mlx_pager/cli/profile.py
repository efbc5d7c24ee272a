"""`mlx-pager profile`: run prompts, report which experts fire, measure task preloading.

Prompts come from a JSONL file of {"task", "text"} records (the calibration format) or a
plain text file with one prompt per line (tasks then come from the classifier). Every
fifth prompt of each task is held out: the others teach the model's task profile, the
held-out ones, visited so that the task changes every time, measure the decode hit rate
and the time to the first token after a switch, with and without preloading. The result
decides whether preloading is on for this model (``TaskProfiles.preload_verdict``).
"""

from __future__ import annotations

import argparse
import itertools
import json
import statistics
import time
from pathlib import Path

import numpy as np

from ..tasks.classifier import split_held_out
from ..tasks.coverage import coverage_curve, layer_skew, task_coverage
from .ranges import MAX_TOKENS_ARG, byte_size, whole


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--model", help="Hub id or folder (default: the embedded model)")
    parser.add_argument("--prompts", required=True, help="JSONL {task, text} or text lines")
    parser.add_argument("--max-tokens", type=MAX_TOKENS_ARG, default=16, help="tokens per prompt")
    parser.add_argument("--budget", type=byte_size, help="memory budget (default: settings)")
    parser.add_argument(
        "--measure-preload",
        action="store_true",
        help="measure task preloading on held-out prompts; save the verdict",
    )
    parser.add_argument(
        "--decode-tokens",
        type=MAX_TOKENS_ARG,
        default=32,
        help="decode tokens after a task switch to score",
    )
    parser.add_argument(
        "--repeats",
        type=whole(1, 100),
        default=1,
        help="with --measure-preload: passes per arm, alternating (times: medians)",
    )
    parser.add_argument(
        "--export-trace", metavar="FILE", help="save the prompts' routing as a prefill trace"
    )
    parser.add_argument("--json", action="store_true")


def read_prompts(path: Path, classify) -> list[tuple[str, str]]:
    text = Path(path).read_text()
    if Path(path).suffix == ".jsonl":
        records = [json.loads(line) for line in text.splitlines() if line.strip()]
        return [(r["task"], r["text"]) for r in records]
    return [(classify(line), line) for line in text.splitlines() if line.strip()]


def interleave(pairs: list[tuple[str, str]]) -> list[tuple[str, str]]:
    """Round robin over tasks, so that consecutive prompts change task."""
    by_task: dict[str, list] = {}
    for task, text in pairs:
        by_task.setdefault(task, []).append((task, text))
    rounds = itertools.zip_longest(*by_task.values())
    return [p for group in rounds for p in group if p is not None]


def run_prompts(engine, pairs, max_tokens, recorder=None) -> dict[str, np.ndarray]:
    """Generate for each prompt; the expert counts each task used."""
    by_task: dict[str, np.ndarray] = {}
    for task, text in pairs:
        before = engine.stats.expert_counts.copy()
        for _ in engine.generate(text, max_tokens=max_tokens, chat_template=False, task=task):
            pass
        by_task[task] = by_task.get(task, 0) + engine.stats.expert_counts - before
        if recorder is not None:
            recorder.end_sequence(label=task, text=text)
    return by_task


# The user's last keystrokes before Enter: both arms idle this long before each reply,
# the "with" arm's preload running in it, as the app's does (started 0.8 s into a pause in
# typing). With no pause the preload's work just before the reply showed as a gain on the
# embedded model although it saved no reads (docs/task-preload.md).
TYPING_SECONDS = 0.5


def measure_preload(
    engine, held_out, decode_tokens: int, repeats: int = 1, typing: float = TYPING_SECONDS
) -> dict:
    """After task switches, without and with preloading: the decode hit rate and the time
    from sending the prompt to the reply's first token.

    "with" starts preloading the new task's hot set ``typing`` seconds before the prompt
    is sent, as the app does while the user types (``Engine.prepare``); a preload not done
    by then is waited for, inside the time to first token. ``preload_seconds`` is how long
    the preloads took. Each arm starts from the same state, an empty cache and a policy
    that has learned nothing, so neither inherits what the other taught the policy.
    ``repeats`` alternates the arms' order (a busy machine slows both alike); the times
    are medians over prompts and repeats, ``ttft_ratio`` the median of each prompt's time
    with over its time without."""
    hit: dict[str, float] = {}
    ttft: dict[str, list[float]] = {"without": [], "with": []}
    reads: dict[str, int] = {}  # the prompts' misses: reads before the first token
    preloading: list[float] = []
    engine.learn = False  # measure with the profile as it stands
    try:
        for repeat in range(repeats):
            arms = (("without", False), ("with", True))
            for mode, preload in arms if repeat % 2 == 0 else arms[::-1]:
                engine.paged.reset_cache()
                engine.last_task = ""
                hits = misses = prompt_misses = 0
                for task, text in interleave(held_out):
                    if preload:  # the draft, prepared while the user types
                        engine.preload_seconds = 0.0
                        engine.prepare(text, preload=True, task=task)
                    time.sleep(typing)
                    sent, first = time.perf_counter(), None
                    # The decode counts start with the first generated token's pass, and
                    # mlx-lm runs one pass per token it yields.
                    for _ in engine.generate(
                        text,
                        max_tokens=decode_tokens,
                        chat_template=False,
                        preload=preload,
                        task=task,
                    ):
                        first = first or time.perf_counter() - sent
                    hits += engine.stats.decode_hits
                    misses += engine.stats.decode_misses
                    ttft[mode].append(first)
                    prompt_misses += (engine.paged.run.prefill_counts or (0, 0))[1]
                    if preload:
                        preloading.append(engine.preload_seconds)
                hit.setdefault(mode, hits / max(1, hits + misses))  # the same every repeat
                reads.setdefault(f"prompt_misses_{mode}", prompt_misses)
    finally:
        engine.learn = True
    # Each prompt's time with over without, the same prompt and repeat: paired, so the
    # prompts' own spread does not drown the difference.
    ratios = [w / wo for w, wo in zip(ttft["with"], ttft["without"], strict=True)]
    return {
        **hit,
        "ttft_without": statistics.median(ttft["without"]),
        "ttft_with": statistics.median(ttft["with"]),
        "ttft_ratio": statistics.median(ratios),
        "preload_seconds": statistics.median(preloading),
        **reads,
    }


def run(args: argparse.Namespace) -> int:
    from ..engine import Engine

    engine = Engine.open(args.model, budget=args.budget)
    if not engine.info.paged:
        print("This model has no routed experts: nothing to profile.")
        return 0
    recorder = None
    if args.export_trace:
        from ..sim.trace import attach_recorder

        recorder = attach_recorder(engine, phase="prefill")  # the prompts, one per task
    try:
        pairs = read_prompts(Path(args.prompts), engine.classify)
        train, held = split_held_out(pairs) if args.measure_preload else (pairs, [])
        by_task = run_prompts(engine, train, args.max_tokens, recorder)
        if recorder is not None:
            engine.paged.run.on_tokens = None  # the trace holds the profiled prompts only
        measured = measure_preload(engine, held, args.decode_tokens, args.repeats) if held else {}
        preload = {k: measured[k] for k in ("without", "with")} if measured else None
        ttft = {k: v for k, v in measured.items() if k not in ("without", "with")} or None
        if measured:
            engine.profiles.preload_hit = preload
            engine.profiles.preload_ttft = ttft
            engine.profiles.save()
        status = engine.preload_status
    finally:
        engine.close()
    if recorder is not None:
        recorder.save(args.export_trace)

    total = sum(by_task.values())
    curve = coverage_curve(total)
    skew = layer_skew(total)
    tasks, matrix = task_coverage(by_task)
    report = {
        "model": engine.info.name,
        "prompts": len(pairs),
        "coverage": {f"top_{round(s * 100)}pct": v for s, v in curve.items()},
        "layer_top25_share": skew.round(4).tolist(),
        "tasks": tasks,
        "task_coverage": matrix.round(4).tolist(),
        "preload_hit": preload,
        "preload_ttft": ttft,
        "preload": status,
    }
    if args.json:
        print(json.dumps(report, indent=2))
        return 0
    print(f"{engine.info.name}: {len(pairs)} prompts, {int(total.sum())} expert activations")
    print(
        "coverage: "
        + ", ".join(f"top {s:.0%} of (layer, expert) pairs take {v:.1%}" for s, v in curve.items())
    )
    print("per-layer share of the top 25% experts: " + " ".join(f"{v:.2f}" for v in skew))
    print("task overlap (row's top-25% set covers column's activations):")
    print("        " + "".join(f"{t:>8}" for t in tasks))
    for task, row in zip(tasks, matrix, strict=True):
        print(f"{task:>8}" + "".join(f"{v:>8.2f}" for v in row))
    if preload is not None:
        print(
            f"decode hit rate after a task switch: without preloading {preload['without']:.1%}"
            f", with {preload['with']:.1%}"
        )
        print(
            f"first token after a task switch: without preloading {ttft['ttft_without']:.3f} s"
            f", with {ttft['ttft_with']:.3f} s (the preload took {ttft['preload_seconds']:.3f} s"
            f" of the last {TYPING_SECONDS} s of typing)"
        )
    print(f"task preloading: {status}")
    return 0
