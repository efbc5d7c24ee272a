"""The decode-speed model: its formula, the Mac table's sources, the calibration cache."""

from __future__ import annotations

import json
from dataclasses import replace
from datetime import date, timedelta

import pytest

from mlx_pager import speed
from mlx_pager.speed import (
    MAC_CONSTANTS,
    MAC_EXPERT_READ_BYTES_PER_S,
    MAC_PAGER_FIGURES,
    MachineConstants,
    TokenCosts,
    load_calibration,
    machine_constants,
    project_decode,
    save_calibration,
)

MACHINE = MachineConstants(disk_bytes_per_s=1e9, memory_bytes_per_s=10e9, compute_s_per_byte=1e-9,
                           host_s_per_layer=0.01, overlap=0.0, source="hand", basis="hand",
                           measured_on=date.today().isoformat())  # fmt: skip
COSTS = TokenCosts(misses=400, disk_bytes=1e9, moe_layers=10, active_bytes=1e9, host_syncs=10)


def test_the_formula_on_hand_made_counts():
    # read 1 s, compute max(0.1 s of memory, 1 s of matmul) = 1 s, host 10 x 10 ms
    assert project_decode(COSTS, MACHINE) == pytest.approx(2.1)
    # half the read hidden behind compute
    assert project_decode(COSTS, replace(MACHINE, overlap=0.5)) == pytest.approx(1.6)
    # a GPU: no compute figure, memory-bound
    gpu = replace(MACHINE, compute_s_per_byte=0.0)
    assert project_decode(COSTS, gpu) == pytest.approx(1 + 0.1 + 0.1)
    # nothing missed: no read time
    assert project_decode(replace(COSTS, misses=0, disk_bytes=0), gpu) == pytest.approx(0.2)


def test_every_mac_row_says_where_its_numbers_come_from():
    assert {"M1 Air 16GB", "M2 Air 16GB", "M3 Air 16GB", "M4 Air 16GB"} <= set(MAC_CONSTANTS)
    assert any("Pro" in name for name in MAC_CONSTANTS)
    for row in MAC_CONSTANTS.values():
        assert row.memory_bytes_per_s > 0 and row.memory_source
        assert row.ssd_source and row.resident_source
        if row.ssd_read_bytes_per_s is None:
            assert "not published" in row.ssd_source
        if row.resident_tps is None:
            assert "not published" in row.resident_source
        constants = row.constants()
        assert constants.disk_bytes_per_s <= MAC_EXPERT_READ_BYTES_PER_S
        assert row.name in constants.source and constants.basis.endswith(" table")
    assert {f["tokens_per_second"] for f in MAC_PAGER_FIGURES} == {6.4, 14.1}
    assert all(f["source"] for f in MAC_PAGER_FIGURES)


def test_a_mac_gets_its_table_row(monkeypatch, tmp_path):
    monkeypatch.setattr(speed.platform, "system", lambda: "Darwin")
    monkeypatch.setattr(speed, "mac_brand", lambda: "Apple M4")
    found = machine_constants(tmp_path, measure=False)
    assert found is not None and found.basis == "M4 Air table"
    monkeypatch.setattr(speed, "mac_brand", lambda: "Apple M9 Ultra")  # not in the table
    assert machine_constants(tmp_path, measure=False) is None  # calibration, none cached


def test_the_calibration_is_cached_for_30_days(monkeypatch, tmp_path):
    monkeypatch.setattr(speed.platform, "system", lambda: "Linux")
    assert machine_constants(tmp_path, measure=False) is None
    save_calibration(MACHINE, tmp_path)
    assert machine_constants(tmp_path, measure=False) == MACHINE
    later = date.today() + timedelta(days=31)
    assert load_calibration(tmp_path, today=later) is None
    (tmp_path / speed.CALIBRATION_FILE).write_text("{not json")
    assert load_calibration(tmp_path) is None

    def measured(folder, probe=None):
        return replace(MACHINE, source="new")

    monkeypatch.setattr(speed, "calibrate", measured)
    assert machine_constants(tmp_path).source == "new"  # measured again, and saved
    assert json.loads((tmp_path / speed.CALIBRATION_FILE).read_text())["source"] == "new"


def test_calibrate_measures_this_machine(tmp_path):
    """A real measurement (about a second): only that it measured, not how fast."""
    found = speed.calibrate(tmp_path)
    assert found.disk_bytes_per_s > 0 and found.memory_bytes_per_s > 0
    assert found.compute_s_per_byte > 0 and found.basis == "measured here"
    assert found.source.startswith(f"measured on this machine {date.today().isoformat()}")
    assert found.backend in ("cpu", "gpu")
    assert not list(tmp_path.iterdir())  # the probe file is gone


def test_cold_reads_of_an_existing_file_or_a_new_one(tmp_path):
    """A large file already on disk is read where there is one; else a file is written."""
    big = tmp_path / "shard.safetensors"
    with big.open("wb") as f:
        f.truncate(speed.READ_FILE_BYTES)
    bps, method = speed.measure_read_bandwidth(tmp_path / "cache", big)
    assert bps > 0 and "an existing" in method
    small = tmp_path / "small.safetensors"
    small.write_bytes(b"x" * 4096)
    bps, method = speed.measure_read_bandwidth(tmp_path / "cache", small)
    assert bps > 0 and "just written" in method
    assert not list((tmp_path / "cache").iterdir())
