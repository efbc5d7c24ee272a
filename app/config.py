"""What the app is built from: the CLI passes defaults, tests pass tmp paths and fakes."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from mlx_pager.assets import embedded_model

from mlx_pager.hub.cache import disk_free
from mlx_pager.machine import MachineMemory, machine_memory
from mlx_pager.settings import Settings
from mlx_pager.speed import MachineConstants, machine_constants

if TYPE_CHECKING:  # the engine imports MLX: the app loads it on its first open, not at start
    from mlx_pager.engine import Engine

# (model name or None, settings, Hugging Face cache folder) -> an open Engine
OpenEngine = Callable[[str | None, Settings, Path | None], "Engine"]


def open_engine(model: str | None, settings: Settings, cache_dir: Path | None = None) -> Engine:
    """The real thing: mlx_pager's Engine, under the settings' budget."""
    from mlx_pager.engine import Engine

    return Engine.open(model, settings=settings, cache_dir=cache_dir)


def default_model() -> str:
    return str(embedded_model())


@dataclass
class AppConfig:
    """Everything the app reads from outside itself, in one place."""

    settings_path: Path | None = None  # None: the platform's config dir
    data_dir: Path | None = None  # None: mlx_pager.settings.data_dir()
    model: str | None = None  # open this instead of the last used model
    open_engine: OpenEngine = open_engine
    default_model: Callable[[], str] = default_model
    machine: Callable[[], MachineMemory] = machine_memory
    max_tokens: int = 1024
    stats_interval: float = 0.25  # seconds between side-panel refreshes while generating
    hub_endpoint: str | None = None  # None: huggingface.co (tests: the local Hub server)
    hub_cache_dir: Path | None = None  # None: the default Hugging Face cache
    catalogue_path: Path | None = None  # None: the catalogue shipped in mlx_pager.assets
    disk_free: Callable[[Path], int] = disk_free  # free bytes where the HF cache lives
    # this machine's speed constants: speed(measure=False) only reads the cache (UI thread);
    # speed() may calibrate for about a second (workers only). Tests pass fixed ones.
    speed: Callable[..., MachineConstants | None] = machine_constants
