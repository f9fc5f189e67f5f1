"""``python -m trajflow ...``: the same as the ``trajflow`` command (:func:`trajflow.cli.main`)."""

import sys

from .cli import main

if __name__ == "__main__":
    sys.exit(main())
