#!/usr/bin/env python
"""Scale benchmarks: what the model costs a rank to start, and the memory estimate against
measured peaks. Kept apart from scripts/bench.py (whose results are tied to its sha256 and
take ~40 min to redo), with its own results file and README block.

    .venv/bin/python scripts/bench_scale.py                  # full run, 2 CPU ranks
    .venv/bin/python scripts/bench_scale.py --update-readme  # ... and refresh README's block
    .venv/bin/python scripts/bench_scale.py --quick -o /tmp/scale.json   # genslm_tiny only

Writes scripts/bench-scale-results.json (machine, versions, git commit, this file's
sha256, every raw figure, targets, met or missed).

1. Start-up memory (`--only startup`): per rank on 2 CPU ranks, the peak RSS through
   model construction and `deepspeed.initialize` minus the RSS just before the model is
   built (after imports and process-group set-up), ZeRO-3 bf16, for genslm_small,
   genslm_25M and genslm_250M: the model built whole on every rank and then partitioned
   (before) vs built inside `deepspeed.zero.Init` (after). Target: after <= 60% of before
   at genslm_250M.
2. Calibration (`--only calibration`): the memory estimate's total per rank vs the
   measured peak RSS above the same baseline over 2-3 training steps, 2 CPU ranks, ZeRO
   stages 0-3, for genslm_small, genslm_25M and genslm_250M. Target: within 10%.
"""

from __future__ import annotations

import argparse
import datetime
import json
import sys
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
RESULTS_PATH = ROOT / "scripts" / "bench-scale-results.json"
README_PATH = ROOT / "README.md"
README_BEGIN = "<!-- bench-scale:begin (written by scripts/bench_scale.py --update-readme) -->"
README_END = "<!-- bench-scale:end -->"
SECTIONS = ("startup", "calibration")


STARTUP_MODELS = ("genslm_small", "genslm_25M", "genslm_250M")
STARTUP_TARGET = 0.60
"""after / before allowed at genslm_250M (the peak above the baseline, worst rank)."""
STARTUP_TARGET_MODEL = "genslm_250M"
STARTUP_WIDER_RANKS = 4
"""Ranks of the extra measurement of the target model (the trend with more ranks)."""

# One rank of the start-up measurement, run as `python -c` by `_startup_run` with the
# rendezvous variables set: dstrain's own `build_engine` (what `dstrain train` runs), given
# ZeRO-3 bf16 and zero_init on ("after") or off ("before"). argv: MODEL SIDE OUT_DIR.
_STARTUP_RANK_CODE = r"""
import gc, json, os, sys
from pathlib import Path

def status(field):
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1]) * 1024
    raise RuntimeError(field)

model, side, out = sys.argv[1], sys.argv[2], Path(sys.argv[3])
from dstrain.ds_runtime import prepare_deepspeed
prepare_deepspeed(timeout_s=600)
import deepspeed
import deepspeed.runtime.zero.stage3  # noqa: F401 (imported before the baseline)
import transformers.initialization  # noqa: F401
import transformers.integrations.deepspeed  # noqa: F401
from dstrain.architectures import resolve_architecture
from dstrain.ds_config import build_ds_config, render_ds_config
from dstrain.ds_run import load_ds_run
from dstrain.model import build_model  # noqa: F401 (transformers' GPT-NeoX)
from dstrain.settings import TrainSettings, make_deepspeed_settings
from dstrain.train import build_engine

deepspeed.init_distributed(dist_backend="gloo")
rank = int(os.environ["RANK"])
config = build_ds_config(make_deepspeed_settings({
    "precision": "bf16", "zero_optimization": {"stage": 3}, "scheduler": {"type": "none"},
    "batch": {"train_micro_batch_size_per_gpu": 1}, "steps_per_print": 10**9,
}))
path = out / f"ds_{side}.json"
if rank == 0:
    path.write_text(render_ds_config(config))
deepspeed.comm.barrier()
checked = load_ds_run(str(path), world_size=int(os.environ["WORLD_SIZE"]))
settings = TrainSettings(model=model, zero_init=side == "after", output_dir=str(out))
arch = resolve_architecture(model)
gc.collect()
deepspeed.comm.barrier()
marks = {}
initialize = deepspeed.initialize

def initialize_marked(*args, **kwargs):  # the build is over: the model is ready to wrap
    marks["build_peak"] = status("VmHWM")
    marks["build_rss"] = status("VmRSS")
    return initialize(*args, **kwargs)

deepspeed.initialize = initialize_marked
baseline = status("VmRSS")
Path("/proc/self/clear_refs").write_text("5")  # VmHWM := VmRSS
engine, _ = build_engine(arch, settings, checked)
peak = status("VmHWM")
result = {
    "rank": rank,
    "baseline_rss_bytes": baseline,
    "peak_rss_bytes": peak,
    "model_peak_bytes": peak - baseline,
    "build_peak_bytes": marks["build_peak"] - baseline,
    "built_rss_bytes": marks["build_rss"] - baseline,
    "after_init_rss_bytes": status("VmRSS") - baseline,
    "num_params": arch.num_params(),
    "zero_stage": engine.zero_optimization_stage(),
    "partitioned_at_build": side == "after",
}
(out / f"{side}_rank{rank}.json").write_text(json.dumps(result))
deepspeed.comm.barrier()
"""


