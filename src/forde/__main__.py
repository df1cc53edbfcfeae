"""`python -m forde ...` is the `forde` command (e.g. under `torchrun --nproc-per-node 2 -m forde train ...`)."""

import sys

from forde.cli import main

if __name__ == "__main__":
    sys.exit(main())
