"""Run or resume an Optuna study of FoRDE trainings: `python sweeps/launch.py --study forde_cifar10`."""

import sys
from pathlib import Path

from forde.sweep.launch import main

if __name__ == "__main__":
    sys.exit(main(studies_dir=Path(__file__).resolve().parent / "studies"))
