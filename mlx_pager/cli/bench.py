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
        "--repeats",
        type=int,
        default=5,
        help="interleaved rounds: stock and paged resident, prefetch off and on",
    )
    parser.add_argument("--json", action="store_true")
    add_peer_arguments(parser)
    make = parser.add_argument_group("real-shaped checkpoints (--make-model)")
    make.add_argument(
        "--make-model",
        nargs=2,
        metavar=("SHAPE", "DIR"),
        help="write a random checkpoint of a real model's shape (qwen3-30b-a3b, olmoe-1b-7b, "
        "deepseek-v2-lite, small...) to DIR, a layer at a time; with --gguf, its GGUF too",
    )
    make.add_argument("--layers", type=whole(1, 1000), help="only the first N layers")
    make.add_argument("--seed", type=whole(0, 2**32 - 1), default=0)


def add_peer_arguments(parser: argparse.ArgumentParser) -> None:
    """`bench --peers`: the at-scale benchmark, every system in its own capped process."""
    peers = parser.add_argument_group("peers (--peers)")
    peers.add_argument(
        "--peers", action="store_true", help="stock, mlx-pager, NunSpark, llama.cpp under a cap"
    )
    peers.add_argument("--cap", help="memory cap for the capped runs, e.g. 8GiB")
    peers.add_argument("--gguf", metavar="FILE", help="GGUF copy of the model for llama.cpp")
    peers.add_argument(
        "--arms", default="stock,mlx-pager,nunspark,llama", help="comma-separated systems"
    )
    peers.add_argument("--prompts", type=whole(1, 64), default=3, help="corpus turns to feed")
    peers.add_argument("--plots", metavar="DIR", help="write PNG plots here")
    peers.add_argument(
        "--prompt-chars", type=whole(20, 100_000), default=400, help="length of each turn"
    )
    peers.add_argument(
        "--variants",
        default="",
        help="mlx-pager again under the cap: keep (page cache as a second tier), "
        "prefetch, direct (O_DIRECT reads); comma-separated",
    )
    peers.add_argument(
        "--arm-timeout", type=whole(1, 10**6), help="seconds before a run is stopped"
    )


def _peer_error(message: str) -> int:
    import sys

    print(f"error: {message}", file=sys.stderr)
    return 2


def run_peers(args: argparse.Namespace) -> int:
    from ..benchmark.harness import (
        ALL_ARMS,
        PAGER_VARIANTS,
        corpus_prompts,
        machine_ram_bytes,
        run_benchmark,
    )
    from ..units import format_bytes, parse_bytes

    if not args.model or not Path(args.model).is_dir():
        return _peer_error(f"--peers needs --model DIR, a checkpoint folder ({args.model!r})")
    if not args.corpus or not Path(args.corpus).is_dir():
        return _peer_error(f"--peers needs --corpus DIR, a folder of *.txt ({args.corpus!r})")
    if args.gguf and not Path(args.gguf).is_file():
        return _peer_error(f"no GGUF file at {args.gguf}")
    cap = None
    if args.cap:
        try:
            cap = parse_bytes(args.cap)
        except ValueError as e:
            return _peer_error(f"--cap: {e}")
        ram = machine_ram_bytes()
        if cap <= 0 or cap > ram:
            return _peer_error(
                f"--cap {args.cap} must be above zero and at most this machine's "
                f"{format_bytes(ram)} of memory"
            )
    arms = {a.strip() for a in args.arms.split(",") if a.strip()}
    if not arms or arms - ALL_ARMS:
        return _peer_error(f"--arms: choose from {', '.join(sorted(ALL_ARMS))}")
    variants = tuple(v.strip() for v in args.variants.split(",") if v.strip())
    if set(variants) - set(PAGER_VARIANTS):
        return _peer_error(f"--variants: choose from {', '.join(PAGER_VARIANTS)}")
    try:
        prompts = corpus_prompts(Path(args.corpus), args.prompts, args.prompt_chars)
    except FileNotFoundError as e:
        return _peer_error(str(e))
    report = run_benchmark(
        Path(args.model),
        cap_bytes=cap,
        prompts=prompts,
        max_tokens=args.max_tokens,
        gguf=Path(args.gguf) if args.gguf else None,
        arms=arms,
        variants=variants,
        arm_timeout_s=args.arm_timeout,
    )
    if args.plots:
        from ..benchmark.plots import plot_report

        report["plots"] = [str(p) for p in plot_report(report, Path(args.plots))]
    if args.json:
        print(json.dumps(report, indent=2))
        return 0
    print(peer_table(report))
    return 0


