"""The benchmark's Mac projection: an arm's measured per-token counts, priced with a Mac's
table constants (``speed.MAC_CONSTANTS``), and the same model's prediction for this
machine checked against what this machine measured.

Everything here is a projection, labelled so: the counts (misses, bytes, layers) carry
over between machines, the prices per unit do not.
"""

from __future__ import annotations

from ..speed import (
    MAC_CONSTANTS,
    MAC_PAGER_FIGURES,
    MachineConstants,
    TokenCosts,
    machine_constants,
    project_decode,
)

ARM_KEYS = (
    "misses_per_token", "disk_bytes_per_token", "moe_layers", "expert_bytes", "hit_rate",
    "decode_tps", "read_seconds_per_token", "host_us_per_layer", "active_bytes_per_token",
)  # fmt: skip


def arm_costs(arm: dict) -> tuple[TokenCosts | None, list[str]]:
    """TokenCosts from an arm's counts, and what it lacked. The disk bytes are
    ``disk_bytes_per_token``, else ``misses_per_token * expert_bytes``; without the MoE
    layers or the active bytes there is nothing to price (None)."""
    missing = [k for k in ARM_KEYS if arm.get(k) is None]
    misses = arm.get("misses_per_token")
    disk = arm.get("disk_bytes_per_token")
    if disk is None and misses is not None and arm.get("expert_bytes") is not None:
        disk = misses * arm["expert_bytes"]
    if misses is None and disk is not None and arm.get("expert_bytes"):
        misses = disk / arm["expert_bytes"]
    layers, active = arm.get("moe_layers"), arm.get("active_bytes_per_token")
    if layers is None or active is None or disk is None:
        return None, missing
    costs = TokenCosts(misses=misses or 0.0, disk_bytes=disk, moe_layers=int(layers),
                       active_bytes=active, host_syncs=int(layers))  # fmt: skip
    return costs, missing


def self_check(arm: dict, costs: TokenCosts, here: MachineConstants) -> dict:
    """The model's prediction for this machine against the arm's measured decode speed:
    ``ratio = predicted / measured`` (1.0: exact; 2.0: the model is twice too fast). A
    second prediction takes the arm's own measured read time and host cost per layer in
    place of the calibrated ones, so what remains of the error is the compute term's."""
    predicted = 1 / project_decode(costs, here)
    measured = arm.get("decode_tps")
    check = {
        "label": "projection self-check (this machine)",
        "constants": here.source,
        "predicted_tps": predicted,
        "measured_tps": measured,
        "ratio": predicted / measured if measured else None,
    }
    read_s, host_us = arm.get("read_seconds_per_token"), arm.get("host_us_per_layer")
    if read_s is not None or host_us is not None:
        compute = max(costs.active_bytes / here.memory_bytes_per_s,
                      costs.active_bytes * here.compute_s_per_byte)  # fmt: skip
        read = read_s if read_s is not None else costs.disk_bytes / here.disk_bytes_per_s
        host = costs.host_syncs * (host_us * 1e-6 if host_us is not None else here.host_s_per_layer)
        parts = 1 / (read + compute + host - here.overlap * min(read, compute))
        check["predicted_tps_with_measured_read_and_host"] = parts
        check["ratio_with_measured_read_and_host"] = parts / measured if measured else None
    return check


def project_mac(
    measured_arm: dict,
    chip: str = "M4 Air 16GB",
    here: MachineConstants | None = None,
) -> dict:
    """Projected decode tok/s of an mlx-pager arm on a Mac of ``MAC_CONSTANTS`` (its
    measured counts priced at that Mac's constants), the published figures of other Mac
    pagers beside it, and ``self_check``: the same model for this machine (``here``; None:
    ``speed.machine_constants()``, calibrated) against the arm's measured decode_tps."""
    if chip not in MAC_CONSTANTS:
        raise ValueError(f"No Mac {chip!r} in the table: one of {', '.join(MAC_CONSTANTS)}.")
    row = MAC_CONSTANTS[chip]
    mac = row.constants()
    costs, missing = arm_costs(measured_arm)
    result: dict = {
        "label": "projection",
        "chip": chip,
        "constants": mac.source,
        "missing": missing,
        "published_mac_pagers": MAC_PAGER_FIGURES,
        "resident_mlx_lm_tps": row.resident_tps,
        "resident_mlx_lm_source": row.resident_source,
    }
    if costs is None:
        result["projected_tps"] = None
        result["why"] = "needs moe_layers, active_bytes_per_token and the disk bytes per token"
        return result
    seconds = project_decode(costs, mac)
    result["projected_tps"] = 1 / seconds
    result["projected_seconds_per_token"] = {
        "read": costs.disk_bytes / mac.disk_bytes_per_s,
        "weights": costs.active_bytes / mac.memory_bytes_per_s,
        "host": costs.host_syncs * mac.host_s_per_layer,
    }
    here = here if here is not None else machine_constants()
    result["self_check"] = self_check(measured_arm, costs, here) if here is not None else None
    return result
