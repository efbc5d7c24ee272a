"""User settings: one TOML file in the platform's config directory, written atomically."""

from __future__ import annotations

import dataclasses
import math
import os
import tomllib
from dataclasses import dataclass, fields
from pathlib import Path

import platformdirs
import tomli_w

from .atomic import write_atomic
from .machine import total_memory
from .paging.policies import DEFAULT_POLICY, POLICIES
from .units import format_bytes, parse_bytes

APP_NAME = "mlx-pager"

READ_PATHS = ("auto", "pread", "mmap", "direct")
# What happens to an expert's pages in the OS page cache once it is copied into a slot:
# dropped (the budget holds the only copy) or kept (the page cache as a second tier,
# outside the budget: it counts against a machine's memory all the same).
PAGE_CACHE_MODES = ("drop", "keep")
COLD_PRECISIONS = ("full", "4bit")  # 3 and 2 bits measured, rejected: docs/cold-precision.md
POLICY_NAMES = tuple(POLICIES)
AUTO_BUDGET_SHARE = 0.6  # budget "auto": this share of the machine's memory
CONTEXT_RANGE = (128, 1_048_576)  # tokens
BUDGET_RANGE = (10**6, 10**15)  # 1 MB to 1 PB: a budget outside is a typo
# Cache-aware routing's margin, a share of each token's router-logit range: at 1 any
# resident expert already beats any missing one, so more changes nothing.
ROUTE_MARGIN_RANGE = (0.0, 1.0)


def check_context_length(value: object) -> int:
    """The context length as a whole number in range, or ValueError saying the range."""
    low, high = CONTEXT_RANGE
    try:
        tokens = int(value)  # type: ignore[call-overload]
    except (TypeError, ValueError):
        raise ValueError(
            f"context_length takes a whole number of tokens from {low} to {high}, not {value!r}."
        ) from None
    if not low <= tokens <= high:
        raise ValueError(f"context_length must be between {low} and {high} tokens, not {tokens}.")
    return tokens


def check_route_margin(value: object) -> float:
    """Cache-aware routing's margin as a number in range, or ValueError saying the range."""
    low, high = ROUTE_MARGIN_RANGE
    try:
        margin = float(value)  # type: ignore[arg-type]
    except (TypeError, ValueError):
        margin = math.nan
    if isinstance(value, bool) or not low <= margin <= high:
        raise ValueError(
            f"route_margin takes a number from {low:g} (exact routing, off) to {high:g} "
            f"(a share of each token's router-logit range), not {value!r}."
        )
    return margin


def check_budget(value: str) -> int:
    """A budget as bytes, in range, or ValueError saying the range."""
    low, high = BUDGET_RANGE
    try:
        nbytes = parse_bytes(value)
    except ValueError as e:
        raise ValueError(
            f"budget: {e} Or write auto ({AUTO_BUDGET_SHARE:.0%} of memory)."
        ) from None
    if not low <= nbytes <= high:
        raise ValueError(
            f"budget must be from {format_bytes(low)} to {format_bytes(high)}, not {value!r}."
        )
    return nbytes


def config_dir() -> Path:
    return Path(os.environ.get("MLX_PAGER_CONFIG_DIR") or platformdirs.user_config_dir(APP_NAME))


def data_dir() -> Path:
    """Where profiles and conversations live (MLX_PAGER_DATA_DIR overrides, for tests)."""
    return Path(os.environ.get("MLX_PAGER_DATA_DIR") or platformdirs.user_data_dir(APP_NAME))


def settings_path() -> Path:
    return config_dir() / "settings.toml"


