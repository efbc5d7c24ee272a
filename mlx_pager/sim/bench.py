"""The benchmark behind `mlx-pager bench`: stock mlx-lm against mlx-pager, side by side in one run.

Decode tokens/s fully resident (stock mlx-lm) and paged at budgets holding 100%, 50% and
25% of the experts; disk bytes per token; the read time of one expert through pread and
mmap, cold (dropped from the page cache) and warm. Ratios are taken within the run.
"""

from __future__ import annotations

import itertools
import os
import signal
import statistics
import sys
import time
from pathlib import Path

import mlx.core as mx
from mlx_lm import load, stream_generate

from ..engine import Engine, ban_tokens
from ..paging.loader import cast_floating, inspect_model, load_paged
from ..storage.readers import DEFAULT_READ_THREADS, drop_page_cache, make_reader

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


def bench_resident(path: Path, max_tokens: int, repeats: int = 5) -> dict:
    """Every expert resident: stock mlx-lm and the paged engine decode the same prompt in
    turn, ``repeats`` times (interleaved, so a busy machine slows both alike); medians of
    the speeds and of the per-round ratio, and the pager's own host time per MoE layer
    and decode token (``PagedSwitch.__call__`` less its sync and its reads)."""
    model, tokenizer = load(str(path))
    model.update(cast_floating(model.parameters(), mx.float32))
    tokens = tokenizer.encode(PROMPT)
    no_eos = [ban_tokens(tokenizer.eos_token_ids)]
    engine = _open_at(path, 1.0)
    engine.keep_prompt_cache = False
    stock, paged, host, ahead = [], [], [], []
    try:
        for _ in engine.generate(WARMUP, max_tokens, chat_template=False, ignore_eos=True):
            pass
        for _ in range(repeats):
            responses = stream_generate(
                model, tokenizer, tokens, max_tokens=max_tokens, logits_processors=no_eos
            )
            stock.append(_decode_tps(responses)[0])
            for _ in engine.generate(PROMPT, max_tokens, chat_template=False, ignore_eos=True):
                pass
            paged.append(engine.stats.decode_tps)
            run = engine.paged.run
            host.append(run.host_seconds / max(1, run.host_layers))
            ahead.append(run.host_ahead_seconds / max(1, run.host_layers))
    finally:
        engine.close()
    return {
        "stock_tps": statistics.median(stock),
        "paged_tps": statistics.median(paged),
        "ratio": statistics.median(p / s for p, s in zip(paged, stock, strict=True)),
        "host_us_per_layer": 1e6 * statistics.median(host),
        "host_ahead_us_per_layer": 1e6 * statistics.median(ahead),
        "repeats": repeats,
    }


def _paged_engine(
    path: Path, fraction: float, max_tokens: int, read_path: str, prefetch: bool
) -> tuple[Engine, int, float]:
    """An engine holding ``fraction`` of the experts, warmed on one prompt: (the engine,
    its budget, the hit rate of that first run, which filled an empty cache)."""
    budget = inspect_model(path, 4096).plan(0).share_budget_bytes(fraction)
    engine = Engine(
        load_paged(path, budget, read_path=read_path, prefetch=prefetch), str(path), 4096
    )
    engine.keep_prompt_cache = False  # every prompt fed in full, as stock mlx-lm does here
    try:
        for _ in engine.generate(WARMUP, max_tokens, chat_template=False, ignore_eos=True):
            pass
    except BaseException:
        engine.close()
        raise
    return engine, budget, engine.stats.hit_rate


def _paged_row(engine: Engine, fraction: float, budget: int, cold_hit_rate: float) -> dict:
    """The last reply's figures."""
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
        "prefetch": engine.paged.cache.prefetcher is not None,
        "prefetch_recall": s.prefetch_recall,
        "prefetch_precision": s.prefetch_precision,
        "prefetch_used": s.prefetch_used,
        "prefetch_issued": s.prefetch_issued,
        "prefetch_pays": s.prefetch_pays,  # the gate's verdict: guessing measured faster
    }


def bench_paged(path: Path, fraction: float, max_tokens: int, read_path: str) -> dict:
    engine, budget, cold_hit_rate = _paged_engine(path, fraction, max_tokens, read_path, False)
    try:
        for _ in engine.generate(PROMPT, max_tokens, chat_template=False, ignore_eos=True):
            pass
        return _paged_row(engine, fraction, budget, cold_hit_rate)
    finally:
        engine.close()


