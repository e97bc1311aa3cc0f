#!/usr/bin/env python
"""Mutation check: deliberate faults that the test suite must catch.

    .venv/bin/python scripts/mutants.py                 # every mutant, ~3 min on 2 CPU cores
    .venv/bin/python scripts/mutants.py --only no-rng-restore,pads-in-loss
    .venv/bin/python scripts/mutants.py --list          # the mutants and their tests

Each mutant is one exact-text replacement in one file of `dstrain/`, applied to a
temporary copy of the repository (dstrain/, tests/, configs, pyproject.toml): the tests
compute their paths from their own location (`REPO / "dstrain" / "train.py"`), so the
copy's tests launch the copy's train.py, and PYTHONPATH puts the copy first, so
`import dstrain` finds the copy in pytest and in every process a test starts (the
editable install's finder comes after sys.path). A sanity run checks both before anything
else. The anchor text must occur exactly once: a refactor that moves it fails here (and in
tests/test_mutants.py) instead of silently testing nothing.

For every mutant the tests it names run with `pytest -x`; the mutant is killed when they
fail. The same tests first run once on the unmutated copy (the baseline): if they fail
there, a failure under a mutant would prove nothing. Exit status 1 when the baseline
fails, an anchor is missing, a run errs or times out, or a mutant survives.
"""

from __future__ import annotations

import argparse
import concurrent.futures
import dataclasses
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
COPIED = ("dstrain", "tests", "ds_configs", "hostfiles", "scripts", "pyproject.toml", "README.md")
"""What the temporary copy holds: the package, its tests and the files they read."""
BLINDSPOTS = "tests/test_train_blindspots.py"


@dataclasses.dataclass(frozen=True)
class Mutant:
    name: str
    path: str
    """File to mutate, relative to the repository root."""
    anchor: str
    """Exact text that must occur once in `path`."""
    replacement: str
    tests: tuple[str, ...]
    """pytest node ids (relative to the repository root) that must fail."""
    fault: str
    """The bug it stands for, in a few words."""


MUTANTS: tuple[Mutant, ...] = (
    Mutant(
        name="eval-without-all-reduce",
        path="dstrain/train.py",
        anchor="    loss_sum, tokens = all_reduce([loss_sum, tokens])\n"
        "    return (loss_sum / tokens",
        replacement="    return (loss_sum / tokens",
        tests=(f"{BLINDSPOTS}::test_two_rank_validation_equals_one_process_computation",),
        fault="evaluate() returns this rank's sums, not the whole validation split's",
    ),
    Mutant(
        name="no-rng-restore",
        path="dstrain/train.py",
        anchor="        if rng is not None:\n            restore_rng_state(rng)\n",
        replacement="        if rng is not None:\n            pass\n",
        tests=(f"{BLINDSPOTS}::test_resume_is_exact_with_dropout",),
        fault="resume leaves the RNG where the new process seeded it",
    ),
    Mutant(
        name="no-loss-scale-restore",
        path="dstrain/checkpoints.py",
        anchor="        path, client_state = engine.load_checkpoint(str(ckpt_dir), tag=tag)\n",
        # DeepSpeed restores the fp16 scale with the optimizer state; this is dstrain
        # resetting it afterwards (as a "fresh scale on resume" would).
        replacement="        path, client_state = engine.load_checkpoint(str(ckpt_dir), tag=tag)\n"
        "        scaler = getattr(engine.optimizer, 'loss_scaler', None)\n"
        "        if scaler is not None and hasattr(scaler, 'cur_scale'):\n"
        "            scaler.cur_scale = engine.initial_dynamic_scale()\n",
        tests=(f"{BLINDSPOTS}::test_fp16_loss_scale_survives_resume",),
        fault="resume starts fp16 from the initial loss scale instead of the saved one",
    ),
    Mutant(
        name="loss-divided-twice",
        path="dstrain/train.py",
        anchor="                    engine.backward(loss)\n",
        replacement="                    engine.backward(loss / engine.gradient_accumulation_steps())\n",
        # ZeRO-2 only (the common case): the fault is dstrain's, any stage shows it.
        tests=("tests/test_train.py::test_accumulation_matches_a_larger_micro_batch[2]",),
        fault="the loss divided by the accumulation steps on top of DeepSpeed's division",
    ),
    Mutant(
        name="pads-in-loss",
        path="dstrain/batching.py",
        anchor="            labels[attention_mask == 0] = IGNORE_INDEX\n",
        replacement="            pass\n",
        tests=("tests/test_batching.py::test_dynamic_padding_to_the_longest_example",),
        fault="pad labels stay in the loss when loss_on_pad is False",
    ),
    Mutant(
        name="batch-layout-not-checked",
        path="dstrain/train.py",
        anchor='            "batch": {"micro": self.micro, "accum": self.accum, "world": self.world},\n',
        replacement="",
        tests=(f"{BLINDSPOTS}::test_resume_refuses_other_batch_layout",),
        fault="resume accepts a checkpoint written with another micro batch, accumulation "
        "or world size",
    ),
    Mutant(
        name="packed-positions-continue",
        path="dstrain/batching.py",
        anchor="            position_ids.append(torch.cat([torch.arange(n) for n in "
        "[*map(len, row), len(tail)]]))\n",
        replacement="            position_ids.append(torch.arange(width))\n",
        tests=("tests/test_packing.py::test_no_attention_or_positions_across_joins",),
        fault="packed rows keep counting positions, so examples attend across their joins",
    ),
    Mutant(
        name="packed-joins-trained",
        path="dstrain/batching.py",
        anchor="        labels = input_ids.masked_fill(pad | (position_ids == 0), IGNORE_INDEX)\n",
        replacement="        labels = input_ids.masked_fill(pad, IGNORE_INDEX)\n",
        tests=("tests/test_packing.py::test_packed_equals_alone_and_padded",),
        fault="a packed example is trained to predict the next example's first codon",
    ),
    Mutant(
        name="reshape-forgets-ranks",
        path="dstrain/batch_plan.py",
        anchor="    return offset + min(micro_done * world, plan_micro_batches - offset)\n",
        replacement="    return offset + min(micro_done, plan_micro_batches - offset)\n",
        tests=(
            "tests/test_elastic.py::test_no_micro_batch_is_skipped_or_run_twice_across_world_sizes",
        ),
        fault="a resume on another world size counts one rank's micro-batches as the job's",
    ),
)


