"""Every table and figure for a study: `python analysis/report.py STUDY_DIR [--out DIR] [--paper]`
(the same as `forde report`)."""

import sys

from forde.cli import main

if __name__ == "__main__":
    sys.exit(main(["report", *sys.argv[1:]]))
