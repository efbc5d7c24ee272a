"""Whether a more flexible model reads more from the learned policy's features than its
linear score does: held-out AUC of "used again within h tokens", logistic against a
small neural network, on the same samples.

    python scripts/feature_ceiling.py TRACE.npz [--capacity 16] [--samples 1200000]

The samples are those the policy is trained on (``mlx_pager.sim.learn.samples``): the
served layer's eviction candidates on the trace's first half, one cache for all layers,
the shipped weights in the loop. Five sixths of them fit each model, the last sixth
judges it. The logistic model is the policy's own fit (``fit_logistic``); the network
has one hidden layer (``--hidden`` tanh units) trained with Adam. Where the network
ranks no better, a scorer that combines these features in any other way has little to
gain either: what is missing is information, not the model's shape. For scale, the
AUC of the shipped weights themselves (fitted on other rounds' samples, at one horizon).
Prints a markdown table.

``--in-loop H``: then each model fitted at horizon H scores the evictions itself (the
policy's linear score swapped for it, nothing else changed) while the Python replay runs
the training half with one cache per layer: the hit rates that the AUCs stand for.
Minutes per model.
"""

from __future__ import annotations

import argparse
import json

import numpy as np

from mlx_pager.paging import learned
from mlx_pager.paging.learned import default_params
from mlx_pager.sim.learn import fit_logistic, samples
from mlx_pager.sim.replay import replay_reference
from mlx_pager.sim.trace import Trace, load_trace


def auc(scores: np.ndarray, labels: np.ndarray) -> float:
    """Area under the ROC curve: the chance that a positive scores above a negative,
    ties counted half (average ranks, Mann-Whitney)."""
    order = np.argsort(scores, kind="stable")
    _, first, counts = np.unique(scores[order], return_index=True, return_counts=True)
    ranks = np.empty(len(scores))
    ranks[order] = np.repeat(first + (counts + 1) / 2, counts)
    positive = labels.astype(bool)
    n1 = int(positive.sum())
    n0 = len(labels) - n1
    return float((ranks[positive].sum() - n1 * (n1 + 1) / 2) / (n1 * n0))


