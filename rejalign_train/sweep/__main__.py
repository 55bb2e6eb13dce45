"""``python -m rejalign_train.sweep``: the same as ``rejalign-sweep``."""

import sys

from rejalign_train.sweep.cli import main

sys.exit(main())
