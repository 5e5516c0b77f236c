"""``python -m llmasos ...``: the same command line as the ``llmasos`` script (``llmasos.cli:main``)."""
import sys

from .cli import main

if __name__ == "__main__":
    sys.exit(main())
