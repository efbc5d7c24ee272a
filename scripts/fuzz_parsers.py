"""Fuzz every parser of untrusted files with atheris (coverage-guided, libFuzzer's
mutations): 100,000 cases each by default.

    pip install -e '.[dev]'        # atheris comes with it on Linux x86-64
    python scripts/fuzz_parsers.py [--cases N] [--only NAME ...] [--jobs 2]

Hypothesis drew each case for about 4 ms of CPU (and slower as its run grew), ten times
what most parsers take, so 100,000 cases a parser took hours on a shared 2-core
machine. Here hypothesis only draws the seed corpus (the strategies and checks of
tests/fuzz_targets.py, which the suite runs a few hundred of) and libFuzzer mutates
from there, guided by the coverage of the parser modules; each case is a file written
over the last one in a folder made once, then parsed.

A case passes when the parser succeeds or raises a ValueError naming the file. Anything
else is a finding and stops that parser with its input saved: another exception (a
traceback a user would see), a case running past --hang-s (a hang), or an allocation of
more than --alloc-mb (address space is capped that much above the process's own, so an
allocation sized by an unchecked number from a file of a few KB fails as MemoryError).
Prints, per parser, the cases run, how they ended, the coverage reached and the time.
"""

from __future__ import annotations

import argparse
import collections
import importlib
import json
import os
import random
import re
import resource
import shutil
import subprocess
import sys
import tempfile
import time
import warnings
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

TESTS = Path(__file__).resolve().parents[1] / "tests"
sys.path.insert(0, str(TESTS))

# The code a case runs through, instrumented for coverage: the parsers and the standard
# library and numpy code they hand a file's bytes to (json's decoder is C: nothing to see).
COVERED_MODULES = [
    "mlx_pager.storage.checkpoint",
    "mlx_pager.sim.trace",
    "mlx_pager.settings",
    "mlx_pager.units",
    "mlx_pager_app.conversations",
    "tomllib._parser",
    "zipfile",
    "numpy.lib._format_impl",
    "numpy.lib._npyio_impl",
]
SEEDS_PER_PARSER = 300  # drawn from each hypothesis strategy
MAX_LEN = 4096  # bytes per case: every parser's structure fits in far less
REPORT_EVERY = 100  # cases between summaries: libFuzzer may end the process


def instrument(names: list[str]) -> int:
    """Add atheris's coverage hooks to every function and method defined in ``names``."""
    import atheris

    done = 0
    for name in names:
        try:
            module = importlib.import_module(name)
        except ImportError:
            continue
        source = getattr(module, "__file__", None)
        members = list(vars(module).values())
        members += [m for c in members if isinstance(c, type) for m in vars(c).values()]
        for obj in members:
            obj = getattr(obj, "__func__", obj)  # staticmethod, classmethod
            code = getattr(obj, "__code__", None)
            if code is not None and code.co_filename == source:
                atheris.instrument_func(obj)
                done += 1
    return done


def seed_corpus(targets, name: str, folder: Path, count: int, seed: int) -> int:
    """The valid file and ``count`` hypothesis examples of the parser's strategy."""
    from hypothesis import HealthCheck, given, settings

    strategy, _ = targets.TARGETS[name]
    examples = [targets.VALID_FILES[name]]

    @settings(database=None, deadline=None, suppress_health_check=list(HealthCheck))
    @given(strategy)
    def draw(data: bytes) -> None:
        examples.append(data)

    rng = random.Random(seed)
    for _ in range(count):
        draw.hypothesis.fuzz_one_input(rng.randbytes(rng.choice([64, 256, 1024, 4096])))
    if name in targets.FUZZER_INPUTS:
        _, seeds = targets.FUZZER_INPUTS[name]
        examples = [s for e in examples for s in seeds(e)]
    folder.mkdir(parents=True, exist_ok=True)
    for i, data in enumerate(examples):
        (folder / f"seed-{i:04d}").write_bytes(data[:MAX_LEN])
    return len(examples)


def child(args: argparse.Namespace) -> None:
    """One parser under libFuzzer: never returns (libFuzzer exits the process)."""
    import atheris

    warnings.simplefilter("ignore")  # numpy's casting warnings on junk values
    targets = importlib.import_module(args.targets)
    name, work = args.child, Path(args.workdir)
    slug = re.sub(r"\W+", "-", name)
    corpus = work / f"{slug}-corpus"
    seed_corpus(targets, name, corpus, args.seeds, args.seed)
    covered = instrument(COVERED_MODULES)
    _, check = targets.TARGETS[name]
    as_file = targets.FUZZER_INPUTS.get(name, (None, None))[0] or (lambda data: data)
    outcomes: collections.Counter = collections.Counter()
    summary = work / f"{slug}.json"
    start = time.monotonic()

    def report() -> None:
        figures = {"parser": name, "cases": outcomes.total(), "outcomes": dict(outcomes),
                   "seconds": round(time.monotonic() - start, 1),
                   "instrumented_functions": covered}  # fmt: skip
        summary.write_text(json.dumps(figures))

    def one_input(data: bytes) -> None:
        outcomes[check(as_file(data))] += 1
        if outcomes.total() % REPORT_EVERY == 0:
            report()
        if outcomes.total() >= args.cases:
            report()
            sys.stdout.flush()
            os._exit(0)

    # Address space: what the process holds now plus --alloc-mb. A file of a few KB that
    # makes a parser allocate more than that got it to trust a number it did not check.
    _, hard = resource.getrlimit(resource.RLIMIT_AS)
    cap = _address_space() + args.alloc_mb * 2**20
    resource.setrlimit(resource.RLIMIT_AS, (cap, hard))
    flags = [
        f"-max_len={MAX_LEN}",
        f"-timeout={int(args.hang_s)}",
        "-rss_limit_mb=3000",
        f"-seed={args.seed}",
        f"-artifact_prefix={work}/{slug}-",
        "-print_final_stats=1",
        f"-dict={_dictionary(targets, work)}",
    ]
    if args.max_minutes:
        flags.append(f"-max_total_time={int(args.max_minutes * 60)}")
    atheris.Setup([sys.argv[0], *flags, str(corpus)], one_input)
    report()
    atheris.Fuzz()


