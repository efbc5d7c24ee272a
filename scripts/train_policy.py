"""Fit the learned cache policy's weights on the training half of a routing trace.

    python scripts/train_policy.py TRACE.npz [--sequences 500] [--out PATH]

Trains on the trace's first ``--sequences`` sequences only (default: half of them) and
writes the weights the policy ships with (``mlx_pager/paging/learned_policy.json``
unless ``--out``), with the training log. The figures on the other sequences, the held-out
ones, come from ``scripts/policy_table.py``.
"""

from __future__ import annotations

import argparse
import time

from mlx_pager.paging.learned import FEATURES, PARAMS_FILE, save_params
from mlx_pager.sim.learn import FAMILIES, train
from mlx_pager.sim.trace import load_trace


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("trace")
    parser.add_argument("--sequences", type=int, help="train on the first N (default: half)")
    parser.add_argument("--capacities", type=int, nargs="+", default=[16])
    parser.add_argument("--horizons", type=int, nargs="+", default=[2, 4, 8])
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument(
        "--families", nargs="+", choices=list(FAMILIES), help="feature families (default: all)"
    )
    parser.add_argument("--out", default=str(PARAMS_FILE))
    args = parser.parse_args()
    trace = load_trace(args.trace)
    n = args.sequences or trace.num_sequences // 2
    training = trace.sequences(0, n)
    start = time.perf_counter()
    features = FEATURES
    if args.families:
        features = tuple(f for family in args.families for f in FAMILIES[family])
    global_terms = "recency" in (args.families or FAMILIES)  # recency_0 and turn
    fit = train(training, args.capacities, args.horizons, args.rounds,
                serving=(1.0, 2.0, 3.0) if global_terms else (0.0,),
                turns=(-1.0, -2.0, -3.0) if global_terms else (0.0,),
                features=features)  # fmt: skip
    capacities = "/".join(map(str, args.capacities))
    source = (
        f"{trace.model} {trace.phase} trace, sequences 0-{n - 1} of {trace.num_sequences} "
        f"({training.num_tokens} tokens), {capacities} of {trace.num_experts} per layer"
    )
    save_params(args.out, fit.weights, source, log=fit.log)
    print(f"wrote {args.out} ({time.perf_counter() - start:.0f} s)")


if __name__ == "__main__":
    main()