def _startup_run(model: str, side: str, out_dir: Path, ranks: int = 2) -> list[dict[str, Any]]:
    """One start-up measurement: `ranks` processes of `_STARTUP_RANK_CODE`, their results."""
    import os
    import subprocess

    from dstrain.ds_runtime import free_port

    env = dict(
        os.environ,
        OMP_NUM_THREADS="1",
        DS_ACCELERATOR="cpu",
        MALLOC_MMAP_THRESHOLD_="65536",  # freed large blocks go back to the kernel at once
        MASTER_ADDR="127.0.0.1",
        MASTER_PORT=str(free_port()),
        WORLD_SIZE=str(ranks),
        PYTHONPATH=str(ROOT),
    )
    procs = [
        subprocess.Popen(
            [sys.executable, "-c", _STARTUP_RANK_CODE, model, side, str(out_dir)],
            env={**env, "RANK": str(rank), "LOCAL_RANK": str(rank)},
            stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE,
            text=True,
        )
        for rank in range(ranks)
    ]
    errors = [p.communicate(timeout=1800)[1] for p in procs]
    for rank, proc in enumerate(procs):
        if proc.returncode != 0:
            raise SystemExit(f"start-up {model} {side} rank {rank} failed:\n{errors[rank][-3000:]}")
    return [json.loads((out_dir / f"{side}_rank{r}.json").read_text()) for r in range(ranks)]


