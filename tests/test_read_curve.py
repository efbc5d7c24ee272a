"""scripts/read_curve.py end to end at one small size: both slot kinds measured, plotted."""

from __future__ import annotations

import shutil

from script_loader import load_script


def test_one_size_widened_and_as_stored(tmp_path):
    script = load_script("read_curve")
    (point,) = script.measure([32], runs=1, rounds=2, target_mb=8)
    assert point["piece_kib"] == 32 and point["experts_per_layer"] == 43
    assert point["widened_mb_s"][0] > 0 and point["as_stored_mb_s"][0] > 0
    if shutil.which("fio"):  # the ratios need the disk's own rate
        assert point["widened"][0] > 0 and point["as_stored"][0] > 0
        assert point["widened_burst"][0] > 0 and point["as_stored_burst"][0] > 0
        script.plot([point], tmp_path / "curve.png")
        assert (tmp_path / "curve.png").stat().st_size > 10_000
