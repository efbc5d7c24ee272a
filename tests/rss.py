"""Peak resident memory of a command, from the kernel, against a baseline process.

VmHWM is a process's own high-water mark. ``ru_maxrss`` is not: Linux carries the
parent's mark across fork and exec (pytest's, hundreds of MB). The baseline is a process
that imports what the command imports, and nothing else.
"""

from __future__ import annotations

HWM = "int(next(ln for ln in open('/proc/self/status') if ln.startswith('VmHWM')).split()[1])"
MB = 10**6
# Measurement granularity: VmHWM counts whole pages and the baseline's own imports vary
# a little from run to run.
TOLERANCE = 1 * MB


def baseline_script(imports: str) -> str:
    """Python for a process that imports ``imports``, touches MLX, prints its peak."""
    return f"import mlx.core as mx, {imports}\nmx.eval(mx.ones(4))\nprint({HWM} * 1024)\n"


# Python for a process that runs `mlx-pager ARGS...`, then prints its own peak.
COMMAND = f"import sys\nfrom mlx_pager.cli import main\nmain(sys.argv[1:])\nprint({HWM} * 1024)\n"


def peak_rss_of(pid: int) -> int:
    """The high-water mark of another process's resident set, read from outside."""
    with open(f"/proc/{pid}/status") as f:
        return int(next(ln for ln in f if ln.startswith("VmHWM:")).split()[1]) * 1024
