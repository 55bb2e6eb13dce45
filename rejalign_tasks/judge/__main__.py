"""``python -m rejalign_tasks.judge``: the same as ``rejalign-judge``."""

import sys

from rejalign_tasks.judge.cli import main

sys.exit(main())
