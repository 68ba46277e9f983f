"""``python -m tunnel2``: the same command line as ``tunnel2``."""

from __future__ import annotations

import sys

from tunnel2.cli import main

sys.exit(main())
