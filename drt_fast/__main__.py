"""``python -m drt_fast`` (and ``torchrun -m drt_fast``): the same as the ``drt-fast`` command."""
import sys

from .cli import main

if __name__ == "__main__":
    sys.exit(main())
