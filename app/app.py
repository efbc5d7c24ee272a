"""The Textual app: owns the settings and the open engine; screens do the rest."""

from __future__ import annotations

import dataclasses
import itertools
import threading
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Literal

from textual import work
from textual.app import App, SystemCommand
from textual.binding import Binding
from textual.reactive import reactive
from textual.screen import ModalScreen, Screen

from mlx_pager.settings import Settings, data_dir, load_settings, save_settings

from .config import AppConfig
from .messages import EngineFailed, EngineOpened
from .text import model_label

if TYPE_CHECKING:
    from mlx_pager.engine import Engine

# Settings whose change needs the model reopened; the others apply on the next reply.
ENGINE_FIELDS = (
    "budget", "context_length", "policy", "prefetch", "cold_precision", "route_margin",
    "read_path",
)  # fmt: skip


@dataclass(frozen=True)
class EngineState:
    """The engine as the screens see it: one value, replaced whole on every change."""

    status: Literal["none", "opening", "ready", "error"] = "none"
    model: str = ""  # the model open, being opened, or that failed
    engine: Engine | None = None  # set when ready
    error: str = ""  # set on error


class PagerApp(App[int]):
    """One engine at a time, opened and closed on a worker thread, never on the UI thread."""

    CSS_PATH = "pager.tcss"
    TITLE = "mlx-pager"
    HORIZONTAL_BREAKPOINTS = [(0, "-narrow"), (110, "-wide")]
    BINDINGS = [
        Binding("f2", "show_models", "Models"),
        Binding("f3", "show_settings", "Settings"),
        Binding("ctrl+q", "quit", "Quit", priority=True),
    ]

    # Screens watch this; always_update: a setting applied in place (task_preload) is a
    # change the screens must show, though the state compares equal.
    engine_state: reactive[EngineState] = reactive(EngineState, always_update=True)

    def __init__(self, config: AppConfig) -> None:
        super().__init__()
        self.config = config
        self.engine_lock = threading.Lock()  # held while generating, opening or closing
        self._open_tokens = itertools.count(1)
        self._open_token = 0
        self._settings_error = ""
        try:
            self.settings = load_settings(self.settings_path)
        except ValueError as e:
            self.settings, self._settings_error = Settings(), str(e)

    # -- paths ----------------------------------------------------------------------------

    @property
    def settings_path(self) -> Path | None:
        return self.config.settings_path

    @property
    def data_dir(self) -> Path:
        return self.config.data_dir or data_dir()

    @property
    def engine(self) -> Engine | None:
        """The open engine, or None."""
        return self.engine_state.engine

    @property
    def model_name(self) -> str:
        return self.engine_state.model

    @property
    def model_title(self) -> str:
        return model_label(self.model_name) if self.model_name else "no model"

    # -- lifecycle ------------------------------------------------------------------------

    def get_default_screen(self) -> Screen:
        from .screens.chat import ChatScreen

        return ChatScreen()

    def on_mount(self) -> None:
        self.theme = "tokyo-night"
        if self._settings_error:
            self.notify(self._settings_error, title="Settings not loaded", severity="error",
                        timeout=15)  # fmt: skip
        self.open_model(self.config.model)

    async def action_quit(self) -> None:
        """Stop generating and downloading first: their threads must end for us to exit."""
        if self.engine is not None:
            self.engine.stop()
        self.cancel_downloads()
        self.exit(0)

    def cancel_downloads(self) -> None:
        """A download in flight stops within a chunk; its partial files resume next time."""
        if self.is_screen_installed("models"):
            self.get_screen("models").cancel_download()  # type: ignore[attr-defined]

    def shutdown_engine(self, timeout: float = 30.0) -> None:
        """Close the model once generation has let go of it (called after the app exits)."""
        engine = self.engine
        if engine is None:
            return
        # The app has exited: no watcher to call, so set it quietly.
        closed = dataclasses.replace(self.engine_state, engine=None)
        self.set_reactive(PagerApp.engine_state, closed)
        engine.stop()
        if self.engine_lock.acquire(timeout=timeout):
            try:
                engine.close()
            finally:
                self.engine_lock.release()

    # -- the engine -----------------------------------------------------------------------

    def open_model(self, model: str | None = None, remember: bool | None = None) -> None:
        """Close the current model and open ``model`` (default: last used, or embedded).

        ``remember`` (default: when a model is named) stores it as the last used model.
        """
        name = model or self.settings.last_model or self.config.default_model()
        old = self.engine
        if old is not None:
            old.stop()
        self._open_token = next(self._open_tokens)
        self.engine_state = EngineState("opening", name)
        explicit = model is not None if remember is None else remember
        self._open_worker(name, self.settings, old, self._open_token, explicit)

    @work(thread=True, group="engine", exit_on_error=False)
    def _open_worker(
        self, name: str, settings: Settings, old: Engine | None, token: int, explicit: bool
    ) -> None:
        with self.engine_lock:
            if old is not None:
                old.close()
            try:
                engine = self.config.open_engine(name, settings, self.config.hub_cache_dir)
            except Exception as e:
                text = str(e) or type(e).__name__
                self.post_message(EngineFailed(name, text, token=token))
                return
        self.post_message(EngineOpened(engine, name, token=token, explicit=explicit))

    def on_engine_opened(self, message: EngineOpened) -> None:
        if message.token != self._open_token:  # a newer request won: drop this one
            self._close_later(message.engine)
            return
        self.engine_state = EngineState("ready", message.model, message.engine)
        if message.explicit and self.settings.last_model != message.model:
            self.update_settings(self.settings.replace(last_model=message.model))
        detail = message.engine.plan.explain()
        self.notify(detail, title=f"Opened {model_label(message.model)}", timeout=4)

    def on_engine_failed(self, message: EngineFailed) -> None:
        if message.token != self._open_token:
            return
        self.engine_state = EngineState("error", message.model, error=message.error)
        self.notify(
            f"{message.error}\nF2: pick or download a model · F3: settings",
            title=f"Could not open {model_label(message.model)}",
            severity="error",
            timeout=12,
        )

    @work(thread=True, group="engine-close")
    def _close_later(self, engine: Engine) -> None:
        with self.engine_lock:
            engine.close()

    # -- settings -------------------------------------------------------------------------

    def update_settings(self, new: Settings) -> bool:
        """Save atomically; False (and a notification) if the file could not be written."""
        try:
            save_settings(new, self.settings_path)
        except (OSError, ValueError) as e:
            self.notify(str(e), title="Settings not saved", severity="error", timeout=10)
            return False
        self.settings = new
        return True

    def apply_settings(self, new: Settings) -> bool:
        """Save, then reopen the model in a worker if the change needs it."""
        old = self.settings
        if not self.update_settings(new):
            return False
        if self.engine is None or any(getattr(old, f) != getattr(new, f) for f in ENGINE_FIELDS):
            self.open_model(self.model_name or None, remember=False)
        else:
            self.engine.task_preload = new.task_preload  # read per prompt: no reopen
            self.engine_state = self.engine_state
        return True

    def get_system_commands(self, screen: Screen) -> Iterable[SystemCommand]:
        """The palette (Ctrl+P) offers the app's own places first."""
        yield SystemCommand("Models", "Download or open a model (F2)", self.action_show_models)
        yield SystemCommand("Settings", "Memory budget, cache policy, context (F3)",
                            self.action_show_settings)  # fmt: skip
        yield from super().get_system_commands(screen)

    # -- navigation -----------------------------------------------------------------------

    def _switch_to(self, screen_type: type) -> None:
        """Show a top-level screen once: pop back to the chat first, never stack copies."""
        if isinstance(self.screen, screen_type) or isinstance(self.screen, ModalScreen):
            return
        while len(self.screen_stack) > 1:
            self.pop_screen()
        self.push_screen(screen_type())

    def action_show_models(self) -> None:
        """One models screen for the app's life: a download goes on while the user chats."""
        from .screens.models import ModelsScreen

        if isinstance(self.screen, ModelsScreen | ModalScreen):
            return
        if not self.is_screen_installed("models"):
            self.install_screen(ModelsScreen(), "models")
        while len(self.screen_stack) > 1:
            self.pop_screen()
        self.push_screen("models")

    def action_show_settings(self) -> None:
        from .screens.settings import SettingsScreen

        self._switch_to(SettingsScreen)
