"""Fuzz every parser of untrusted files with hypothesis: 100,000 cases each by default.

    python scripts/fuzz_parsers.py [--cases N] [--only NAME ...]

    python scripts/fuzz_parsers.py --max-minutes 10   # what a shared machine allows

The strategies and checks are tests/fuzz_targets.py (the suite runs a few hundred of each).
A case passes when the parser succeeds or raises a ValueError naming the file; any other
exception stops the run with the failing input, and a case that runs past --hang-s seconds
aborts it with every thread's stack (a hang). Prints, per parser, the cases run and how
they ended.
"""

from __future__ import annotations

import argparse
import collections
import faulthandler
import sys
import time
import warnings
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))

from fuzz_targets import TARGETS
from hypothesis import HealthCheck, given, settings
from hypothesis.reporting import with_reporter


class TimeUp(BaseException):
    """--max-minutes reached: hypothesis lets a BaseException through, unreported."""


def fuzz(name: str, cases: int, hang_s: float, max_s: float) -> collections.Counter:
    strategy, check = TARGETS[name]
    outcomes: collections.Counter = collections.Counter()
    end = time.monotonic() + max_s

    @settings(
        max_examples=cases,
        deadline=None,
        database=None,
        derandomize=False,
        phases=["generate"],  # no shrinking: a failure prints its input as found
        suppress_health_check=list(HealthCheck),
    )
    @given(strategy)
    def run(data: bytes) -> None:
        if time.monotonic() > end:
            raise TimeUp
        faulthandler.dump_traceback_later(hang_s, exit=True)
        try:
            outcomes[check(data)] += 1
        finally:
            faulthandler.cancel_dump_traceback_later()

    try:
        with with_reporter(lambda _: None):  # silence its "reproduce with @seed" line
            run()
    except TimeUp:
        pass
    return outcomes


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--cases", type=int, default=100_000, help="cases per parser")
    parser.add_argument("--only", nargs="*", choices=list(TARGETS), help="some parsers only")
    parser.add_argument("--hang-s", type=float, default=10.0, help="one case longer: a hang")
    parser.add_argument(
        "--max-minutes", type=float, default=None, help="stop each parser after this long"
    )
    args = parser.parse_args()
    warnings.simplefilter("ignore")  # numpy's casting warnings on junk values
    total = 0
    for name in args.only or TARGETS:
        start = time.perf_counter()
        max_s = args.max_minutes * 60 if args.max_minutes else float("inf")
        outcomes = fuzz(name, args.cases, args.hang_s, max_s)
        runs = sum(outcomes.values())
        total += runs
        ends = ", ".join(f"{k} {v}" for k, v in outcomes.most_common())
        print(f"{name}: {runs} cases in {time.perf_counter() - start:.0f} s, no crash ({ends})")
        sys.stdout.flush()
    print(f"all: {total} cases, every one a success or a clear error naming the file")
    if total < args.cases * len(args.only or TARGETS):
        print(f"(stopped by --max-minutes before {args.cases} cases each)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
