"""``python -m export.finetune``: see :mod:`export.finetune.cli`."""

import sys

from export.finetune.cli import main

if __name__ == "__main__":
    sys.exit(main())