def _num(value, fmt: str) -> str:
    return format(value, fmt) if isinstance(value, int | float) else "-"


def peer_table(report: dict) -> str:
    """One line a run: speeds, disk and stall per token, memory, hit rate, how it ended."""
    cap = report["cap_bytes"]
    lines = [
        f"model {report['model']} ({report['model_disk_bytes'] / 1e9:.2f} GB on disk), cap "
        f"{_num(cap and cap / 2**30, '.2f')} GiB ({report['cap_support']['why']}), "
        f"{report['max_tokens']} tokens x {len(report['prompts'])} prompts",
        f"{'run':<20} {'load s':>7} {'ttft s':>7} {'pre t/s':>8} {'dec t/s':>8} "
        f"{'disk KB/tok':>11} {'stall ms/tok':>12} {'psi ms/tok':>10} {'rss MB':>7} "
        f"{'cgroup MB':>9} "
        f"{'hit':>6} {'belady':>6} {'same':>5} exit  (hit: decode's)",
    ]
    same = report["ratios"]["tokens_equal_stock"]
    for name, r in report["runs"].items():
        ex = r["exit"]
        how = "ok" if ex["completed"] else ("OOM-killed" if ex["oom_killed"] else
                                           ex["signal"] or f"rc {ex['returncode']}")  # fmt: skip
        peak = (r.get("cap") or {}).get("peak_bytes")
        stall = r.get("blkio_stall_s_per_token")
        full = r.get("io_full_s_per_token")
        disk = r.get("disk_bytes_per_token")
        lines.append(
            f"{name:<20} {_num(r.get('load_s'), '7.2f')} {_num(r.get('ttft_s'), '7.3f')} "
            f"{_num(r.get('prefill_tps'), '8.1f')} {_num(r.get('decode_tps'), '8.1f')} "
            f"{_num(disk and disk / 1e3, '11.1f'):>11} {_num(stall and stall * 1e3, '12.2f'):>12} "
            f"{_num(full and full * 1e3, '10.2f'):>10} "
            f"{_num(r.get('peak_rss_bytes', 0) / 1e6, '7.0f')} "
            f"{_num(peak and peak / 1e6, '9.0f'):>9} {_num(r.get('decode_hit_rate'), '6.1%')} "
            f"{_num(r.get('belady_decode_hit_rate'), '6.1%')} {str(same.get(name, '-')):>5} {how}"
        )
    split = []
    for name, r in report["runs"].items():
        if r.get("ttft_read_s_per_prompt") and r.get("ttft_s") is not None:
            read = r["ttft_read_s_per_prompt"][0]  # the first prompt's: cold
            split.append(f"{name} {read:.2f} + {r['ttft_s'] - read:.2f}")
    if split:
        lines.append(f"first token, reading experts + the rest (s): {', '.join(split)}")
    waits = [
        f"{name} {r['read_seconds_per_token'] * 1e3:.1f}"
        for name, r in report["runs"].items()
        if r.get("read_seconds_per_token") is not None
    ]
    if waits:
        lines.append(
            "decode's wall time waiting on expert reads, ms/token (the engine's clock; the "
            "kernel's stall column sums every thread's, parallel readers each; psi: wall time "
            f"with every running thread of the process stalled on I/O): {', '.join(waits)}"
        )
    kept = ", ".join(f"{k} {_num(v, '.2f')}" for k, v in report["ratios"]["speed_kept"].items())
    lines.append(f"speed kept under the cap (capped / fully resident decode): {kept}")
    for name, why in report["skipped"].items():
        lines.append(f"skipped {name}: {why}")
    extra = report.get("nunspark_packed_extra_disk_bytes")
    if extra is not None:
        lines.append(f"NunSpark's packed copy: {extra / 1e6:.1f} MB of extra disk")
    agreement = (report.get("gguf") or {}).get("agreement")
    if agreement and "expert_slot_agreement" in agreement:
        lines.append(
            f"llama.cpp and mlx-pager route the first {agreement['tokens_compared']} prompt "
            f"tokens to the same experts: {agreement['expert_slot_agreement']:.1%} of "
            f"experts, {agreement['expert_set_agreement']:.1%} of (layer, token) sets"
        )
    lines.append("goals for mlx-pager under the cap:")
    for g in report.get("goals", []):
        verdict = {True: "met", False: "NOT met", None: "not measured"}[g["met"]]
        measured = g["measured"]
        shown = _num(measured, ".2f") if not isinstance(measured, bool) else str(measured)
        lines.append(f"  {g['goal']}: {shown} (goal {g['target']}): {verdict}")
    projection = report.get("projection")
    if projection and projection.get("projected_tps"):
        check = projection.get("self_check") or {}
        lines.append(
            f"PROJECTION, not a measurement: mlx-pager's counts under this cap priced at a "
            f"{projection['chip']}'s constants: {projection['projected_tps']:.1f} decode tok/s "
            f"(published Mac pagers: "
            + ", ".join(
                f"{f['tokens_per_second']} tok/s at {f['budget']} on a {f['machine']}"
                for f in projection["published_mac_pagers"]
            )
            + f"); the same model predicts {_num(check.get('predicted_tps'), '.2f')} tok/s here "
            f"against {_num(check.get('measured_tps'), '.2f')} measured (ratio "
            f"{_num(check.get('ratio'), '.2f')})"
        )
    return "\n".join(lines)


