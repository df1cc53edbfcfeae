"""benchmarks/gpu_env.py: what the GPU machines' image lacks is derived from the package's dependencies and the
image's list, and a machine that lacks something is told in one line."""

import importlib.metadata
import importlib.util
import subprocess
import sys
from pathlib import Path

from packaging.requirements import Requirement
from packaging.version import Version

REPO = Path(__file__).resolve().parents[1]
spec = importlib.util.spec_from_file_location("gpu_env", REPO / "benchmarks" / "gpu_env.py")
assert spec is not None and spec.loader is not None
gpu_env = importlib.util.module_from_spec(spec)
spec.loader.exec_module(gpu_env)


def carried(image) -> dict[str, str]:
    needs = gpu_env.walk(gpu_env.roots(image), image, image.marker_environment())
    assert needs.missing == []
    return needs.carried


def test_the_carried_set_is_what_the_dependencies_need_beyond_the_image():
    image = gpu_env.Image.read()
    assert image.python == "3.12.3" and image.packages["torch"] == Version("2.11.0")
    carry = carried(image)
    direct = {"omegaconf", "optuna", "wandb", "submitit"}  # the package's dependencies the image lacks
    assert direct <= set(carry) and {"sqlalchemy", "alembic"} <= set(carry)  # and what optuna needs in turn
    assert not set(carry) & set(image.packages)  # nothing the image holds
    assert all(carry[name] == importlib.metadata.version(name) for name in carry)  # as installed here
    # an image without numpy: numpy is carried, at the version installed here
    without = gpu_env.Image(image.python, {k: v for k, v in image.packages.items() if k != "numpy"})
    assert carried(without)["numpy"] == importlib.metadata.version("numpy")


def test_a_version_the_image_has_that_the_package_refuses_is_named():
    image = gpu_env.Image.read()
    old = gpu_env.Image(image.python, image.packages | {"torch": Version("2.0.0")})
    needs = gpu_env.walk(gpu_env.roots(old), old, old.marker_environment())
    assert [m for m in needs.missing if m.startswith("torch")] == ["torch>=2.4 (for forde; the image has 2.0.0)"]


def test_check_names_each_missing_package_in_one_line(monkeypatch):
    image = gpu_env.Image.read()
    real = gpu_env.metadata.version

    def version(name: str) -> str:
        if name.lower() in ("submitit", "optuna"):
            raise importlib.metadata.PackageNotFoundError(name)
        return "0.1" if name.lower() == "wandb" else real(name)

    monkeypatch.setattr(gpu_env.metadata, "version", version)
    needs = gpu_env.walk(gpu_env.roots(image), image, image.marker_environment(), on_image=True)
    assert sorted(needs.missing) == [
        "optuna>=4.9 (for forde)",
        "submitit>=1.5 (for forde)",
        "wandb>=0.17 (for forde; found 0.1)",
    ]
    assert "sqlalchemy" not in needs.carried  # optuna's own needs are not walked when optuna is missing


def test_markers_are_those_of_the_image_python():
    image = gpu_env.Image("3.12.3", {})
    env = image.marker_environment()
    assert Requirement("tomli; python_version < '3.11'").marker.evaluate(env) is False
    assert Requirement("x; python_version >= '3.12' and platform_machine == 'x86_64'").marker.evaluate(env)


def test_the_command_line_check_passes_here():
    """This environment has everything (the test extra installed): `check` is silent and exits 0."""
    done = subprocess.run(
        [sys.executable, str(REPO / "benchmarks" / "gpu_env.py"), "check"], capture_output=True, text=True
    )
    assert done.returncode == 0 and done.stdout == done.stderr == "", done.stderr
