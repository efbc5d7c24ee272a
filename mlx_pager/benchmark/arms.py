"""One benchmark arm per process: the same token ids, greedy, exactly N new tokens each.

``python -m mlx_pager.benchmark.arms ARM --model DIR --prompt-file F --max-tokens N``
prints one JSON line. The prompt file is a JSON list of prompts, each a list of token ids
(or a text turn, tokenised here with the model's chat template). Each arm is timed the
same way: time to the first token (prefill), then the remaining N-1 tokens (decode).
An arm whose package, module or file is missing prints ``{"skipped": why}``.
"""

from __future__ import annotations

import argparse
import json
import resource
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path

ARMS = ("stock", "mlx-pager", "nunspark", "llama", "baseline")


class Skip(Exception):
    """This arm cannot run here; the message says why."""


def peak_rss_bytes() -> int:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # KiB on Linux


def load_prompts(path: Path, model: Path) -> list[list[int]]:
    prompts = json.loads(Path(path).read_text())
    if not isinstance(prompts, list) or not prompts:
        raise ValueError(f"{path}: expected a JSON list of prompts")
    if all(isinstance(t, int) for t in prompts):
        prompts = [prompts]
    if all(isinstance(p, list) for p in prompts):
        return [[int(t) for t in p] for p in prompts]
    return [chat_tokens(model, str(p)) for p in prompts]


def chat_tokens(model: Path, text: str) -> list[int]:
    """A user turn as mlx-lm tokenises it: the chat template when the model has one."""
    from mlx_lm.utils import load_tokenizer

    tokenizer = load_tokenizer(Path(model))
    if tokenizer.has_chat_template:
        messages = [{"role": "user", "content": text}]
        return list(tokenizer.apply_chat_template(messages, add_generation_prompt=True))
    return tokenizer.encode(text)


def timed(steps: Iterator[int], max_tokens: int) -> dict:
    """Pull ``max_tokens`` tokens from a generator; the first one closes the prefill. The
    kernel's counters of this process at the first token and at the end give the decode's
    own storage reads and block-I/O stall (not the load's or the prompt's)."""
    from .cap import own_counters

    start = time.perf_counter()
    tokens: list[int] = []
    first = None
    at_first = (None, None, None)
    for token in steps:
        tokens.append(int(token))
        if first is None:
            first = time.perf_counter()
            at_first = own_counters()
        if len(tokens) >= max_tokens:
            break
    end = time.perf_counter()
    at_end = own_counters()
    read = at_end[0] - at_first[0] if None not in (at_end[0], at_first[0]) else None
    stall = at_end[1] - at_first[1] if None not in (at_end[1], at_first[1]) else None
    pressure = (at_first[2], at_end[2])
    return {
        "tokens": tokens,
        "ttft_s": first - start,
        "decode_s": end - first,
        "decode_read_bytes": read,
        "decode_blkio_s": stall,
        # wall-clock seconds of the decode with all (full) / some of its threads stalled on I/O
        "decode_io_full_s": pressure[1]["full"] - pressure[0]["full"] if all(pressure) else None,
        "decode_io_some_s": pressure[1]["some"] - pressure[0]["some"] if all(pressure) else None,
    }


def summarise(runs: list[dict], prompts: list[list[int]], load_s: float) -> dict:
    prompt_tokens = sum(len(p) for p in prompts)
    decoded = sum(len(r["tokens"]) - 1 for r in runs)
    prefill_s = sum(r["ttft_s"] for r in runs)
    decode_s = sum(r["decode_s"] for r in runs)
    reads = [r.get("decode_read_bytes") for r in runs]
    stalls = [r.get("decode_blkio_s") for r in runs]
    full = [r.get("decode_io_full_s") for r in runs]
    some = [r.get("decode_io_some_s") for r in runs]
    return {
        "decode_read_bytes": sum(reads) if None not in reads else None,
        "decode_blkio_s": sum(stalls) if None not in stalls else None,
        "decode_io_full_s": sum(full) if None not in full else None,
        "decode_io_some_s": sum(some) if None not in some else None,
        "load_s": load_s,
        "ttft_s": runs[0]["ttft_s"],  # the first prompt: the cold one
        "ttft_per_prompt_s": [r["ttft_s"] for r in runs],
        "prefill_tps": prompt_tokens / prefill_s if prefill_s else None,
        "decode_tps": decoded / decode_s if decode_s else None,
        "tokens": [r["tokens"] for r in runs],
        "prompt_tokens": prompt_tokens,
        "generated_tokens": sum(len(r["tokens"]) for r in runs),
        "decoded_tokens": decoded,
    }


def _greedy_steps(model, prompt: list[int], max_tokens: int) -> Iterator[int]:
    import mlx.core as mx
    from mlx_lm.generate import generate_step

    for token, _ in generate_step(
        mx.array(prompt), model, max_tokens=max_tokens, sampler=lambda x: mx.argmax(x, axis=-1)
    ):
        yield int(token)


