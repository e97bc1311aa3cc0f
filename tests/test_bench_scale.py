"""scripts/bench_scale.py: the committed results come from the current script, cover every
model and stage the issue asks for, and README's scale block is generated from them."""

from __future__ import annotations

import hashlib
import importlib.util
import json
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
SCRIPT = REPO / "scripts" / "bench_scale.py"
RESULTS = REPO / "scripts" / "bench-scale-results.json"


def load_script():
    spec = importlib.util.spec_from_file_location("dstrain_bench_scale", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    return module


def test_committed_scale_results_come_from_the_current_script():
    results = json.loads(RESULTS.read_text())
    assert results["mode"] == "full"
    recorded = results["git"]["bench_scale_py_sha256"]
    assert recorded == hashlib.sha256(SCRIPT.read_bytes()).hexdigest(), (
        "scripts/bench-scale-results.json was written by another version of "
        "scripts/bench_scale.py; run `python scripts/bench_scale.py --update-readme` again "
        "and commit the results"
    )


def test_readme_scale_block_matches_the_results_file():
    module = load_script()
    text = (REPO / "README.md").read_text()
    block = text.split(module.README_BEGIN, 1)[1].split(module.README_END, 1)[0].strip("\n")
    assert block == module.render_readme_block(json.loads(RESULTS.read_text()))
