"""``python -m mpreqrep``: run the command line of :mod:`mpreqrep._cli`."""

from __future__ import annotations

import sys

from ._cli import main

# The guard matters: process pools that spawn workers re-import the main
# module under another name, and must not start a second command line.
if __name__ == "__main__":
    sys.exit(main())
