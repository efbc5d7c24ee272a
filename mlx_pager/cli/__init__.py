"""The `mlx-pager` commands: one module each, in mlx-lm's shape.

Each command module has ``add_arguments(parser)`` and ``run(args) -> int`` and imports
MLX and mlx-lm only inside ``run``, so `mlx-pager --help` and `mlx-pager settings` print
at once. With no command the terminal app opens: the app's entry point
(``mlx_pager_app.entry``) calls ``main`` with itself as ``no_command``; the engine never
imports the app.
"""

from __future__ import annotations

import argparse
import importlib
import math
import sys
from collections.abc import Callable

from ..units import parse_bytes

# name -> (module, help)
COMMANDS: dict[str, tuple[str, str]] = {
    "generate": ("mlx_pager.cli.generate", "generate text from a prompt, paging experts"),
    "bench": ("mlx_pager.cli.bench", "stock mlx-lm against mlx-pager at several budgets"),
    "profile": ("mlx_pager.cli.profile", "which experts fire, per layer and task"),
    "settings": ("mlx_pager.cli.settings", "show or change the settings"),
    "download": ("mlx_pager.cli.download", "download a model into the Hugging Face cache"),
    "models": ("mlx_pager.cli.models", "list models with their verdicts for the budget"),
    "simulate": ("mlx_pager.cli.simulate", "replay a routing trace against cache policies"),
    "serve": ("mlx_pager.cli.serve", "serve the paged model over an OpenAI-compatible HTTP API"),
}


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="mlx-pager",
        description="Run mixture-of-experts models larger than memory. "
        "With no command, opens the terminal app.",
    )
    sub = parser.add_subparsers(dest="command")
    for name, (module, help_text) in COMMANDS.items():
        sub_parser = sub.add_parser(name, help=help_text)
        importlib.import_module(module).add_arguments(sub_parser)
        sub_parser.set_defaults(module=module)
    return parser


def main(argv: list[str] | None = None, no_command: Callable[[], int] | None = None) -> int:
    """Run one command; with none, ``no_command`` (the app) or the help."""
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.command is None:
        if no_command is None:
            parser.print_help()
            return 0
        return no_command()
    try:
        return importlib.import_module(args.module).run(args)
    except KeyboardInterrupt:
        print("\ninterrupted", file=sys.stderr)
        return 130
    except (ValueError, FileNotFoundError, OSError) as e:
        print(f"mlx-pager: error: {e}", file=sys.stderr)
        return 2


# Argument types with their accepted range: a value out of range is refused by argparse
# with the range in the message, instead of being clamped or passed on to fail later.
MAX_TOKENS = 1_048_576  # the longest context_length a setting accepts
SEED_MAX = 2**32 - 1


def whole(low: int, high: int) -> Callable[[str], int]:
    """A whole number from ``low`` to ``high``."""

    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(
                f"takes a whole number from {low} to {high}, not {text!r}"
            ) from None
        if not low <= value <= high:
            raise argparse.ArgumentTypeError(f"must be from {low} to {high}, not {value}")
        return value

    parse.__name__ = "whole number"
    return parse


def real(low: float, high: float, *, low_open: bool = False) -> Callable[[str], float]:
    """A finite number in ``[low, high]`` (``(low, high]`` when ``low_open``)."""
    shown = f"{'above' if low_open else 'from'} {low:g} {'up ' if low_open else ''}to {high:g}"

    def parse(text: str) -> float:
        try:
            value = float(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"takes a number {shown}, not {text!r}") from None
        above_low = value > low if low_open else value >= low
        if not (math.isfinite(value) and above_low and value <= high):
            raise argparse.ArgumentTypeError(f"must be a number {shown}, not {text}")
        return value

    parse.__name__ = "number"
    return parse


def byte_size(text: str) -> str:
    """A memory size such as 6GB, above zero; kept as text, as settings keep it."""
    try:
        value = parse_bytes(text)
    except ValueError as e:
        raise argparse.ArgumentTypeError(str(e)) from None
    if value <= 0:
        raise argparse.ArgumentTypeError(f"must be a size above zero, such as 6GB, not {text!r}")
    return text


def fractions(text: str) -> list[float]:
    """Comma-separated shares of the experts, each above 0 up to 1."""
    share = real(0.0, 1.0, low_open=True)
    parts = [p.strip() for p in text.split(",") if p.strip()]
    if not parts:
        raise argparse.ArgumentTypeError("takes shares above 0 up to 1, such as 1.0,0.5,0.25")
    return [share(p) for p in parts]


def capacity(text: str) -> str:
    """Experts per layer (a whole number from 1) or a share of them (above 0 up to 1)."""
    try:
        value = float(text)
    except ValueError:
        value = math.nan
    if not (math.isfinite(value) and value > 0) or (value > 1 and value != int(value)):
        raise argparse.ArgumentTypeError(
            f"takes a whole number of experts per layer from 1, or a share above 0 up to 1, "
            f"not {text!r}"
        )
    return text


def check_budget_on_machine(budget: str, name: str = "budget") -> None:
    """Refuse a budget past this machine's memory, warn (stderr) past its safe share:
    the rule and its words are machine.budget_warnings, shared with the app."""
    import sys

    from ..machine import budget_refused, budget_warnings, machine_memory

    if budget == "auto":
        return
    machine = machine_memory(ask_gpu=False)
    warnings = budget_warnings(parse_bytes(budget), machine)
    if budget_refused(parse_bytes(budget), machine):
        raise ValueError(f"{name} {budget}: {warnings[0]}")
    for warning in warnings:
        print(f"mlx-pager: warning: {name} {budget}: {warning}", file=sys.stderr)


MAX_TOKENS_ARG = whole(1, MAX_TOKENS)
SEED_ARG = whole(0, SEED_MAX)
TEMP_ARG = real(0.0, 100.0)
TOP_P_ARG = real(0.0, 1.0, low_open=True)


if __name__ == "__main__":
    sys.exit(main())
