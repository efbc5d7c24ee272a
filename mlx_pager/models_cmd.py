"""`mlx-pager models`: what the Hugging Face cache holds, with sizes and verdicts.

Verdicts are for the budget and context length in settings (`mlx-pager settings`),
planned as the engine plans them (floats in its compute dtype: float32 on a CPU);
``--catalogue`` adds the curated models of assets/catalogue.json that are not cached.
"""

from __future__ import annotations

import argparse
import json

from .download import load_catalogue, local_verdict, verdict
from .hub import cached_models
from .units import format_bytes


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--json", action="store_true", help="one JSON list on stdout")
    parser.add_argument(
        "--catalogue", action="store_true", help="also list curated models not downloaded yet"
    )


def rows(budget_bytes: int, context_length: int, catalogue: bool = False) -> list[dict]:
    """One dict per cached model revision (and catalogue model), with its verdict."""
    out = []
    for m in cached_models():
        row = {
            "id": m.repo_id,
            "commit": m.commit,
            "refs": list(m.refs),
            "path": str(m.path),
            "size_bytes": m.size_bytes,
            "incomplete_bytes": m.incomplete_bytes,
            "runnable": m.runnable,
            "cached": True,
            "verdict": None,
            "reason": "" if m.runnable else "not runnable: no config.json or weights (partial?)",
            "tokens_per_second": None,
        }
        if m.runnable:
            try:  # planned by the engine itself, as the app and `generate` plan it
                v = local_verdict(m.path, budget_bytes, context_length)
                if v.plan.num_experts:
                    _add_verdict(row, v)
                else:
                    row["reason"] = "not a mixture-of-experts model: nothing to page"
            except (OSError, ValueError, KeyError, RuntimeError) as e:
                row["reason"] = f"cannot open it: {e}"
        out.append(row)
    if catalogue:
        here = {r["id"] for r in out}
        for entry in load_catalogue():
            if entry.id in here:
                continue
            row = {"id": entry.id, "cached": False, "size_bytes": entry.sizes.total_bytes}
            _add_verdict(row, verdict(entry.sizes, budget_bytes, context_length))
            out.append(row)
    return out


def _add_verdict(row: dict, v) -> None:  # noqa: ANN001 - download.Verdict
    row.update(verdict=v.verdict, reason=v.reason, tokens_per_second=v.tokens_per_second)


def run(args: argparse.Namespace) -> int:
    import psutil

    from .settings import load_settings

    settings = load_settings()
    budget = settings.budget_bytes(psutil.virtual_memory().total)
    found = rows(budget, settings.context_length, args.catalogue)
    if args.json:
        print(json.dumps(found, indent=2))
        return 0
    if not found:
        print("No models in the Hugging Face cache. Get one with `mlx-pager download ID`.")
        return 0
    print(f"budget {format_bytes(budget)}, context {settings.context_length} tokens")
    for r in found:
        state = "cached" if r["cached"] else "not downloaded"
        verdict_text = r["verdict"] or "-"
        print(f"{r['id']:<55} {format_bytes(r['size_bytes']):>9}  {state:<14} {verdict_text}")
        if r.get("reason"):
            print(f"    {r['reason']}")
    return 0
