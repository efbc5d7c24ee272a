"""Tasks: which kind of prompt this is, and which experts that kind of prompt uses.

``classifier`` tells code, math, prose and chat apart (naive Bayes on the calibration
prompts), ``profiles`` keeps each task's expert counts per model (the access profiler),
``coverage`` measures how concentrated those counts are (hot sets, predicted hit rates).
"""
