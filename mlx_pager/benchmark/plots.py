"""PNG plots of a benchmark report: speed against budget per system, and mlx-pager's hit
rate against budget beside Belady's bound for the same routing."""

from __future__ import annotations

from pathlib import Path


def _system(name: str) -> str:
    return name.split("-resident")[0].split("-capped")[0].rsplit("-0.", 1)[0]


def plot_report(report: dict, out_dir: Path) -> list[Path]:
    """Write ``tps_vs_budget.png`` and ``hit_rate_vs_budget.png``; returns their paths."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    runs = {n: r for n, r in report["runs"].items() if r.get("decode_tps")}
    model_bytes = report["model_disk_bytes"]
    fig, ax = plt.subplots(figsize=(7, 4.5))
    for system in sorted({_system(n) for n in runs}):
        points = sorted(
            ((r.get("budget_bytes") or (r.get("cap") or {}).get("limit_bytes") or model_bytes)
             / 2**30, r["decode_tps"])
            for n, r in runs.items()
            if _system(n) == system
        )  # fmt: skip
        ax.plot(*zip(*points, strict=True), marker="o", label=system)
    ax.set_xlabel("memory budget (GiB)")
    ax.set_ylabel("decode tokens/s")
    ax.set_title("Decode speed against budget")
    ax.legend()
    tps = out_dir / "tps_vs_budget.png"
    fig.savefig(tps, dpi=120, bbox_inches="tight")
    plt.close(fig)

    # Decode's hit rate where Belady's is known for it: both count a request per token and
    # expert (a prefill fetch serves many tokens at once, the trace counts each).
    pager = {n: r for n, r in runs.items() if n.startswith("mlx-pager")}
    decode = all(r.get("belady_decode_hit_rate") is not None for r in pager.values())
    live_key, best_key = (
        ("decode_hit_rate", "belady_decode_hit_rate") if decode else ("hit_rate", None)
    )
    paged = sorted(
        (r["budget_bytes"] / 2**30, r[live_key], r.get(best_key) if best_key else None)
        for r in pager.values()
        if r.get(live_key) is not None
    )
    fig, ax = plt.subplots(figsize=(7, 4.5))
    if paged:
        x, live, best = zip(*paged, strict=True)
        what = "decode" if decode else "all fetches"
        ax.plot(x, live, marker="o", label=f"mlx-pager (live, {what})")
        if all(b is not None for b in best):
            ax.plot(x, best, marker="s", linestyle="--", label="Belady bound (same routing)")
    ax.set_xlabel("memory budget (GiB)")
    ax.set_ylabel("expert hit rate")
    ax.set_ylim(0, 1.02)
    ax.set_title("Hit rate against budget")
    ax.legend()
    hits = out_dir / "hit_rate_vs_budget.png"
    fig.savefig(hits, dpi=120, bbox_inches="tight")
    plt.close(fig)
    return [tps, hits]
