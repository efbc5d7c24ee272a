"""`mlx-pager simulate`: replay a routing trace against the cache policies, and Belady."""

from __future__ import annotations

import argparse
import json
import sys
import time

from ..paging.policies import DEFAULT_POLICY, POLICIES
from .ranges import capacity


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--trace", required=True, metavar="FILE", help="routing trace (.npz)")
    parser.add_argument(
        "--capacity",
        required=True,
        type=capacity,
        help="experts per layer (16) or a fraction of the layer's experts (0.25)",
    )
    parser.add_argument(
        "--policy",
        action="append",
        choices=list(POLICIES),
        help=f"a policy to replay (repeatable; default: all, {DEFAULT_POLICY} is the default)",
    )
    parser.add_argument(
        "--mode",
        choices=("both", "layer", "global"),
        default="both",
        help="per-layer caches, one global budget of capacity x layers, or both",
    )
    parser.add_argument("--sequences", metavar="A:B", help="replay only sequences A to B")
    parser.add_argument("--json", action="store_true", help="one JSON object on stdout")


def _slice(trace, text: str):
    try:
        start, _, stop = text.partition(":")
        return trace.sequences(int(start or 0), int(stop) if stop else trace.num_sequences)
    except ValueError:
        raise ValueError(f"--sequences takes A:B (sequence numbers), not {text!r}") from None


def run(args: argparse.Namespace) -> int:
    from ..sim.replay import parse_capacity, simulate
    from ..sim.trace import load_trace

    trace = load_trace(args.trace)
    if args.sequences:
        trace = _slice(trace, args.sequences)
    if trace.num_tokens == 0:
        raise ValueError("The trace (or the chosen sequences) has no tokens to replay.")
    capacity = parse_capacity(args.capacity, trace.num_experts)
    policies = list(dict.fromkeys(args.policy or POLICIES))
    start = time.perf_counter()
    out: dict = {"capacity": capacity}
    modes = ["layer", "global"] if args.mode == "both" else [args.mode]
    for mode, result in simulate(trace, capacity, policies, tuple(modes)).items():
        if mode == modes[0] and mode == "layer":
            out.update(result)
        else:
            out[mode] = result
    if "belady" not in out:  # --mode global: the top-level figures are the global ones
        out.update(out.pop("global"))
    out["default"] = DEFAULT_POLICY
    out["mode"] = modes[0]
    if args.json:
        print(json.dumps(out))
        return 0
    print(
        f"{trace.model or 'trace'} ({trace.phase}): {trace.num_tokens} tokens, "
        f"{trace.num_layers} layers, {trace.num_experts} experts, top-{trace.top_k}; "
        f"capacity {capacity} of {trace.num_experts} per layer"
    )
    for mode in modes:
        result = out if mode == modes[0] else out[mode]
        if mode == "layer":
            print(f"\nper-layer caches ({capacity} experts each)")
        else:
            print(f"\none global budget ({capacity * trace.num_layers} experts for all layers)")
        print(f"  {'policy':12} {'hit rate':>8} {'misses/token':>13}")
        for name, rate in [*result["policies"].items(), ("belady", result["belady"])]:
            mark = (
                " (default)"
                if name == DEFAULT_POLICY
                else " (offline optimum)" * (name == "belady")
            )
            print(f"  {name:12} {rate:8.3f} {result['misses_per_token'][name]:13.1f}{mark}")
    print(f"\n{time.perf_counter() - start:.0f} s", file=sys.stderr)
    return 0