def bench_startup(quick: bool) -> dict[str, Any]:
    """Section 1 (see the module docstring): per rank, 2 CPU ranks, ZeRO-3 bf16, dstrain's
    `build_engine` (model + `deepspeed.initialize`), --no-zero-init (before) vs the default
    zero.Init build (after)."""
    import tempfile

    models = ("genslm_tiny",) if quick else STARTUP_MODELS
    rows: dict[str, Any] = {}
    for model in models:
        row: dict[str, Any] = {}
        for side in ("before", "after"):
            with tempfile.TemporaryDirectory(prefix="dstrain-startup-") as tmp:
                started = time.time()
                ranks = _startup_run(model, side, Path(tmp))
            row[side] = {
                "ranks": ranks,
                "model_peak_bytes": max(r["model_peak_bytes"] for r in ranks),
                "build_peak_bytes": max(r["build_peak_bytes"] for r in ranks),
                "seconds": round(time.time() - started, 1),
            }
            print(
                f"start-up {model} {side}: {row[side]['model_peak_bytes'] / 2**20:.0f} MiB "
                f"(build {row[side]['build_peak_bytes'] / 2**20:.0f} MiB)"
            )
        psi = row["num_params"] = row["after"]["ranks"][0]["num_params"]
        before, after = row["before"]["model_peak_bytes"], row["after"]["model_peak_bytes"]
        row["ratio"] = round(after / before, 4)
        before, after = row["before"]["build_peak_bytes"], row["after"]["build_peak_bytes"]
        row["build_ratio"] = round(after / before, 4)
        # What no build can shrink: what the engine itself holds once initialize returns
        # (16-bit partition, fp32 master partition, gradient partition, buckets).
        row["engine_rss_bytes"] = max(r["after_init_rss_bytes"] for r in row["after"]["ranks"])
        row["fp32_model_bytes"] = 4 * psi  # what the old path builds on every rank
        rows[model] = row
    target_model = models[-1] if quick else STARTUP_TARGET_MODEL
    ratio = rows[target_model]["ratio"]
    # The same model on more ranks (4 on one box): the engine's partitions shrink with the
    # rank count, the old path's whole-model build does not.
    wider: dict[str, Any] = {"model": target_model, "ranks": STARTUP_WIDER_RANKS}
    for side in ("before", "after"):
        with tempfile.TemporaryDirectory(prefix="dstrain-startup-") as tmp:
            ranks = _startup_run(target_model, side, Path(tmp), ranks=STARTUP_WIDER_RANKS)
        wider[side] = {
            "ranks": ranks,
            "model_peak_bytes": max(r["model_peak_bytes"] for r in ranks),
            "build_peak_bytes": max(r["build_peak_bytes"] for r in ranks),
        }
    wider["ratio"] = round(
        wider["after"]["model_peak_bytes"] / wider["before"]["model_peak_bytes"], 4
    )
    print(
        f"start-up {target_model} on {STARTUP_WIDER_RANKS} ranks: after/before {wider['ratio']:.0%}"
    )
    return {
        "wider": wider,
        "what": "peak RSS through build_engine (model + deepspeed.initialize) minus the RSS "
        "just before (imports and process group done), per rank, worst of 2 CPU ranks, "
        "ZeRO-3 bf16; before = --no-zero-init, after = zero.Init (the default). build_*: "
        "the same peak up to the call of deepspeed.initialize (the model built, before the "
        "engine allocates its optimizer state)",
        "models": rows,
        "target": {"model": target_model, "max_ratio": STARTUP_TARGET},
        "ratio": ratio,
        "met": ratio <= STARTUP_TARGET,
        "build_ratio": rows[target_model]["build_ratio"],
        "build_met": rows[target_model]["build_ratio"] <= STARTUP_TARGET,
    }


CALIBRATION_SEQ_LEN = 512
"""Tokens per sequence for the calibration figure: long enough that activations show
(genslm_250M: ~0.4 GiB of them per rank), short enough for 2 CPU ranks."""
CALIBRATION_STEPS = 2
"""Steps per stage: the second (timed) one runs with Adam's state from the first, so the
peak is reached; genslm_250M takes about a minute a step on 2 CPU ranks in bf16."""
CALIBRATION_TARGET = 0.10
"""|measured / estimated - 1| allowed, on the total above the baseline."""
CALIBRATION_RAM_GIB = 18.0
"""The most RAM the calibration's ranks may hold together (they are killed beyond it)."""


