"""``python -m kmsg_worker.cli``: the same as ``kmsg`` (used where the script may not be on PATH)."""

import sys

from kmsg_worker.cli import main

sys.exit(main())
