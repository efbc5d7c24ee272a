"""Entry points: ``create_app`` (shared by the CLI and the tests) and ``run_app``."""

from __future__ import annotations

from typing import Any

from .app import PagerApp
from .config import AppConfig


def create_app(**options: Any) -> PagerApp:
    """Build the app; options are ``AppConfig`` fields (paths, engine opener, sizes)."""
    return PagerApp(AppConfig(**options))


def run_app(**options: Any) -> int:
    """Run in the terminal until the user quits; closes the model on the way out."""
    app = create_app(**options)
    try:
        result = app.run()
    finally:
        app.cancel_downloads()
        app.shutdown_engine()
    return int(result or 0)
