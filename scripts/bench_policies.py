"""Hit rates of every cache policy and Belady's optimum on a routing trace.

Per-layer caches and one global budget, at 8, 16 and 32 of the layer's experts; the
"held-out" column counts only the second half of the sequences (the policies' constants
were chosen on the first 300 sequences of the shared DeepSeek trace). Slow on purpose:
the whole trace, every policy.

    .venv/bin/python scripts/bench_policies.py [TRACE] [--capacities 8 16 32] [--json OUT]
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

from mlx_pager.paging.policies import POLICIES
from mlx_pager.sim.replay import belady, replay
from mlx_pager.sim.trace import load_trace


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "trace", help="routing trace (.npz), e.g. shared/traces/deepseek-v2-lite-prefill-dev.npz"
    )
    parser.add_argument("--capacities", type=int, nargs="+", default=[8, 16, 32])
    parser.add_argument("--policies", nargs="+", default=list(POLICIES))
    parser.add_argument("--modes", nargs="+", default=["layer", "global"])
    parser.add_argument("--no-belady", action="store_true", help="skip the offline optimum")
    parser.add_argument("--json", help="also write the rows to this file")
    args = parser.parse_args()
    trace = load_trace(args.trace)
    split = int(trace.offsets[trace.num_sequences // 2])
    print(f"{args.trace}: {trace.num_tokens} tokens, {trace.num_layers} layers, "
          f"{trace.num_experts} experts, top-{trace.top_k}, {trace.phase}")  # fmt: skip
    header = ("mode", "cap", "policy", "hit", "held-out", "miss/tok", "s")
    print("{:7} {:>4} {:10} {:>6} {:>8} {:>8} {:>5}".format(*header))
    rows = []
    for mode in args.modes:
        for capacity in args.capacities:
            for name in [*args.policies, *(["belady"] * (not args.no_belady))]:
                start = time.perf_counter()
                shared = mode == "global"
                if name == "belady":
                    r = belady(trace, capacity, shared, split)
                else:
                    r = replay(trace, capacity, name, shared, split)
                seconds = time.perf_counter() - start
                row = {
                    "mode": mode,
                    "capacity": capacity,
                    "policy": name,
                    "hit_rate": r.hit_rate,
                    "held_out": r.held_out_hit_rate,
                    "misses_per_token": r.misses_per_token,
                    "seconds": seconds,
                }
                rows.append(row)
                print(f"{mode:7} {capacity:4d} {name:10} {r.hit_rate:6.3f} "
                      f"{r.held_out_hit_rate:8.3f} {r.misses_per_token:8.1f} {seconds:5.0f}",
                      flush=True)  # fmt: skip
                if args.json:
                    Path(args.json).write_text(json.dumps(rows, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