def make_model(args: argparse.Namespace) -> int:
    """`bench --make-model SHAPE DIR [--gguf FILE]`: the fixture, and its report."""
    from ..benchmark.fixture import make_model as write
    from ..benchmark.shapes import SHAPES

    shape, folder = args.make_model
    if shape not in SHAPES:
        return _peer_error(f"--make-model: unknown shape {shape!r}; one of {', '.join(SHAPES)}")
    folder = Path(folder)
    if folder.exists() and any(folder.iterdir()):
        return _peer_error(f"--make-model: {folder} is not empty; pick a new folder")
    try:
        report = write(shape, folder, seed=args.seed, num_layers=args.layers)
    except (ValueError, OSError) as e:
        return _peer_error(str(e))
    if args.gguf:
        from ..benchmark.gguf_export import export_gguf

        try:
            report["gguf"] = str(export_gguf(folder, Path(args.gguf)))
        except (ValueError, OSError) as e:
            return _peer_error(f"--gguf: {e}")
        report["gguf_bytes"] = Path(args.gguf).stat().st_size
    if args.json:
        print(json.dumps(report, indent=2))
        return 0
    print(fixture_summary(report))
    return 0


def fixture_summary(report: dict) -> str:
    """The fixture's size and its routing against the target curve and a real model's."""
    points = report["target_coverage"]
    reference = report["reference_overlap"]
    lines = [
        f"{report['shape']}: {report['layers']} layers ({report['moe_layers']} MoE), "
        f"{report['bytes'] / 1e9:.2f} GB, one expert {report['expert_bytes'] / 1e6:.2f} MB, "
        f"written in {report['seconds']:.0f} s",
        "share of activations taken by the top experts (fixture / target):",
        *(f"  top {float(x):.0%}: {report['coverage'][x]:.2f} / {points[x]:.2f}" for x in points),
        f"consecutive tokens share {report['overlap']:.2f} of their experts (random "
        f"routing: {report['uniform_overlap']:.2f}; a real model: {reference['overlap']:.3f} "
        f"against {reference['uniform_overlap']:.3f}, {reference['source']})",
        f"({report['measured']})",
    ]
    if "gguf" in report:
        lines.append(f"GGUF for llama.cpp: {report['gguf']} ({report['gguf_bytes'] / 1e9:.2f} GB)")
    return "\n".join(lines)


