"""The `cuda` marker: tests that need a CUDA device run where one is present and are skipped elsewhere.

`python -m pytest -m cuda` runs only them (benchmarks/gpu_check.sh does, on a GPU machine)."""

import pytest
import torch

CUDA = pytest.mark.cuda


def devices(*extra_marks) -> list:
    """["cpu", "cuda"] for parametrising a test over devices; the cuda case carries the `cuda` marker."""
    return ["cpu", pytest.param("cuda", marks=[CUDA, *extra_marks])]


@pytest.fixture
def ieee_float32():
    """Float32 convolutions and matrix products without TF32 (on CUDA, where PyTorch lets cuDNN use TF32 by default
    and a run's settings may have switched it on): a float32 comparison between two ways of computing the same
    thing then sees float32 rounding, not TF32's."""
    saved = torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32
    torch.backends.cudnn.allow_tf32 = torch.backends.cuda.matmul.allow_tf32 = False
    yield
    torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32 = saved


def pytest_configure(config):
    config.addinivalue_line("markers", "cuda: needs a CUDA device; skipped where there is none (`pytest -m cuda` runs only these)")


def pytest_collection_modifyitems(config, items):
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA device")
    for item in items:
        if item.get_closest_marker("cuda"):
            item.add_marker(skip)