class AnchorError(Exception):
    """A mutant's anchor text is missing or ambiguous in the current source."""


def mutate(source: str, mutant: Mutant) -> str:
    """`source` with the mutant applied; AnchorError unless the anchor occurs exactly once."""
    count = source.count(mutant.anchor)
    if count != 1:
        raise AnchorError(
            f"{mutant.name}: the anchor occurs {count} times in {mutant.path} (expected 1); "
            f"the code moved: update the anchor in scripts/mutants.py. Anchor:\n{mutant.anchor}"
        )
    return source.replace(mutant.anchor, mutant.replacement)


def copy_repo(dest: Path, repo: Path = REPO) -> Path:
    """The files tests need, copied under `dest` (no caches, no egg-info)."""
    ignore = shutil.ignore_patterns("__pycache__", "*.egg-info", ".pytest_cache", "*.pyc")
    dest.mkdir(parents=True)
    for name in COPIED:
        source = repo / name
        if source.is_dir():
            shutil.copytree(source, dest / name, ignore=ignore)
        elif source.exists():
            shutil.copy2(source, dest / name)
    return dest


def child_env(copy: Path) -> dict[str, str]:
    """This environment with the copy first on PYTHONPATH (inherited by every process a test
    starts, the DeepSpeed launcher's ranks included) and no bytecode written into it."""
    env = dict(os.environ, PYTHONDONTWRITEBYTECODE="1", OMP_NUM_THREADS="1")
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(copy), env.get("PYTHONPATH")]))
    return env


PROBE = """\
import dstrain, dstrain.train
print(dstrain.__file__)
print(dstrain.train.__file__)
"""


def check_imports_resolve_to(copy: Path) -> list[str]:
    """Problems (none expected): `import dstrain` from the copy's root, and from a script
    launched by path out of the copy's dstrain/ like train.py is, must find the copy."""
    problems = []
    probe = copy / "dstrain" / "_mutants_probe.py"
    probe.write_text(PROBE)
    try:
        for how, command in (
            ("python -c", [sys.executable, "-c", PROBE]),
            ("script by path in dstrain/", [sys.executable, str(probe)]),
        ):
            result = subprocess.run(
                command, cwd=copy, env=child_env(copy), capture_output=True, text=True
            )
            paths = result.stdout.split()
            if result.returncode != 0 or len(paths) != 2:
                problems.append(f"{how}: exit {result.returncode}: {result.stderr[-2000:]}")
            for path in paths:
                if not Path(path).resolve().is_relative_to(copy.resolve()):
                    problems.append(f"{how}: imported {path}, outside the copy {copy}")
    finally:
        probe.unlink()
    return problems


@dataclasses.dataclass
class Run:
    returncode: int | None
    """None: timed out."""
    seconds: float
    output: str


def run_tests(copy: Path, tests: tuple[str, ...], timeout_s: float) -> Run:
    """`pytest -x -q TESTS` in the copy, in its own session (killed whole on time-out)."""
    command = [sys.executable, "-m", "pytest", "-x", "-q", "-p", "no:cacheprovider", *tests]
    start = time.perf_counter()
    proc = subprocess.Popen(
        command,
        cwd=copy,
        env=child_env(copy),
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        start_new_session=True,
    )
    try:
        output, _ = proc.communicate(timeout=timeout_s)
        returncode: int | None = proc.returncode
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)  # the session: pytest and the ranks it started
        output, _ = proc.communicate()
        returncode = None
    return Run(returncode, time.perf_counter() - start, output)


