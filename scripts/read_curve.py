"""A layer's misses against the disk as the pieces grow: the ratio to fio at 8 reads in
flight and to fio in bursts of a decode step's reads, read into float32 slots (widened on
the host, as this CPU computes) and into slots of the stored bf16 (as a GPU holds them),
from 32 KiB pieces (the embedded model's) to 768 KiB (Qwen3-30B-A3B's).

    python scripts/read_curve.py OUT_DIR [--sizes 32 64 128 256 512 768] [--runs 2]

For each size, a checkpoint of that piece size is written to a temporary folder (two
qwen3_moe layers of per-expert bf16 experts, top-4, as Hugging Face ships them: every
expert's three projections apart in the file) and ``bench_layer_reads`` runs on it
``--runs`` times at 8 threads; the checkpoint is deleted before the next size. Each
checkpoint holds about ``--target-mb`` of experts (more experts where they are smaller),
so fio reads files of one size throughout: a file of a few MB reads at twice the disk's
rate here, from the host's cache. Writes ``read-curve.png`` and ``read-curve.json`` into
OUT_DIR. Minutes.
"""

from __future__ import annotations

import argparse
import json
import statistics
import tempfile
from pathlib import Path

import mlx.core as mx

from mlx_pager.sim.bench import bench_layer_reads
from mlx_pager.sim.synthetic import make_checkpoint

HIDDEN = 1024  # a projection is HIDDEN x moe_intermediate_size bf16 values
LAYERS = 2


def measure(sizes: list[int], runs: int, rounds: int, target_mb: int) -> list[dict]:
    """Per piece size (KiB): each run's ratios to fio at depth 8 and to fio in a decode
    step's bursts, widened and as stored."""
    points = []
    for kib in sizes:
        experts = max(32, round(target_mb * 1024 / (LAYERS * 3 * kib)))
        with tempfile.TemporaryDirectory() as tmp:
            path = make_checkpoint(
                Path(tmp) / "m", "qwen3_moe", per_expert=True, dtype=mx.bfloat16,
                hidden_size=HIDDEN, moe_intermediate_size=kib * 1024 // (2 * HIDDEN),
                num_experts=experts, num_experts_per_tok=4, num_hidden_layers=LAYERS,
                intermediate_size=256,
            )  # fmt: skip
            rows = [bench_layer_reads(path, (8,), rounds, read_paths=("pread",))
                    for _ in range(runs)]  # fmt: skip
        point = {"piece_kib": kib, "experts_per_layer": experts}
        for key, name in (("pread_8", "widened"), ("pread_8_as_stored", "as_stored")):
            point[name] = [row[key].get("fio_ratio") for row in rows]
            point[f"{name}_burst"] = [row[key].get("fio_burst_ratio") for row in rows]
            point[f"{name}_mb_s"] = [row[key]["miss_mb_s"] for row in rows]
        point["fio_mb_s"] = [row["pread_8"].get("fio_mb_s") for row in rows]
        print(json.dumps(point), flush=True)
        points.append(point)
    return points


def plot(points: list[dict], out: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(12, 4.5), sharey=True)
    for ax, suffix, baseline in (
        (axes[0], "", "fio random reads, 8 in flight (a steady queue)"),
        (axes[1], "_burst", "fio in bursts of a decode step's reads"),
    ):
        for name, label, marker, color in (
            ("as_stored", "into slots as stored (bf16, a GPU's)", "s", "C0"),
            ("widened", "widened into float32 slots (this CPU)", "o", "C1"),
        ):
            for i, point in enumerate(points):
                values = [v for v in point[name + suffix] if v is not None]
                ax.scatter([point["piece_kib"]] * len(values), values, marker=marker,
                           color=color, label=label if i == 0 else None)  # fmt: skip
            means = [(p["piece_kib"], statistics.mean(v for v in p[name + suffix]
                      if v is not None)) for p in points]  # fmt: skip
            ax.plot(*zip(*means, strict=True), color=color, alpha=0.4)
        ax.axhline(0.8, color="grey", linestyle="--", label="goal: 0.8 of fio")
        ax.set_xscale("log", base=2)
        ax.set_xticks([p["piece_kib"] for p in points], [str(p["piece_kib"]) for p in points])
        ax.set_xlabel("piece size (KiB); 3 pieces an expert, 4 experts a decode group")
        ax.set_title(f"against {baseline}", fontsize=10)
    axes[0].set_ylim(0, max(1.2, axes[0].get_ylim()[1]))
    axes[0].set_ylabel("a layer's misses / fio")
    axes[0].legend()
    fig.suptitle("Reading a decode step's misses, against the disk's own random reads")
    fig.savefig(out, dpi=120, bbox_inches="tight")
    plt.close(fig)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("out_dir", type=Path)
    parser.add_argument("--sizes", type=int, nargs="+", default=[32, 64, 128, 256, 512, 768])
    parser.add_argument("--runs", type=int, default=2)
    parser.add_argument("--rounds", type=int, default=24)
    parser.add_argument("--target-mb", type=int, default=192)
    args = parser.parse_args()
    points = measure(args.sizes, args.runs, args.rounds, args.target_mb)
    args.out_dir.mkdir(parents=True, exist_ok=True)
    (args.out_dir / "read-curve.json").write_text(json.dumps(points, indent=1) + "\n")
    if None in points[0]["widened"] + points[0]["widened_burst"]:
        raise SystemExit("No ratios to plot: fio (with io_uring) is needed; apt install fio.")
    plot(points, args.out_dir / "read-curve.png")
    print(f"wrote {args.out_dir / 'read-curve.png'}")


if __name__ == "__main__":
    main()
