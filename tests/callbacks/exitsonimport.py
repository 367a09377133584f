"""A callback module with a script's exit left at top level (test fixture)."""

import sys

sys.exit(0)
