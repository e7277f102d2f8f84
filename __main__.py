"""``python -m neureg``: the same command line as ``neureg``."""

import sys

from .cli import main

sys.exit(main())
