"""mlx-pager: run mixture-of-experts models larger than memory on MLX.

The path of a prompt through the engine, one module each:
``engine`` (prompt -> tokens -> generation) -> ``loader`` (mlx-lm model, dense core
resident) -> ``paged_switch`` (the routed-expert layers) -> ``expert_cache`` (slots under
the budget) -> ``expert_map`` / ``disk`` (byte ranges read from the safetensors files).
"""

__version__ = "0.1.0"