def _address_space() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[0]) * resource.getpagesize()


def _dictionary(targets, work: Path) -> Path:
    """Words the parsers look for, so mutations try them (libFuzzer's -dict format)."""
    path = work / "parsers.dict"
    path.write_text("".join(f'"{_escape(w.encode("latin-1"))}"\n' for w in targets.FUZZER_WORDS))
    return path


def _escape(word: bytes) -> str:
    return "".join(chr(b) if 32 <= b < 127 and b not in b'"\\' else f"\\x{b:02x}" for b in word)


def run_parser(name: str, args: argparse.Namespace, work: Path) -> dict:
    slug = re.sub(r"\W+", "-", name)
    log = work / f"{slug}.log"
    command = [sys.executable, __file__, "--child", name, "--workdir", str(work),
               "--cases", str(args.cases), "--hang-s", str(args.hang_s),
               "--seed", str(args.seed), "--seeds", str(args.seeds),
               "--alloc-mb", str(args.alloc_mb), "--targets", args.targets]  # fmt: skip
    if args.max_minutes:
        command += ["--max-minutes", str(args.max_minutes)]
    # The child's folders for the files it parses go in a scratch folder of this parser's
    # own, removed here: the child ends by os._exit or libFuzzer, past the exit handlers
    # that would have removed them.
    scratch = work / f"{slug}-files"
    scratch.mkdir(exist_ok=True)
    env = {**os.environ, "TMPDIR": str(scratch)}
    start = time.monotonic()
    try:
        with open(log, "wb") as out:
            rc = subprocess.run(command, stdout=out, stderr=subprocess.STDOUT, env=env).returncode
    finally:
        shutil.rmtree(scratch, ignore_errors=True)
    seconds = time.monotonic() - start
    try:
        figures = json.loads((work / f"{slug}.json").read_text())
    except (OSError, ValueError):
        figures = {"parser": name, "cases": 0, "outcomes": {}}
    text = log.read_text(errors="replace")
    coverage = re.findall(r"cov: (\d+) ft: (\d+)", text)
    figures.update(
        wall_seconds=round(seconds, 1),
        coverage=int(coverage[-1][0]) if coverage else None,
        features=int(coverage[-1][1]) if coverage else None,
        log=str(log),
        passed=rc == 0 and figures["cases"] >= (1 if args.max_minutes else args.cases),
    )
    if rc != 0:
        saved = re.findall(r"Test unit written to (\S+)", text)  # libFuzzer's words
        figures["finding"] = saved or f"exit status {rc}"
    return figures


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--cases", type=int, default=100_000, help="cases per parser")
    parser.add_argument("--only", nargs="*", help="some parsers only")
    parser.add_argument("--jobs", type=int, default=1, help="parsers fuzzed at once")
    parser.add_argument("--hang-s", type=float, default=10.0, help="one case longer: a hang")
    parser.add_argument("--alloc-mb", type=int, default=1024, help="more: an allocation "
                        "sized by an unchecked number")  # fmt: skip
    parser.add_argument("--max-minutes", type=float, default=None, help="per parser")
    parser.add_argument("--seed", type=int, default=1)
    parser.add_argument("--seeds", type=int, default=SEEDS_PER_PARSER)
    parser.add_argument("--workdir", help="corpora, logs and findings (default: a new one)")
    parser.add_argument("--json", action="store_true")
    parser.add_argument("--targets", default="fuzz_targets", help="module of TARGETS, "
                        "VALID_FILES, FUZZER_INPUTS and FUZZER_WORDS (tests/ is on the "
                        "path)")  # fmt: skip
    parser.add_argument("--child", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        child(args)
        return 0
    try:
        import atheris  # noqa: F401
    except ImportError:
        print("needs atheris: pip install atheris (its wheels are for Linux x86-64)")
        return 2
    targets = importlib.import_module(args.targets)
    if unknown := set(args.only or ()) - set(targets.TARGETS):
        parser.error(
            f"no parser {', '.join(sorted(unknown))}; there are {', '.join(targets.TARGETS)}"
        )
    work = Path(args.workdir or tempfile.mkdtemp(prefix="mlx-pager-fuzz-"))
    work.mkdir(parents=True, exist_ok=True)
    names = args.only or list(targets.TARGETS)
    start = time.monotonic()
    with ThreadPoolExecutor(args.jobs) as pool:
        results = list(pool.map(lambda n: run_parser(n, args, work), names))
    for r in results:
        ends = ", ".join(f"{k} {v}" for k, v in sorted(r["outcomes"].items()))
        line = (f"{r['parser']}: {r['cases']} cases in {r['wall_seconds']:.0f} s, "
                f"coverage {r['coverage']} edges ({ends})")  # fmt: skip
        print(line if r["passed"] else f"{line}\n  FINDING: {r.get('finding')}; see {r['log']}")
    total = sum(r["cases"] for r in results)
    print(f"all: {total} cases in {time.monotonic() - start:.0f} s; corpora and logs in {work}")
    if args.json:
        print(json.dumps(results, indent=2))
    return 0 if all(r["passed"] for r in results) else 1


if __name__ == "__main__":
    sys.exit(main())