def outcome(run: Run) -> str:
    """pytest exit 1 (tests failed) kills a mutant; 0 lets it survive; anything else is an
    error of the check itself (time-out, collection error, no such test)."""
    if run.returncode is None:
        return "TIMEOUT"
    return {0: "SURVIVED", 1: "killed"}.get(run.returncode, f"ERROR (pytest exit {run.returncode})")


def format_table(rows: list[tuple[str, str, str, str]]) -> str:
    header = ("mutant", "tests", "result", "seconds")
    widths = [max(len(row[i]) for row in [header, *rows]) for i in range(4)]
    lines = [
        "  ".join(cell.ljust(w) for cell, w in zip(row, widths, strict=True)).rstrip()
        for row in [header, *rows]
    ]
    lines.insert(1, "  ".join("-" * w for w in widths))
    return "\n".join(lines)


def short(test: str) -> str:
    return test.replace("tests/", "", 1)


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--only", help="Comma-separated mutant names (default: all).")
    p.add_argument("--list", action="store_true", help="List the mutants and their tests.")
    p.add_argument(
        "--timeout", type=float, default=300, help="Seconds per pytest run (default 300)."
    )
    p.add_argument("--keep", action="store_true", help="Keep the temporary copies.")
    p.add_argument(
        "--jobs",
        type=int,
        default=1,
        help="Mutants tested at once, each in its own copy (default 1; CI uses 2).",
    )
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.list:
        for m in MUTANTS:
            print(f"{m.name}: {m.fault} ({m.path})\n    " + "\n    ".join(m.tests))
        return 0
    mutants = list(MUTANTS)
    if args.only:
        names = args.only.split(",")
        unknown = sorted(set(names) - {m.name for m in MUTANTS})
        if unknown:
            print(f"unknown mutant(s): {', '.join(unknown)}; see --list", file=sys.stderr)
            return 2
        mutants = [m for m in MUTANTS if m.name in names]

    mutated = {}  # fail before any test runs if an anchor is gone
    try:
        for m in mutants:
            mutated[m.name] = mutate((REPO / m.path).read_text(encoding="utf-8"), m)
    except AnchorError as exc:
        print(f"mutation check: {exc}", file=sys.stderr)
        return 1

    work = Path(tempfile.mkdtemp(prefix="dstrain-mutants-"))
    started = time.perf_counter()
    try:
        baseline_copy = copy_repo(work / "baseline")
        problems = check_imports_resolve_to(baseline_copy)
        if problems:
            print("mutation check: the copy is not what gets imported:\n  " + "\n  ".join(problems))
            return 1
        tests = tuple(dict.fromkeys(t for m in mutants for t in m.tests))

        def test_mutant(m: Mutant) -> Run:
            copy = copy_repo(work / m.name)
            (copy / m.path).write_text(mutated[m.name], encoding="utf-8")
            print(f"mutation check: {m.name} ({m.fault})", flush=True)
            run = run_tests(copy, m.tests, args.timeout)
            if not args.keep:
                shutil.rmtree(copy, ignore_errors=True)
            return run

        # The baseline first, then each mutant in its own copy and session (tests pick free
        # ports), `--jobs` at a time; a mutant's result counts only once the baseline passed.
        print(f"mutation check: baseline, {len(tests)} test(s) on the unmutated copy", flush=True)
        with concurrent.futures.ThreadPoolExecutor(max_workers=max(1, args.jobs)) as pool:
            pending = pool.submit(run_tests, baseline_copy, tests, args.timeout * 2)
            futures = [pool.submit(test_mutant, m) for m in mutants]
            baseline = pending.result()
            if baseline.returncode != 0:
                pool.shutdown(cancel_futures=True)
                print(baseline.output[-6000:])
                print(
                    "mutation check: the named tests fail without any mutant "
                    f"({outcome(baseline)}); fix them first: a failure under a mutant would "
                    "prove nothing"
                )
                return 1
            runs = [future.result() for future in futures]
        rows = [
            ("(baseline)", f"{len(tests)} tests, unmutated", "passed", f"{baseline.seconds:.0f}")
        ]
        failed = []
        for m, run in zip(mutants, runs, strict=True):
            result = outcome(run)
            rows.append((m.name, ", ".join(map(short, m.tests)), result, f"{run.seconds:.0f}"))
            if result != "killed":
                failed.append(m.name)
                if result != "SURVIVED":
                    print(run.output[-4000:])
    finally:
        if args.keep:
            print(f"copies kept in {work}")
        else:
            shutil.rmtree(work, ignore_errors=True)
    print()
    print(format_table(rows))
    print(
        f"\n{len(mutants) - len(failed)} of {len(mutants)} mutants killed in "
        f"{time.perf_counter() - started:.0f} s"
    )
    if failed:
        print(
            f"mutation check failed: {', '.join(failed)}. A survivor means its tests pass with "
            "the fault in place: strengthen them (see each mutant's fault in scripts/mutants.py)."
        )
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
