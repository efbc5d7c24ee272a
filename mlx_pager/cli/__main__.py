"""`python -m mlx_pager.cli COMMAND`: the engine's commands, without the app."""

import sys

from . import main

sys.exit(main())