def fit_mlp(
    x: np.ndarray,
    y: np.ndarray,
    hidden: int = 32,
    epochs: int = 4,
    batch: int = 4096,
    rate: float = 3e-3,
    seed: int = 0,
):
    """P(y) = sigmoid(w2 . tanh(W1 z + b1) + b2), z the standardised features, fitted by
    Adam on the log loss; returns the scoring function."""
    rng = np.random.default_rng(seed)
    mean, std = x.mean(0), x.std(0) + 1e-9
    z = (x - mean) / std
    params = [
        rng.normal(0, 1 / np.sqrt(x.shape[1]), (x.shape[1], hidden)),
        np.zeros(hidden),
        rng.normal(0, 1 / np.sqrt(hidden), hidden),
        np.zeros(1),
    ]
    moments = [(np.zeros_like(p), np.zeros_like(p)) for p in params]
    for step in range(1, epochs * -(-len(y) // batch) + 1):  # batches drawn at random
        rows = rng.integers(0, len(y), batch)
        zb, yb = z[rows], y[rows]
        h = np.tanh(zb @ params[0] + params[1])
        p = 1 / (1 + np.exp(-np.clip(h @ params[2] + params[3], -30, 30)))
        d = (p - yb) / len(yb)  # the log loss's gradient at the output
        dh = np.outer(d, params[2]) * (1 - h * h)
        grads = [zb.T @ dh, dh.sum(0), h.T @ d, np.array([d.sum()])]
        for param, g, (m, v) in zip(params, grads, moments, strict=True):
            m *= 0.9
            m += 0.1 * g
            v *= 0.999
            v += 0.001 * g * g
            param -= rate * (m / (1 - 0.9**step)) / (np.sqrt(v / (1 - 0.999**step)) + 1e-8)

    def score(features: np.ndarray) -> np.ndarray:
        h = np.tanh(((features - mean) / std) @ params[0] + params[1])
        return h @ params[2] + params[3]

    return score


def features(state: learned.LayerState, now: np.ndarray, above, cols: np.ndarray) -> np.ndarray:
    """The candidates' features (``learned.FEATURES``, as the compiled replay writes its
    samples) from a layer's state: what ``LayerState.score`` weighs, before weighing.
    Logs by numpy, not the policy's bit-exact series: equal to about 1e-6."""
    r = state.services - state.last[cols]
    serving = np.zeros(state.size, bool)
    serving[now] = True
    r[serving[cols]] = 0
    x = np.zeros((len(cols), len(learned.FEATURES)))
    x[np.arange(len(cols)), np.searchsorted(learned.RECENCY_EDGES, r, side="right")] = 1.0
    base = (state.pop[cols] + 0.5) / (state.services + 1.0)
    k_mean = max(state.requests / max(state.services, 1), 1.0)
    seen = max(int(np.count_nonzero(state.pop)), 1)
    totals = np.maximum(state.total, 1e-300)[:, None]
    x[:, 9:14] = np.log(state.decayed[:, cols] / totals / base + 0.01).T
    x[:, 14] = np.log(base * seen / k_mean)
    none = np.zeros(0, np.int64)
    sets = ((learned.FOLLOWS, now, 15), (learned.FOLLOWS2, state.latest, 17),
            (learned.BELOW, none if above is None else above, 18))  # fmt: skip
    for kind, rows, column in sets:
        if len(rows):
            seen_rows = state.trans_seen[kind, rows][:, None] + 1.0
            lift = (state.trans[kind][rows[:, None], cols] + base) / seen_rows / base
            x[:, column] = np.log(lift).mean(0)
            if column == 15:
                x[:, 16] = lift.mean(0)
    x[:, 20] = 1.0
    return x


def replayed_with(trace: Trace, capacity: int, score) -> float:
    """The per-layer hit rate of the learned policy with ``score(features)`` in place of
    its linear score (the Python replay, the live policy's own code otherwise)."""
    linear = learned.LayerState.score
    learned.LayerState.score = lambda state, now, above, params, cols: score(
        features(state, now, above, cols)
    )
    try:
        return replay_reference(trace, capacity, "learned").hit_rate
    finally:
        learned.LayerState.score = linear


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("trace")
    parser.add_argument("--capacity", type=int, default=16)
    parser.add_argument("--samples", type=int, default=1_200_000)
    parser.add_argument("--horizons", type=int, nargs="+", default=[2, 4, 8])
    parser.add_argument("--hidden", type=int, default=32)
    parser.add_argument("--in-loop", type=int, metavar="H", help="replay the models of horizon H")
    parser.add_argument("--json", metavar="FILE")
    args = parser.parse_args()
    trace = load_trace(args.trace)
    training = trace.sequences(0, trace.num_sequences // 2)
    rate, x, y = samples(training, args.capacity, default_params().weights, 8)
    rows = np.random.default_rng(0).permutation(len(y))[: args.samples]
    x, y = x[rows], y[rows]
    cut = len(y) * 5 // 6
    print(f"{len(y)} samples, hit rate {rate:.4f} with the shipped weights in the loop")
    shipped = x[cut:] @ default_params().weights  # for scale: the weights in the loop
    print("| used again within | share | shipped | logistic | network | network - logistic |")
    print("| --- | --- | --- | --- | --- | --- |")
    results, scorers = [], {}
    for horizon in args.horizons:
        label = (y <= horizon) * 1.0
        weights = fit_logistic(x[:cut], label[:cut])
        network = fit_mlp(x[:cut], label[:cut], args.hidden)
        scorers[horizon] = {"logistic": lambda f, w=weights: f @ w, "network": network}
        row = {"shipped": auc(shipped, label[cut:])}
        row["logistic"] = auc(x[cut:] @ weights, label[cut:])
        row["network"] = auc(network(x[cut:]), label[cut:])
        results.append({"horizon": horizon, "share": label.mean(), **row})
        cells = " | ".join(f"{row[name]:.4f}" for name in ("shipped", "logistic", "network"))
        gain = row["network"] - row["logistic"]
        print(f"| {horizon} tokens | {label.mean():.3f} | {cells} | {gain:+.4f} |", flush=True)
    loop = {}
    if args.in_loop in scorers:
        print(f"\nper-layer hit rate on the training half, {args.capacity} of "
              f"{trace.num_experts} per layer, models of horizon {args.in_loop}:")  # fmt: skip
        weights = default_params().weights
        for name, score in (("shipped", lambda f: f @ weights), *scorers[args.in_loop].items()):
            loop[name] = replayed_with(training, args.capacity, score)
            print(f"  {name}: {loop[name]:.4f}", flush=True)
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"capacity": args.capacity, "samples": len(y), "rows": results,
                       "in_loop": {"horizon": args.in_loop, **loop}}, f)  # fmt: skip


if __name__ == "__main__":
    main()
