"""``python -m neureg.cli``: the same command line as ``neureg``."""

import sys

from . import main

sys.exit(main())
