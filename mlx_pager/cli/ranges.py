"""Argument types with their accepted range: a value out of range is refused by argparse
with the range in the message, instead of being clamped or passed on to fail later."""

from __future__ import annotations

import argparse
import math
from collections.abc import Callable
from typing import TYPE_CHECKING

from ..units import parse_bytes

if TYPE_CHECKING:  # the engine imports MLX: only inside open_engine
    from ..engine import Engine

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


def open_engine(args: argparse.Namespace) -> Engine:
    """The Engine a command's --model, --budget, --context-length, --policy, --read-path,
    --page-cache and --route-margin ask for, the budget checked against this machine first
    (``generate`` and ``serve`` alike)."""
    from ..engine import Engine

    if args.budget:
        check_budget_on_machine(args.budget, "--budget")
    overrides = {
        name: getattr(args, name)
        for name in ("context_length", "policy", "read_path", "page_cache", "route_margin")
        if getattr(args, name, None) is not None
    }
    return Engine.open(args.model, budget=args.budget, **overrides)
