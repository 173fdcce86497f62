"""``python -m fastflow``: the ``fastflow`` command line."""

import sys

from .cli import main

sys.exit(main())
