"""Textual's footer, without the FooterKeys it keeps after each recompose."""

from __future__ import annotations

from textual.widgets import Footer as TextualFooter


class Footer(TextualFooter):
    """The footer recomposes whenever the bindings change (focus moves, a screen opens or
    closes) and binds each new FooterKey to its ``compact``; Textual (8.2.8) drops a
    removed key's watcher only when ``compact`` changes, which here it never does, so
    each recompose kept a footer's worth of dead keys with their rendered lines (28
    within the app's first two turns). Announcing ``compact`` after each recompose
    lets Textual prune them; the live keys get the value they already have."""

    async def recompose(self) -> None:
        await super().recompose()
        self.mutate_reactive(TextualFooter.compact)
