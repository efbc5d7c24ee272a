"""The `mlx-pager` command: the engine's CLI, with the terminal app as its no-command.

The engine's CLI (``mlx_pager.cli``) never imports the app; this entry point hands it the
app to open when no command is given, and imports Textual only then.
"""

from __future__ import annotations

import sys


def open_app() -> int:
    from .main import run_app

    return run_app()


def main(argv: list[str] | None = None) -> int:
    from mlx_pager.cli import main as cli_main

    return cli_main(argv, no_command=open_app)


if __name__ == "__main__":
    sys.exit(main())
