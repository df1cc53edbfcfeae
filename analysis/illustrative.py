"""The paper's illustrative experiments (Fig. 2 and 3): `python analysis/illustrative.py --out DIR`."""

import sys

from forde.illustrative.run import main

if __name__ == "__main__":
    sys.exit(main())
