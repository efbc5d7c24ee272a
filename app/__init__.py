"""The mlx-pager terminal app (Textual): chat, model downloads, memory-budget settings.

``app.main.create_app`` builds it for the CLI and for the tests; nothing in ``mlx_pager``
imports this package.
"""
