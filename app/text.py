"""Small formatting helpers shared by the screens and widgets."""

from __future__ import annotations

import re

from mlx_pager.units import format_bytes

_CONTROL = re.compile(r"[\x00-\x08\x0b-\x1f\x7f]")


def clean(text: str) -> str:
    """Drop control characters a model may emit: they would corrupt the terminal."""
    return _CONTROL.sub("", text)


def rate(tokens_per_second: float) -> str:
    return f"{tokens_per_second:,.1f} tok/s" if tokens_per_second > 0 else "—"


def seconds(value: float) -> str:
    if value <= 0:
        return "—"
    return f"{value * 1000:.0f} ms" if value < 1 else f"{value:.2f} s"


def percent(value: float | None) -> str:
    return "—" if value is None else f"{value:.1%}"


def size(n: float) -> str:
    return format_bytes(n)


def megabytes(n: float) -> str:
    return f"{n / 1e6:.2f} MB"


def model_label(name: str) -> str:
    """A Hub id as is, a folder by its last part: the path of a temporary dir is noise."""
    if "/" in name and not name.startswith(("/", ".", "~")) and name.count("/") == 1:
        return name
    return name.rstrip("/").rsplit("/", 1)[-1] or name


def heading_colour(widget: object) -> str:
    """The theme's accent text colour, for headings drawn with Rich (no CSS variables)."""
    try:
        return widget.app.get_css_variables().get("text-accent", "#FFBE98")  # type: ignore[attr-defined]
    except Exception:
        return "#FFBE98"