def bench_prefetch(
    path: Path, fraction: float, max_tokens: int, read_path: str, repeats: int = 5
) -> dict:
    """Decode with the prefetcher (and its gate) on against off, at ``fraction`` of the
    experts: two engines, one prompt each in turn (which goes first alternates),
    ``repeats`` rounds, so a busy machine slows both alike. ``off`` and ``on``: the round
    with each one's median decode speed; ``ratio``: the median of the rounds' on / off."""
    rows: dict[str, list[dict]] = {"off": [], "on": []}
    engines = {}
    try:
        for name in rows:
            engines[name] = _paged_engine(path, fraction, max_tokens, read_path, name == "on")
        for round_ in range(repeats):
            order = list(engines) if round_ % 2 == 0 else list(engines)[::-1]  # neither first
            for name in order:
                engine, budget, cold = engines[name]
                for _ in engine.generate(PROMPT, max_tokens, chat_template=False, ignore_eos=True):
                    pass
                rows[name].append(_paged_row(engine, fraction, budget, cold))
    finally:
        for engine, _, _ in engines.values():
            engine.close()
    ratios = [
        on["decode_tps"] / off["decode_tps"]
        for on, off in zip(rows["on"], rows["off"], strict=True)
    ]

    def median_row(runs: list[dict]) -> dict:
        return sorted(runs, key=lambda row: row["decode_tps"])[len(runs) // 2]

    return {
        "fraction": fraction,
        "repeats": repeats,
        "off": median_row(rows["off"]),
        "on": median_row(rows["on"]),
        "ratio": statistics.median(ratios),
        "prefetch_pays": rows["on"][-1]["prefetch_pays"],  # the gate's verdict at the end
    }


CHAT_TURNS = [
    "Explain how a mixture of experts model decides which experts each token uses.",
    "Why does that make the model cheaper to run than a dense one of the same size?",
    "What happens when the experts do not all fit in memory at once?",
    "How can a cache of experts decide which ones to keep and which to evict?",
    "Summarise the whole discussion so far in a few sentences.",
]


def _open_at(path: Path, fraction: float) -> Engine:
    budget = inspect_model(path, 4096).plan(0).share_budget_bytes(fraction)
    return Engine(load_paged(path, budget), str(path), 4096)


def bench_chat(path: Path, fraction: float, max_tokens: int, repeats: int = 2) -> dict:
    """Time to first token per turn of a five-turn chat, the KV cache kept against a
    prefill from scratch: two engines on the same messages, turn by turn, interleaved,
    the whole chat repeated; medians over the repeats."""
    kept, fresh = _open_at(path, fraction), _open_at(path, fraction)
    fresh.keep_prompt_cache = False
    ttft = {"kept": [[] for _ in CHAT_TURNS], "fresh": [[] for _ in CHAT_TURNS]}
    reused, fed = [0] * len(CHAT_TURNS), [0] * len(CHAT_TURNS)
    try:
        for _ in range(repeats):
            kept.prompt_cache.clear()
            messages: list[dict[str, str]] = []
            for turn, text in enumerate(CHAT_TURNS):
                messages.append({"role": "user", "content": text})
                for name, engine in (("kept", kept), ("fresh", fresh)):
                    reply = "".join(
                        c.text for c in engine.generate(messages, max_tokens, ignore_eos=True)
                    )
                    ttft[name][turn].append(engine.stats.ttft_seconds)
                    if name == "kept":
                        reused[turn] = engine.stats.prompt_reused_tokens
                        fed[turn] = engine.stats.prompt_tokens
                messages.append({"role": "assistant", "content": reply})
    finally:
        kept.close()
        fresh.close()
    return {
        "fraction": fraction,
        "ttft_kept": [statistics.median(t) for t in ttft["kept"]],
        "ttft_fresh": [statistics.median(t) for t in ttft["fresh"]],
        "prompt_reused_tokens": reused,
        "prompt_fed_tokens": fed,
    }


def bench_policies(path: Path, fraction: float, prompts: list[str], max_tokens: int) -> dict:
    """The live engine's hit rate per cache policy: same prompts, same budget, one run."""
    from ..paging.policies import POLICIES

    budget = inspect_model(path, 4096).plan(0).share_budget_bytes(fraction)
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


def corpus_prompts(corpus: Path | None, n: int, chars: int = 400) -> list[str]:
    """Openings of documents from a corpus folder of ``*.txt`` files (one per domain),
    alternating domains; without one, the built-in prompts."""
    domains = []
    if corpus is not None and not Path(corpus).is_dir():
        raise FileNotFoundError(f"No corpus folder {corpus}: pass a folder of *.txt files.")
    for file in sorted(Path(corpus).glob("*.txt")) if corpus else []:
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


def bench_layer_reads(
    path: Path,
    threads: tuple[int, ...] = (1, 4, 8, 16),
    rounds: int = 24,
    seed: int = 0,
    read_paths: tuple[str, ...] = ("pread", "direct"),
) -> dict:
    """A layer's misses read through the expert cache (straight into its slots), cold,
    against the same number of bytes read sequentially from the same file, cold, in turn,
    and against ``fio`` reading pieces of the same size, run just before and just after
    the rounds, two ways: a steady queue of as many reads in flight as reader threads, and
    bursts of as many reads of that size as carry a layer's top-k experts, each burst
    ended before the next (what a decode step can have: its computation needs all of a
    layer's misses, and the next layer's are not known until it is done). MB/s of each
    and the ratios, per read path and thread count. fio is taken twice and averaged
    because this machine's disk runs at a different speed from one minute to the next
    (one fio run a configuration put the same code at 0.73-1.04x); it is not run between
    rounds, which starts every round with cold CPU caches (the embedded model's 0.4 MB
    groups then read at 200-340 MB/s instead of about 500). The rounds' median, 24 of
    them: six had swung 0.61-0.78x of fio's queue of 8 from one call to the next on the
    same machine, 40 gave 0.79-0.84x, and a round costs about a millisecond beside fio's
    runs.

    Where the slots widen what is stored (bf16 into the float32 the CPU backend computes
    in), one more row, ``pread_8_as_stored``: the same reads, with the default 8 threads,
    into slots of the stored dtype, as on a GPU. The difference between the two is the
    host's widening, not the disk."""
    import numpy as np

    layout = inspect_model(path, 4096)
    stored = inspect_model(path, 4096, None)
    expert_map = layout.expert_map
    per_layer = layout.top_k
    out: dict = {"expert_bytes": expert_map.expert_disk_bytes(), "experts_per_read": per_layer}
    rng = np.random.default_rng(seed)
    # fio's baseline reads blocks of the size of the piece most of an expert's bytes are
    # in (a 4-bit expert: its weights, not its scales), whole 4 KiB blocks for O_DIRECT.
    pieces = sorted(expert_map.expert_pieces(0, 0).values(), key=lambda pc: pc.nbytes)
    half = sum(pc.nbytes for pc in pieces) / 2
    piece = next(pc.nbytes for pc, upto in zip(pieces, itertools.accumulate(
        pc.nbytes for pc in pieces), strict=True) if upto >= half)  # fmt: skip
    block = max(4096, piece - piece % 4096)
    # a decode step's misses: the reads of that size carrying top-k experts' bytes
    burst = max(1, round(per_layer * sum(pc.nbytes for pc in pieces) / block))
    runs = [(r, t, layout) for r in read_paths for t in threads]
    if stored.expert_bytes != layout.expert_bytes:  # the slots widen: the GPU's case too
        runs.append(("pread", DEFAULT_READ_THREADS, stored))
    for read_path, count, plan in runs:
        budget = plan.plan(0).share_budget_bytes(0.25)
        dtype = "auto" if plan is layout else None
        paged = load_paged(
            path, budget, read_path=read_path, read_threads=count, compute_dtype=dtype
        )
        cache, misses, plain = paged.cache, [], []
        direct = read_path == "direct"
        fio = [fio_random_read(pieces[0].path, block, count, direct)]
        bursts = [fio_random_read(pieces[0].path, block, burst, direct, burst=True)]
        try:
            for _ in range(rounds):
                layer = int(rng.integers(layout.moe_layers))
                free = np.flatnonzero(cache.slot_table[layer] < 0)
                experts = rng.choice(free, min(per_layer, len(free)), replace=False)
                nbytes = sum(expert_map.expert_disk_bytes(layer, int(e)) for e in experts)
                cache.reader.drop()
                start = time.perf_counter()
                cache.fetch(layer, experts, record=False)  # as a decode step: what it waits for
                misses.append(nbytes / (time.perf_counter() - start))
                cache.record()  # the books and the page-cache drops, beside its computation
                plain.append(_sequential_read(expert_map.expert_pieces(layer, 0), nbytes))
        finally:
            paged.close()
        fio.append(fio_random_read(pieces[0].path, block, count, direct))
        bursts.append(fio_random_read(pieces[0].path, block, burst, direct, burst=True))
        row = out[f"{read_path}_{count}" + ("" if plan is layout else "_as_stored")] = {
            "miss_mb_s": statistics.median(misses) / 1e6,
            "sequential_mb_s": statistics.median(plain) / 1e6,
            "ratio": statistics.median(m / q for m, q in zip(misses, plain, strict=True)),
        }
        if None not in fio:  # the disk's own rate for reads of the pieces' size
            row["fio_piece_bytes"] = block
            row["fio_mb_s"] = statistics.mean(fio) / 1e6
            row["fio_ratio"] = row["miss_mb_s"] / row["fio_mb_s"]
        if None not in bursts:  # the disk's own rate for a layer's misses as a burst
            row["fio_burst_reads"] = burst
            row["fio_burst_mb_s"] = statistics.mean(bursts) / 1e6
            row["fio_burst_ratio"] = row["miss_mb_s"] / row["fio_burst_mb_s"]
    return out


def fio_random_read(
    path: Path,
    block: int,
    depth: int,
    direct: bool,
    limit: int = 256 << 20,
    burst: bool = False,
    timeout: float = 120.0,
):
    """Bytes/s of ``fio`` reading ``block``-byte pieces (whole 4 KiB blocks) of ``path`` at
    random offsets, each at most once, ``depth`` reads in flight (io_uring), cold (its
    pages dropped first), buffered or O_DIRECT, over at most ``limit`` bytes: what the disk
    gives reads of that size with no Python in the way. ``burst``: the ``depth`` reads go
    in together and all of them end before the next ``depth`` go in, as a layer's misses
    in a decode step do (its computation needs every one), instead of a steady queue that
    starts a read as each ends. io_uring on Linux, POSIX aio elsewhere (macOS: untested
    here). None without fio, or when it fails or runs past ``timeout`` seconds."""
    import json
    import shutil
    import subprocess

    fio = shutil.which("fio")
    if fio is None:
        return None
    size = os.path.getsize(path) // block * block
    command = [
        fio, "--name=pieces", f"--filename={path}", "--readonly", "--rw=randread",
        f"--bs={block}", f"--size={size}", f"--io_size={min(size, limit)}",
        f"--ioengine={'io_uring' if sys.platform == 'linux' else 'posixaio'}",
        f"--iodepth={depth}", f"--direct={int(direct)}",
        "--invalidate=1", "--fadvise_hint=random", "--output-format=json",
    ]  # fmt: skip
    if burst:
        # A think time after every ``depth`` reads issued: fio first waits for all of them.
        # (Batching alone is not bursts: io_uring rounds the depth up to a power of two,
        # and 12 became 16 in flight, traced with --debug=io. A spinning think time hung 1
        # to 3 runs in 60 here, asleep with every read done; this sleep of 1 us cost fio
        # 2% against the spin's runs, 922 against 940 MB/s, medians of 8.)
        command += ["--thinktime=1", f"--thinktime_blocks={depth}", "--thinktime_blocks_type=issue"]
    # fio forks a process per job: a run that stalls is ended with its whole group, or
    # the job process would outlive the timeout.
    proc = subprocess.Popen(
        command, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True,
        start_new_session=True,
    )  # fmt: skip
    try:
        out, _ = proc.communicate(timeout=timeout)
        job = json.loads(out)["jobs"][0]["read"]
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.communicate()
        return None
    except (ValueError, KeyError, IndexError):
        return None
    return float(job["bw_bytes"]) or None


def _sequential_read(pieces: dict, nbytes: int) -> float:
    """Bytes/s of one cold sequential read of ``nbytes`` from the file of ``pieces``,
    starting at the first piece (the same region the misses come from)."""
    piece = next(iter(pieces.values()))
    fd = os.open(piece.path, os.O_RDONLY)
    try:
        drop_page_cache(fd)
        size = os.fstat(fd).st_size
        start_at = max(0, min(piece.offset, size - nbytes))
        buffer = bytearray(nbytes)
        view, done = memoryview(buffer), 0
        start = time.perf_counter()
        while done < nbytes:
            n = os.preadv(fd, [view[done:]], start_at + done)
            if n == 0:
                break
            done += n
        seconds = time.perf_counter() - start
        drop_page_cache(fd)
        return done / seconds
    finally:
        os.close(fd)


def bench_prefill_stalls(path: Path, fraction: float, prompts: list[str], repeats: int = 2) -> dict:
    """Time to first token of each prompt, each from an empty cache at ``fraction`` of
    the experts, with the next layer's experts read ahead during prefill and without, in
    turn: the share of it stalled on reads (median) and the time itself."""
    engine = _open_at(path, fraction)
    engine.keep_prompt_cache = False
    cache = engine.paged.cache
    result: dict = {"fraction": fraction}
    try:
        for _ in range(repeats):
            for ahead in (False, True):
                cache.reads_ahead = ahead
                for prompt in prompts:
                    engine.paged.reset_cache()
                    for _ in engine.generate(prompt, 1, chat_template=False):
                        pass
                    s = engine.stats
                    key = "ahead" if ahead else "plain"
                    result.setdefault(f"{key}_ttft", []).append(s.ttft_seconds)
                    result.setdefault(f"{key}_stall_share", []).append(
                        s.ttft_read_seconds / s.ttft_seconds if s.ttft_seconds else 0.0
                    )
                    if ahead:
                        result.setdefault("ahead_used_share", []).append(
                            s.read_ahead_used / max(1, s.read_ahead_issued)
                        )
    finally:
        cache.reads_ahead = True
        engine.close()
    return {k: statistics.median(v) if isinstance(v, list) else v for k, v in result.items()}
