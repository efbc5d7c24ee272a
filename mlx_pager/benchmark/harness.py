"""The at-scale benchmark: every system in its own process, under a real memory cap.

Each run is ``python -m mlx_pager.benchmark.arms`` inside ``cap.run_capped`` (a memory
cgroup, page cache included), the page cache dropped first so every arm starts cold;
then a ``baseline`` process imports the libraries, so they are warm and the model cold
and the kernel's read count is the model's. The same token ids go to every arm; the
harness adds the kernel's counters (disk bytes, block-I/O stalls, the cgroup's peak),
the ratios between runs, and Belady's bound for mlx-pager's own routing.
"""

from __future__ import annotations

import importlib.util
import json
import os
import sys
import tempfile
from pathlib import Path

from .cap import cgroup_version, drop_page_cache, run_capped

MiB = 2**20
# What the interpreter and its libraries take beside the engine's budget, under a cap.
PROCESS_BASELINE_BYTES = 256 * MiB
# A fully resident run is skipped when the model is larger than this share of the memory
# available when it starts: past it the kernel's OOM killer would pick the largest process,
# the run itself or someone else's work, and that measures nothing.
RESIDENT_SHARE_OF_AVAILABLE = 0.8
ALL_ARMS = frozenset({"stock", "mlx-pager", "nunspark", "llama"})
AGREEMENT_TOKENS = 8  # the first prompt tokens whose routing llama.cpp and MLX compare
# mlx-pager once more under the cap: (share of the cap's budget, arm options). "keep":
# half the budget for slots, the rest of the cap left to the OS page cache, pages kept.
PAGER_VARIANTS: dict[str, tuple[float, dict]] = {
    "keep": (0.5, {"page-cache": "keep"}),
    "prefetch": (1.0, {"prefetch": True}),
    "direct": (1.0, {"read-path": "direct"}),
}


def machine_ram_bytes() -> int:
    return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")


def too_big_to_hold(needed_bytes: int) -> str | None:
    """Why a fully resident run holding ``needed_bytes`` cannot run here now, or None."""
    import psutil

    available = psutil.virtual_memory().available
    if needed_bytes <= RESIDENT_SHARE_OF_AVAILABLE * available:
        return None
    return (
        f"holding it all takes {needed_bytes / 1e9:.1f} GB, over "
        f"{RESIDENT_SHARE_OF_AVAILABLE:.0%} of the memory available now "
        f"({available / 1e9:.1f} GB of {machine_ram_bytes() / 1e9:.1f})"
    )


def folder_bytes(path: Path) -> int:
    return sum(f.stat().st_size for f in Path(path).rglob("*") if f.is_file())


