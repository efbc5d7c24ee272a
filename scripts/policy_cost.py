"""What each cache policy costs the live engine per MoE layer call, in microseconds.

Drives every policy through the calls ``ExpertCache`` makes (one shared cache of
``capacity x layers`` slots: ``victim`` and ``remove`` for each miss over the budget,
``access_layer`` for the layer's experts, ``next_token`` after every layer) over the
first tokens of a trace, timing only the policy's own calls; no expert is read.

    python scripts/policy_cost.py TRACE.npz [--capacity 16] [--tokens 2000]
"""

from __future__ import annotations

import argparse
import time

import numpy as np

from mlx_pager.paging.policies import POLICIES, make_policy
from mlx_pager.sim.replay import replay
from mlx_pager.sim.trace import load_trace


def cost(trace, capacity: int, name: str) -> tuple[np.ndarray, int]:
    """(wall seconds of each layer call, hits) of ``name`` on ``trace``."""
    policy = make_policy(name)
    limit = capacity * trace.num_layers
    resident: set[tuple[int, int]] = set()
    times, hits = [], 0
    clock = time.perf_counter
    for row in trace.expert_ids.astype(np.int64):
        for layer, ids in enumerate(row):
            experts = np.array(list(dict.fromkeys(ids[ids >= 0].tolist())), np.int64)
            if not len(experts):
                continue
            start = clock()
            pinned = {(layer, int(e)) for e in experts}
            missing = [k for k in pinned if k not in resident]
            for _ in range(len(resident) + len(missing) - limit):
                victim = policy.victim(pinned)
                policy.remove(victim)
                resident.discard(victim)
            resident.update(missing)
            policy.access_layer(layer, experts, None)
            times.append(clock() - start)
            hits += len(experts) - len(missing)
        start = clock()
        policy.next_token()
        times[-1] += clock() - start
    return np.array(times), hits


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("trace")
    parser.add_argument("--capacity", type=int, default=16)
    parser.add_argument("--tokens", type=int, default=2000)
    parser.add_argument("--policy", action="append", choices=list(POLICIES))
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    full = load_trace(args.trace)
    cut = int(np.searchsorted(full.offsets, args.tokens))
    trace = full.sequences(0, max(cut, 1))
    print(f"{trace.num_tokens} tokens, {trace.num_layers} layers, {trace.num_experts} experts, "
          f"top-{trace.top_k}, one cache of {args.capacity * trace.num_layers}")  # fmt: skip
    head = ("policy", "us/layer call", "median", "p99", "hits", "replayed")
    print("{:10} {:>13} {:>7} {:>7} {:>8} {:>8}".format(*head))
    for name in args.policy or POLICIES:
        # The same calls each run: each call's fastest run is its cost without the
        # other processes of a busy machine (wall time: process_time costs more than
        # the calls themselves on some machines).
        runs = [cost(trace, args.capacity, name) for _ in range(args.repeats)]
        hits = runs[0][1]
        micros = 1e6 * np.min([times for times, _ in runs], axis=0)
        replayed = replay(trace, args.capacity, name, shared=True).hits  # live = replay
        print(
            f"{name:10} {micros.mean():13.1f} {np.median(micros):7.1f} "
            f"{np.percentile(micros, 99):7.0f} {hits:8d} {replayed:8d}",
            flush=True,
        )


if __name__ == "__main__":
    main()
