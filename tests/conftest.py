"""Shared fixtures. The `cuda` marker: tests that need a CUDA device run where one is present and are skipped
elsewhere (`python -m pytest -m cuda` runs only them; benchmarks/gpu_check.sh does, on a GPU machine).
`needs(module)`: tests of the test extra's optional tools (timm, lightning, kubernetes-validate) skip where the
tool is absent, so the suite collects wherever the package's own dependencies are; CI sets $FORDE_REQUIRE_TOOLS,
where a missing tool fails instead.
`small_disk`: a tiny filesystem that fills up, for tests of what a full disk does."""

import fcntl
import importlib.util
import inspect
import os
import subprocess
import tempfile
from pathlib import Path

import pytest
import torch

CUDA = pytest.mark.cuda


def devices(*extra_marks) -> list:
    """["cpu", "cuda"] for parametrising a test over devices; the cuda case carries the `cuda` marker."""
    return ["cpu", pytest.param("cuda", marks=[CUDA, *extra_marks])]


def _absent(module: str) -> bool:
    return not os.environ.get("FORDE_REQUIRE_TOOLS") and importlib.util.find_spec(module) is None


def needs(module: str) -> pytest.MarkDecorator:
    """Skip a test (or a parameter: `pytest.param(..., marks=needs("timm"))`) where an optional tool is absent."""
    return pytest.mark.skipif(_absent(module), reason=f"needs {module}, an optional tool: pip install -e '.[test]'")


@pytest.fixture
def ieee_float32():
    """Float32 convolutions and matrix products without TF32 (on CUDA, where PyTorch lets cuDNN use TF32 by default
    and a run's settings may have switched it on): a float32 comparison between two ways of computing the same
    thing then sees float32 rounding, not TF32's."""
    saved = torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32
    torch.backends.cudnn.allow_tf32 = torch.backends.cuda.matmul.allow_tf32 = False
    yield
    torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32 = saved


@pytest.fixture
def small_disk_factory(tmp_path):
    """`mount(size_bytes)` -> the Path of a fresh tmpfs of that size, unmounted at teardown. Mounting needs root
    (or CAP_SYS_ADMIN): where it is not permitted the test is skipped, or fails when $FORDE_REQUIRE_TMPFS is set."""
    mounted: list[Path] = []

    def mount(size_bytes: int) -> Path:
        target = tmp_path / f"small-disk-{len(mounted)}"
        target.mkdir()
        try:
            done = subprocess.run(
                ["mount", "-t", "tmpfs", "-o", f"size={size_bytes}", "tmpfs", str(target)],
                capture_output=True,
                text=True,
                timeout=30,
            )
            why = done.stderr.strip() if done.returncode else None
        except (OSError, subprocess.SubprocessError) as err:
            why = str(err)
        if why is not None:
            reason = f"cannot mount a {size_bytes}-byte tmpfs for a full-disk test ({why}); needs root or CAP_SYS_ADMIN"
            if os.environ.get("FORDE_REQUIRE_TMPFS"):
                pytest.fail(reason)
            pytest.skip(reason)
        mounted.append(target)
        return target

    yield mount
    for target in reversed(mounted):
        if subprocess.run(["umount", str(target)], capture_output=True).returncode:
            subprocess.run(["umount", "-l", str(target)], capture_output=True)  # still busy: detach it


@pytest.fixture
def small_disk(small_disk_factory) -> Path:
    """A 2 MiB tmpfs (see small_disk_factory)."""
    return small_disk_factory(2 * 2**20)


def pytest_configure(config):
    config.addinivalue_line(
        "markers", "cuda: needs a CUDA device; skipped where there is none (`pytest -m cuda` runs only these)"
    )


def shared_service(item: pytest.Item) -> str | None:
    """The server a test shares with others, if any: "postgres" (one database; one test drops every connection to
    it) or "slurm" (one node that a test's jobs fill)."""
    if item.module.__name__ == "test_slurm":
        return "slurm"
    params = getattr(item, "callspec", None)
    if params and "postgresql" in map(str, params.params.values()):
        return "postgres"
    function = getattr(item, "function", None)
    if function is not None and "postgres_url(" in inspect.getsource(function):
        return "postgres"
    return None


@pytest.fixture(autouse=True)
def one_test_per_shared_server(request):
    """Tests of one shared server run one after another, also when pytest-xdist runs the suite in several processes
    (an exclusive lock per server, held for the test)."""
    service = shared_service(request.node)
    if service is None:
        yield
        return
    with open(Path(tempfile.gettempdir()) / f"forde-tests-{service}.lock", "a") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(lock, fcntl.LOCK_UN)


def pytest_collection_modifyitems(config, items):
    """`cuda` tests skip where there is no CUDA device."""
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA device")
    for item in items:
        if item.get_closest_marker("cuda"):
            item.add_marker(skip)
