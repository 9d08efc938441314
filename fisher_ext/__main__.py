"""``python -m fisher_ext``: the ``fisher-ext`` command line."""

import sys

from .cli import main

sys.exit(main())
