"""scripts/mutants.py's mechanics, fast: every anchor still matches the code exactly once,
every named test exists, and a temporary copy is what gets imported. The mutation check
itself (minutes) runs from scripts/test.sh after pytest."""

from __future__ import annotations

import ast
import importlib.util
import re
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
SCRIPT = REPO / "scripts" / "mutants.py"


def load_mutants():
    """scripts/mutants.py as a module (standard library only at its top level)."""
    spec = importlib.util.spec_from_file_location("dstrain_mutants", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up there
    spec.loader.exec_module(module)
    return module


mutants = load_mutants()


@pytest.mark.parametrize("mutant", mutants.MUTANTS, ids=lambda m: m.name)
def test_anchor_matches_once_and_the_mutant_still_parses(mutant):
    source = (REPO / mutant.path).read_text(encoding="utf-8")
    assert source.count(mutant.anchor) == 1, (
        f"{mutant.name}: anchor moved in {mutant.path}; update scripts/mutants.py"
    )
    mutated = mutants.mutate(source, mutant)
    assert mutated != source
    ast.parse(mutated)  # the fault is in behaviour, not a syntax error that kills anything


@pytest.mark.parametrize("mutant", mutants.MUTANTS, ids=lambda m: m.name)
def test_every_named_test_exists(mutant):
    assert mutant.tests
    for node in mutant.tests:
        path, name = node.split("::")
        name = name.split("[")[0]  # a parametrised test's id: test_x[2]
        test_file = REPO / path
        assert test_file.is_file(), f"{mutant.name}: {path} is missing"
        assert re.search(rf"^def {name}\(", test_file.read_text(), re.M), (
            f"{mutant.name}: no test {name} in {path}"
        )


def test_mutant_names_are_unique():
    names = [m.name for m in mutants.MUTANTS]
    assert len(names) == len(set(names))


def test_a_missing_or_repeated_anchor_is_refused():
    mutant = mutants.MUTANTS[0]
    with pytest.raises(mutants.AnchorError, match="occurs 0 times"):
        mutants.mutate("nothing here\n", mutant)
    with pytest.raises(mutants.AnchorError, match="occurs 2 times"):
        mutants.mutate(mutant.anchor * 2, mutant)


def test_the_copy_is_what_gets_imported(tmp_path):
    copy = mutants.copy_repo(tmp_path / "copy")
    assert (copy / "dstrain" / "train.py").is_file() and (copy / "tests" / "conftest.py").is_file()
    assert not list(copy.rglob("__pycache__"))
    assert mutants.check_imports_resolve_to(copy) == []
    # A mutated file in the copy is the one a child process runs.
    target = copy / "dstrain" / "batching.py"
    target.write_text(target.read_text() + "\nMUTANT_MARK = 1\n")
    result = subprocess.run(
        [sys.executable, "-c", "import dstrain.batching as b; print(b.MUTANT_MARK)"],
        cwd=copy,
        env=mutants.child_env(copy),
        capture_output=True,
        text=True,
    )
    assert result.stdout.strip() == "1", result.stderr[-2000:]


def test_outcome_and_table():
    run = mutants.Run
    assert mutants.outcome(run(1, 1.0, "")) == "killed"
    assert mutants.outcome(run(0, 1.0, "")) == "SURVIVED"
    assert mutants.outcome(run(None, 1.0, "")) == "TIMEOUT"
    assert mutants.outcome(run(4, 1.0, "")).startswith("ERROR")  # e.g. no such test
    table = mutants.format_table([("m", "t.py::x", "killed", "3")]).splitlines()
    assert table[0].split() == ["mutant", "tests", "result", "seconds"]
    assert table[2].split() == ["m", "t.py::x", "killed", "3"]
