"""``python -m minorsft train ...`` / ``python -m minorsft demo`` (see :mod:`minorsft.cli`)."""
import sys

from minorsft.cli import main

if __name__ == "__main__":
    sys.exit(main())