def budget_for_cap(cap_bytes: int) -> int:
    """The engine budget a cap leaves after the process's own libraries."""
    return max(cap_bytes - max(PROCESS_BASELINE_BYTES, cap_bytes // 10), cap_bytes // 2)


def corpus_prompts(corpus: Path, n: int = 3, chars: int = 400) -> list[str]:
    # (chars: each turn's length; MLX on a CPU computes a few tokens a second at scale)
    """Openings of real documents, one domain after another, as chat turns."""
    from ..sim.bench import corpus_prompts as openings

    if not Path(corpus).is_dir():
        raise FileNotFoundError(f"No corpus folder {corpus}: pass a folder of *.txt files.")
    if not list(Path(corpus).glob("*.txt")):
        raise FileNotFoundError(f"The corpus folder {corpus} holds no *.txt files.")
    return openings(Path(corpus), n, chars)


def tokenise(model_dir: Path, prompts: list[str]) -> list[list[int]]:
    from .arms import chat_tokens

    return [chat_tokens(model_dir, p) for p in prompts]


def share_budgets(model_dir: Path, context: int, fractions) -> dict[float, int]:
    """Budgets that hold a share of the experts, by the engine's own budget planning."""
    from ..paging.loader import inspect_model

    layout = inspect_model(model_dir, context)
    plan = layout.plan(0)
    budgets = {1.0: plan.full_budget_bytes}
    for f in fractions:
        budgets[f] = plan.share_budget_bytes(f)
    return budgets


def _arm(
    arm: str,
    model_dir: Path,
    prompt_file: Path,
    max_tokens: int,
    cap_bytes: int | None,
    timeout_s: float | None = None,
    **options,
) -> dict:
    argv = [sys.executable, "-m", "mlx_pager.benchmark.arms", arm, "--model", str(model_dir),
            "--prompt-file", str(prompt_file), "--max-tokens", str(max_tokens)]  # fmt: skip
    for key, value in options.items():
        if value is True:  # a flag
            argv.append(f"--{key}")
        elif value is not None and value is not False:
            argv += [f"--{key}", str(value)]
    cold = drop_page_cache()
    if arm != "baseline":  # libraries warm, model cold: read_bytes is the model's
        run_capped(argv[:3] + ["baseline"] + argv[4:], None)
    child = run_capped(argv, cap_bytes, timeout_s=timeout_s)
    line = next((x for x in reversed(child.stdout.splitlines()) if x.startswith("{")), None)
    result = json.loads(line) if line else {"arm": arm}
    if line is None:
        result["error"] = child.stderr.strip().splitlines()[-1:] or ["no output"]
    result["cold_start"] = cold
    result["exit"] = {
        "returncode": child.returncode,
        "signal": child.signal,
        "oom_killed": child.oom_killed,
        "completed": child.returncode == 0 and line is not None,
    }
    result["cap"] = child.cap
    result["cap_reason"] = child.cap_reason
    result["read_bytes"] = child.read_bytes
    result["blkio_delay_s"] = child.blkio_delay_s
    result["io_pressure_s"] = child.io_pressure_s
    result["delay_accounting"] = child.delay_accounting
    result["wall_s"] = child.wall_s
    result["notes"] = child.notes
    # Per decoded token: the decode's own reads and stalls, counted by the kernel inside
    # the process between its first and last token (the load's and prompt's are not a
    # decoded token's); the whole process's, from outside, stay in read_bytes/blkio_delay_s.
    decoded = result.get("decoded_tokens") or 0
    if decoded and result.get("decode_read_bytes") is not None:
        result["disk_bytes_per_token"] = result["decode_read_bytes"] / decoded
    if decoded and result.get("decode_blkio_s") is not None:
        result["blkio_stall_s_per_token"] = result["decode_blkio_s"] / decoded
    for kind in ("full", "some"):  # PSI: wall-clock, whatever the number of threads
        if decoded and result.get(f"decode_io_{kind}_s") is not None:
            result[f"io_{kind}_s_per_token"] = result[f"decode_io_{kind}_s"] / decoded
    if arm != "baseline":  # a long run says where it is; stdout carries only the report
        done = "done" if result["exit"]["completed"] else "did not finish"
        print(f"{arm} {' '.join(argv[10:])}: {done} in {child.wall_s:.0f} s", file=sys.stderr)
    return result


def _belady(run: dict) -> None:
    """Belady's offline hit rate for the run's slots, on the routing it recorded: the
    replay's shared mode holds ``capacity x layers`` experts, so the run's slots are
    divided by the layers, rounded up (a cache no smaller: still a bound)."""
    from ..sim.replay import belady
    from ..sim.trace import load_trace

    trace_path = run.get("trace")
    if not trace_path or not Path(trace_path).exists():
        return
    trace = load_trace(trace_path)
    first = trace.expert_ids[: int(trace.offsets[1])][:AGREEMENT_TOKENS]
    run["first_routes"] = {layer: first[:, layer] for layer in range(trace.num_layers)}
    per_layer = max(-(-run["slots"] // trace.num_layers), trace.top_k)
    one_sequence = len(trace.offsets) == 2 and run.get("prompt_tokens")
    result = belady(
        trace, per_layer, shared=True, split=run["prompt_tokens"] if one_sequence else None
    )
    run["belady_hit_rate"] = result.hit_rate
    # Decode only, in the live decode hit rate's units (one request per token and expert;
    # a prefill fetch counts an expert once for all its tokens, the trace once per token).
    run["belady_decode_hit_rate"] = result.held_out_hit_rate
    run["belady_misses_per_token"] = result.misses_per_token
    run["belady_slots"] = per_layer * trace.num_layers
    run["trace_tokens"] = trace.num_tokens
    Path(trace_path).unlink()
    run.pop("trace")


def _ratios(runs: dict[str, dict]) -> dict:
    def tps(name: str) -> float | None:
        r = runs.get(name)
        return r.get("decode_tps") if r and r["exit"]["completed"] else None

    kept = {}
    for system, resident, capped in (
        ("stock", "stock-resident", "stock-capped"),
        ("mlx-pager", "mlx-pager-resident", "mlx-pager-capped"),
        ("nunspark", "nunspark-resident", "nunspark-capped"),
        ("llama", "llama-resident", "llama-capped"),
    ):
        a, b = tps(capped), tps(resident)
        kept[system] = a / b if a and b else None
    ours = runs.get("mlx-pager-capped", {}).get("disk_bytes_per_token")
    disk = {}
    for name, r in runs.items():
        theirs = r.get("disk_bytes_per_token")
        disk[name] = theirs / ours if theirs is not None and ours else None
    reference = next(
        (runs[n]["tokens"] for n in ("stock-resident", "stock-capped")
         if n in runs and runs[n]["exit"]["completed"]),
        None,
    )  # fmt: skip
    same = {
        name: (r.get("tokens") == reference if reference and r.get("tokens") else None)
        for name, r in runs.items()
    }
    return {
        "speed_kept": kept,
        "disk_bytes_per_token_vs_mlx_pager": disk,
        "tokens_equal_stock": same,
    }


def run_benchmark(
    model_dir: Path,
    *,
    cap_bytes: int | None,
    prompts: list[str],
    max_tokens: int,
    fractions=(0.5, 0.25, 0.125),
    gguf: Path | None = None,
    arms: set[str] = ALL_ARMS,
    workdir: Path | None = None,
    variants: tuple[str, ...] = (),
    arm_timeout_s: float | None = None,
) -> dict:
    """Every system cold, in its own process, fully resident and under ``cap_bytes``.

    ``variants``: mlx-pager under the cap once more per name in ``PAGER_VARIANTS`` (the
    page cache as a second tier, decode prefetch, O_DIRECT reads), to decide defaults by
    measurement. ``arm_timeout_s``: a run still going after it is killed and says so."""
    model_dir = Path(model_dir)
    if not model_dir.is_dir():
        raise FileNotFoundError(f"No model folder {model_dir}")
    unknown = set(arms) - ALL_ARMS
    if unknown:
        raise ValueError(f"Unknown arms {sorted(unknown)}; choose from {sorted(ALL_ARMS)}")
    version, why = cgroup_version()
    with tempfile.TemporaryDirectory(dir=workdir) as tmp:
        tmp = Path(tmp)
        tokens = tokenise(model_dir, prompts)
        prompt_file = tmp / "prompts.json"
        prompt_file.write_text(json.dumps(tokens))
        context = max(len(t) for t in tokens) + max_tokens + 16
        budgets = share_budgets(model_dir, context, fractions)
        cap_budget = budget_for_cap(cap_bytes) if cap_bytes else budgets[1.0]
        model_bytes = folder_bytes(model_dir)
        runs: dict[str, dict] = {}
        skipped: dict[str, str] = {}
        baseline = _arm("baseline", model_dir, prompt_file, max_tokens, None)
        library = baseline.get("read_bytes") or 0  # what warming the libraries read, cold
        common = (model_dir, prompt_file, max_tokens)
        if "stock" in arms:
            why_not = too_big_to_hold(model_bytes)
            if why_not:
                skipped["stock-resident"] = why_not
            else:
                runs["stock-resident"] = _arm("stock", *common, None, arm_timeout_s)
            runs["stock-capped"] = _arm("stock", *common, cap_bytes, arm_timeout_s)
        if "mlx-pager" in arms:

            def pager(name: str, budget: int, cap: int | None, **options) -> None:
                trace = tmp / f"{name}.npz"
                runs[name] = _arm(
                    "mlx-pager", *common, cap, budget=budget, trace=trace,
                    timeout_s=arm_timeout_s, **options,
                )  # fmt: skip
                _belady(runs[name])

            capped = min(cap_budget, budgets[1.0])
            why_not = too_big_to_hold(budgets[1.0])
            if why_not:
                skipped["mlx-pager-resident"] = why_not
            else:
                pager("mlx-pager-resident", budgets[1.0], None)
            pager("mlx-pager-capped", capped, cap_bytes)
            for f in fractions:
                if cap_bytes and budgets[f] > cap_budget:  # it could only be killed
                    skipped[f"mlx-pager-{f:g}"] = (
                        f"holding {f:.1%} of the experts takes a {budgets[f] / 2**30:.2f} GiB "
                        f"budget; the cap leaves {cap_budget / 2**30:.2f} GiB"
                    )
                    continue
                pager(f"mlx-pager-{f:g}", budgets[f], cap_bytes)
                runs[f"mlx-pager-{f:g}"]["expert_share_asked"] = f
            for variant in variants:
                share, options = PAGER_VARIANTS[variant]
                pager(f"mlx-pager-{variant}", int(capped * share), cap_bytes, **options)
                runs[f"mlx-pager-{variant}"]["variant"] = variant
        packed_extra = None
        if "nunspark" in arms:
            packed = tmp / "nunspark"
            pack = _pack_nunspark(model_dir, packed)
            if pack is None:
                packed_extra = folder_bytes(packed)
                everything = 2 * packed_extra + 512 * MiB
                why_not = too_big_to_hold(packed_extra)
                if why_not:
                    skipped["nunspark-resident"] = why_not
                else:
                    runs["nunspark-resident"] = _arm(
                        "nunspark", *common, None, arm_timeout_s, budget=everything,
                        packed=packed,
                    )  # fmt: skip
                runs["nunspark-capped"] = _arm(
                    "nunspark", *common, cap_bytes, arm_timeout_s, budget=cap_budget,
                    packed=packed,
                )  # fmt: skip
            else:
                skipped["nunspark"] = pack
        gguf_report: dict = {"given": str(gguf) if gguf else None}
        if "llama" in arms and importlib.util.find_spec("llama_cpp") is None:
            why = "llama-cpp-python is not installed: pip install 'mlx-pager[peers]' (it compiles"
            why += " llama.cpp, about half an hour on two cores)"
            gguf_report["skipped"] = f"{why}; no GGUF written"
            skipped["llama-resident"] = skipped["llama-capped"] = why
        elif "llama" in arms:
            if gguf is None:
                gguf = _export_gguf(model_dir, tmp / "model.gguf", gguf_report)
            if gguf is not None:
                gguf_report["bytes"] = Path(gguf).stat().st_size
                ours = runs.get("mlx-pager-capped", {}).get("first_routes")
                if ours is not None:
                    gguf_report["agreement"] = _llama_agreement(gguf, tokens[0], ours, tmp)
            runs["llama-resident"] = _arm("llama", *common, None, arm_timeout_s, gguf=gguf)
            runs["llama-capped"] = _arm("llama", *common, cap_bytes, arm_timeout_s, gguf=gguf)
        for r in runs.values():
            r.pop("first_routes", None)
        for name, r in list(runs.items()):
            if "skipped" in r:
                skipped[name] = r["skipped"]
                del runs[name]
    return {
        "model": str(model_dir),
        "model_disk_bytes": model_bytes,
        "cap_bytes": cap_bytes,
        "cap_support": {"version": version, "why": why},
        "budget_under_cap": cap_budget,
        "share_budgets": {f"{k:g}": v for k, v in budgets.items()},
        "max_tokens": max_tokens,
        "library_read_bytes": library,
        "prompts": prompts,
        "prompt_token_counts": [len(t) for t in tokens],
        "nunspark_packed_extra_disk_bytes": packed_extra,
        "gguf": gguf_report,
        "runs": runs,
        "skipped": skipped,
        "ratios": _ratios(runs),
        "goals": goals(runs),
        "projection": _projection(runs),
    }


def _pack_nunspark(model_dir: Path, out: Path) -> str | None:
    """``nunspark pack`` in a process of its own; None when done, else why it could not."""
    if importlib.util.find_spec("nunspark") is None:
        return "nunspark is not installed: pip install 'mlx-pager[peers]'"
    code = "import sys; from nunspark.cli import main; sys.exit(main(sys.argv[1:]))"
    child = run_capped([sys.executable, "-c", code, "pack", str(model_dir), str(out)], None)
    if child.returncode != 0:
        tail = child.stderr.strip().splitlines()[-1:] or ["no output"]
        return f"nunspark pack failed: {tail[0]}"
    return None


def _export_gguf(model_dir: Path, out: Path, report: dict) -> Path | None:
    """The llama.cpp arm's GGUF, written beside the run (the same weights, repacked); None
    with the reason in ``report`` when the model cannot be exported."""
    import time

    from .gguf_export import export_gguf

    start = time.perf_counter()
    try:
        export_gguf(model_dir, out)
    except (ValueError, ImportError) as e:
        report["skipped"] = f"no GGUF export: {e}"
        return None
    report["export_s"] = time.perf_counter() - start
    report["exported"] = True
    return out


def _llama_agreement(gguf: Path, prompt: list[int], ours: dict, tmp: Path) -> dict:
    """llama.cpp's routing of the prompt's first tokens (its own process) against
    mlx-pager's, recorded in the capped run (bit for bit mlx-lm's, tests/test_exact.py)."""
    from .gguf_agreement import expert_agreement

    tokens_file = tmp / "agreement-tokens.json"
    tokens_file.write_text(json.dumps(prompt))
    argv = [sys.executable, "-m", "mlx_pager.benchmark.gguf_agreement", str(gguf),
            str(tokens_file), str(AGREEMENT_TOKENS)]  # fmt: skip
    child = run_capped(argv, None)
    line = next((x for x in reversed(child.stdout.splitlines()) if x.startswith("{")), None)
    if line is None:
        tail = child.stderr.strip().splitlines()[-1:] or ["no output"]
        return {"error": f"llama.cpp routing failed: {tail[0]}"}
    theirs = {int(k): v for k, v in json.loads(line)["routed"].items()}
    return expert_agreement(ours, theirs, AGREEMENT_TOKENS)


def goals(runs: dict[str, dict]) -> list[dict]:
    """The at-scale issue's goals for mlx-pager under the cap, each with its measured
    ratio and whether it is met (None where a side did not run or complete)."""

    def value(name: str, key: str) -> float | None:
        r = runs.get(name)
        return r.get(key) if r and r["exit"]["completed"] else None

    def ratio(a: float | None, b: float | None) -> float | None:
        return a / b if a is not None and b else None

    ours, nun, llama = "mlx-pager-capped", "nunspark-capped", "llama-capped"
    stock = runs.get("stock-capped")
    pager = runs.get(ours)
    rows = [
        ("decode tok/s vs NunSpark at the same budget", ">= 3",
         ratio(value(ours, "decode_tps"), value(nun, "decode_tps")), lambda x: x >= 3),
        ("disk bytes per decoded token vs llama.cpp under the cap", "<= 0.5",
         ratio(value(ours, "disk_bytes_per_token"), value(llama, "disk_bytes_per_token")),
         lambda x: x <= 0.5),
        # The stall as the whole process felt it: wall-clock time in which every running
        # thread waited on I/O (PSI full), the same whether an engine reads on 1 thread or 8
        ("read stall per decoded token vs llama.cpp under the cap (PSI full)", "<= 0.33",
         ratio(value(ours, "io_full_s_per_token"), value(llama, "io_full_s_per_token")),
         lambda x: x <= 1 / 3),
        # Delay accounting's sum over threads: 8 readers waiting on one layer count 8 times
        ("read stall per decoded token vs llama.cpp under the cap (delay accounting, "
         "summed over threads)", "<= 0.33",
         ratio(value(ours, "blkio_stall_s_per_token"), value(llama, "blkio_stall_s_per_token")),
         lambda x: x <= 1 / 3),
    ]  # fmt: skip
    out = [
        {"goal": goal, "target": target, "measured": measured,
         "met": None if measured is None else bool(test(measured))}
        for goal, target, measured, test in rows
    ]  # fmt: skip
    decodes_where_stock_dies = None
    if stock is not None and pager is not None:
        decodes_where_stock_dies = (not stock["exit"]["completed"]) and pager["exit"]["completed"]
    out.append({"goal": "decodes under the cap where stock mlx-lm cannot", "target": "yes",
                "measured": decodes_where_stock_dies, "met": decodes_where_stock_dies})  # fmt: skip
    return out


def _projection(runs: dict[str, dict]) -> dict | None:
    """mlx-pager's capped run priced at a 16 GB M4 MacBook Air's constants (a projection,
    with the model's self-check against this machine's measured decode speed)."""
    from .projection import project_mac

    run = runs.get("mlx-pager-capped")
    if not run or not run["exit"]["completed"]:
        return None
    return project_mac(run, "M4 Air 16GB")
