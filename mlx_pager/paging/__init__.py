"""Paging: the routed experts of a loaded model, served from a cache under the budget.

``loader`` builds mlx-lm's model with its dense core resident and every Switch layer
swapped for a ``paged_switch.PagedSwitch``; each of those asks the ``router`` for this
layer's choices, the ``expert_cache`` for slots (``policies`` choose what to evict, the
``cold_tier`` holds unimportant misses at low precision), and ``prefetch`` reads the
next layer's likely experts early. Bytes come from ``mlx_pager.storage``.
"""

# ``policies`` registers ``learned.LearnedUse``, which subclasses its ``Policy``: importing
# it here first keeps that order whichever module is asked for.
from . import policies  # noqa: F401
