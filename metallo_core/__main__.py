"""`python -m metallo_core <command> ...`: the `metallo` console script, for where it is not on PATH."""

import sys

from metallo_core.cli import main

sys.exit(main())
