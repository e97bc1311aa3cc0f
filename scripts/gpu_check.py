#!/usr/bin/env python
"""GPU check: the GPU tests, then throughput, MFU and peak memory vs the estimate, on one GPU.

    python scripts/gpu_check.py                       # on a GPU box: ~6 min on one H100/H200
    python scripts/gpu_check.py --dry-run -o /tmp/g.json   # CPU smoke run (toy sizes)

Writes scripts/gpu-results.json (device, driver, versions, commit, every figure) and prints
a table. Steps, in order (the results file is rewritten after each one, so a run cut short
still leaves what it measured):

1. `pytest tests/test_gpu.py` (skipped tests on a machine without CUDA). Its configs leave
   `torch_adam` out, so DeepSpeed's FusedAdam is JIT-built here on first use (~1 min,
   cached in ~/.cache/torch_extensions for every later run).
2. A device probe in a child process: name, memory, and the rate of an 8192^3 bf16
   matrix product on random data (median of 10 after 3 warm-ups): the practical ceiling.
3. The GPU test's own runs again (genslm_25M, bundled H3N2 data, micro batch 8, bf16,
   ZeRO-2 and ZeRO-3, 5 steps), to record the measured / estimated peak ratio the test
   bounds (PEAK_OVER_ESTIMATE in tests/test_gpu.py); pytest only says pass or fail.
4. genslm_25M and genslm_250M at 2048 codons (random full-length records, no padding),
   ZeRO-2, one GPU, a few micro batch sizes: `python -m dstrain.train` (the real
   training loop, one fresh process per case) on dstrain's GPU defaults: no precision
   flag (bf16 where the GPU has it natively), no optimizer flag (the config leaves
   `torch_adam` out and `dstrain train` picks FusedAdam on CUDA), SDPA attention; one
   case again with `--torch-adam` (what FusedAdam buys). The banner's device line gives
   each case's device, precision, optimizer and attention. Per case: tokens/s and
   steps/s from metrics.jsonl (the first logged window, with start-up and warm-up,
   dropped; the median of the rest), MFU, and the peak of
   torch.cuda.max_memory_allocated() (training rows, and the whole run from
   summary.json) over dstrain's estimate for that run.
5. Where `--batching packed` exists: genslm_25M on mixed-length records (100-2048
   codons), random batches of 8 vs packed rows of 16,384 tokens: useful (non-pad)
   tokens/s of each.

MFU = tokens/s x model FLOPs per token / peak, FLOPs per token = 6 x matmul parameters
(all parameters less the input embedding, a lookup) + 12 x layers x hidden x seq_len
(attention scores and values, full not causal: the usual convention; the same formula as
scripts/bench.py). Reported against the dense bf16 data-sheet peak (989.4 TFLOP/s for
H100 SXM / H200) and against the matrix-product rate measured in step 2.
"""

from __future__ import annotations

import argparse
import dataclasses
import hashlib
import json
import os
import platform
import random
import re
import shutil
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

SPEC_BF16_PEAK = (
    # Dense bf16 tensor-core peak per GPU (vendor data sheets), matched against the
    # device name in this order.
    ("H100 PCIe", 756e12),
    ("H100 NVL", 835e12),
    ("H100", 989.4e12),
    ("H200", 989.4e12),
    ("A100", 312e12),
)


@dataclasses.dataclass(frozen=True)
class Case:
    model: str
    micro: int
    flags: tuple[str, ...] = ()
    """More `dstrain.train` flags (`--torch-adam`, `--batching packed ...`)."""
    mixed: bool = False
    """Mixed-length records (Plan.shortest to seq_len codons) instead of full-length ones."""
    label: str = ""
    """Name suffix; default: the flags without dashes."""

    @property
    def name(self) -> str:
        label = self.label or "-".join(f.removeprefix("--") for f in self.flags)
        return "-".join(x for x in (self.model, f"m{self.micro}", self.mixed * "mixed", label) if x)


