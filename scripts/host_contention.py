"""What a fixed piece of host work costs on the hit path, right after a layer's sync,
against the same work on an idle thread.

The bench's host time per MoE layer is the layer thread's CPU time outside MLX. Where the
computation shares the host's cores and caches (MLX's CPU backend, a small VM), the same
Python and numpy work costs more right after a layer's sync, while the experts compute,
than it does idle. This puts a number on that: a fixed workload of the kinds the books are
made of (a 100-entry dict, a numpy update by ``np.add.at`` and by fancy indexing) is timed
idle, then at every decode step that found all its experts resident (where
``ExpertCache.defer_hit`` is called), with every expert resident. It also times one MLX
evaluation's round trip (a chain of tiny operations, evaluated after each against once
at the end): the price of each MoE layer's one sync, which stock mlx-lm pays once a token.

    python scripts/host_contention.py MODEL [MODEL ...] [--tokens 32]
"""

from __future__ import annotations

import argparse
import statistics
import time
from pathlib import Path

import numpy as np

from mlx_pager.benchmark.quality import slots_budget
from mlx_pager.engine import Engine
from mlx_pager.paging.loader import load_paged
from mlx_pager.sim.bench import PROMPT, WARMUP

CONTEXT = 4096

_COUNTS = np.zeros(4096)
_ROWS = np.arange(0, 4096, 37)


def workload() -> float:
    """Thread CPU seconds of the fixed work."""
    start = time.thread_time()
    table = {}
    for i in range(100):
        table[i] = (i, 2 * i)
    np.add.at(_COUNTS, _ROWS, 1.0)
    _COUNTS[_ROWS] += 1.0
    return time.thread_time() - start


def idle(repeats: int = 2000) -> float:
    """Median seconds of the work on this thread with nothing else running."""
    return statistics.median(workload() for _ in range(repeats))


def sync_round_trip(ops: int = 600, repeats: int = 5) -> tuple[float, float]:
    """(seconds a tiny MLX operation takes in a lazily built chain, and evaluated after
    each one): their difference is what a sync costs beyond the work it waits for."""
    import mlx.core as mx

    start_value = mx.ones((256,))
    mx.eval(start_value)

    def chain(sync: bool) -> float:
        y, start = start_value, time.perf_counter()
        for _ in range(ops):
            y = y * 1.0001
            if sync:
                mx.eval(y)
        mx.eval(y)
        return (time.perf_counter() - start) / ops

    lazy = statistics.median(chain(False) for _ in range(repeats))
    synced = statistics.median(chain(True) for _ in range(repeats))
    return lazy, synced


def in_layer(model: Path, tokens: int) -> tuple[float, int]:
    """(median seconds of the work at each hit layer's deferred books, how many layers),
    decoding ``tokens`` tokens with every expert resident, after one warm-up reply."""
    engine = Engine(load_paged(model, slots_budget(model, 1.0, CONTEXT), CONTEXT), str(model),
                    CONTEXT)  # fmt: skip
    engine.keep_prompt_cache = False
    cache, times = engine.paged.cache, []
    defer = cache.defer_hit
    try:
        for _ in engine.generate(WARMUP, tokens, chat_template=False, ignore_eos=True):
            pass

        def timed_defer(layer, indices) -> None:
            times.append(workload())
            defer(layer, indices)

        cache.defer_hit = timed_defer
        for _ in engine.generate(PROMPT, tokens, chat_template=False, ignore_eos=True):
            pass
    finally:
        engine.close()
    if not times:
        raise ValueError(f"{model}: no decode step found every expert resident")
    return statistics.median(times), len(times)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("models", nargs="+", type=Path)
    parser.add_argument("--tokens", type=int, default=32)
    args = parser.parse_args(argv)
    lazy, synced = sync_round_trip()
    print(
        f"one MLX evaluation round trip: {1e6 * (synced - lazy):.1f} us beyond its work "
        f"(a tiny operation {1e6 * lazy:.1f} us built lazily, {1e6 * synced:.1f} us "
        "evaluated each time)"
    )
    base = idle()
    print(f"the fixed work, idle: {1e6 * base:.1f} us")
    for model in args.models:
        seconds, calls = in_layer(model, args.tokens)
        print(
            f"{model}: {1e6 * seconds:.1f} us after a hit layer's sync "
            f"({calls} layers), {seconds / base:.1f}x idle"
        )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
