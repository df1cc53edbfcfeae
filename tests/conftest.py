"""The `cuda` marker: tests that need a CUDA device run where one is present and are skipped elsewhere.

`python -m pytest -m cuda` runs only them (benchmarks/gpu_check.sh does, on a GPU machine)."""

import pytest
import torch

CUDA = pytest.mark.cuda


def devices(*extra_marks) -> list:
    """["cpu", "cuda"] for parametrising a test over devices; the cuda case carries the `cuda` marker."""
    return ["cpu", pytest.param("cuda", marks=[CUDA, *extra_marks])]


def pytest_collection_modifyitems(config, items):
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA device")
    for item in items:
        if item.get_closest_marker("cuda"):
            item.add_marker(skip)
