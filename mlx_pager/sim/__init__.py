"""Research tools: routing traces, their replay against the policies, benchmarks.

``trace`` reads, writes and records routing traces (docs/trace-format.md), ``replay``
replays one against every policy and Belady's optimum (compiled in ``fast``, with
CPython's set order from ``pyset``, and in ``learned_replay`` for the learned policy; the
Python loop is kept as the reference), ``learn`` fits the learned policy's weights,
``allocate`` divides one budget across layers by their measured hit curves,
``synthetic`` writes random checkpoints of every supported architecture, ``bench``
measures stock mlx-lm against mlx-pager side by side. Nothing in the engine imports these.
"""
