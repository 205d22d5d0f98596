"""``python -m training`` is ``switchboard-train``."""

import sys

from training.cli import main

sys.exit(main())
