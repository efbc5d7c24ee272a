"""Research tools: routing traces, their replay against the policies, benchmarks.

``trace`` reads, writes and records routing traces (docs/trace-format.md), ``replay``
replays one against every policy and Belady's optimum (compiled in ``fast``, the
Python loop kept as the reference; ``pyset`` gives the compiled loops Python's set order), ``synthetic`` writes random
checkpoints of every supported architecture, ``bench`` measures stock mlx-lm against
mlx-pager side by side. Nothing in the engine imports these.
"""
