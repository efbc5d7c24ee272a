"""The expert cache's slot table, which the hit path trusts: it says what is resident."""

from __future__ import annotations

import numpy as np
import pytest
from checkpoints import open_paged

from mlx_pager.sim.synthetic import make_checkpoint


@pytest.mark.parametrize("direct", [True, False], ids=["into-slots", "through-buffers"])
def test_a_failed_read_leaves_no_slot_in_the_table(tmp_path, monkeypatch, direct):
    """The hit path trusts the slot table: a read that fails must not leave its experts
    looking resident, whether misses are read straight into their slots or staged."""
    path = make_checkpoint(tmp_path / "m", "qwen3_moe")
    paged = open_paged(path, 3)
    try:
        cache = paged.cache
        assert cache.views is not None, "this machine's MLX buffers are host-writable"
        if not direct:
            cache.views = None
        cache.staging_bytes = 1  # staged: one expert per read
        read = cache.reader.read
        per_expert = len(cache.map.params)

        def failing(pieces, outs=None):
            # The first expert's bytes land (in its slot when direct), then the read fails.
            read(pieces[:per_expert], outs[:per_expert] if outs else None)
            raise OSError("short read")

        monkeypatch.setattr(cache.reader, "read", failing)
        with pytest.raises(OSError):
            cache.fetch(0, [1, 2])
        assert (cache.slot_table == -1).all() and not cache.resident(0, 1)
        monkeypatch.undo()
        lut = cache.fetch(0, [1, 2])
        assert cache.resident(0, 1) and cache.resident(0, 2) and lut[1] != lut[2]
    finally:
        paged.close()


def test_a_lazy_output_is_computed_before_its_slots_are_overwritten(tmp_path):
    """The last layer's output may stay lazy after its pass (``hold``): when a later miss
    evicts a slot it reads, it is computed first, with the bytes it was built on."""
    path = make_checkpoint(tmp_path / "m", "qwen3_moe")
    paged = open_paged(path, 3)
    try:
        cache = paged.cache
        assert cache.views is not None, "this machine's MLX buffers are host-writable"
        param = next(iter(cache.pools))
        slot = int(cache.fetch(0, [1])[1])
        expected = np.array(cache.views[param][slot]).copy()
        lazy = cache.pools[param][slot] + 0  # reads the slot when it is computed
        cache.hold(lazy)
        cache.fetch(1, [0, 1, 2])  # three misses: every slot changes hands
        assert cache.slot_table[1, 0] >= 0 and not cache.resident(0, 1)
        assert not np.array_equal(np.array(cache.views[param][slot]), expected)
        assert np.array_equal(np.array(lazy), expected)
    finally:
        paged.close()
