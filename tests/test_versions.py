"""The dependency ranges pyproject.toml declares are the ones the suite runs on.

pyproject.toml's lower bounds are the tested versions (scripts/constraints.txt, plus
torch from scripts/setup.sh's TORCH_SPEC): every pin must lie inside its declared range,
every declared dependency must be pinned, and the installed versions must satisfy the
ranges (a venv that drifted from the pins would test something else).
"""

from __future__ import annotations

import re
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path

import pytest

try:
    import tomllib
except ModuleNotFoundError:  # Python 3.10
    tomllib = pytest.importorskip("tomli")

from packaging.requirements import Requirement
from packaging.utils import canonicalize_name
from packaging.version import Version

REPO = Path(__file__).resolve().parent.parent


def declared() -> dict[str, Requirement]:
    """Every requirement of [project] dependencies and the `test` extra, by package name."""
    project = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]
    lines = project["dependencies"] + project["optional-dependencies"]["test"]
    requirements = [Requirement(line) for line in lines]
    return {canonicalize_name(r.name): r for r in requirements}


def pinned() -> dict[str, Version]:
    """scripts/constraints.txt's `name==version` lines, and setup.sh's default torch."""
    pins = {}
    for line in (REPO / "scripts" / "constraints.txt").read_text().splitlines():
        line = line.split("#", 1)[0].strip()
        if line:
            name, _, pin = line.partition("==")
            assert pin, f"constraints.txt: {line!r} is not name==version"
            pins[canonicalize_name(name)] = Version(pin)
    setup = (REPO / "scripts" / "setup.sh").read_text()
    torch_spec = re.search(r"TORCH_SPEC=\$\{TORCH_SPEC:-torch==([^}]+)\}", setup)
    assert torch_spec, "scripts/setup.sh no longer sets TORCH_SPEC=${TORCH_SPEC:-torch==X}"
    pins["torch"] = Version(torch_spec.group(1))
    return pins


def test_every_declared_range_is_bounded_below_and_pinned():
    requirements, pins = declared(), pinned()
    unbounded = [
        str(r)
        for r in requirements.values()
        if not any(s.operator in (">=", "==") for s in r.specifier)
    ]
    assert not unbounded, f"no tested lower bound: {unbounded}"
    assert sorted(requirements) == sorted(pins), (
        "pyproject.toml and scripts/constraints.txt (+ setup.sh's torch) name different "
        f"packages: only declared {sorted(set(requirements) - set(pins))}, "
        f"only pinned {sorted(set(pins) - set(requirements))}"
    )


def test_pins_lie_in_the_declared_ranges():
    requirements = declared()
    outside = [
        f"{name}=={pin} outside {requirements[name].specifier}"
        for name, pin in pinned().items()
        if name in requirements and not requirements[name].specifier.contains(pin)
    ]
    assert not outside, outside


def test_lower_bounds_are_the_tested_versions():
    """A lower bound below the pin admits versions nothing tests (the issue: `>=4.46` with
    only 5.23 tested); the bound may drop the patch level (`>=5.23` for 5.23.0)."""
    requirements, pins = declared(), pinned()
    loose = []
    for name, requirement in requirements.items():
        lower = [Version(s.version) for s in requirement.specifier if s.operator == ">="]
        pin = pins.get(name)
        if pin is not None and lower and max(lower) < Version(f"{pin.major}.{pin.minor}"):
            loose.append(f"{name}: {requirement.specifier} but {pin} is tested")
    assert not loose, loose


def test_installed_versions_satisfy_the_declared_ranges():
    requirements = declared()
    problems = []
    for name, requirement in requirements.items():
        try:
            installed = Version(version(name))
        except PackageNotFoundError:
            problems.append(f"{name} is not installed")
            continue
        # torch's local label (2.13.0+cpu, +cu126) does not change what the range means
        if not requirement.specifier.contains(installed, prereleases=True):
            problems.append(f"{name} {installed} outside {requirement.specifier}")
    assert not problems, "; ".join(problems) + " (run scripts/setup.sh)"
