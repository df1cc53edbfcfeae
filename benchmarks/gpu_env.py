"""What the GPU machines' image lacks for the GPU check, derived from the package's dependencies and the image's list.

    python benchmarks/gpu_env.py carry   # name==version, as installed here, of every needed package the image lacks
    python benchmarks/gpu_env.py image   # the image's packages the project and its tests use, pinned as there
    python benchmarks/gpu_env.py check   # on the GPU machine: one line naming what is missing (exit 2), else silent

"Needed" is the package's dependencies (pyproject.toml) and the GPU check's own (pytest and pytest-timeout, from the
test extra; the tests skip where the extra's optional tools are absent), with everything they require in turn, for
the image's Python on Linux x86-64. The walk stops at packages the image holds (benchmarks/gpu_image.txt): the image
brings their own requirements. Only packaging and the standard library are used, so `check` runs before anything is
installed."""

import argparse
import importlib.metadata as metadata
import platform
import sys
import tomllib
from dataclasses import dataclass, field
from pathlib import Path

try:
    from packaging.markers import default_environment
    from packaging.requirements import Requirement
    from packaging.utils import canonicalize_name
    from packaging.version import Version
except ImportError:  # what reads requirements is missing itself: say so in the check's own words
    sys.exit(f"missing on this machine (Python {platform.python_version()}): packaging (for this check)")

REPO = Path(__file__).resolve().parent.parent
IMAGE_LIST = REPO / "benchmarks" / "gpu_image.txt"
CHECK_NEEDS = ("pytest", "pytest-timeout")  # from the test extra: what runs `pytest -m cuda` (with --timeout)


@dataclass(frozen=True)
class Image:
    python: str
    packages: dict[str, Version | None]  # canonical name -> the version read on the image, where one was

    @classmethod
    def read(cls, path: Path = IMAGE_LIST) -> "Image":
        packages: dict[str, Version | None] = {}
        for line in path.read_text().splitlines():
            line = line.split("#", 1)[0].strip()
            if line:
                name, _, version = line.partition("==")
                packages[canonicalize_name(name)] = Version(version) if version else None
        python = packages.pop("python")
        assert python is not None, f"{path}: the image's Python needs a version (python==X.Y.Z)"
        return cls(str(python), packages)

    def marker_environment(self) -> dict[str, str]:
        """The environment markers of the image's Python on Linux x86-64 (for the walk done on another machine)."""
        env = dict(default_environment())
        major_minor = ".".join(self.python.split(".")[:2])
        env.update(
            python_version=major_minor,
            python_full_version=self.python,
            implementation_version=self.python,
            implementation_name="cpython",
            platform_python_implementation="CPython",
            sys_platform="linux",
            platform_system="Linux",
            os_name="posix",
            platform_machine="x86_64",
        )
        return env


def roots(image: Image, optional_tools: bool = False) -> list[Requirement]:
    """The package's dependencies and the check's own; with `optional_tools`, also the test extra's tools that the
    image happens to hold (the tests use them there, and skip without them)."""
    project = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]
    test = [Requirement(r) for r in project["optional-dependencies"]["test"]]
    check = [r for r in test if canonicalize_name(r.name) in CHECK_NEEDS]
    assert len(check) == len(CHECK_NEEDS), f"pyproject.toml's test extra should name {', '.join(CHECK_NEEDS)}"
    tools = (
        [r for r in test if r not in check and canonicalize_name(r.name) in image.packages] if optional_tools else []
    )
    return [Requirement(r) for r in project["dependencies"]] + check + tools


@dataclass
class Needs:
    carried: dict[str, str] = field(default_factory=dict)  # canonical name -> version installed in this environment
    from_image: dict[str, list[Requirement]] = field(default_factory=dict)  # canonical name -> what asks for it
    missing: list[str] = field(default_factory=list)  # "name>=x (what asks for it)", or with the version found


def walk(requirements: list[Requirement], image: Image, env: dict[str, str], on_image: bool = False) -> Needs:
    """Every requirement reachable from `requirements` under the markers `env`, read from this environment's
    installed metadata; a package the image holds ends its branch, checked against the version installed
    (`on_image`: this is the image) or else against the version the image list pins."""
    needs = Needs()
    todo = [(r, "forde") for r in requirements]
    while todo:
        req, wanted_by = todo.pop()
        if req.marker is not None and not req.marker.evaluate({**env, "extra": ""}):
            continue
        name = canonicalize_name(req.name)
        in_image = name in image.packages
        if in_image:
            needs.from_image.setdefault(name, []).append(req)
        version = installed_version(req.name) if on_image or not in_image else image.packages[name]
        if version is None and in_image and not on_image:
            continue  # in the image at a version nobody recorded
        if version is None:
            needs.missing.append(f"{req} (for {wanted_by})")
        elif not req.specifier.contains(version, prereleases=True):
            needs.missing.append(f"{req} (for {wanted_by}; {'the image has' if in_image else 'found'} {version})")
        elif not in_image and name not in needs.carried:
            needs.carried[name] = str(version)
            for line in metadata.requires(req.name) or []:
                sub = Requirement(line)
                if sub.marker is None or any(sub.marker.evaluate({**env, "extra": e}) for e in {"", *req.extras}):
                    sub.marker = None
                    todo.append((sub, req.name))
    return needs


def installed_version(name: str) -> Version | None:
    try:
        return Version(metadata.version(name))
    except metadata.PackageNotFoundError:
        return None


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("mode", choices=["carry", "image", "check"])
    mode = parser.parse_args().mode
    image = Image.read()
    if mode == "check":
        needs = walk(roots(image), image, dict(default_environment()), on_image=True)
        if needs.missing:
            print(
                f"missing on this machine (Python {platform.python_version()}): {'; '.join(sorted(needs.missing))}. "
                "Run benchmarks/gpu_carry.sh where pip works and carry .gpu_carry",
                file=sys.stderr,
            )
            return 2
        return 0
    needs = walk(roots(image, optional_tools=mode == "image"), image, image.marker_environment())
    if needs.missing:
        print(f"cannot derive the carried set: {'; '.join(sorted(needs.missing))}", file=sys.stderr)
        print("install the project's environment here first (pip install -e '.[test]')", file=sys.stderr)
        return 2
    if mode == "carry":
        print("\n".join(f"{name}=={version}" for name, version in sorted(needs.carried.items())))
    else:
        for name in sorted(needs.from_image):
            pinned = image.packages[name]
            print(f"{name}=={pinned}" if pinned else str(merged(name, needs.from_image[name])))
    return 0


def merged(name: str, requirements: list[Requirement]) -> Requirement:
    """One requirement with every specifier that asked for `name`."""
    return Requirement(name + ",".join(str(r.specifier) for r in requirements if r.specifier))


if __name__ == "__main__":
    sys.exit(main())
