"""`mlx-pager serve`: the paged model behind mlx-lm's OpenAI-compatible HTTP server.

``state`` (the running server's file, light to import: the app reads it) and ``server``
(the model provider, request handler and generator mlx-lm's server runs with).
"""
