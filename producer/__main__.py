"""`python -m tokenfeed.producer` is the `tokenfeed` command."""

import sys

from tokenfeed.producer.cli import main

if __name__ == "__main__":
    sys.exit(main())
