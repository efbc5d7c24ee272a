"""The policy table: hit rates of every policy and Belady, per-layer, global and divided by
measured skew, on a trace.

    python scripts/policy_table.py TRACE.npz --capacity 8 16 32 [--skew learned belady]
        [--json out.json]

Each run also counts the second half of the trace's sequences on its own (``split``,
the cache warm from the first half): the held-out figure for a policy fitted on the
first half (the learned policy's weights were). *skew*: per-layer caches whose sizes
divide the same budget by each layer's hit curve, measured on the first half only
(``mlx_pager/sim/allocate.py``). Prints a markdown table.
"""

from __future__ import annotations

import argparse
import json
import time

from mlx_pager.paging.policies import POLICIES
from mlx_pager.sim import allocate
from mlx_pager.sim.replay import belady, replay
from mlx_pager.sim.trace import load_trace

MODES = ("layer", "global", "skew")


def table(trace, capacities: list[int], policies: list[str], skew: list[str]) -> dict:
    half = trace.num_sequences // 2
    split = int(trace.offsets[half])
    out = {"split_token": split, "runs": [], "allocations": {}}

    def record(capacity, mode, name, r, start):
        out["runs"].append({
            "capacity": capacity, "mode": mode, "policy": name, "hit_rate": r.hit_rate,
            "held_out_hit_rate": r.held_out_hit_rate, "seconds": time.perf_counter() - start,
        })  # fmt: skip

    for capacity in capacities:
        for shared in (False, True):
            for name in [*policies, "belady"]:
                start = time.perf_counter()
                if name == "belady":
                    r = belady(trace, capacity, shared, split=split)
                else:
                    r = replay(trace, capacity, name, shared, split=split)
                record(capacity, "global" if shared else "layer", name, r, start)
    grid = allocate.capacity_grid(trace.top_k, trace.num_experts)
    profile = trace.sequences(0, half)
    for name in skew:
        start = time.perf_counter()
        hits = allocate.curves(profile, name, grid)
        profiled = time.perf_counter() - start
        for capacity in capacities:
            start = time.perf_counter() - profiled / len(capacities)
            shares = allocate.allocate(grid, hits, capacity * trace.num_layers)
            out["allocations"][f"{name} {capacity}"] = shares.tolist()
            r = allocate.replay_partitioned(trace, shares, name, split=split)
            record(capacity, "skew", name, r, start)
    return out


def markdown(result: dict, num_experts: int) -> str:
    runs = result["runs"]
    caps = sorted({r["capacity"] for r in runs})
    names = list(dict.fromkeys(r["policy"] for r in runs))
    modes = [m for m in MODES if any(r["mode"] == m for r in runs)]
    head = " | ".join(f"{c}/{num_experts} {m}" for c in caps for m in modes)
    lines = [f"| policy | {head} |", "| --- |" + " --- |" * (len(modes) * len(caps))]
    found = {(r["capacity"], r["mode"], r["policy"]): r for r in runs}
    for key, label in (("hit_rate", "whole trace"), ("held_out_hit_rate", "held-out half")):
        lines.append(f"| *{label}* |" + " |" * (len(modes) * len(caps)))
        for name in names:
            cells = []
            for c in caps:
                for m in modes:
                    r = found.get((c, m, name))
                    cells.append("-" if r is None else f"{r[key]:.3f}")
            lines.append(f"| {name} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("trace")
    parser.add_argument("--capacity", type=int, nargs="+", default=[8, 16, 32])
    parser.add_argument("--policy", action="append", choices=list(POLICIES))
    parser.add_argument(
        "--skew",
        nargs="*",
        default=["learned", "belady"],
        choices=[*POLICIES, "belady"],
        help="policies also run with per-layer shares from the first half's hit curves",
    )
    parser.add_argument("--json", metavar="FILE")
    args = parser.parse_args()
    trace = load_trace(args.trace)
    result = table(trace, args.capacity, args.policy or list(POLICIES), args.skew)
    if args.json:
        with open(args.json, "w") as f:
            json.dump(result, f, indent=1)
    print(markdown(result, trace.num_experts))


if __name__ == "__main__":
    main()
