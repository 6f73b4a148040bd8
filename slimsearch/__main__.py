"""``python -m slimsearch`` is the ``slimsearch`` command (handy where it is not installed)."""

import sys

from slimsearch.cli import main

sys.exit(main())
