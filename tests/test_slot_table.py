"""The expert cache's slot table, which the hit path trusts: it says what is resident."""

from __future__ import annotations

import pytest
from checkpoints import open_paged

from mlx_pager.sim.synthetic import make_checkpoint


def test_a_failed_read_leaves_no_slot_in_the_table(tmp_path, monkeypatch):
    """The hit path trusts the slot table: a read that fails must not leave its experts
    looking resident."""
    path = make_checkpoint(tmp_path / "m", "qwen3_moe")
    paged = open_paged(path, 3)
    try:
        cache = paged.cache
        cache.staging_bytes = 1  # one expert per read: the first lands, the second fails
        read, calls = cache.reader.read, []

        def failing(pieces):
            calls.append(1)
            if len(calls) > 1:
                raise OSError("short read")
            return read(pieces)

        monkeypatch.setattr(cache.reader, "read", failing)
        with pytest.raises(OSError):
            cache.fetch(0, [1, 2])
        assert (cache.slot_table == -1).all() and not cache.resident(0, 1)
        monkeypatch.undo()
        lut = cache.fetch(0, [1, 2])
        assert cache.resident(0, 1) and cache.resident(0, 2) and lut[1] != lut[2]
    finally:
        paged.close()
