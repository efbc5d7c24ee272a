"""The mlx-pager terminal app (Textual): chat, model downloads, memory-budget settings.

- ``main.py``: ``create_app(**AppConfig fields)`` for the CLI and the tests, ``run_app()``.
- ``app.py``: the App; owns the settings and the one open Engine, opened and closed on
  worker threads (``open_model``, ``apply_settings``).
- ``screens/``: ``chat`` (streamed replies, stats panel, expert heatmap),
  ``conversations`` (saved chats), ``models`` (catalogue, cache, downloads),
  ``settings`` (budget breakdown and verdict).
- ``widgets/``: prompt with history, chat messages, stats panel, heatmap, budget bar.
- ``downloads.py`` / ``conversations.py`` / ``machine.py``: no widgets, called from workers.
- ``messages.py``: the dataclass messages workers post; ``pager.tcss``: the one stylesheet.

Nothing in ``mlx_pager`` imports this package.
"""