def run_stock(args: argparse.Namespace, prompts: list[list[int]]) -> dict:
    """mlx-lm as shipped, the whole model loaded; floats cast as the engine casts them."""
    import mlx.core as mx
    from mlx_lm import load

    from ..paging.loader import cast_floating, default_compute_dtype

    start = time.perf_counter()
    model, _ = load(str(args.model))
    dtype = default_compute_dtype()
    if dtype is not None:
        model.update(cast_floating(model.parameters(), dtype))
    mx.eval(model.parameters())
    load_s = time.perf_counter() - start
    runs = [timed(_greedy_steps(model, p, args.max_tokens), args.max_tokens) for p in prompts]
    return {**summarise(runs, prompts, load_s), "compute_dtype": str(dtype)}


def run_mlx_pager(args: argparse.Namespace, prompts: list[list[int]]) -> dict:
    """The engine at ``--budget``: hit rate, misses, read stalls, its own bytes, the trace."""
    from ..engine import Engine
    from ..paging.loader import load_paged
    from ..sim.trace import TraceRecorder

    if args.budget is None:
        raise ValueError("the mlx-pager arm needs --budget BYTES")
    context = max(len(p) for p in prompts) + args.max_tokens + 16
    start = time.perf_counter()
    paged = load_paged(
        Path(args.model),
        args.budget,
        context_length=context,
        read_path=args.read_path,
        page_cache=args.page_cache,
        prefetch=args.prefetch,
    )
    engine = Engine(paged, str(args.model), context)
    load_s = time.perf_counter() - start
    recorder = None
    if paged.run is not None:  # every token fed, prompt and reply, in the order served
        recorder = TraceRecorder(engine.info.experts_per_layer, str(args.model), phase="decode")
        paged.run.on_tokens = lambda layer, ids: recorder.record(layer, ids)
    runs, hits, misses, dhits, dmisses, prefill_reads = [], 0, 0, 0, 0, []
    read_s = decode_read_s = bytes_read = host_s = host_ahead_s = host_layers = 0
    try:
        for prompt in prompts:
            engine.begin_run(len(prompt))
            runs.append(timed(_greedy_steps(paged.model, prompt, args.max_tokens), args.max_tokens))
            run, s = paged.run, engine.stats
            if run is None:
                continue
            run.sync()
            at_prefill = run.prefill_counts or (s.hits, s.misses)
            hits, misses = hits + s.hits, misses + s.misses
            dhits += s.hits - at_prefill[0]
            dmisses += s.misses - at_prefill[1]
            read_s += s.read_seconds
            prefill_read = run.prefill_read_seconds if run.prefill_counts else s.read_seconds
            prefill_reads.append(prefill_read)  # of its time to first token, waiting on reads
            decode_read_s += s.read_seconds - prefill_read
            bytes_read += s.bytes_read
            host_s += run.host_seconds
            host_ahead_s += run.host_ahead_seconds
            host_layers += run.host_layers
            if recorder is not None:
                recorder.end_sequence()
        plan = paged.plan
        result = summarise(runs, prompts, load_s)
        decoded = result["decoded_tokens"]
        result.update(
            budget_bytes=args.budget,
            slots=plan.slots,
            num_experts=plan.num_experts,
            expert_fraction=plan.expert_fraction,
            hit_rate=hits / (hits + misses) if hits + misses else None,
            decode_hit_rate=dhits / (dhits + dmisses) if dhits + dmisses else None,
            misses_per_token=dmisses / decoded if decoded else None,
            read_stall_s=read_s,
            ttft_read_s_per_prompt=prefill_reads,
            engine_bytes_read=bytes_read,
            host_us_per_moe_layer=1e6 * host_s / host_layers if host_layers else None,
            host_ahead_us_per_moe_layer=1e6 * host_ahead_s / host_layers if host_layers else None,
            **_projection_counts(args, paged, decode_read_s / decoded if decoded else None),
        )
        result["host_us_per_layer"] = result["host_us_per_moe_layer"]
        if recorder is not None and args.trace:
            recorder.save(args.trace)
            result["trace"] = str(args.trace)
        return result
    finally:
        engine.close()


def _projection_counts(args: argparse.Namespace, paged, read_s_per_token: float | None) -> dict:
    """What the Mac projection prices (benchmark/projection.py): the MoE layers, one
    expert's stored bytes, and the weights a token computes with as a Mac holds them (the
    checkpoint's own dtypes: no float32 cast of the core as on this CPU)."""
    from ..paging.loader import inspect_model

    if paged.cache is None:
        return {}
    layout = inspect_model(Path(args.model), 256, compute_dtype=None)  # weights, no KV
    stored = paged.cache.map.expert_disk_bytes()
    return {
        "moe_layers": layout.moe_layers,
        "expert_bytes": stored,
        "active_bytes_per_token": layout.resident_bytes + layout.moe_layers * layout.top_k * stored,
        "read_seconds_per_token": read_s_per_token,
    }


