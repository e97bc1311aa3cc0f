"""dstrain/ is put first on sys.path when dstrain/train.py runs by path, so no module in
it may shadow a standard-library module or an installed package."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

import pytest

PACKAGE_DIR = Path(__file__).resolve().parent.parent / "dstrain"


def test_no_module_shadows_stdlib_or_installed_packages():
    names = {p.stem for p in PACKAGE_DIR.glob("*.py")} - {"__init__", "__main__"}
    names |= {p.name for p in PACKAGE_DIR.iterdir() if p.is_dir() and p.name != "__pycache__"}
    shadowing = []
    saved = list(sys.path)
    try:
        sys.path[:] = [p for p in sys.path if Path(p or ".").resolve() != PACKAGE_DIR]
        for name in sorted(names):
            if name in sys.stdlib_module_names:
                shadowing.append(f"{name} (stdlib)")
                continue
            spec = importlib.util.find_spec(name) if name not in sys.modules else True
            if spec is not None:
                shadowing.append(f"{name} (installed)")
    finally:
        sys.path[:] = saved
    assert shadowing == []


def test_every_data_file_in_the_package_is_declared_package_data():
    """A wheel carries only declared data files: dstrain/ds_schema.json and the bundled
    FASTA must be among them, or an installed dstrain cannot validate or demo."""
    import fnmatch

    tomllib = pytest.importorskip("tomllib")  # Python 3.11+

    pyproject = tomllib.loads((PACKAGE_DIR.parent / "pyproject.toml").read_text())
    patterns = pyproject["tool"]["setuptools"]["package-data"]["dstrain"]
    data_files = [
        p.relative_to(PACKAGE_DIR).as_posix()
        for p in PACKAGE_DIR.rglob("*")
        if p.is_file() and p.suffix not in (".py", ".pyc")
    ]
    assert "ds_schema.json" in data_files
    undeclared = [f for f in data_files if not any(fnmatch.fnmatch(f, pat) for pat in patterns)]
    assert undeclared == []
