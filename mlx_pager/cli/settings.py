"""`mlx-pager settings`: show them, or `set NAME VALUE [NAME VALUE ...]`, or `reset`."""

from __future__ import annotations

import argparse
import dataclasses
import json

from ..settings import Settings, load_settings, save_settings, settings_path, total_memory
from ..units import format_bytes
from .ranges import check_budget_on_machine


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("action", nargs="?", choices=["show", "set", "reset"], default="show")
    parser.add_argument("pairs", nargs="*", metavar="NAME VALUE", help="with set: e.g. budget 8GB")
    parser.add_argument("--json", action="store_true")


def run(args: argparse.Namespace) -> int:
    settings = load_settings()
    if args.action == "set":
        if not args.pairs or len(args.pairs) % 2:
            raise ValueError("settings set takes NAME VALUE pairs, e.g. `settings set budget 8GB`.")
        changes = dict(zip(args.pairs[::2], args.pairs[1::2], strict=True))
        settings = settings.replace(**changes)
        if "budget" in changes:
            check_budget_on_machine(settings.budget)
        save_settings(settings)
    elif args.action == "reset":
        settings = Settings()
        save_settings(settings)
    memory = total_memory()
    if args.json:
        data = dataclasses.asdict(settings)
        data.update(path=str(settings_path()), budget_bytes=settings.budget_bytes(memory))
        print(json.dumps(data, indent=2))
        return 0
    print(f"# {settings_path()}")
    for name, value in dataclasses.asdict(settings).items():
        print(f"{name} = {value!r}")
    print(
        f"# budget: {format_bytes(settings.budget_bytes(memory))} of {format_bytes(memory)} memory"
    )
    return 0
