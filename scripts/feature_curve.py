"""What each feature family of the learned policy buys: trained on a trace's first half
with the families added one at a time, judged on the whole trace and on its second half.

    python scripts/feature_curve.py TRACE.npz [--capacity 16] [--json out.json]

Each row trains from scratch (one horizon, two rounds, the global terms at their usual
values rather than searched, to keep it to minutes) with the families so far: recency,
then frequency, then this layer's transitions from the current set, from the previous
one, then the layer above's. Prints a markdown table.
"""

from __future__ import annotations

import argparse
import json

import numpy as np

from mlx_pager.sim import learned_replay
from mlx_pager.sim.learn import FAMILIES, train
from mlx_pager.sim.trace import load_trace


def judged(trace, capacity: int, weights: np.ndarray, shared: bool, split: int) -> tuple:
    """(whole-trace, held-out) hit rates of the learned policy on ``weights``."""
    none = np.zeros(1, np.int64)
    limit = capacity * trace.num_layers if shared else capacity
    hits, misses, before_hits, before_misses, _, _ = learned_replay.run(
        trace.expert_ids.astype(np.int64), trace.num_experts, weights, learned_replay.GROWTH,
        shared, limit, split, 0, 0, none, none)  # fmt: skip
    held = (hits - before_hits) / max(hits + misses - before_hits - before_misses, 1)
    return hits / max(hits + misses, 1), held


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("trace")
    parser.add_argument("--capacity", type=int, default=16)
    parser.add_argument("--horizon", type=int, default=4)
    parser.add_argument("--json", metavar="FILE")
    args = parser.parse_args()
    trace = load_trace(args.trace)
    half = trace.num_sequences // 2
    split = int(trace.offsets[half])
    rows, names = [], []
    print("| features | per-layer | per-layer held-out | global | global held-out |")
    print("| --- | --- | --- | --- | --- |")
    for family in FAMILIES:
        names.append(family)
        features = tuple(f for name in names for f in FAMILIES[name])
        fit = train(trace.sequences(0, half), [args.capacity], [args.horizon], rounds=2,
                    serving=(2.0,), turns=(-2.0,), features=features,
                    say=lambda _: None)  # fmt: skip
        layer = judged(trace, args.capacity, fit.weights, False, split)
        shared = judged(trace, args.capacity, fit.weights, True, split)
        rows.append({"families": list(names), "weights": fit.weights.tolist(),
                     "layer": layer, "global": shared})  # fmt: skip
        print(f"| + {family} | {layer[0]:.4f} | {layer[1]:.4f} | {shared[0]:.4f} | "
              f"{shared[1]:.4f} |", flush=True)  # fmt: skip
    if args.json:
        with open(args.json, "w") as f:
            json.dump(rows, f, indent=1)


if __name__ == "__main__":
    main()