def bench_calibration(quick: bool) -> dict[str, Any]:
    """Section 2 (see the module docstring): `dstrain estimate --measure`'s own code on 2 CPU
    ranks, bf16, micro batch 1, ZeRO stages 0-3, one launch per stage."""
    from dstrain.calibrate import CalibrationRequest, calibration_to_json, run_calibration
    from dstrain.memory import GIB

    models = ["genslm_tiny"] if quick else ["genslm_small", "genslm_25M", "genslm_250M"]
    available_gib = _mem_available_bytes() / GIB
    rows, notes = [], []
    for model in models:
        request = CalibrationRequest(
            model=model,
            ranks=2,
            seq_len=CALIBRATION_SEQ_LEN,
            precision="bf16",
            stages=(0, 1, 2, 3),
            micro_batches=(1,),
            checkpointing=(False,),
            offloads=("none",),
            steps=CALIBRATION_STEPS,
            max_candidates=4,
            cpu_mem_gib=min(CALIBRATION_RAM_GIB, available_gib),
        )
        result = calibration_to_json(run_calibration(request, progress=print))
        for row in result["candidates"]:
            ratio = row["ratio"]
            rows.append(
                {
                    "model": model,
                    "stage": row["stage"],
                    "status": row["status"],
                    "estimate_total_bytes": row["estimate_total_bytes"],
                    "estimate_peak_bytes": row["estimate_peak_bytes"],
                    "measured_peak_bytes": row["measured_peak_bytes"],
                    "measured_init_peak_bytes": row["measured_init_peak_bytes"],
                    "baseline_bytes": row["baseline_bytes"],
                    "ratio": ratio,
                    "step_time_s": row["step_time_s"],
                    "met": ratio is not None and abs(ratio - 1) <= CALIBRATION_TARGET,
                }
            )
        notes += [f"{model}: {note}" for note in result["notes"]]
    return {
        "ranks": 2,
        "precision": "bf16",
        "micro_batch": 1,
        "seq_len": CALIBRATION_SEQ_LEN,
        "steps": CALIBRATION_STEPS,
        "ram_limit_gib": round(min(CALIBRATION_RAM_GIB, available_gib), 2),
        "target": f"|measured / peak - 1| <= {CALIBRATION_TARGET:.0%}",
        "rows": rows,
        "met": bool(rows) and all(row["met"] for row in rows),
        "notes": notes,
    }


def _mem_available_bytes() -> int:
    for line in Path("/proc/meminfo").read_text().splitlines():
        if line.startswith("MemAvailable:"):
            return int(line.split()[1]) * 1024
    raise SystemExit("/proc/meminfo has no MemAvailable")