def run(args: argparse.Namespace) -> int:
    if args.make_model:
        return make_model(args)
    if args.peers:
        return run_peers(args)
    from ..sim.bench import (
        BENCH_MODEL,
        bench_chat,
        bench_layer_reads,
        bench_paged,
        bench_policies,
        bench_prefetch,
        bench_prefill_stalls,
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
        layer_reads = bench_layer_reads(path)
        default = "pread" if reads["pread_cold_ms"] <= reads["mmap_cold_ms"] else "mmap"
        stock = bench_stock(path, args.max_tokens)
        resident = bench_resident(path, args.max_tokens, args.repeats)
        shares = args.fractions
        paged = [bench_paged(path, f, args.max_tokens, default) for f in shares]
        prefetch = bench_prefetch(path, min(shares), args.max_tokens, default, args.repeats)
        chat = None
        if args.chat_fraction > 0:
            chat = bench_chat(path, args.chat_fraction, args.max_tokens)
        long_prompts = corpus_prompts(args.corpus, 4, 1200)
        prefill = bench_prefill_stalls(path, min(shares), long_prompts)
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
        "layer_reads": layer_reads,
        "prefill": prefill,
        "faster_read_path": default,
    }
    if args.json:
        print(json.dumps(report, indent=2))
        return 0
    print_report(report)
    return 0


def print_report(report: dict) -> None:
    """The bench's sections as text, from the report ``--json`` prints."""
    stock, resident, paged, prefetch = (
        report[k] for k in ("stock", "resident", "paged", "prefetch")
    )
    chat, policies, reads = report["chat"], report["policies"], report["reads"]
    layer_reads, prefill, default = (
        report["layer_reads"],
        report["prefill"],
        report["faster_read_path"],
    )
    shares = [p["fraction"] for p in paged]
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
        "per MoE layer and token (outside its sync, its reads and mlx-lm's computation), "
        f"{resident['host_ahead_us_per_layer']:.0f} us of it before the experts' computation "
        "starts (the rest runs beside it)"
    )
    off, on = prefetch["off"], prefetch["on"]
    verdict = {
        None: "still measuring",
        True: "guessing measured faster",
        False: "measured faster without guesses, paused",
    }[prefetch["prefetch_pays"]]
    print(
        f"prefetch at {prefetch['fraction']:.0%} of experts, {prefetch['repeats']} interleaved "
        f"rounds (without -> with; median rounds; gate: {verdict}):"
    )
    for key, label, scale in (
        ("decode_tps", "decode tok/s", 1),
        ("read_seconds", "seconds stalled on reads", 1),
        ("bytes_per_token", "disk MB/token", 1e-6),
        ("hit_rate", "hit rate", 1),
    ):
        print(f"  {label:>26}: {off[key] * scale:.3f} -> {on[key] * scale:.3f}")
    print(
        f"  with / without, median of the rounds: {prefetch['ratio']:.2f}x; prediction "
        f"recall {on['prefetch_recall']:.1%}, precision {on['prefetch_precision']:.1%}; "
        f"guesses used {on['prefetch_used']}/{on['prefetch_issued']}"
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
    print(
        f"a layer's misses ({layer_reads['experts_per_read']} experts) read through the cache, "
        "cold, against a cold sequential read of the same file and, with fio, random reads "
        "of the pieces' size, as many in flight as threads and in a decode step's bursts "
        "(MB/s, ratio):"
    )
    for key, row in layer_reads.items():
        if isinstance(row, dict):
            fio = (
                f"; fio {row['fio_piece_bytes'] // 1024} KiB random {row['fio_mb_s']:.0f} "
                f"({row['fio_ratio']:.2f}x)"
                if "fio_mb_s" in row
                else ""
            )
            if "fio_burst_mb_s" in row:
                fio += (
                    f", in bursts of {row['fio_burst_reads']} {row['fio_burst_mb_s']:.0f} "
                    f"({row['fio_burst_ratio']:.2f}x)"
                )
            print(
                f"  {key:>17}: {row['miss_mb_s']:.0f} vs sequential {row['sequential_mb_s']:.0f} "
                f"({row['ratio']:.2f}x){fio}"
            )
    if any(key.endswith("_as_stored") for key in layer_reads):
        print(
            "  (_as_stored: slots in the checkpoint's dtype, as on a GPU; the other rows "
            "widen bf16 into this CPU's float32 slots on the host as they read)"
        )
    print(
        f"prefill at {prefill['fraction']:.0%} of experts, from an empty cache, next layer "
        "read ahead (without -> with): first token "
        f"{prefill['plain_ttft']:.2f} -> {prefill['ahead_ttft']:.2f} s, stalled on reads "
        f"{prefill['plain_stall_share']:.1%} -> {prefill['ahead_stall_share']:.1%} of it; "
        f"{prefill['ahead_used_share']:.0%} of the read-aheads used"
    )
