"""How much foresight a cache policy would need to reach a hit rate on a routing trace.

Replays the trace with per-layer caches where the policy is told, exactly, which experts
each layer will route to over the next ``h`` tokens (an oracle no live engine has) and
never evicts those; among the rest it evicts as a real policy does. h = 0 is the real
policy; h = infinity is Belady. The table says how far ahead routing would have to be
known, perfectly, to reach a target such as 0.60 on the shared DeepSeek-V2-Lite trace.

    .venv/bin/python scripts/foresight_bound.py [TRACE] [--capacity 16] [--horizons 0 1 2 3 4]
"""

from __future__ import annotations

import argparse
import sys
import time

from mlx_pager.paging.policies import make_policy
from mlx_pager.sim.replay import _requests, belady, next_uses, replay
from mlx_pager.sim.trace import load_trace


def foresight_hit_rate(trace, capacity: int, horizon: int, fallback: str) -> float:
    """Per-layer caches; a resident key whose next use falls within ``horizon`` tokens
    is never evicted, the others go in the ``fallback`` policy's order."""
    keys, weights = _requests(trace)
    nxt = next_uses(keys)  # step t * L + l of each request's next use
    n_layers, n_experts = trace.num_layers, trace.num_experts
    policies = [make_policy(fallback) for _ in range(n_layers)]
    next_of: list[dict[tuple[int, int], int]] = [{} for _ in range(n_layers)]
    hits = misses = 0
    for t in range(trace.num_tokens):
        key_rows, next_rows, weight_rows = keys[t].tolist(), nxt[t].tolist(), weights[t].tolist()
        horizon_end = (t + horizon) * n_layers + n_layers  # steps up to token t + horizon
        for layer in range(n_layers):
            pol, resident = policies[layer], next_of[layer]
            want = [divmod(k, n_experts) for k in key_rows[layer] if k >= 0]
            missed = list(dict.fromkeys(k for k in want if k not in resident))
            misses += len(missed)
            hits += len(want) - len(missed)
            for _ in range(len(resident) + len(missed) - capacity):
                foreseen = {k for k, n in resident.items() if n < horizon_end}
                free = [k for k in resident if k not in want and k not in foreseen]
                if free:
                    victim = pol.victim(set(want) | foreseen)
                else:  # every candidate is foreseen: the one used last goes
                    victim = max((k for k in resident if k not in want), key=resident.get)
                pol.remove(victim)
                del resident[victim]
            rows = zip(key_rows[layer], next_rows[layer], weight_rows[layer], strict=True)
            for k, n, w in rows:
                if k >= 0:
                    resident[divmod(k, n_experts)] = n
                    pol.access(divmod(k, n_experts), w)
        for pol in policies:
            pol.next_token()
    return hits / max(1, hits + misses)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "trace", help="routing trace (.npz), e.g. shared/traces/deepseek-v2-lite-prefill-dev.npz"
    )
    parser.add_argument("--capacity", type=int, default=16)
    parser.add_argument("--horizons", type=int, nargs="+", default=[0, 1, 2, 3, 4])
    parser.add_argument("--fallbacks", nargs="+", default=["lru", "lfu-decay"])
    parser.add_argument("--sequences", type=int, help="replay only the first N sequences")
    args = parser.parse_args()
    trace = load_trace(args.trace)
    if args.sequences:
        trace = trace.sequences(0, args.sequences)
    print(f"{args.trace}: {trace.num_tokens} tokens, {trace.num_layers} layers, "
          f"{trace.num_experts} experts, top-{trace.top_k}; {args.capacity} per layer")  # fmt: skip
    print(f"{'fallback':10} {'tokens foreseen':>15} {'hit rate':>9} {'s':>5}")
    for name in args.fallbacks:
        for h in args.horizons:
            start = time.perf_counter()
            rate = foresight_hit_rate(trace, args.capacity, h, name)
            print(f"{name:10} {h:>15} {rate:9.3f} {time.perf_counter() - start:5.0f}", flush=True)
    real = {name: replay(trace, args.capacity, name).hit_rate for name in args.fallbacks}
    print("the real policies (no foresight):", {k: round(v, 3) for k, v in real.items()})
    print(f"belady (whole future): {belady(trace, args.capacity).hit_rate:.3f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
