"""The `mlx-pager` command: the app with no arguments, subcommands for scripts.

Each subcommand lives in its own module with ``add_arguments(parser)`` and
``run(args) -> int``; this file only wires them up.
"""

from __future__ import annotations

import argparse
import importlib
import sys

# name -> (module, help)
COMMANDS: dict[str, tuple[str, str]] = {
    "generate": ("mlx_pager.generate_cmd", "generate text from a prompt, paging experts"),
    "bench": ("mlx_pager.bench", "stock mlx-lm against mlx-pager at several budgets"),
    "profile": ("mlx_pager.profile_cmd", "which experts fire, per layer and task"),
    "settings": ("mlx_pager.settings_cmd", "show or change the settings"),
    "download": ("mlx_pager.download_cmd", "download a model into the Hugging Face cache"),
    "models": ("mlx_pager.models_cmd", "list cached models with their verdicts for the budget"),
    "simulate": ("mlx_pager.simulate", "replay a routing trace against cache policies"),
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


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if args.command is None:
        from app.main import run_app

        return run_app()
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
