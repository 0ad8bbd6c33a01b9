"""``python -m export.train``: see :mod:`export.train.cli`."""

import sys

from export.train.cli import main

if __name__ == "__main__":
    sys.exit(main())
