"""Reading pickled files that others may have written (checkpoints, caches, dataset batches) without running
code from them.

A pickle may name any importable function and call it while it loads, so a shared checkpoint or dataset
could run a command. Every pickle the project reads goes through here: torch files with
`weights_only=True` (tensors and plain values only), other pickles through an unpickler that builds
only the few types their format needs.
"""

from __future__ import annotations

import pickle
from pathlib import Path
from typing import Any

import torch

from forde.torch_internals import unsafe_globals


class UnsafePickleError(pickle.UnpicklingError):
    """A file that holds an object other than the allowed ones; nothing from it was run."""

    def __init__(self, path: Path, name: str | None):
        self.path, self.name = Path(path), name
        super().__init__(f"{path} holds {name or 'an object'}, which loading would have to import and call")


def torch_load(path: str | Path) -> Any:
    """`torch.load` onto the CPU with `weights_only=True`; an object it refuses raises UnsafePickleError."""
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as err:
        refused = unsafe_globals(path, err)
        if refused is None:
            raise
        raise UnsafePickleError(Path(path), refused[0]) from None


class _AllowListUnpickler(pickle.Unpickler):
    def __init__(self, file, path: Path, allowed: frozenset[tuple[str, str]], **kwargs):
        super().__init__(file, **kwargs)
        self.path, self.allowed = path, allowed

    def find_class(self, module: str, name: str) -> Any:
        if (module, name) not in self.allowed:
            raise UnsafePickleError(self.path, f"{module}.{name}")
        return super().find_class(module, name)


# What a pickled NumPy array needs, as NumPy 1 and 2 write it under every protocol, and what Python 2
# pickles (the CIFAR release) need to turn their byte strings into bytes.
NUMPY_ARRAYS = frozenset(
    {
        ("numpy", "ndarray"),
        ("numpy", "dtype"),
        ("numpy.core.multiarray", "_reconstruct"),
        ("numpy._core.multiarray", "_reconstruct"),
        ("numpy.core.numeric", "_frombuffer"),
        ("numpy._core.numeric", "_frombuffer"),
        ("_codecs", "encode"),
    }
)


def pickle_load(path: str | Path, allowed: frozenset[tuple[str, str]] = NUMPY_ARRAYS, **kwargs) -> Any:
    """A pickle holding only plain values and the `allowed` globals (default: NumPy arrays)."""
    path = Path(path)
    with open(path, "rb") as f:
        return _AllowListUnpickler(f, path, allowed, **kwargs).load()
