"""This machine's memory, and what a budget above its safe share costs.

The settings screen shows these beside the budget; `mlx-pager settings` and the app warn
with the same words. MLX is imported only to ask Metal for its working-set limit.
"""

from __future__ import annotations

from dataclasses import dataclass

import psutil

from .units import format_bytes

# Past about this share of RAM, macOS's memory compressor returns and speed falls (a
# 16 GB M4 measured 7.8 tok/s at 10 GB and 6.4 at 11 GB: docs/field-notes.md).
SAFE_SHARE = 0.75


@dataclass(frozen=True)
class MachineMemory:
    total_bytes: int
    available_bytes: int
    gpu_limit_bytes: int | None = None  # Metal's recommended working set, Macs only


def total_memory() -> int:
    """The machine's memory in bytes, what budget "auto" and the warnings are shares of."""
    return psutil.virtual_memory().total


def machine_memory(ask_gpu: bool = True) -> MachineMemory:
    """psutil's view, plus MLX's GPU working-set limit where the device reports one
    (``ask_gpu=False``: not asked, so MLX is not imported)."""
    vm = psutil.virtual_memory()
    if not ask_gpu:
        return MachineMemory(vm.total, vm.available)
    gpu = None
    try:
        import mlx.core as mx

        info = mx.device_info() if mx.metal.is_available() else {}
        gpu = int(info["max_recommended_working_set_size"]) or None
    except (AttributeError, KeyError, RuntimeError, TypeError, ValueError):
        gpu = None
    return MachineMemory(vm.total, vm.available, gpu)


def budget_warnings(budget_bytes: int, machine: MachineMemory) -> list[str]:
    """What is wrong with a budget on this machine, with the numbers ([] when nothing).
    The CLI refuses a budget past the whole memory (``budget_refused``) and warns with
    the rest; the settings screen shows them all."""
    total, safe = machine.total_bytes, int(SAFE_SHARE * machine.total_bytes)
    warnings = []
    if budget_bytes > total:
        warnings.append(
            f"{format_bytes(budget_bytes)} is more than this machine's {format_bytes(total)} "
            f"of memory: it would swap on every token. Use at most {format_bytes(safe)}."
        )
    elif budget_bytes > safe:
        warnings.append(
            f"{format_bytes(budget_bytes)} is {budget_bytes / total:.0%} of this machine's "
            f"{format_bytes(total)}, above {SAFE_SHARE:.0%} ({format_bytes(safe)}): macOS "
            "starts compressing and swapping, and speed falls."
        )
    if machine.gpu_limit_bytes and budget_bytes > machine.gpu_limit_bytes:
        warnings.append(
            f"{format_bytes(budget_bytes)} is above the GPU working-set limit "
            f"({format_bytes(machine.gpu_limit_bytes)})."
        )
    return warnings


def budget_refused(budget_bytes: int, machine: MachineMemory) -> bool:
    """Past the whole memory: no run can hold it, so the CLI refuses it outright."""
    return budget_bytes > machine.total_bytes