@dataclass
class Settings:
    """What the user chose; the engine derives everything else from it."""

    budget: str = "auto"  # bytes as text ("6GB") or "auto": 60% of total memory
    context_length: int = 4096
    policy: str = DEFAULT_POLICY
    prefetch: bool = True  # the engine measures it and guesses only where that is faster
    cold_precision: str = "full"
    route_margin: float = 0.0  # cache-aware routing (lossy): 0 is exact, up to 1
    read_path: str = "auto"
    page_cache: str = "drop"
    task_preload: bool = True
    last_model: str = ""

    def validate(self) -> None:
        """Raise ValueError with what to do, so a bad value never reaches the engine."""
        if self.budget != "auto":
            check_budget(self.budget)
        for name in ("prefetch", "task_preload"):
            if not isinstance(getattr(self, name), bool):
                raise ValueError(f"{name} takes true or false, not {getattr(self, name)!r}.")
        check_context_length(self.context_length)
        if self.read_path not in READ_PATHS:
            raise ValueError(f"read_path must be one of {', '.join(READ_PATHS)}.")
        if self.page_cache not in PAGE_CACHE_MODES:
            raise ValueError(f"page_cache must be one of {', '.join(PAGE_CACHE_MODES)}.")
        if self.cold_precision not in COLD_PRECISIONS:
            raise ValueError(f"cold_precision must be one of {', '.join(COLD_PRECISIONS)}.")
        if self.policy not in POLICIES:
            raise ValueError(f"policy must be one of {', '.join(POLICIES)}.")
        check_route_margin(self.route_margin)

    def budget_bytes(self, memory_bytes: int | None = None) -> int:
        """The budget in bytes; "auto" is a share of ``memory_bytes`` (default: this
        machine's memory). The one place the rule lives: CLI, app and engine call it."""
        if self.budget == "auto":
            memory = total_memory() if memory_bytes is None else memory_bytes
            return int(AUTO_BUDGET_SHARE * memory)
        return check_budget(self.budget)

    def replace(self, **changes: object) -> Settings:
        """A copy with some fields changed from text or values, type-converted and validated."""
        types = {f.name: f.type for f in fields(self)}
        converted: dict[str, object] = {}
        for name, value in changes.items():
            if name not in types:
                raise ValueError(f"Unknown setting {name!r}; known: {', '.join(types)}.")
            kind = types[name]
            if kind == "bool" and isinstance(value, str):
                if value.lower() not in ("true", "false", "on", "off", "1", "0", "yes", "no"):
                    raise ValueError(f"{name} takes true or false, not {value!r}.")
                value = value.lower() in ("true", "on", "1", "yes")
            elif kind == "int":
                if isinstance(value, bool) or not isinstance(value, (int, str)):
                    raise ValueError(f"{name} takes a whole number, not {value!r}.")
                try:
                    value = int(value)
                except ValueError:
                    raise ValueError(f"{name} takes a whole number, not {value!r}.") from None
            elif kind == "float":
                if isinstance(value, bool) or not isinstance(value, (int, float, str)):
                    raise ValueError(f"{name} takes a number, not {value!r}.")
                try:
                    value = float(value)
                except ValueError:
                    raise ValueError(f"{name} takes a number, not {value!r}.") from None
            elif kind == "str":
                if not isinstance(value, (str, int, float)) or isinstance(value, bool):
                    raise ValueError(f"{name} takes text, not {value!r}.")
                value = str(value)
            converted[name] = value
        new = dataclasses.replace(self, **converted)  # type: ignore[arg-type]
        new.validate()
        return new


def load_settings(path: Path | None = None) -> Settings:
    """Read settings; a missing file gives defaults, a broken one a clear error."""
    path = path or settings_path()
    if not path.exists():
        return Settings()
    try:
        data = tomllib.loads(path.read_text(encoding="utf-8"))
    except (tomllib.TOMLDecodeError, UnicodeDecodeError, RecursionError) as e:
        what = "nested too deeply" if isinstance(e, RecursionError) else e
        raise ValueError(
            f"The settings file {path} is not valid TOML ({what}). Fix it or delete it to "
            "start from the defaults."
        ) from None
    known = {f.name for f in fields(Settings)}
    try:
        return Settings().replace(**{k: v for k, v in data.items() if k in known})
    except ValueError as e:
        raise ValueError(
            f"The settings file {path} has a bad value: {e} Fix it with `mlx-pager settings "
            "set NAME VALUE`, or delete the file to start from the defaults."
        ) from None


def save_settings(settings: Settings, path: Path | None = None) -> Path:
    """Write atomically: a crash mid-write leaves the old file whole."""
    settings.validate()
    return write_atomic(
        path or settings_path(), tomli_w.dumps(dataclasses.asdict(settings)).encode()
    )
