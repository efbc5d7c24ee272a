"""Storage: where each expert's bytes are in the safetensors files, and reading them.

``checkpoint`` reads and validates safetensors headers and shard indexes, ``expert_map``
turns them into one (file, offset, length) per expert parameter, ``readers`` reads those
ranges with ``pread`` or ``mmap``, readahead off and the copied pages dropped.
"""