def packed_cases(model: str, micro: int, tokens: int) -> tuple[Case, ...]:
    """random vs packed batches of mixed-length records, where dstrain has --batching."""
    from dstrain.settings import DataSettings

    field = DataSettings.model_fields.get("batching")
    if field is None or "packed" not in str(field.annotation):
        return ()
    packed = ("--batching", "packed", "--tokens-per-micro-batch", str(tokens))
    return (
        Case(model, micro, ("--batching", "random"), mixed=True, label="random"),
        Case(model, micro, packed, mixed=True, label=f"packed{tokens}"),
    )


@dataclasses.dataclass(frozen=True)
class Plan:
    cases: tuple[Case, ...]
    """At seq_len, ZeRO-2, dstrain's GPU defaults, in the order run (most wanted first:
    a run cut short by --budget-s still has them)."""
    seq_len: int
    steps: int
    warmup_steps: int
    records: int
    test_model: str
    test_steps: int
    case_timeout_s: float

    @property
    def shortest(self) -> int:
        """Codons in the shortest mixed-length record."""
        return min(100, self.seq_len // 4)


FULL = Plan(
    cases=(
        Case("genslm_25M", 8),
        Case("genslm_250M", 8),
        Case("genslm_250M", 8, ("--torch-adam",)),
        Case("genslm_25M", 16),
        Case("genslm_250M", 16),
        *packed_cases("genslm_25M", 8, 16384),
        Case("genslm_25M", 32),
    ),
    seq_len=2048,
    steps=30,
    warmup_steps=5,
    records=320,
    test_model="genslm_25M",
    test_steps=5,
    case_timeout_s=150,
)
DRY = Plan(
    cases=(
        Case("genslm_tiny", 2),
        Case("genslm_tiny", 2, ("--torch-adam",)),
        *packed_cases("genslm_tiny", 2, 256),
    ),
    seq_len=64,
    steps=6,
    warmup_steps=2,
    records=48,
    test_model="genslm_tiny",
    test_steps=2,
    case_timeout_s=300,
)

DEVICE_LINE = re.compile(
    # the banner's per-device choices (dstrain.train.device_line)
    r"^  device (?P<device>\S+)(?: \((?P<gpu>[^)]*)\))? \| (?P<precision>\w+) \| "
    r"(?P<optimizer>.+) \| attention (?P<attention>\S+)$",
    re.MULTILINE,
)
PEAK_LINE = re.compile(
    r"peak GPU memory: measured ([\d.]+) GiB, estimated ([\d.]+) GiB for ZeRO-(\d) "
    r"\(measured / estimated = ([\d.]+)\)"
)


def say(message: str = "") -> None:
    print(message, flush=True)


# --------------------------------------------------------------------------------------
# Provenance
# --------------------------------------------------------------------------------------


def sha256_of(paths: list[Path]) -> str:
    digest = hashlib.sha256()
    for path in paths:
        digest.update(str(path.relative_to(ROOT)).encode() + b"\0" + path.read_bytes())
    return digest.hexdigest()


def provenance() -> dict[str, Any]:
    try:
        commit = subprocess.run(
            ["git", "rev-parse", "HEAD"], cwd=ROOT, capture_output=True, text=True, check=True
        ).stdout.strip()
        status = subprocess.run(
            ["git", "status", "--porcelain", "dstrain", "tests", "scripts/gpu_check.py"],
            cwd=ROOT,
            capture_output=True,
            text=True,
            check=True,
        ).stdout
        dirty: bool | None = bool(status.strip())
    except (OSError, subprocess.CalledProcessError):
        # a copy without .git (git archive): the caller names the commit
        commit, dirty = os.environ.get("GPU_CHECK_COMMIT"), None
    return {
        "commit": commit,
        "uncommitted_changes": dirty,
        "dstrain_sources_sha256": sha256_of(sorted((ROOT / "dstrain").glob("*.py"))),
        "gpu_check_py_sha256": sha256_of([Path(__file__).resolve()]),
        "test_gpu_py_sha256": sha256_of([ROOT / "tests" / "test_gpu.py"]),
    }


def versions() -> dict[str, str | None]:
    from importlib import metadata

    out: dict[str, str | None] = {"python": platform.python_version()}
    for name in (
        "torch",
        "deepspeed",
        "transformers",
        "tokenizers",
        "safetensors",
        "pydantic",
        "numpy",
        "biopython",
        "pytest",
    ):
        try:
            out[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            out[name] = None
    return out


def nvidia_smi() -> dict[str, str] | None:
    fields = "name,driver_version,memory.total,clocks.max.sm,power.limit"
    try:
        line = subprocess.run(
            ["nvidia-smi", f"--query-gpu={fields}", "--format=csv,noheader"],
            capture_output=True,
            text=True,
            timeout=30,
            check=True,
        ).stdout.splitlines()[0]
    except (OSError, subprocess.SubprocessError, IndexError):
        return None
    return dict(zip(fields.split(","), (v.strip() for v in line.split(",")), strict=False))


# --------------------------------------------------------------------------------------
# Device probe (child process: keeps CUDA out of this one)
# --------------------------------------------------------------------------------------


def probe() -> dict[str, Any]:
    import torch

    info: dict[str, Any] = {
        "cuda_available": torch.cuda.is_available(),
        "torch_cuda": torch.version.cuda,
    }
    if not torch.cuda.is_available():
        return info
    props = torch.cuda.get_device_properties(0)
    info |= {
        "name": torch.cuda.get_device_name(0),
        "capability": list(torch.cuda.get_device_capability(0)),
        "total_memory_bytes": props.total_memory,
        "multiprocessors": props.multi_processor_count,
        "bf16_supported": torch.cuda.is_bf16_supported(),
    }
    n = 8192
    gen = torch.Generator(device="cuda").manual_seed(0)
    a = torch.randn(n, n, device="cuda", dtype=torch.bfloat16, generator=gen)
    b = torch.randn(n, n, device="cuda", dtype=torch.bfloat16, generator=gen)
    for _ in range(3):
        a @ b
    times = []
    for _ in range(10):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        a @ b
        end.record()
        torch.cuda.synchronize()
        times.append(start.elapsed_time(end) / 1e3)
    info["matmul_8192_bf16_tflops"] = round(2 * n**3 / statistics.median(times) / 1e12, 1)
    return info


def run_probe() -> dict[str, Any]:
    done = subprocess.run(
        [sys.executable, str(Path(__file__).resolve()), "--probe"],
        capture_output=True,
        text=True,
        timeout=120,
        cwd=ROOT,
    )
    if done.returncode != 0:
        return {"error": done.stderr[-2000:]}
    return json.loads(done.stdout.strip().splitlines()[-1])


# --------------------------------------------------------------------------------------
# Training runs
# --------------------------------------------------------------------------------------


def write_fasta(
    path: Path, records: int, codons: int, seed: int = 0, *, shortest: int | None = None
) -> None:
    """Random records of exactly `codons` codons (no stop codons), one training example each
    at --max-length `codons`; with `shortest`, of a length drawn from [shortest, codons]."""
    rng = random.Random(seed)
    sense = [
        a + b + c
        for a in "ACGT"
        for b in "ACGT"
        for c in "ACGT"
        if a + b + c not in ("TAA", "TAG", "TGA")
    ]
    with open(path, "w", encoding="ascii") as out:
        for i in range(records):
            length = codons if shortest is None else rng.randint(shortest, codons)
            seq = "".join(rng.choice(sense) for _ in range(length))
            lines = "\n".join(seq[j : j + 60] for j in range(0, len(seq), 60))
            out.write(f">synthetic_{i}\n{lines}\n")


def train(out_dir: Path, args: list[str], timeout_s: float, env: dict[str, str]) -> tuple[int, str]:
    """`python -m dstrain.train ARGS` (a fresh process); (exit code, its output)."""
    log = out_dir.parent / f"{out_dir.name}.log"
    command = [sys.executable, "-m", "dstrain.train", "--output-dir", str(out_dir), *args]
    code, output = run_captured(command, timeout_s, env=env)
    log.write_text(output)
    return code, output


def run_captured(
    command: list[str], timeout_s: float, env: dict[str, str] | None = None
) -> tuple[int, str]:
    """(exit code, stdout and stderr together) of `command` run in the repository; a
    time-out is exit code 124 with what was printed until then."""
    try:
        done = subprocess.run(
            command,
            cwd=ROOT,
            env=env,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
            timeout=timeout_s,
        )
    except subprocess.TimeoutExpired as exc:
        raw = exc.stdout or ""
        return 124, (raw.decode(errors="replace") if isinstance(raw, bytes) else raw) + "\nTIMEOUT"
    return done.returncode, done.stdout


def train_flops_per_token(arch, seq_len: int) -> int:
    matmul_params = arch.num_params() - arch.vocab_size * arch.hidden_size
    return 6 * matmul_params + 12 * arch.num_layers * arch.hidden_size * seq_len


def spec_peak(device_name: str | None) -> float | None:
    for key, flops in SPEC_BF16_PEAK:
        if device_name and key in device_name:
            return flops
    return None


def run_estimate(out_dir: Path, model: str, seq_len: int, micro: int) -> dict[str, int]:
    """dstrain's estimate for the run in out_dir (its ds_config.json), per GPU, ZeRO stage
    of the config: the numbers `format_peak_comparison` divides by."""
    from dstrain.architectures import get_architecture
    from dstrain.ds_run import load_ds_run
    from dstrain.memory import estimate_for_run

    checked = load_ds_run(str(out_dir / "ds_config.json"), world_size=1)
    estimate = estimate_for_run(
        get_architecture(model), checked.run, 1, 1, seq_len, micro_batch=micro
    )
    row = estimate.stage(checked.run.zero.stage or 0)
    return {
        "total_bytes": row.total_bytes,
        "model_states_bytes": row.model_states_bytes,
        "activations_bytes": row.activations_bytes,
        "comm_buffer_bytes": row.comm_buffer_bytes,
    }


def device_choices(output: str, out_dir: Path) -> dict[str, Any]:
    """What the run chose on this device: the banner's device line, and whether the run's
    ds_config.json (as written, before the per-device choice) names torch_adam."""
    line = DEVICE_LINE.search(output)
    choices: dict[str, Any] = line.groupdict() if line else {"device_line": None}
    try:
        params = json.loads((out_dir / "ds_config.json").read_text())["optimizer"]["params"]
        choices["config_torch_adam"] = params.get("torch_adam", "absent (auto)")
    except (OSError, KeyError, ValueError):
        choices["config_torch_adam"] = None
    return choices


def measure_case(
    work: Path,
    fasta: Path,
    plan: Plan,
    spec: Case,
    env: dict[str, str],
    peaks: dict[str, float | None],
) -> dict[str, Any]:
    from dstrain.architectures import get_architecture

    model, micro = spec.model, spec.micro
    out_dir = work / spec.name
    cache = work / ("cache-mixed" if spec.mixed else "cache")
    args = ["--model", model, "--fasta", str(fasta), "--cache-dir", str(cache)]
    args += ["--max-length", str(plan.seq_len), "--max-steps", str(plan.steps)]
    args += ["--log-every", "1", "--eval-every", "0", "--max-eval-batches", "1"]
    args += ["--no-export", "--no-report", "--no-progress"]
    # No precision or optimizer flag: dstrain's own choice for this device is measured.
    args += ["--zero", "2", "--micro-batch", str(micro), "--steps-per-print", "1000"]
    args += list(spec.flags)
    started = time.time()
    code, output = train(out_dir, args, plan.case_timeout_s, env)
    case: dict[str, Any] = {
        "case": spec.name,
        "model": model,
        "micro_batch": micro,
        "flags": list(spec.flags),
        "data": f"mixed {plan.shortest}-{plan.seq_len} codons" if spec.mixed else "full-length",
        "seq_len": plan.seq_len,
        "zero_stage": 2,
        "exit_code": code,
        "wall_s": round(time.time() - started, 1),
        **device_choices(output, out_dir),
    }
    if code != 0:
        case["error_tail"] = output[-3000:]
        return case
    rows = [json.loads(x) for x in (out_dir / "metrics.jsonl").read_text().splitlines()]
    train_rows = [r for r in rows if "loss" in r]
    # One row per step: drop the warm-up steps (allocation, kernel selection).
    kept = [r for r in train_rows if r["step"] > plan.warmup_steps]
    tokens_s = statistics.median(r["tokens_per_s"] for r in kept)
    useful_s = statistics.median(r.get("useful_tokens_per_s", r["tokens_per_s"]) for r in kept)
    samples_s = statistics.median(r["samples_per_s"] for r in kept)
    before = next(r for r in train_rows if r["step"] == plan.warmup_steps)
    mean_step_s = (kept[-1]["elapsed_s"] - before["elapsed_s"]) / len(kept)
    examples = re.search(r"data: (\d+) train", output)
    arch = get_architecture(model)
    flops_token = train_flops_per_token(arch, plan.seq_len)
    achieved = tokens_s * flops_token
    summary = json.loads((out_dir / "summary.json").read_text())
    estimate = run_estimate(out_dir, model, plan.seq_len, micro)
    train_peak = train_rows[-1].get("cuda_max_allocated_bytes") or train_rows[-1].get("rss_bytes")
    run_peak = summary["peak_memory_bytes"]
    line = PEAK_LINE.search(output)
    case |= {
        "params": arch.num_params(),
        "steps": plan.steps,
        "warmup_steps": plan.warmup_steps,
        "train_examples": int(examples.group(1)) if examples else None,
        "tokens_per_s_per_step": [round(r["tokens_per_s"]) for r in kept],
        "tokens_per_s": round(tokens_s, 1),
        "useful_tokens_per_s": round(useful_s, 1),
        "samples_per_s": round(samples_s, 3),
        "steps_per_s": round(samples_s / micro, 3),
        "mean_s_per_step_incl_epoch_tail": round(mean_step_s, 4),
        "model_flops_per_token": flops_token,
        "model_flops_per_token_6n": 6 * arch.num_params(),
        "achieved_tflops": round(achieved / 1e12, 2),
        "mfu_vs_spec": None if peaks["spec"] is None else round(achieved / peaks["spec"], 4),
        "mfu_vs_measured_matmul": None
        if peaks["measured"] is None
        else round(achieved / peaks["measured"], 4),
        "mfu_6n_vs_spec": None
        if peaks["spec"] is None
        else round(tokens_s * 6 * arch.num_params() / peaks["spec"], 4),
        "peak_memory": "cuda_max_allocated"
        if "cuda_max_allocated_bytes" in train_rows[-1]
        else "rss",
        "train_peak_bytes": train_peak,
        "run_peak_bytes": run_peak,
        "estimate": estimate,
        "train_peak_over_estimate": round(train_peak / estimate["total_bytes"], 4),
        "run_peak_over_estimate": round(run_peak / estimate["total_bytes"], 4),
        "run_banner_ratio": float(line.group(4)) if line else None,
        "final_loss": train_rows[-1]["loss"],
    }
    if spec.mixed:  # rows shorter than seq_len: the MFU formula's attention term is off
        case |= {k: None for k in ("mfu_vs_spec", "mfu_vs_measured_matmul", "mfu_6n_vs_spec")}
    return case


def test_config_case(work: Path, plan: Plan, stage: int, env: dict[str, str]) -> dict[str, Any]:
    """tests/test_gpu.py's run (bundled data, micro 8), in a fresh process: its ratio."""
    out_dir = work / f"testcfg-zero{stage}"
    args = ["--model", plan.test_model, "--max-steps", str(plan.test_steps)]
    args += ["--eval-every", "0", "--no-progress", "--no-report", "--cache-dir", str(work / "ha")]
    args += ["--bf16", "--zero", str(stage), "--micro-batch", "8"]
    code, output = train(out_dir, args, 240, env)
    case: dict[str, Any] = {"model": plan.test_model, "zero_stage": stage, "exit_code": code}
    case |= device_choices(output, out_dir)
    if code != 0:
        case["error_tail"] = output[-3000:]
        return case
    line = PEAK_LINE.search(output)
    summary = json.loads((out_dir / "summary.json").read_text())
    case |= {
        "micro_batch": 8,
        "steps": plan.test_steps,
        "run_peak_bytes": summary["peak_memory_bytes"],
        "banner": line.group(0) if line else None,
        "peak_over_estimate": float(line.group(4)) if line else None,
    }
    return case


# --------------------------------------------------------------------------------------
# Main
# --------------------------------------------------------------------------------------


def run_pytest(work: Path, timeout_s: float = 240) -> dict[str, Any]:
    started = time.time()
    command = [sys.executable, "-m", "pytest", "-rA", "-p", "no:cacheprovider", "tests/test_gpu.py"]
    code, output = run_captured(command, timeout_s)
    (work / "pytest.log").write_text(output)
    lines = output.strip().splitlines()
    return {
        "exit_code": code,
        "summary": lines[-1] if lines else "",
        "results": [x for x in lines if x.startswith(("PASSED", "FAILED", "SKIPPED", "ERROR"))],
        "wall_s": round(time.time() - started, 1),
        "output_tail": "" if code == 0 else output[-4000:],
    }


def table(results: dict[str, Any]) -> str:
    head = (
        f"{'case':<30} {'tok/s':>10} {'useful/s':>10} {'step/s':>7} {'TFLOP/s':>8} "
        f"{'MFU spec':>8} {'MFU meas':>8} {'train pk GiB':>12} {'est GiB':>8} {'pk/est':>6}"
    )
    lines = [head]
    for c in results["cases"]:
        if c.get("exit_code") != 0:
            why = c.get("skipped") or f"FAILED (exit {c['exit_code']})"
            lines.append(f"{c['case']:<30} {why}")
            continue
        mfu = c["mfu_vs_spec"]
        meas = c["mfu_vs_measured_matmul"]
        lines.append(
            f"{c['case']:<30} {c['tokens_per_s']:>10,.0f} {c['useful_tokens_per_s']:>10,.0f} "
            f"{c['steps_per_s']:>7.2f} {c['achieved_tflops']:>8.1f} "
            f"{'n/a' if mfu is None else f'{mfu:.1%}':>8} "
            f"{'n/a' if meas is None else f'{meas:.1%}':>8} "
            f"{c['train_peak_bytes'] / 2**30:>12.2f} "
            f"{c['estimate']['total_bytes'] / 2**30:>8.2f} {c['train_peak_over_estimate']:>6.3f}"
        )
    chosen = {
        f"{c.get('precision')} | {c.get('optimizer')} | attention {c.get('attention')}"
        for c in results["cases"] + results["test_config"]
        if c.get("exit_code") == 0
    }
    lines += [f"chosen: {text}" for text in sorted(chosen)]
    for c in results["test_config"]:
        lines.append(
            f"test config ZeRO-{c['zero_stage']}: " + (c.get("banner") or f"exit {c['exit_code']}")
        )
    lines.append(f"pytest tests/test_gpu.py: {results['pytest'].get('summary')}")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--dry-run", action="store_true", help="toy sizes (a CPU smoke run)")
    p.add_argument("-o", "--out", type=Path, default=ROOT / "scripts" / "gpu-results.json")
    p.add_argument("--work-dir", type=Path, default=Path("/tmp/dstrain-gpu-check"))
    p.add_argument("--skip-pytest", action="store_true")
    p.add_argument("--budget-s", type=float, default=400, help="stop starting cases after")
    p.add_argument("--probe", action="store_true", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.probe:
        print(json.dumps(probe()))
        return 0

    started = time.time()
    plan = DRY if args.dry_run else FULL
    work = args.work_dir
    work.mkdir(parents=True, exist_ok=True)
    env = dict(os.environ, PYTHONUNBUFFERED="1")
    env["PYTHONPATH"] = os.pathsep.join(x for x in (str(ROOT), env.get("PYTHONPATH", "")) if x)
    results: dict[str, Any] = {
        "command": "python scripts/gpu_check.py" + (" --dry-run" if args.dry_run else ""),
        "mode": "dry-run" if args.dry_run else "full",
        "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
        "git": provenance(),
        "versions": versions(),
        "nvidia_smi": nvidia_smi(),
        "machine": {"cpu_count": os.cpu_count(), "platform": platform.platform()},
        "mfu_formula": (
            "achieved FLOP/s = tokens/s x (6 x (params - vocab x hidden) + 12 x layers x "
            "hidden x seq_len); MFU = that / peak. mfu_vs_spec: dense bf16 data-sheet peak; "
            "mfu_vs_measured_matmul: the 8192^3 bf16 matmul rate measured on this device "
            "just before; mfu_6n_vs_spec: 6 x all params per token only"
        ),
        "method": (
            "python -m dstrain.train per case (fresh process), random full-length records "
            f"of {plan.seq_len} codons (no padding; `-mixed` cases: {plan.shortest}-"
            f"{plan.seq_len} codons), ZeRO-2, dstrain's choices for the device (no precision "
            "or optimizer flag unless the case names one; each case's precision, optimizer and "
            f"attention are the banner's device line), {plan.steps} steps, a metrics row per "
            f"step (--log-every 1), the first {plan.warmup_steps} dropped; tokens/s = the "
            "median of the per-step rows (an epoch's last micro-batch is short when train "
            "examples % micro != 0: a slow "
            "outlier the median skips; mean_s_per_step_incl_epoch_tail = elapsed_s between "
            "rows over steps, it included); train peak = torch.cuda.max_memory_allocated() "
            "in the last training row; run peak = summary.json (final eval and save included)"
        ),
        "pytest": {},
        "device": {},
        "test_config": [],
        "cases": [],
    }

    def save() -> None:
        results["duration_s"] = round(time.time() - started, 1)
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(results, indent=2) + "\n")

    if not args.skip_pytest:
        say("== pytest tests/test_gpu.py")
        results["pytest"] = run_pytest(work)
        say(results["pytest"]["summary"])
        save()

    say("== device probe")
    results["device"] = run_probe()
    say(json.dumps(results["device"]))
    device_name = results["device"].get("name")
    measured = results["device"].get("matmul_8192_bf16_tflops")
    peaks = {
        "spec": spec_peak(device_name),
        "measured": measured * 1e12 if measured else None,
    }
    results["peak_flops"] = peaks
    save()

    say("== the GPU test's runs (ratio measured / estimated)")
    for stage in (2, 3):
        results["test_config"].append(test_config_case(work, plan, stage, env))
        say(json.dumps(results["test_config"][-1]))
        save()

    fasta = work / f"synthetic-{plan.seq_len}.fasta"
    write_fasta(fasta, plan.records, plan.seq_len)
    mixed = work / f"synthetic-mixed-{plan.seq_len}.fasta"
    write_fasta(mixed, plan.records, plan.seq_len, shortest=plan.shortest)
    for spec in plan.cases:
        if time.time() - started > args.budget_s:
            results["cases"].append(
                {
                    "case": spec.name,
                    "model": spec.model,
                    "micro_batch": spec.micro,
                    "exit_code": None,
                    "skipped": "budget",
                }
            )
            continue
        say(f"== {spec.name} seq {plan.seq_len}")
        case = measure_case(work, mixed if spec.mixed else fasta, plan, spec, env, peaks)
        results["cases"].append(case)
        say(json.dumps({k: v for k, v in case.items() if k != "error_tail"}))
        if case.get("error_tail"):
            say(case["error_tail"])
        shutil.rmtree(work / spec.name / "checkpoints", ignore_errors=True)
        save()
    save()
    say(table(results))
    failed = results["pytest"].get("exit_code", 0) != 0 or any(
        c.get("exit_code") not in (0, None) for c in results["cases"] + results["test_config"]
    )
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
