#!/usr/bin/env bash
# Fill .gpu_carry/ (git-ignored) with what benchmarks/gpu_check.sh needs on a GPU machine without network:
# wheels for CPython 3.12 / x86-64 of the Python packages such images lack (omegaconf, optuna and their
# dependencies, at the versions installed here), and the CIFAR-10 JPEG tarball (train/<class>/*.jpg, test/<class>/*.jpg).
#   bash benchmarks/gpu_carry.sh PATH/TO/cifar10-jpg.tar.gz
set -euo pipefail
cd "$(dirname "$0")/.."
TARBALL=${1:?usage: benchmarks/gpu_carry.sh CIFAR10_JPEG_TARBALL}
CARRY=.gpu_carry
PACKAGES="omegaconf optuna alembic sqlalchemy mako colorlog"  # what a typical GPU image (torch, numpy, scipy, ...) lacks
rm -rf "$CARRY/wheels" && mkdir -p "$CARRY/wheels"
PINNED=$(python3 -c "import importlib.metadata as m, sys; print(' '.join(f'{p}=={m.version(p)}' for p in sys.argv[1:]))" $PACKAGES)
python3 -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
  --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 \
  -d "$CARRY/wheels" $PINNED
cp "$TARBALL" "$CARRY/cifar10-jpg.tar.gz"
ls -1 "$CARRY/wheels"
du -sh "$CARRY"
