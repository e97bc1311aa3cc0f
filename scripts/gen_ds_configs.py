#!/usr/bin/env python
"""Regenerate the DeepSpeed presets in ds_configs/ from dstrain/presets.py.

Usage: python scripts/gen_ds_configs.py [--check]
  --check  exit 1 (changing nothing) if any committed preset differs or is missing.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from dstrain.ds_config import write_text_atomic
from dstrain.presets import render_presets

CONFIG_DIR = Path(__file__).resolve().parent.parent / "ds_configs"


def main() -> int:
    parser = argparse.ArgumentParser(description="Regenerate ds_configs/ presets.")
    parser.add_argument("--check", action="store_true", help="only report drift")
    args = parser.parse_args()
    stale = []
    for name, text in render_presets().items():
        path = CONFIG_DIR / name
        if path.exists() and path.read_text(encoding="utf-8") == text:
            continue
        stale.append(name)
        if not args.check:
            write_text_atomic(path, text)
            print(f"wrote {path}")
    if args.check and stale:
        print(
            "stale presets: " + ", ".join(stale) + "; run python scripts/gen_ds_configs.py",
            file=sys.stderr,
        )
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
