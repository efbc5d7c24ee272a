"""Let go of the rendered lines of widgets that are gone."""

from __future__ import annotations

from textual._styles_cache import StylesCache


def release_render_caches() -> None:
    """Textual (8.2.8) memoizes ``StylesCache.get_inner_outer`` with ``lru_cache(1024)``
    on the method, so its key holds the StylesCache, and with it every line its widget
    rendered, for up to 1,024 calls after the widget is removed: each turn's message
    widgets (and the blocks a streamed Markdown replaces) stayed in memory, about six
    a turn in the app soak. The cached value is two Styles made from two colours, cheap
    to make again: call this after widgets are removed or a reply is done."""
    StylesCache.get_inner_outer.cache_clear()
