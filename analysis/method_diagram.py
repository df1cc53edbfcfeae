"""The docs' method diagram (FoRDE's kernel on one input): `python analysis/method_diagram.py --out docs/figures`."""

import sys

from forde.illustrative.diagram import main

if __name__ == "__main__":
    sys.exit(main())
