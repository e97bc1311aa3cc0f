"""ds_configs/ presets and the measured DeepSpeed key table do not drift."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from dstrain.ds_check import check_ds_config, load_schema
from dstrain.presets import render_presets

REPO = Path(__file__).resolve().parent.parent
CONFIG_DIR = REPO / "ds_configs"


def test_presets_cover_stages_precisions_and_offload():
    names = set(render_presets())
    assert len(names) >= 10
    for stage in range(4):
        for precision in ("bf16", "fp16"):
            assert f"zero{stage}_{precision}.json" in names
    assert {"zero2_bf16_offload.json", "zero3_bf16_offload.json"} <= names


def test_regenerating_presets_changes_nothing():
    committed = {p.name: p.read_text(encoding="utf-8") for p in CONFIG_DIR.glob("*.json")}
    assert committed == render_presets()


@pytest.mark.parametrize("name", sorted(p.name for p in CONFIG_DIR.glob("*.json")))
def test_every_preset_validates(name):
    config = json.loads((CONFIG_DIR / name).read_text())
    assert check_ds_config(config, name, world_size=64) == []


def test_schema_matches_installed_deepspeed():
    deepspeed = pytest.importorskip("deepspeed")
    if load_schema()["deepspeed_version"] != deepspeed.__version__:
        pytest.skip(
            f"schema measured on DeepSpeed {load_schema()['deepspeed_version']}, "
            f"{deepspeed.__version__} installed: rerun scripts/gen_ds_schema.py"
        )
    result = subprocess.run(
        [sys.executable, str(REPO / "scripts" / "gen_ds_schema.py"), "--check"],
        capture_output=True,
        timeout=120,
        check=False,
    )
    assert result.returncode == 0, result.stderr.decode()[-2000:]