def run_nunspark(args: argparse.Namespace, prompts: list[list[int]]) -> dict:
    """NunSpark's streaming engine over its packed copy, at ``--budget`` resident bytes."""
    try:
        from nunspark.engine import StreamingEngine
        from nunspark.generate import stream_generate
        from nunspark.manifest import Manifest
    except ImportError as e:
        raise Skip(f"nunspark is not installed ({e}): pip install 'mlx-pager[peers]'") from e
    if args.packed is None or not (Path(args.packed) / "manifest.json").exists():
        raise Skip(f"no packed NunSpark copy at {args.packed} (run `nunspark pack` first)")
    if args.budget is None:
        raise ValueError("the nunspark arm needs --budget BYTES")
    packed = Path(args.packed)
    start = time.perf_counter()
    engine = StreamingEngine(packed, Manifest.load(packed / "manifest.json"), args.budget)
    load_s = time.perf_counter() - start
    try:
        runs = [
            timed(stream_generate(engine, p, max_tokens=args.max_tokens, temp=0.0), args.max_tokens)
            for p in prompts
        ]
        hits, misses = engine.cache.hits, engine.cache.misses
        peak = engine.cache.peak_bytes
    finally:
        engine.close()
    return {
        **summarise(runs, prompts, load_s),
        "budget_bytes": args.budget,
        "piece_hit_rate": hits / (hits + misses) if hits + misses else None,
        "piece_misses": misses,
        "resident_peak_bytes": peak,
    }


def run_llama(args: argparse.Namespace, prompts: list[list[int]]) -> dict:
    """llama.cpp on the GGUF copy, loaded once (mmap), each prompt from a fresh context."""
    try:
        import llama_cpp  # noqa: F401
    except ImportError as e:
        raise Skip(f"llama-cpp-python is not installed ({e})") from e
    from .llama_arm import greedy_steps, open_llama

    if args.gguf is None or not Path(args.gguf).is_file():
        raise Skip(f"no GGUF file at {args.gguf}: pass --gguf FILE")
    start = time.perf_counter()
    llm = open_llama(Path(args.gguf), n_ctx=max(len(p) for p in prompts) + args.max_tokens + 8)
    load_s = time.perf_counter() - start
    try:
        runs = [timed(greedy_steps(llm, p), args.max_tokens) for p in prompts]
    finally:
        llm.close()
    return summarise(runs, prompts, load_s)


def run_baseline(args: argparse.Namespace, prompts: list[list[int]]) -> dict:
    """Every library an arm imports and the tokenizer, and nothing of the weights: run
    after the page cache is dropped, it leaves the libraries warm and the model cold, so
    an arm's kernel read count is its model's."""
    import importlib
    import importlib.util

    from mlx_lm.utils import load_tokenizer

    from .. import engine  # noqa: F401
    from ..paging import loader  # noqa: F401

    warmed = ["mlx_lm.generate"]
    for name in ("mlx_lm", "nunspark.engine", "nunspark.generate", "llama_cpp"):
        if importlib.util.find_spec(name.split(".")[0]) is not None:
            importlib.import_module(name)
            warmed.append(name)
    load_tokenizer(Path(args.model))
    return {"prompt_tokens": sum(len(p) for p in prompts), "warmed": warmed}


RUNNERS: dict[str, Callable[[argparse.Namespace, list[list[int]]], dict]] = {
    "stock": run_stock,
    "mlx-pager": run_mlx_pager,
    "nunspark": run_nunspark,
    "llama": run_llama,
    "baseline": run_baseline,
}


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m mlx_pager.benchmark.arms")
    parser.add_argument("arm", choices=ARMS)
    parser.add_argument("--model", type=Path, required=True)
    parser.add_argument("--prompt-file", type=Path, required=True)
    parser.add_argument("--max-tokens", type=int, required=True)
    parser.add_argument("--budget", type=int)
    parser.add_argument("--gguf", type=Path)
    parser.add_argument("--packed", type=Path)
    parser.add_argument("--trace", type=Path, help="mlx-pager: the routing trace (.npz)")
    parser.add_argument("--read-path", default="auto", help="mlx-pager: pread, mmap, direct")
    parser.add_argument("--page-cache", default="drop", help="mlx-pager: drop or keep")
    parser.add_argument("--prefetch", action="store_true", help="mlx-pager: read ahead")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    out: dict = {"arm": args.arm}
    try:
        prompts = load_prompts(args.prompt_file, args.model)
        out.update(RUNNERS[args.arm](args, prompts))
    except Skip as e:
        out["skipped"] = str(e)
    out["peak_rss_bytes"] = peak_rss_bytes()
    print(json.dumps(out), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
