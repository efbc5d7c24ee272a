"""`mlx-pager models`: the models you can open, with sizes and verdicts for the budget.

The rows are the Models screen's (``hub.listing``): what the Hugging Face cache holds,
then the embedded model; ``--catalogue`` adds the curated models not downloaded yet.
Verdicts are for the budget and context length in settings (`mlx-pager settings`),
planned as the engine plans them (floats in its compute dtype: float32 on a CPU). Speeds
are ``speed.project_decode`` with this machine's constants (``speed.machine_constants``:
calibrated here, about a second the first time, or a Mac's table row), shown with that
basis.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from ..speed import MachineConstants


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--json", action="store_true", help="one JSON list on stdout")
    parser.add_argument(
        "--catalogue", action="store_true", help="also list curated models not downloaded yet"
    )


def rows(
    budget_bytes: int,
    context_length: int,
    catalogue: bool = False,
    machine: MachineConstants | None = None,
) -> list[dict]:
    """One dict per model of the listing, with its verdict and the speed for ``machine``."""
    from ..hub.listing import estimate_speed_text, list_models, quick_estimate

    out = []
    for row in list_models(catalogue=catalogue):
        in_cache = bool(row.commit)
        if not (in_cache or row.embedded or catalogue):
            continue
        estimate = quick_estimate(row, budget_bytes, context_length, machine)
        reason = estimate.error or estimate.explain
        if in_cache and not row.cached:
            reason = "not runnable: no config.json or weights (partial?)"
        out.append(
            {
                "id": row.repo_id,
                "label": row.label,
                "commit": row.commit,
                "path": str(row.path) if row.path else None,
                "size_bytes": row.size_bytes,
                "incomplete_bytes": row.incomplete_bytes,
                "runnable": row.cached,
                "cached": in_cache,
                "embedded": row.embedded,
                "verdict": estimate.verdict or None,
                "reason": reason,
                "tokens_per_second": estimate.tokens_per_second,
                "speed": estimate_speed_text(estimate) if estimate.verdict == "paged" else None,
                "speed_source": estimate.speed_source or None,
            }
        )
    return out


def largest_shard() -> Path | None:
    """The largest safetensors file of the cached models: what misses read, and a truer
    probe of cold reads than a file just written (``speed.measure_read_bandwidth``)."""
    from ..hub.cache import cached_models

    shards = [p for m in cached_models() if m.runnable for p in m.path.glob("*.safetensors")]
    return max(shards, key=lambda p: p.stat().st_size, default=None)


def run(args: argparse.Namespace) -> int:
    from ..settings import load_settings
    from ..speed import machine_constants
    from ..units import format_bytes

    settings = load_settings()
    budget = settings.budget_bytes()
    machine = machine_constants(measure=False) or machine_constants(probe=largest_shard())
    found = rows(budget, settings.context_length, args.catalogue, machine)
    if args.json:
        print(json.dumps(found, indent=2))
        return 0
    print(f"budget {format_bytes(budget)}, context {settings.context_length} tokens")
    for r in found:
        state = "embedded" if r["embedded"] else "cached" if r["cached"] else "not downloaded"
        verdict_text = r["verdict"] or "-"
        if r["speed"]:
            verdict_text += f" {r['speed']}"
        print(f"{r['label']:<55} {format_bytes(r['size_bytes']):>9}  {state:<14} {verdict_text}")
        if r["reason"]:
            print(f"    {r['reason']}")
    if machine is not None:
        print(f"speeds are estimates: {machine.source}")
    if not any(r["cached"] for r in found):
        print("No models in the Hugging Face cache yet. Get one with `mlx-pager download ID`.")
    return 0
