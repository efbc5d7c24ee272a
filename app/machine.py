"""The machine's memory, as the settings screen shows it beside the budget."""

from __future__ import annotations

from dataclasses import dataclass

import psutil


@dataclass(frozen=True)
class MachineMemory:
    total_bytes: int
    available_bytes: int
    gpu_limit_bytes: int | None = None  # Metal's recommended working set, Macs only


def machine_memory() -> MachineMemory:
    """psutil's view, plus MLX's GPU working-set limit where the device reports one."""
    vm = psutil.virtual_memory()
    gpu = None
    try:
        import mlx.core as mx

        info = mx.device_info() if mx.metal.is_available() else {}
        gpu = int(info["max_recommended_working_set_size"]) or None
    except (AttributeError, KeyError, RuntimeError, TypeError, ValueError):
        gpu = None
    return MachineMemory(vm.total, vm.available, gpu)
