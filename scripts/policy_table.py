"""The policy table: hit rates of every policy and Belady, per-layer and global, on a trace.

    python scripts/policy_table.py TRACE.npz --capacity 8 16 32 [--json out.json]

Each run also counts the second half of the trace's sequences on its own (``split``,
the cache warm from the first half): the held-out figure a policy fitted on the first
half is judged by. Prints a markdown table.
"""

from __future__ import annotations

import argparse
import json
import time

from mlx_pager.paging.policies import POLICIES
from mlx_pager.sim.replay import belady, replay
from mlx_pager.sim.trace import load_trace


def table(trace, capacities: list[int], policies: list[str]) -> dict:
    split = int(trace.offsets[trace.num_sequences // 2])
    out = {"split_token": split, "runs": []}
    for capacity in capacities:
        for shared in (False, True):
            for name in [*policies, "belady"]:
                start = time.perf_counter()
                if name == "belady":
                    r = belady(trace, capacity, shared, split=split)
                else:
                    r = replay(trace, capacity, name, shared, split=split)
                out["runs"].append({
                    "capacity": capacity, "mode": "global" if shared else "layer",
                    "policy": name, "hit_rate": r.hit_rate,
                    "held_out_hit_rate": r.held_out_hit_rate,
                    "seconds": time.perf_counter() - start,
                })  # fmt: skip
    return out


def markdown(result: dict, num_experts: int) -> str:
    runs = result["runs"]
    caps = sorted({r["capacity"] for r in runs})
    names = list(dict.fromkeys(r["policy"] for r in runs))
    head = " | ".join(f"{c}/{num_experts} {m}" for c in caps for m in ("layer", "global"))
    lines = [f"| policy | {head} |", "| --- |" + " --- |" * (2 * len(caps))]
    for key, label in (("hit_rate", "whole trace"), ("held_out_hit_rate", "held-out half")):
        lines.append(f"| *{label}* |" + " |" * (2 * len(caps)))
        for name in names:
            cells = []
            for c in caps:
                for m in ("layer", "global"):
                    (r,) = [
                        r for r in runs if (r["capacity"], r["mode"], r["policy"]) == (c, m, name)
                    ]
                    cells.append(f"{r[key]:.3f}")
            lines.append(f"| {name} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("trace")
    parser.add_argument("--capacity", type=int, nargs="+", default=[8, 16, 32])
    parser.add_argument("--policy", action="append", choices=list(POLICIES))
    parser.add_argument("--json", metavar="FILE")
    args = parser.parse_args()
    trace = load_trace(args.trace)
    result = table(trace, args.capacity, args.policy or list(POLICIES))
    if args.json:
        with open(args.json, "w") as f:
            json.dump(result, f, indent=1)
    print(markdown(result, trace.num_experts))


if __name__ == "__main__":
    main()