def startup_lines(results: dict[str, Any]) -> list[str]:
    """README lines (markdown) for section 1."""
    section = results.get("benchmarks", {}).get("startup")
    if not section:
        return []
    mib = 2**20
    lines = [
        "Start-up memory the model costs a rank (ZeRO-3 bf16, 2 CPU ranks, worst rank, MiB "
        "above the RSS just before the model is built): peak through the build alone "
        "(up to `deepspeed.initialize`) and through `deepspeed.initialize` too; before = "
        "`--no-zero-init`, after = zero.Init (the default).",
        "",
        "| model | params | build: before | after | after/before "
        "| with initialize: before | after | after/before | engine after initialize |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for model, row in section["models"].items():
        b, a = row["before"], row["after"]
        lines.append(
            f"| {model} | {row['num_params']:,} | {b['build_peak_bytes'] / mib:,.0f} "
            f"| {a['build_peak_bytes'] / mib:,.0f} | {row['build_ratio']:.0%} "
            f"| {b['model_peak_bytes'] / mib:,.0f} | {a['model_peak_bytes'] / mib:,.0f} "
            f"| {row['ratio']:.0%} | {row['engine_rss_bytes'] / mib:,.0f} |"
        )
    target = section["target"]
    lines += [
        "",
        f"Target: after <= {target['max_ratio']:.0%} of before at {target['model']}. "
        f"Build: {'met' if section['build_met'] else 'missed'} ({section['build_ratio']:.0%}); "
        f"with initialize: {'met' if section['met'] else 'missed'} ({section['ratio']:.0%})"
        + (
            "."
            if section["met"]
            else ": on 2 ranks `deepspeed.initialize` itself (fp32 master and gradient "
            "partitions, buffers) peaks higher than the old path's whole fp32 model, and "
            "after that model is freed, so it sets the peak on both paths; its share shrinks "
            "as ranks are added, the whole-model build's does not."
        ),
    ]
    wider = section.get("wider")
    if wider:
        lines += [
            "",
            f"The same on {wider['ranks']} ranks ({wider['model']}, with initialize): "
            f"before {wider['before']['model_peak_bytes'] / mib:,.0f} MiB, after "
            f"{wider['after']['model_peak_bytes'] / mib:,.0f} MiB, after/before "
            f"{wider['ratio']:.0%}.",
        ]
    return lines


def calibration_lines(results: dict[str, Any]) -> list[str]:
    """README lines (markdown) for section 2."""
    cal = results.get("benchmarks", {}).get("calibration")
    if not cal:
        return []

    def size(nbytes: int | None) -> str:
        return "-" if nbytes is None else f"{nbytes / 2**20:,.1f}"

    lines = [
        f"Memory estimate vs measured peak, per rank on {cal['ranks']} CPU ranks "
        f"({cal['precision']}, micro batch {cal['micro_batch']}, {cal['seq_len']} tokens, "
        f"{cal['steps']} steps; MiB; `dstrain estimate --measure`'s code). total = `dstrain "
        "estimate`'s total; peak = its peak (activations and the gradients made after them "
        "counted once), with only the gradient-bucket pages that gradients fill (a GPU "
        "allocates the whole bucket, a CPU backs only the pages written); measured = peak RSS "
        "above the baseline (the RSS after imports, process-group set-up and a throwaway "
        f"12k-parameter engine's step). Target: {cal['target']}.",
        "",
        "| model | ZeRO | total | peak | measured | measured / peak | baseline "
        "| start-up peak | s/step | met |",
        "| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |",
    ]
    for row in cal["rows"]:
        ratio = "-" if row["ratio"] is None else f"{row['ratio']:.3f}"
        step = "-" if row["step_time_s"] is None else f"{row['step_time_s']:.2f}"
        met = "yes" if row["met"] else ("no" if row["ratio"] is not None else row["status"])
        lines.append(
            f"| {row['model']} | {row['stage']} | {size(row['estimate_total_bytes'])} "
            f"| {size(row['estimate_peak_bytes'])} | {size(row['measured_peak_bytes'])} "
            f"| {ratio} | {size(row['baseline_bytes'])} | {size(row['measured_init_peak_bytes'])} "
            f"| {step} | {met} |"
        )
    for note in cal.get("notes", []):
        lines += ["", f"- {note}"]
    return lines


def render_readme_block(results: dict[str, Any]) -> str:
    return "\n".join([*startup_lines(results), "", *calibration_lines(results)]).strip("\n")


def update_readme(results: dict[str, Any], readme: Path = README_PATH) -> None:
    text = readme.read_text(encoding="utf-8")
    if README_BEGIN not in text or README_END not in text:
        raise SystemExit(f"{readme}: the scale block markers are missing ({README_BEGIN})")
    before, rest = text.split(README_BEGIN, 1)
    _, after = rest.split(README_END, 1)
    block = render_readme_block(results)
    readme.write_text(f"{before}{README_BEGIN}\n{block}\n{README_END}{after}", encoding="utf-8")


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--quick", action="store_true", help="genslm_tiny only: seconds.")
    p.add_argument("-o", "--output", type=Path, default=None)
    p.add_argument("--only", help="Comma-separated subset: " + ", ".join(SECTIONS))
    p.add_argument("--update-readme", action="store_true")
    args = p.parse_args(argv)
    sys.path.insert(0, str(ROOT / "scripts"))
    from bench import bench_py_sha256, git_state, machine_info, versions

    parts = (args.only or ",".join(SECTIONS)).split(",")
    started = time.time()
    benchmarks: dict[str, Any] = {}
    if "startup" in parts:
        benchmarks["startup"] = bench_startup(args.quick)
    if "calibration" in parts:
        benchmarks["calibration"] = bench_calibration(args.quick)
    results = {
        "command": "python scripts/bench_scale.py" + (" --quick" if args.quick else ""),
        "mode": "quick" if args.quick else "full",
        "date": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
        "duration_s": round(time.time() - started, 1),
        "git": {**git_state(), "bench_scale_py_sha256": bench_py_sha256(Path(__file__))},
        "machine": machine_info(),
        "versions": versions(),
        "benchmarks": benchmarks,
    }
    output = args.output or RESULTS_PATH
    output.write_text(json.dumps(results, indent=2) + "\n", encoding="utf-8")
    print(render_readme_block(results))
    print(f"wrote {output}")
    if args.update_readme:
        update_readme(results)
    return 0


if __name__ == "__main__":
    sys.exit(main())
