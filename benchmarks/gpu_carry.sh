#!/usr/bin/env bash
# Fill .gpu_carry/ (git-ignored) with what benchmarks/gpu_check.sh needs on a GPU machine without network: wheels
# for the image's Python (benchmarks/gpu_image.txt) of every package the project and the check need that the image
# lacks, at the versions installed here (the list: `python benchmarks/gpu_env.py carry`), and the CIFAR-10 JPEG
# tarball (train/<class>/*.jpg, test/<class>/*.jpg). Run it in the project's environment, where pip works:
#   bash benchmarks/gpu_carry.sh PATH/TO/cifar10-jpg.tar.gz
set -euo pipefail
cd "$(dirname "$0")/.."
TARBALL=${1:?usage: benchmarks/gpu_carry.sh CIFAR10_JPEG_TARBALL}
CARRY=${FORDE_CARRY:-.gpu_carry}
PY=${PYTHON:-python3}
LIMIT_MIB=56  # the run tool sends at most 64 MiB: the carried folder, the repository (about 5 MiB) and room to spare

PYVER=$(sed -n 's/^python==\([0-9]*\)\.\([0-9]*\).*/\1\2/p' benchmarks/gpu_image.txt)  # e.g. 312
PLATFORMS=(--platform manylinux2014_x86_64)
for minor in $(seq 17 39); do PLATFORMS+=(--platform "manylinux_2_${minor}_x86_64"); done
PACKAGES=$($PY benchmarks/gpu_env.py carry)

rm -rf "$CARRY/wheels" && mkdir -p "$CARRY/wheels"
BUILT=$(mktemp -d)
trap 'rm -rf "$BUILT"' EXIT
for pkg in $PACKAGES; do
  if ! $PY -m pip download -q --no-deps --only-binary=:all: --python-version "$PYVER" --implementation cp \
      "${PLATFORMS[@]}" -d "$CARRY/wheels" "$pkg" 2>"$BUILT/err"; then
    # no wheel on the index: build one here, which only a pure-Python package turns into a wheel for any Python
    $PY -m pip wheel -q --no-deps -w "$BUILT" "$pkg" || { cat "$BUILT/err" >&2; exit 1; }
    whl=$(ls "$BUILT"/*.whl)
    case $whl in
      *-py3-none-any.whl | *-py2.py3-none-any.whl) mv "$whl" "$CARRY/wheels/" ;;
      *) echo "$pkg: no wheel for CPython $PYVER on the index, and the one built here is not pure Python: $whl" >&2; exit 1 ;;
    esac
  fi
done
cp "$TARBALL" "$CARRY/cifar10-jpg.tar.gz"
ls -1 "$CARRY/wheels"
SIZE_MIB=$(( $(du -sb "$CARRY" | cut -f1) / 1048576 ))
echo "$CARRY: $(echo "$PACKAGES" | wc -w) wheels and the tarball, $SIZE_MIB MiB"
if [ "$SIZE_MIB" -gt "$LIMIT_MIB" ]; then
  echo "$CARRY is over $LIMIT_MIB MiB: with the repository it would not travel to a GPU machine" >&2
  exit 1
fi
