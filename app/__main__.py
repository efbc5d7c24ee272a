"""`python -m mlx_pager_app`: the same as `mlx-pager`."""

import sys

from .entry import main

sys.exit(main())
