"""dstrain/ is put first on sys.path when dstrain/train.py runs by path, so no module in
it may shadow a standard-library module or an installed package."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

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
