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
import sys
from collections.abc import Callable

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


if __name__ == "__main__":
    sys.exit(main())
