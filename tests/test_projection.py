"""The benchmark's Mac projection and its self-check, on hand-made counts."""

from __future__ import annotations

import pytest

from mlx_pager.benchmark.projection import project_mac
from mlx_pager.speed import MAC_CONSTANTS, MachineConstants

HERE = MachineConstants(
    disk_bytes_per_s=0.25e9, memory_bytes_per_s=15e9, compute_s_per_byte=1e-9,
    host_s_per_layer=1e-3, overlap=0.0, source="hand", basis="hand",
)  # fmt: skip
EXPERT = 2.5 * 2**20
ARM = {
    "misses_per_token": 40.0, "moe_layers": 48, "expert_bytes": EXPERT, "hit_rate": 0.9,
    "decode_tps": 0.25, "read_seconds_per_token": 0.5, "host_us_per_layer": 2000.0,
    "active_bytes_per_token": 2e9,
}  # fmt: skip


def test_projection_prices_the_counts_at_the_macs_constants():
    result = project_mac(ARM, "M4 Air 16GB", here=HERE)
    mac = MAC_CONSTANTS["M4 Air 16GB"].constants()
    read = 40 * EXPERT / mac.disk_bytes_per_s
    weights = 2e9 / 120e9  # M4: 120 GB/s, memory-bound
    host = 48 * 1e-3
    assert result["label"] == "projection"
    assert result["projected_tps"] == pytest.approx(1 / (read + weights + host))
    assert result["missing"] == ["disk_bytes_per_token"]  # derived from misses x expert bytes
    assert [f["tokens_per_second"] for f in result["published_mac_pagers"]] == [6.4, 14.1]


def test_self_check_is_the_models_error_here():
    check = project_mac(ARM, "M4 Air 16GB", here=HERE)["self_check"]
    predicted = 1 / (40 * EXPERT / 0.25e9 + 2e9 * 1e-9 + 48 * 1e-3)
    assert check["predicted_tps"] == pytest.approx(predicted)
    assert check["ratio"] == pytest.approx(predicted / 0.25)
    with_parts = 1 / (0.5 + 2.0 + 48 * 2e-3)  # the arm's own read time and host cost
    assert check["predicted_tps_with_measured_read_and_host"] == pytest.approx(with_parts)
    assert check["ratio_with_measured_read_and_host"] == pytest.approx(with_parts / 0.25)


def test_what_is_missing_is_said():
    arm = {"moe_layers": 48, "disk_bytes_per_token": 1e8}
    result = project_mac(arm, here=HERE)
    assert result["projected_tps"] is None and "active_bytes_per_token" in result["why"]
    assert "decode_tps" in result["missing"] and "active_bytes_per_token" in result["missing"]
    arm["active_bytes_per_token"] = 2e9
    result = project_mac(arm, here=HERE)
    assert result["projected_tps"] > 0 and result["self_check"]["ratio"] is None
    with pytest.raises(ValueError, match="No Mac"):
        project_mac(ARM, "M7 Toaster", here=HERE)
