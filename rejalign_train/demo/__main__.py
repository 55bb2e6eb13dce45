"""``python -m rejalign_train.demo``: the same as ``rejalign-demo``."""

import sys

from rejalign_train.demo.cli import main

sys.exit(main())
