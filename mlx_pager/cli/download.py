"""`mlx-pager download ID`: fetch a model into the Hugging Face cache, resumably.

Prints what it will cost and the verdict for the budget in settings first; progress goes
to stderr; Ctrl-C keeps what arrived, and the same command resumes it.
"""

from __future__ import annotations

import argparse
import sys
import threading
import time
from typing import TYPE_CHECKING

from ..units import format_bytes

if TYPE_CHECKING:
    from ..hub.plan import DownloadPlan


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "repo_id", metavar="ID", help="Hub id, e.g. mlx-community/Qwen3-30B-A3B-4bit"
    )
    parser.add_argument("--revision", default=None, help="branch, tag or commit (default: main)")
    parser.add_argument(
        "--endpoint", default=None, help="Hub URL (default: HF_ENDPOINT or huggingface.co)"
    )


def describe_plan(plan: DownloadPlan, budget_bytes: int, context_length: int) -> list[str]:
    """The plan in a few lines: its files and commit, then what the listing says of it
    (the speed for this machine's cached constants: `mlx-pager models` measures them)."""
    from ..hub.listing import describe_download, estimate_from_plan
    from ..speed import machine_constants

    lines = [
        f"{plan.repo_id} @ {plan.revision} ({plan.commit[:12]}): {len(plan.files)} files, "
        f"{format_bytes(plan.total_bytes)}",
    ]
    if plan.sizes is not None:
        s = plan.sizes
        lines.append(
            f"  dense {format_bytes(s.dense_bytes)}, experts {format_bytes(s.expert_bytes)} "
            f"({s.moe_layers} MoE layers x {s.experts} experts, top-{s.top_k}, "
            f"{format_bytes(s.one_expert_bytes)} each)"
        )
    machine = machine_constants(measure=False)
    estimate = estimate_from_plan(plan, budget_bytes, context_length, machine=machine)
    estimate.disk_problem = ""  # run() reports it as the error it is
    where = {"free disk": f" ({plan.cache_dir})", "your budget": f" ({format_bytes(budget_bytes)})"}
    for label, text in describe_download(estimate):
        lines.append(f"  {label}{where.get(label, '')}: {text}")
    return lines


class _Bar:
    """One line on stderr; the fetch loop calls it at most every PROGRESS_INTERVAL_S."""

    def __init__(self) -> None:
        self.start = time.monotonic()
        self.first_done: int | None = None

    def __call__(self, done: int, total: int, file: str) -> None:
        now = time.monotonic()
        if self.first_done is None:
            self.first_done = done
        pct = done / total if total else 1.0
        width = 30
        bar = "#" * int(pct * width) + "-" * (width - int(pct * width))
        rate = (done - self.first_done) / max(now - self.start, 1e-6)
        line = (
            f"\r[{bar}] {pct:4.0%} {format_bytes(done)} / {format_bytes(total)} "
            f"{format_bytes(rate)}/s {file[-40:]}"
        )
        sys.stderr.write(f"{line:<110}")
        sys.stderr.flush()


def run(args: argparse.Namespace) -> int:
    from ..hub.errors import DownloadCancelled, DownloadError
    from ..hub.fetch import download
    from ..hub.plan import plan_download
    from ..settings import load_settings

    settings = load_settings()
    budget, context = settings.budget_bytes(), settings.context_length
    try:
        plan = plan_download(args.repo_id, args.revision, args.endpoint)
    except DownloadError as e:
        print(f"mlx-pager: error: {e}", file=sys.stderr)
        return 2
    for line in describe_plan(plan, budget, context):
        print(line)
    if problem := plan.disk_problem:
        print(f"mlx-pager: error: {problem}", file=sys.stderr)
        return 2
    cancel = threading.Event()
    bar = _Bar()
    try:
        path = download(args.repo_id, plan=plan, progress=bar, cancel=cancel)
    except (KeyboardInterrupt, DownloadCancelled):
        cancel.set()
        print(
            f"\nInterrupted: the partial download is kept; run `mlx-pager download "
            f"{args.repo_id}` again to resume it.",
            file=sys.stderr,
        )
        return 130
    except DownloadError as e:
        print(f"\nmlx-pager: error: {e}", file=sys.stderr)
        return 2
    print(file=sys.stderr)
    print(path)
    return 0
