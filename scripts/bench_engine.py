"""Engine benchmark: the same as `mlx-pager bench` (see mlx_pager/bench.py)."""

import sys

from mlx_pager.cli import main

if __name__ == "__main__":
    sys.exit(main(["bench", *sys.argv[1:]]))
