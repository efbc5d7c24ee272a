"""The at-scale benchmark: real-shaped checkpoints written layer by layer, the same weights
as a GGUF for llama.cpp, and every peer (stock mlx-lm, NunSpark, llama.cpp) run against
mlx-pager side by side, each in its own process inside a machine-sized memory cap.

Research tooling, like ``sim``: the engine never imports it. Its peers are the optional
``peers`` extra (``pip install -e ".[peers]"``)."""
