#!/usr/bin/env python
"""Benchmarks: what dstrain exists for, side by side with what a user would otherwise run.

    .venv/bin/python scripts/bench.py                   # full run: ~40 min on 2 CPU cores
    .venv/bin/python scripts/bench.py --update-readme   # ... and refresh README's table
    .venv/bin/python scripts/bench.py --quick -o /tmp/bench.json   # seconds (the test's)

Writes scripts/bench-results.json (machine, versions, the git commit and the sha256 of
this file, load average before and after, every raw sample, medians, targets, met or
missed and by how much) and prints a table. After editing this file, run it again:
tests/test_bench.py fails while the results come from another version of it.
Both sides of a comparison run in this one process or back to back, interleaved
(A B A B), several repetitions; the median is reported. Each row also records the share
of the CPU that other processes took meanwhile (the noise it was measured under).

1. Useful tokens/s (non-pad codons) on the bundled H3N2 HA set for genslm_tiny,
   genslm_small and genslm_25M, each side with the same model and ZeRO-2 bf16 config (`dstrain gen-config --zero 2 --bf16 --torch-adam --micro-batch 8`: torch
   AdamW on every side, the HF Trainer and bare engines included), the real
   loop (`dstrain.train.main`, per-step rows of OUTPUT_DIR/metrics.jsonl, warm-up steps
   dropped): `--padding longest` (dstrain's default) vs `--padding max_length
   --loss-on-pad` (upstream GenSLM: every record padded to 2048, pads in the loss).
   Target >= 3.0x.
2. Loop overhead: seconds per optimizer step of `dstrain.train.main` (logging every
   step, progress bar on, evaluation off: the deltas of `elapsed_s` between metric rows)
   vs a bare `engine(**batch).loss; engine.backward(loss); engine.step()` loop over the
   same batches (same cache, CodonCollator, DistributedSampler order, seed, config),
   timed the same way: step end to step end, collation included. Target <= 1.10x.
3. Data preparation of ~100k records resampled from the bundled HA/NA records, both
   sides reading the same FASTA with biopython: `dstrain.prepare.prepare_dataset`
   (hash, parse, clean, encode, write the cache) vs upstream's per-record way (codons
   joined by spaces, the HF tokenizer padding to 2048). Upstream runs on the file's first
   records only and is extrapolated per record; five interleaved repetitions, the median
   ratio and its min-max spread reported. Target >= 10x; cache <= 1 byte per codon
   (upstream's HDF5 cache: int64, 8 bytes per codon).
4. CLI start-up: `dstrain --help` and `dstrain gen-config --zero 2 --bf16` wall time
   beside `python -c pass`. Target <= 0.3 s.
5. Memory estimate: `dstrain.memory`'s `model_states_bytes` vs the bytes two CPU ranks'
   engines hold at the peak of a step (tests/rank_memory_probe.py under torchrun),
   ZeRO 1-3, bf16 and fp32. Target within 2%.
6. With CUDA: MFU of genslm_25M and genslm_250M at 2048 codons (model FLOPs per second
   over the GPU's dense bf16 peak). Skipped on CPU, with a note.
7. Embedding throughput (sequences/s) on the bundled H3N2 HA/NA records, same model, both
   mean over real codons: `dstrain.embed.embed_records` (length-grouped batches, no pad
   past a batch's longest record) vs upstream GenSLM's way (every record tokenized and
   padded to 2048, batches in file order, `output_hidden_states`, masked mean). Both in
   this process, interleaved. Target >= 3.0x.
8. Generation (codons/s): `dstrain.generate.generate_sequences` (its own KV-cache loop,
   special tokens suppressed) vs transformers' `generate` called as upstream's
   `generate_dna` does (top-k 50, top-p 0.95, min_length = max_length, prompt ATG), same
   model, rows and length, interleaved. No target: a figure, with the ratio.
9. Mixed-length set (`--only mixed`): every ORF of >= 30 codons of the bundled SARS-CoV-2
   genomes (`--frame all-orfs`) plus the bundled H3N2 HA/NA records, one token cache at a
   512-codon context; for genslm_small and genslm_25M, same ZeRO-2 bf16 config (micro 4),
   interleaved repetitions of the real loop with `--batching random` (4 sequences per
   micro-batch), `--batching grouped` and `--batching packed` (token budget 2,048 = 4 x
   512, random's worst micro-batch), and the HF Trainer (`train_sampling_strategy=
   "group_by_length"`, micro 4, `deepspeed=` the same JSON, same model and seed, in a
   child process). Useful-token share, useful tokens/s and s/step per side. Targets:
   packed share >= 95%; packed useful tokens/s >= 1.5x random and >= 1.2x the HF Trainer.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import datetime
import gc
import hashlib
import itertools
import json
import os
import platform
import random
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parent.parent
RESULTS_PATH = REPO / "scripts" / "bench-results.json"
README_PATH = REPO / "README.md"
PROBE = REPO / "tests" / "rank_memory_probe.py"
README_BEGIN = "<!-- bench-results:begin (written by scripts/bench.py --update-readme) -->"
README_END = "<!-- bench-results:end -->"

NOISY_SHARE = 0.10
"""Above this share of the CPU taken by other processes a row gets a warning."""
UPSTREAM_MAX_LENGTH = 2048  # upstream GenSLM pads every record to its 2048-codon context
UPSTREAM_H5_ITEMSIZE_BYTES = 8
"""Upstream GenSLM's HDF5 cache stores input_ids and attention_mask with dtype "i8", which
is numpy's int64: 8 bytes per position (ramanathanlab/genslm, genslm/dataset.py,
H5PreprocessMixin.write_h5). Its preprocess() casts to np.int8 in memory first, but the
file's dtype wins."""
MICRO_BATCH = 8


@dataclasses.dataclass(frozen=True)
class ThroughputRuns:
    """One model's share of the throughput comparison."""

    runs: int
    """Runs per side, interleaved (dstrain, upstream, dstrain, ...)."""
    longest_steps: int
    """Optimizer steps per run with dstrain's `--padding longest`."""
    max_length_steps: int
    """Optimizer steps per run padded to 2048 (about 7x slower per step)."""
    warmup_steps: int
    """Leading steps of every run left out of the samples."""


@dataclasses.dataclass(frozen=True)
class MixedRuns:
    """One model's share of the mixed-length comparison (section 9)."""

    runs: int
    """Repetitions; each runs the four sides interleaved (random, grouped, packed, HF)."""
    steps: int
    """Optimizer steps per dstrain run (each of random, grouped, packed)."""
    hf_steps: int | None
    """Optimizer steps per HF Trainer run; None: the warm-up plus one whole mega-batch of
    its length-grouped sampler (its batches come longest first within a mega-batch, so
    fewer steps would sample only its longest, least padded batches)."""
    warmup_steps: int
    """Leading steps of every run left out of the samples (at least 1)."""


@dataclasses.dataclass(frozen=True)
class Plan:
    """How much of everything to run: `FULL` for the results file, `QUICK` for the test."""

    mode: str
    cli_repetitions: int
    data_records: int
    """Records in the resampled FASTA that dstrain prepares."""
    upstream_records: int
    """Upstream tokenizes the file's first this many records (extrapolated per record)."""
    data_repetitions: int
    """Interleaved runs of both sides; the median and the min-max spread are reported."""
    throughput: dict[str, ThroughputRuns]
    """The models compared on useful tokens/s, and how long."""
    overhead_steps: int
    overhead_warmup: int
    overhead_runs: int
    memory_cases: tuple[str, ...]
    """tests/rank_memory_probe.py cases, STAGE:PRECISION; ZeRO-3 last."""
    mfu_models: tuple[str, ...]
    mfu_seq_len: int
    mfu_micro_batch: int
    mfu_steps: int
    mfu_warmup: int
    embed_records: dict[str, int]
    """Models in the embedding comparison, and how many bundled records each embeds."""
    embed_runs: int
    generate_models: tuple[str, ...]
    generate_rows: int
    generate_codons: int
    generate_runs: int
    mixed: dict[str, MixedRuns]
    """Models in the mixed-length comparison (section 9), and how long."""
    mixed_max_length: int
    """The mixed set's context in codons (longer ORFs and records are cut into windows)."""
    mixed_micro_batch: int
    """Sequences per micro-batch of the fixed-count sides (dstrain random, HF Trainer); the
    token budget of grouped and packed is this times `mixed_max_length`."""


FULL = Plan(
    mode="full",
    cli_repetitions=10,
    data_records=100_000,
    upstream_records=10_000,
    data_repetitions=5,
    throughput={
        "genslm_tiny": ThroughputRuns(runs=2, longest_steps=20, max_length_steps=8, warmup_steps=2),
        "genslm_small": ThroughputRuns(
            runs=2, longest_steps=10, max_length_steps=4, warmup_steps=2
        ),
        # ~20 s per step padded to 2048 on 2 CPU cores: one run per side.
        "genslm_25M": ThroughputRuns(runs=1, longest_steps=6, max_length_steps=3, warmup_steps=1),
    },
    overhead_steps=40,
    overhead_warmup=5,
    overhead_runs=2,
    memory_cases=("1:bf16", "2:bf16", "1:fp32", "2:fp32", "3:bf16", "3:fp32"),
    mfu_models=("genslm_25M", "genslm_250M"),
    mfu_seq_len=2048,
    mfu_micro_batch=8,
    mfu_steps=12,
    mfu_warmup=4,
    # Upstream's side runs every record at 2048 codons: ~2 s per record for genslm_25M.
    embed_records={"genslm_small": 144, "genslm_25M": 24},
    embed_runs=2,
    generate_models=("genslm_small", "genslm_25M"),
    generate_rows=8,
    generate_codons=256,
    generate_runs=2,
    # On 2 CPU cores genslm_small trains ~3,000 positions/s, genslm_25M ~150 (~14 s per
    # 2,048-position step): ~2.5 min for genslm_small's two repetitions, ~7 min for
    # genslm_25M's one, half of it the HF run (warm-up + a 38-batch mega-batch).
    mixed={
        "genslm_small": MixedRuns(runs=2, steps=10, hf_steps=None, warmup_steps=2),
        "genslm_25M": MixedRuns(runs=1, steps=4, hf_steps=None, warmup_steps=1),
    },
    mixed_max_length=512,
    mixed_micro_batch=4,
)
DEFAULT_THROUGHPUT_RUNS = ThroughputRuns(
    runs=1, longest_steps=6, max_length_steps=3, warmup_steps=1
)
"""For a model named with --models that the plan does not list."""

QUICK = Plan(
    mode="quick",
    cli_repetitions=2,
    data_records=600,
    upstream_records=200,
    data_repetitions=1,
    throughput={
        "genslm_tiny": ThroughputRuns(runs=1, longest_steps=3, max_length_steps=2, warmup_steps=1)
    },
    overhead_steps=4,
    overhead_warmup=1,
    overhead_runs=1,
    memory_cases=("2:bf16",),
    # On CPU the quick run still drives the MFU code on a toy shape, so it cannot rot.
    mfu_models=("genslm_tiny",),
    mfu_seq_len=64,
    mfu_micro_batch=2,
    mfu_steps=2,
    mfu_warmup=1,
    embed_records={"genslm_tiny": 6},
    embed_runs=1,
    generate_models=("genslm_tiny",),
    generate_rows=2,
    generate_codons=16,
    generate_runs=1,
    mixed={"genslm_tiny": MixedRuns(runs=1, steps=3, hf_steps=3, warmup_steps=1)},
    mixed_max_length=128,
    mixed_micro_batch=4,
)

BF16_PEAK_FLOPS = (
    # Dense bf16 tensor-core peak per GPU (vendor data sheets), matched against
    # torch.cuda.get_device_name() in this order; --peak-tflops overrides.
    ("H100 PCIe", 756e12),
    ("H100 NVL", 835e12),
    ("H100", 989e12),
    ("H200", 989e12),
    ("GH200", 989e12),
    ("A100", 312e12),
    ("L40S", 362e12),
    ("L4", 121e12),
)


# --------------------------------------------------------------------------------------
# Small helpers: console, quiet runs, statistics, verdicts
# --------------------------------------------------------------------------------------

_console: list = []
"""A copy of fd 1 taken at start: progress and the table reach the terminal even while
`quiet` points fds 1 and 2 at a log file."""


def say(message: str = "") -> None:
    if not _console:
        _console.append(os.fdopen(os.dup(1), "w", buffering=1))
    print(message, file=_console[0], flush=True)


@contextlib.contextmanager
def quiet(log_path: Path) -> Iterator[None]:
    """Send fds 1 and 2 (DeepSpeed's logger, tqdm, train.py's banner) to `log_path`; on a
    failure, show its last lines."""
    from dstrain.ds_runtime import redirect_fds

    try:
        with redirect_fds(log_path):
            yield
    except BaseException:
        tail = log_path.read_text(errors="replace").splitlines()[-30:]
        say(f"--- last lines of {log_path} ---\n" + "\n".join(tail))
        raise


def median(values: list[float]) -> float:
    return statistics.median(values) if values else float("nan")


def rounded(values: list[float], digits: int = 6) -> list[float]:
    """Raw samples with `digits` significant digits (readable JSON, no real loss)."""
    return [float(f"{v:.{digits}g}") for v in values]


def verdict(value: float, op: str, target: float, show: Callable[[float], str]) -> dict[str, Any]:
    """`target`, `met`, `margin` (share of the target to spare; negative: missed by that
    share of the target) and a sentence; `show` formats a number with its unit."""
    if op == ">=":
        met, margin = value >= target, (value - target) / target
    else:
        met, margin = value <= target, (target - value) / target
    word = "met" if met else "missed"
    return {
        "target": {"op": op, "value": target, "text": f"{op} {show(target)}"},
        "met": met,
        "margin": round(margin, 4),
        "verdict": f"{word}: {show(value)} vs target {op} {show(target)} "
        f"({abs(margin):.1%} of the target {'to spare' if met else 'short'})",
    }


def fmt_ratio(x: float) -> str:
    return f"{x:.2f}x"


def free_port() -> int:
    from dstrain.ds_runtime import free_port as pick

    return pick()


# --------------------------------------------------------------------------------------
# Machine and versions
# --------------------------------------------------------------------------------------


def machine_info() -> dict[str, Any]:
    cpu = platform.processor() or platform.machine()
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    memory_gib = None
    with contextlib.suppress(OSError, ValueError, IndexError):
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemTotal:"):
                memory_gib = round(int(line.split()[1]) / 2**20, 1)
    usable = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    import torch

    gpu = torch.cuda.get_device_name(0) if torch.cuda.is_available() else None
    return {
        "cpu": cpu,
        "logical_cores": os.cpu_count(),
        "usable_cores": usable,
        "memory_gib": memory_gib,
        "gpu": gpu,
        "os": platform.platform(),
        "torch_threads": torch.get_num_threads(),
        "omp_num_threads": os.environ.get("OMP_NUM_THREADS"),
    }


def versions() -> dict[str, str | None]:
    from importlib.metadata import PackageNotFoundError, version

    out: dict[str, str | None] = {"python": platform.python_version()}
    for name in (
        "dstrain",
        "torch",
        "deepspeed",
        "transformers",
        "tokenizers",
        "numpy",
        "biopython",
        "pydantic",
        "click",
    ):
        try:
            out[name] = version(name)
        except PackageNotFoundError:
            out[name] = None
    return out


def git_state() -> dict[str, Any]:
    def git(*args: str) -> str | None:
        try:
            return subprocess.run(
                ["git", *args], cwd=REPO, capture_output=True, text=True, timeout=10, check=True
            ).stdout.strip()
        except (OSError, subprocess.SubprocessError):
            return None

    commit = git("rev-parse", "HEAD")
    status = git("status", "--porcelain", "--untracked-files=no")
    return {
        "commit": commit,
        "uncommitted_changes": bool(status) if status is not None else None,
        # tests/test_bench.py compares this with the current file: results measured by an
        # older bench.py are stale and must be regenerated.
        "bench_py_sha256": bench_py_sha256(),
    }


def bench_py_sha256(path: Path = Path(__file__)) -> str:
    """sha256 of this script's bytes: which benchmark code produced a results file."""
    return hashlib.sha256(path.read_bytes()).hexdigest()


def cpu_ticks() -> tuple[int, int, float] | None:
    """(busy, total) clock ticks of the whole machine (/proc/stat), and the ticks this
    process and its waited-for children (torchrun and its ranks included) used."""
    try:
        values = [int(v) for v in Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:9]]
    except (OSError, ValueError):
        return None
    idle = values[3] + values[4]  # idle + iowait
    t = os.times()
    ours = (t.user + t.system + t.children_user + t.children_system) * os.sysconf("SC_CLK_TCK")
    return sum(values) - idle, sum(values), ours


def others_cpu_share(before, after) -> float | None:
    """Share of the machine's CPU time that other processes took between two `cpu_ticks`:
    the noise the samples in between were taken under (0 = the benchmark ran alone)."""
    if before is None or after is None or after[1] == before[1]:
        return None
    busy, total, ours = (a - b for a, b in zip(after, before, strict=True))
    return round(min(1.0, max(0.0, (busy - ours) / total)), 3)


def load_average() -> list[float] | None:
    try:
        return [round(x, 2) for x in os.getloadavg()]
    except OSError:
        return None


# --------------------------------------------------------------------------------------
# 4. CLI start-up (subprocesses; run first, before this process imports torch)
# --------------------------------------------------------------------------------------


def dstrain_command() -> list[str]:
    """The `dstrain` console script of this interpreter's environment (what a user runs)."""
    console_script = Path(sys.executable).with_name("dstrain")
    return [str(console_script)] if console_script.exists() else [sys.executable, "-m", "dstrain"]


def bench_cli(plan: Plan) -> dict[str, dict[str, Any]]:
    dstrain = dstrain_command()
    commands = {
        "python -c pass": [sys.executable, "-c", "pass"],
        "dstrain --help": [*dstrain, "--help"],
        "dstrain gen-config --zero 2 --bf16": [*dstrain, "gen-config", "--zero", "2", "--bf16"],
    }
    samples: dict[str, list[float]] = {name: [] for name in commands}
    for _ in range(plan.cli_repetitions):
        for name, command in commands.items():  # interleaved: load drift hits all alike
            start = time.perf_counter()
            subprocess.run(
                command, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, check=True
            )
            samples[name].append(time.perf_counter() - start)
    baseline = median(samples["python -c pass"])
    results = {}
    for key, name in (
        ("cli_help", "dstrain --help"),
        ("cli_gen_config", "dstrain gen-config --zero 2 --bf16"),
    ):
        value = median(samples[name])
        results[key] = {
            "title": f"`{name}` wall time",
            "unit": "s",
            "samples_s": {
                name: rounded(samples[name]),
                "python -c pass": rounded(samples["python -c pass"]),
            },
            "median_s": {name: round(value, 4), "python -c pass": round(baseline, 4)},
            "over_python_s": round(value - baseline, 4),
            "value": round(value, 4),
            **verdict(value, "<=", 0.3, lambda x: f"{x:.2f} s"),
            "summary": {
                "dstrain": f"{value:.3f} s",
                "baseline": f"{baseline:.3f} s (`python -c pass`)",
                "result": f"{value:.2f} s",
            },
            "note": f"median of {plan.cli_repetitions} runs each, interleaved; the target is "
            "on the command's whole wall time, interpreter start included",
        }
    return results


# --------------------------------------------------------------------------------------
# 3. Data preparation
# --------------------------------------------------------------------------------------


def write_resampled_fasta(path: Path, num_records: int, seed: int = 0) -> None:
    """`num_records` records drawn with replacement from the bundled HA/NA records, each
    under a unique ID (so the train/validation split hashes them independently), 60 bases
    per line like the originals."""
    from Bio import SeqIO

    from dstrain.fasta import bundled_fasta_paths

    originals = [
        (record.id, str(record.seq))
        for source in bundled_fasta_paths()
        for record in SeqIO.parse(str(source), "fasta")
    ]
    rng = random.Random(seed)
    with open(path, "w", encoding="ascii") as out:
        for i in range(num_records):
            record_id, seq = originals[rng.randrange(len(originals))]
            lines = "\n".join(seq[j : j + 60] for j in range(0, len(seq), 60))
            out.write(f">{record_id}#{i}\n{lines}\n")


def upstream_tokenize(path: Path, num_records: int, tokenizer) -> tuple[list, list]:
    """Upstream GenSLM's per-record way: biopython record -> uppercase codons joined by
    spaces -> the HF tokenizer, padded (and truncated) to 2048. Lists of ids and masks,
    as a user's dataset would hold them."""
    from Bio import SeqIO

    from dstrain.codons import codons_to_text

    input_ids, attention_masks = [], []
    for number, record in enumerate(SeqIO.parse(str(path), "fasta")):
        if number == num_records:
            break
        encoded = tokenizer(
            codons_to_text(str(record.seq).upper()),
            padding="max_length",
            max_length=UPSTREAM_MAX_LENGTH,
            truncation=True,
        )
        input_ids.append(encoded["input_ids"])
        attention_masks.append(encoded["attention_mask"])
    return input_ids, attention_masks


def bench_data(plan: Plan, tmp: Path) -> dict[str, dict[str, Any]]:
    from dstrain.codons import build_hf_tokenizer
    from dstrain.prepare import prepare_dataset
    from dstrain.settings import DataSettings

    fasta = tmp / "resampled.fasta"
    write_resampled_fasta(fasta, plan.data_records)
    tokenizer = build_hf_tokenizer()
    ours_s: list[float] = []
    theirs_s_per_record: list[float] = []
    prepared = None
    for rep in range(plan.data_repetitions):
        cache_dir = tmp / f"cache-{rep}"
        start = time.perf_counter()
        prepared = prepare_dataset([fasta], cache_dir, DataSettings())
        ours_s.append(time.perf_counter() - start)
        assert not prepared.reused
        start = time.perf_counter()
        ids, masks = upstream_tokenize(fasta, plan.upstream_records, tokenizer)
        theirs_s_per_record.append((time.perf_counter() - start) / len(ids))
        del ids, masks
        if rep < plan.data_repetitions - 1:
            shutil.rmtree(cache_dir)
    assert prepared is not None
    codons = prepared.train.num_tokens + prepared.val.num_tokens
    records = prepared.report["records"]
    ours_per_record = median(ours_s) / records
    theirs_per_record = median(theirs_s_per_record)
    speedup = theirs_per_record / ours_per_record
    # Each repetition's own ratio (both sides ran back to back): the spread of the figure.
    speedups = [t * records / o for o, t in zip(ours_s, theirs_s_per_record, strict=True)]
    spread = f"{min(speedups):.1f}-{max(speedups):.1f}x over {len(speedups)} runs"
    cache_bytes = sum(p.stat().st_size for p in prepared.cache_dir.iterdir())
    token_bytes = sum(p.stat().st_size for p in prepared.cache_dir.glob("*_tokens.bin"))
    # Upstream's HDF5 cache: input_ids and attention_mask rows of 2048 positions, int64.
    upstream_bytes_per_codon = UPSTREAM_H5_ITEMSIZE_BYTES  # the ids alone, without padding
    upstream_padded_bytes_per_codon = (
        2 * UPSTREAM_H5_ITEMSIZE_BYTES * UPSTREAM_MAX_LENGTH * records / codons
    )
    speed = {
        "title": f"Data prep, {records:,} records: dstrain vs upstream",
        "unit": "x",
        "samples": {
            "dstrain_prepare_s": rounded(ours_s),
            "upstream_s_per_record": rounded(theirs_s_per_record),
            "speedup": rounded(speedups, 4),
        },
        "median": {
            "dstrain_s": round(median(ours_s), 4),
            "dstrain_records_per_s": round(1 / ours_per_record, 1),
            "upstream_records_per_s": round(1 / theirs_per_record, 1),
            "upstream_s_extrapolated": round(theirs_per_record * records, 2),
        },
        "value": round(speedup, 3),
        "spread": {"min": round(min(speedups), 3), "max": round(max(speedups), 3)},
        **verdict(speedup, ">=", 10.0, fmt_ratio),
        "summary": {
            "dstrain": f"{median(ours_s):.1f} s ({1 / ours_per_record:,.0f} records/s)",
            "baseline": f"{theirs_per_record * records:.0f} s ({1 / theirs_per_record:,.0f} "
            f"records/s, from {plan.upstream_records:,})",
            "result": f"{speedup:.1f}x (median; {spread})",
        },
        "note": (
            f"both sides parse the same file with biopython; dstrain's time is the whole "
            f"prepare_dataset call (sha256 of the file, cleaning, encoding, writing the cache) "
            f"over all {records:,} records; upstream tokenizes the file's first "
            f"{plan.upstream_records:,} records (codons_to_text, then the HF tokenizer with "
            f"padding='max_length', max_length=2048, truncation=True, Python lists kept: "
            f"cheaper than the numpy/torch tensors upstream's own code asks for) and "
            f"its time is extrapolated per record; {plan.data_repetitions} repetition(s), "
            f"interleaved; the result is the ratio of the medians, the spread the min-max "
            f"of the repetitions' own ratios"
        ),
    }
    bytes_per_codon = cache_bytes / codons
    size = {
        "title": f"Token cache size ({codons:,} codons)",
        "unit": "bytes/codon",
        "cache_bytes": cache_bytes,
        "token_file_bytes": token_bytes,
        "codons": codons,
        "examples": len(prepared.train) + len(prepared.val),
        "token_file_bytes_per_codon": round(token_bytes / codons, 4),
        "upstream_int64_bytes_per_codon": upstream_bytes_per_codon,
        "upstream_padded_bytes_per_codon": round(upstream_padded_bytes_per_codon, 2),
        "value": round(bytes_per_codon, 4),
        **verdict(bytes_per_codon, "<=", 1.0, lambda x: f"{x:.3f} B/codon"),
        "summary": {
            "dstrain": f"{bytes_per_codon:.3f} B/codon ({token_bytes / codons:.3f} token file)",
            "baseline": f"{upstream_bytes_per_codon} B/codon (int64 ids; "
            f"{upstream_padded_bytes_per_codon:.0f} padded to 2048, with the mask)",
            "result": f"{bytes_per_codon:.3f} B/codon",
        },
        "note": (
            "whole cache directory (tokens, offsets, manifest) over all codons; the token "
            "files hold exactly 1 byte per codon and each example adds an 8-byte int64 "
            "offset (8 / ~570 codons = 1.4%), so the whole cache cannot reach 1.0; "
            "upstream stores no cache by default (it re-tokenizes every run); its HDF5 "
            "preprocessing (genslm/dataset.py, H5PreprocessMixin.write_h5) writes input_ids "
            'and attention_mask with dtype "i8" (int64, 8 bytes per position) in rows of '
            "2048, before gzip: 8 B/codon for the ids alone, "
            f"{upstream_padded_bytes_per_codon:.0f} B/codon with the padding and the mask"
        ),
    }
    return {"data_prep": speed, "cache_size": size}


# --------------------------------------------------------------------------------------
# 1 and 2. The training loop
# --------------------------------------------------------------------------------------


def ha_fasta_paths() -> list[Path]:
    from dstrain.fasta import bundled_fasta_paths

    return [p for p in bundled_fasta_paths() if p.name.startswith("ha_")]


def write_ds_config(tmp: Path, micro_batch: int = MICRO_BATCH) -> Path:
    """`dstrain gen-config --zero 2 --bf16 --torch-adam --micro-batch N` (8 unless given), run
    the way a user runs it. `--torch-adam` is explicit: dstrain's loop picks torch AdamW on
    CPU by itself, but the bare engines and the HF Trainer would build FusedAdam."""
    path = tmp / (
        "zero2_bf16.json" if micro_batch == MICRO_BATCH else f"zero2_bf16_{micro_batch}.json"
    )
    subprocess.run(
        [
            *dstrain_command(),
            "gen-config",
            "--zero",
            "2",
            "--bf16",
            "--torch-adam",
            "--micro-batch",
            str(micro_batch),
            "-o",
            str(path),
        ],
        check=True,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    return path


def run_dstrain(
    out_dir: Path,
    model: str,
    steps: int,
    ds_config: Path,
    cache_dir: Path,
    *extra: str,
    fasta: list[Path] | None = None,
) -> list[dict[str, Any]]:
    """`dstrain train` in this process (on the bundled HA set, or `fasta`: files or a
    prepared cache directory); its per-step metric rows."""
    from dstrain.train import main

    args = ["--model", model, "--fasta", *map(str, fasta or ha_fasta_paths())]
    args += ["--deepspeed_config", str(ds_config), "--output-dir", str(out_dir)]
    args += ["--cache-dir", str(cache_dir), "--max-steps", str(steps), "--log-every", "1"]
    args += ["--eval-every", "0", "--max-eval-batches", "1", "--no-export", *extra]
    with quiet(out_dir.parent / f"{out_dir.name}.log"):
        code = main(args)
    if code != 0:
        raise RuntimeError(f"dstrain train exited {code}; see {out_dir.parent / out_dir.name}.log")
    rows = [json.loads(line) for line in (out_dir / "metrics.jsonl").read_text().splitlines()]
    gc.collect()
    return [r for r in rows if "loss" in r]


def bench_throughput(
    runs: ThroughputRuns, tmp: Path, ds_config: Path, model: str
) -> dict[str, Any]:
    sides = {
        "dstrain": ("--padding", "longest"),
        "upstream": ("--padding", "max_length", "--loss-on-pad"),
    }
    steps = {"dstrain": runs.longest_steps, "upstream": runs.max_length_steps}
    useful: dict[str, list[float]] = {side: [] for side in sides}
    all_tokens: dict[str, list[float]] = {side: [] for side in sides}
    per_run: dict[str, list[float]] = {side: [] for side in sides}
    for run in range(runs.runs):
        for side, flags in sides.items():
            rows = run_dstrain(
                tmp / f"tp-{model}-{side}-{run}",
                model,
                steps[side],
                ds_config,
                tmp / "ha-cache",
                *flags,
            )
            kept = [r for r in rows if r["step"] > runs.warmup_steps]
            useful[side] += [r["useful_tokens_per_s"] for r in kept]
            all_tokens[side] += [r["tokens_per_s"] for r in kept]
            per_run[side].append(median([r["useful_tokens_per_s"] for r in kept]))
    ours, theirs = median(useful["dstrain"]), median(useful["upstream"])
    ratio = ours / theirs
    return {
        "title": f"Useful tokens/s, {model}, ZeRO-2 bf16, micro {MICRO_BATCH}",
        "unit": "x",
        "samples_useful_tokens_per_s": {s: rounded(v) for s, v in useful.items()},
        "samples_tokens_per_s": {s: rounded(v) for s, v in all_tokens.items()},
        "median_useful_tokens_per_s_per_run": {s: rounded(v) for s, v in per_run.items()},
        "median_useful_tokens_per_s": {s: round(median(v), 1) for s, v in useful.items()},
        "median_tokens_per_s": {s: round(median(v), 1) for s, v in all_tokens.items()},
        "value": round(ratio, 3),
        **verdict(ratio, ">=", 3.0, fmt_ratio),
        "summary": {
            "dstrain": f"{ours:,.0f} tok/s (`--padding longest`)",
            "baseline": f"{theirs:,.0f} tok/s (pad to 2048)",
            "result": f"{ratio:.1f}x",
        },
        "note": (
            f"dstrain.train.main in this process, {runs.runs} run(s) per side "
            f"interleaved, {runs.longest_steps} / {runs.max_length_steps} steps per run, the "
            f"first {runs.warmup_steps} of each dropped; useful = non-pad codons; upstream "
            f"side = --padding max_length --loss-on-pad (same batches of the same records)"
        ),
    }


def bare_loop_step_times(
    model: str, ds_config_path: Path, cache_dir: Path, steps: int
) -> list[float]:
    """Seconds per optimizer step of the loop a user would write around the engine, over
    the batches `dstrain train` makes (same cache, collator, sampler order and seed)."""
    import deepspeed
    import torch

    from dstrain.batching import CodonCollator, CodonDataset
    from dstrain.ds_runtime import prepare_deepspeed
    from dstrain.model import build_model
    from dstrain.prepare import load_prepared
    from dstrain.settings import TrainSettings
    from dstrain.train import epoch_batches, param_groups

    seed = TrainSettings().seed
    ds_config = json.loads(ds_config_path.read_text())
    prepared = load_prepared(cache_dir)
    train_set = CodonDataset(prepared.train)
    # dstrain's defaults, whichever run built the cache: pad to the longest, no loss on pads.
    collate = CodonCollator(prepared.settings.max_length, padding="longest", loss_on_pad=False)
    prepare_deepspeed()
    deepspeed.init_distributed()
    torch.manual_seed(seed)
    network = build_model(model)
    network.config.use_cache = False
    weight_decay = ds_config.get("optimizer", {}).get("params", {}).get("weight_decay", 0.0)
    engine, *_ = deepspeed.initialize(
        model=network, model_parameters=param_groups(network, weight_decay), config=ds_config
    )
    sync = torch.cuda.synchronize if torch.cuda.is_available() else (lambda: None)
    times: list[float] = []
    epoch = 0
    last = time.perf_counter()
    while len(times) < steps:
        for indices in epoch_batches(len(train_set), MICRO_BATCH, epoch, seed, 0, 1):
            batch = collate([train_set[i] for i in indices])
            batch = {k: v.to(engine.device) for k, v in batch.items()}
            loss = engine(**batch, use_cache=False).loss
            engine.backward(loss)
            engine.step()
            sync()
            now = time.perf_counter()
            times.append(now - last)
            last = now
            if len(times) == steps:
                break
        epoch += 1
    engine.destroy()
    del engine, network
    gc.collect()
    return times


def bench_loop_overhead(plan: Plan, tmp: Path, ds_config: Path) -> dict[str, Any]:
    model = "genslm_tiny"
    cache_dir = tmp / "ha-cache"
    ours: list[float] = []
    bare: list[float] = []
    for run in range(plan.overhead_runs):
        rows = run_dstrain(
            tmp / f"overhead-{run}", model, plan.overhead_steps, ds_config, cache_dir
        )
        elapsed = [0.0] + [r["elapsed_s"] for r in rows]
        deltas = [b - a for a, b in itertools.pairwise(elapsed)]
        ours += deltas[plan.overhead_warmup :]
        with quiet(tmp / f"bare-{run}.log"):
            times = bare_loop_step_times(model, ds_config, cache_dir, plan.overhead_steps)
        bare += times[plan.overhead_warmup :]
    ratio = median(ours) / median(bare)
    return {
        "title": f"Loop overhead, {model}: dstrain / bare step",
        "unit": "x",
        "samples_s_per_step": {"dstrain": rounded(ours), "bare_loop": rounded(bare)},
        "median_s_per_step": {
            "dstrain": round(median(ours), 5),
            "bare_loop": round(median(bare), 5),
        },
        "value": round(ratio, 4),
        **verdict(ratio, "<=", 1.10, fmt_ratio),
        "summary": {
            "dstrain": f"{median(ours) * 1e3:.1f} ms/step",
            "baseline": f"{median(bare) * 1e3:.1f} ms/step (bare loop)",
            "result": f"{ratio:.3f}x",
        },
        "note": (
            f"{plan.overhead_runs} run(s) per side interleaved, {plan.overhead_steps} steps "
            f"each, first {plan.overhead_warmup} dropped; dstrain: deltas of metrics.jsonl "
            f"elapsed_s (1 ms resolution), logging every step, progress bar on, eval off; "
            f"bare: the three engine calls plus collation, timed step end to step end"
        ),
    }


# --------------------------------------------------------------------------------------
# 5. Memory estimate vs two ranks' engines
# --------------------------------------------------------------------------------------

MODEL_STATE_CATEGORIES = (
    "params_bytes",
    "master_bytes",
    "optimizer_state_bytes",
    "model_gradient_bytes",
    "master_gradient_bytes",
)


def run_memory_probe(out_dir: Path, cases: tuple[str, ...], timeout_s: float = 300) -> None:
    env = dict(
        os.environ,
        OMP_NUM_THREADS="1",  # two ranks on 2 cores (see FACTS.md)
        DS_ACCELERATOR="cpu",
        CUDA_VISIBLE_DEVICES="",
        TOKENIZERS_PARALLELISM="false",
    )
    for key in ("RANK", "LOCAL_RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT"):
        env.pop(key, None)
    command = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2"]
    command += ["--master_addr", "127.0.0.1", "--master_port", str(free_port())]
    command += [str(PROBE), str(out_dir), *cases]
    log_path = out_dir / "probe.log"
    with open(log_path, "wb") as log:
        proc = subprocess.Popen(
            command, env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True
        )
        try:
            code = proc.wait(timeout=timeout_s)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)  # torchrun and its workers
            proc.wait()
            raise RuntimeError(
                f"memory probe timed out after {timeout_s} s; see {log_path}"
            ) from None
    if code != 0:
        tail = "\n".join(log_path.read_text(errors="replace").splitlines()[-20:])
        raise RuntimeError(f"memory probe exited {code}:\n{tail}")


def estimate_for_probe_case(case: dict[str, Any], world_size: int):
    """The estimator's row for one probe case, from the case's own model and config."""
    from dstrain.architectures import architecture_from_hf_config
    from dstrain.ds_run import resolve_ds_run
    from dstrain.memory import estimate_for_run

    arch = architecture_from_hf_config(case["model"], name="probe")
    estimate = estimate_for_run(
        arch,
        resolve_ds_run(case["ds_config"]),
        world_size=world_size,
        gpus_per_node=world_size,
        seq_len=case["seq_len"],
    )
    return estimate.stage(estimate.inputs.zero.stage)


def bench_memory(plan: Plan, tmp: Path) -> dict[str, Any]:
    out_dir = tmp / "memory-probe"
    out_dir.mkdir()
    run_memory_probe(out_dir, plan.memory_cases)
    per_case: dict[str, dict[str, Any]] = {}
    worst = 0.0
    for rank in (0, 1):
        measured = json.loads((out_dir / f"rank{rank}.json").read_text())
        for name in plan.memory_cases:
            case = measured[name]
            held = max(
                sum(snapshot[c] for c in MODEL_STATE_CATEGORIES)
                for snapshot in case["snapshots"].values()
            )
            estimated = estimate_for_probe_case(case, world_size=2).model_states_bytes
            error = (estimated - held) / held
            worst = max(worst, abs(error))
            entry = per_case.setdefault(
                name, {"numel": case["numel"], "estimated_bytes": estimated, "ranks": {}}
            )
            entry["ranks"][str(rank)] = {
                "measured_bytes": held,
                "relative_error": round(error, 6) + 0.0,
            }
    return {
        "title": "Memory estimate vs 2 ranks' engines",
        "unit": "relative error",
        "cases": per_case,
        "value": round(worst, 6),
        **verdict(worst, "<=", 0.02, lambda x: f"{x:.2%}"),
        "summary": {
            "dstrain": f"estimate ({', '.join(plan.memory_cases)})",
            "baseline": "bytes 2 CPU ranks' engines hold at the step peak",
            "result": f"max error {worst:.2%}",
        },
        "note": (
            "tests/rank_memory_probe.py under torchrun, 2 CPU ranks (gloo), a 3.2M-parameter "
            "GPT-NeoX, client AdamW; measured = largest sum of parameters, fp32 master, Adam "
            "state and gradients over the step's snapshots (communication buckets excluded); "
            "byte counts are deterministic, so one run"
        ),
    }


# --------------------------------------------------------------------------------------
# 6. MFU on a GPU
# --------------------------------------------------------------------------------------


def train_flops_per_token(arch, seq_len: int) -> int:
    """Model FLOPs of one training token: 6 per matmul parameter (forward 2, backward 4)
    plus attention scores and values, 12 * layers * hidden * seq_len (full, not causal,
    the usual MFU convention). The input embedding is a lookup, not a matmul."""
    matmul_params = arch.num_params() - arch.vocab_size * arch.hidden_size
    return 6 * matmul_params + 12 * arch.num_layers * arch.hidden_size * seq_len


def bf16_peak_flops(device_name: str) -> float | None:
    for key, flops in BF16_PEAK_FLOPS:
        if key in device_name:
            return flops
    return None


def measure_mfu(
    plan: Plan, ds_config_path: Path, model: str, peak_flops: float | None
) -> dict[str, Any]:
    """Step time of a ZeRO-2 bf16 engine on full-length random codon sequences."""
    import deepspeed
    import torch

    from dstrain.architectures import get_architecture
    from dstrain.ds_runtime import prepare_deepspeed
    from dstrain.model import build_model
    from dstrain.train import param_groups

    arch = get_architecture(model)
    config = json.loads(ds_config_path.read_text())
    config["train_micro_batch_size_per_gpu"] = plan.mfu_micro_batch
    prepare_deepspeed()
    deepspeed.init_distributed()
    torch.manual_seed(0)
    network = build_model(arch)
    network.config.use_cache = False
    engine, *_ = deepspeed.initialize(
        model=network, model_parameters=param_groups(network, 0.01), config=config
    )
    shape = (plan.mfu_micro_batch, plan.mfu_seq_len)
    ids = torch.randint(5, arch.vocab_size, shape, device=engine.device)
    batch = {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": ids}
    sync = torch.cuda.synchronize if engine.device.type == "cuda" else (lambda: None)
    times = []
    for _ in range(plan.mfu_steps):
        sync()
        start = time.perf_counter()
        loss = engine(**batch, use_cache=False).loss
        engine.backward(loss)
        engine.step()
        sync()
        times.append(time.perf_counter() - start)
    engine.destroy()
    del engine, network
    gc.collect()
    kept = times[plan.mfu_warmup :]
    step_s = median(kept)
    flops = train_flops_per_token(arch, plan.mfu_seq_len) * plan.mfu_micro_batch * plan.mfu_seq_len
    achieved = flops / step_s
    return {
        "model": model,
        "seq_len": plan.mfu_seq_len,
        "micro_batch": plan.mfu_micro_batch,
        "samples_s_per_step": rounded(kept),
        "median_s_per_step": round(step_s, 5),
        "model_flops_per_step": flops,
        "achieved_tflops": round(achieved / 1e12, 3),
        "peak_tflops": None if peak_flops is None else peak_flops / 1e12,
        "mfu": None if peak_flops is None else round(achieved / peak_flops, 4),
    }


def bench_mfu(plan: Plan, tmp: Path, ds_config: Path, peak_tflops: float | None) -> dict[str, Any]:
    import torch

    entry: dict[str, Any] = {
        "title": "MFU at 2048 codons, ZeRO-2 bf16 (GPU only)",
        "unit": "share of bf16 peak",
        "value": None,
        "met": None,
        "summary": {"dstrain": "", "baseline": "", "result": ""},
    }
    if not torch.cuda.is_available():
        entry["skipped"] = "no CUDA device on this machine"
        entry["summary"] = {"dstrain": "skipped: no GPU", "baseline": "", "result": "n/a"}
        if plan.mode != "quick":
            return entry
        device = "cpu"
        peak = peak_tflops * 1e12 if peak_tflops else None
        entry["note"] = "quick mode: the MFU code ran on CPU with a toy shape (smoke test)"
    else:
        device = torch.cuda.get_device_name(0)
        peak = peak_tflops * 1e12 if peak_tflops else bf16_peak_flops(device)
        entry["note"] = (
            "model FLOPs = tokens * (6 * matmul parameters + 12 * layers * hidden * seq_len); "
            "median step time after warm-up; random full-length sequences (no padding)"
        )
    runs = []
    for model in plan.mfu_models:
        with quiet(tmp / f"mfu-{model}.log"):
            runs.append(measure_mfu(plan, ds_config, model, peak))
    entry["device"] = device
    entry["runs"] = runs
    achieved = ", ".join(f"{r['model']} {r['achieved_tflops']:.3g} TFLOPS" for r in runs)
    entry["summary"] = {
        "dstrain": achieved,
        "baseline": "bf16 peak unknown" if peak is None else f"{peak / 1e12:.0f} TFLOPS bf16 peak",
        "result": "n/a" if peak is None else ", ".join(f"{r['mfu']:.1%}" for r in runs),
    }
    return entry


# --------------------------------------------------------------------------------------
# Using a model: embeddings and generation
# --------------------------------------------------------------------------------------

EMBED_BATCH = 8
"""Records per batch on both sides of the embedding comparison."""


def bundled_h3n2_records(count: int) -> list[tuple[str, str]]:
    """`count` (id, sequence) pairs spread evenly over the 144 bundled HA/NA records."""
    from Bio import SeqIO

    from dstrain.fasta import bundled_fasta_paths

    records = [
        (r.id, str(r.seq)) for path in bundled_fasta_paths() for r in SeqIO.parse(path, "fasta")
    ]
    stride = max(1, len(records) // count)
    return records[::stride][:count]


def upstream_embed(model, sequences: list[str], tokenizer) -> list:
    """Upstream GenSLM's embedding way: codons joined by spaces, the HF tokenizer padding
    every record to 2048, batches in file order, the last hidden state averaged over the
    real tokens (its run_inference; the README recipe averages pads too, same cost)."""
    import torch

    from dstrain.codons import codons_to_text

    pooled = []
    with torch.inference_mode():
        for start in range(0, len(sequences), EMBED_BATCH):
            texts = [codons_to_text(s.upper()) for s in sequences[start : start + EMBED_BATCH]]
            batch = tokenizer(
                texts,
                padding="max_length",
                max_length=UPSTREAM_MAX_LENGTH,
                truncation=True,
                return_tensors="pt",
            )
            out = model(**batch, output_hidden_states=True)
            mask = batch["attention_mask"].unsqueeze(-1).to(out.hidden_states[-1].dtype)
            pooled += list((out.hidden_states[-1] * mask).sum(1) / mask.sum(1))
    return pooled


def bench_embed(plan: Plan, model_name: str, num_records: int) -> dict[str, Any]:
    import torch

    from dstrain.codons import build_hf_tokenizer, encode_sequence
    from dstrain.embed import embed_records
    from dstrain.model import build_model

    torch.manual_seed(0)
    model = build_model(model_name).eval()
    tokenizer = build_hf_tokenizer()
    records = bundled_h3n2_records(num_records)
    sequences = [seq for _, seq in records]
    ids = [encode_sequence(seq.upper()) for seq in sequences]
    rates: dict[str, list[float]] = {"dstrain": [], "upstream": []}
    first: dict[str, Any] = {}
    sides = {
        "dstrain": lambda: embed_records(model, ids, pooling="mean", batch_size=EMBED_BATCH),
        "upstream": lambda: upstream_embed(model, sequences, tokenizer),
    }
    for _ in range(plan.embed_runs):
        for side, run in sides.items():
            t0 = time.perf_counter()
            result = run()
            rates[side].append(len(records) / (time.perf_counter() - t0))
            first.setdefault(side, result)
    # Same weights, same records: the two poolings must agree (dstrain drops a trailing
    # partial codon, upstream makes it [UNK], so compare records of whole codons only).
    ours = first["dstrain"].embeddings
    whole = [i for i, s in enumerate(sequences) if len(s) % 3 == 0]
    diff = max(
        (
            float((torch.as_tensor(ours[i]).reshape(-1) - first["upstream"][i]).abs().max())
            for i in whole
        ),
        default=float("nan"),
    )
    ours_rate, theirs_rate = median(rates["dstrain"]), median(rates["upstream"])
    ratio = ours_rate / theirs_rate
    mean_codons = statistics.mean(len(i) for i in ids)
    return {
        "title": f"Embedding sequences/s, {model_name}, CPU fp32",
        "unit": "x",
        "samples_sequences_per_s": {s: rounded(v) for s, v in rates.items()},
        "median_sequences_per_s": {s: round(median(v), 2) for s, v in rates.items()},
        "records": len(records),
        "mean_codons": round(mean_codons, 1),
        "max_abs_diff_whole_codon_records": diff,
        "value": round(ratio, 3),
        **verdict(ratio, ">=", 3.0, fmt_ratio),
        "summary": {
            "dstrain": f"{ours_rate:,.2f} seq/s (`dstrain embed`)",
            "baseline": f"{theirs_rate:,.2f} seq/s (pad to 2048, file order)",
            "result": f"{ratio:.1f}x",
        },
        "note": (
            f"{len(records)} bundled HA/NA records (mean {mean_codons:.0f} codons), batches of "
            f"{EMBED_BATCH}, {plan.embed_runs} interleaved run(s) per side, median; both mean "
            f"the last hidden state over real codons; max |diff| between the two sides' "
            f"embeddings on whole-codon records {diff:.1e}"
        ),
    }


def upstream_generate(model, rows: int, codons: int, seed: int):
    """transformers' `generate` as upstream's generate_dna calls it (prompt ATG)."""
    import torch

    from dstrain.codons import PAD_ID, TOKEN_TO_ID

    torch.manual_seed(seed)
    prompt = torch.tensor([[TOKEN_TO_ID["ATG"]]])
    with torch.inference_mode():
        return model.generate(
            prompt,
            max_length=codons,
            min_length=codons,
            do_sample=True,
            top_k=50,
            top_p=0.95,
            num_return_sequences=rows,
            remove_invalid_values=True,
            use_cache=True,
            pad_token_id=PAD_ID,
        )


def bench_generate(plan: Plan, model_name: str) -> dict[str, Any]:
    import torch

    from dstrain.generate import generate_sequences
    from dstrain.model import build_model

    torch.manual_seed(0)
    model = build_model(model_name).eval()
    rows, codons = plan.generate_rows, plan.generate_codons
    new_codons = rows * (codons - 1)  # the prompt codon is given, not sampled
    rates: dict[str, list[float]] = {"dstrain": [], "upstream": []}
    sides = {
        "dstrain": lambda run: generate_sequences(
            model, n=rows, max_length=codons, seed=run, batch_size=rows
        ),
        "upstream": lambda run: upstream_generate(model, rows, codons, seed=run),
    }
    for run in range(plan.generate_runs):
        for side, generate in sides.items():
            t0 = time.perf_counter()
            generate(run)
            rates[side].append(new_codons / (time.perf_counter() - t0))
    ours_rate, theirs_rate = median(rates["dstrain"]), median(rates["upstream"])
    ratio = ours_rate / theirs_rate
    return {
        "title": f"Generation codons/s, {model_name}, CPU fp32",
        "unit": "codons/s",
        "samples_codons_per_s": {s: rounded(v) for s, v in rates.items()},
        "median_codons_per_s": {s: round(median(v), 1) for s, v in rates.items()},
        "value": round(ours_rate, 1),
        "met": None,
        "summary": {
            "dstrain": f"{ours_rate:,.0f} codons/s (`dstrain generate`)",
            "baseline": f"{theirs_rate:,.0f} codons/s (HF generate, upstream's settings)",
            "result": f"{ratio:.2f}x",
        },
        "note": (
            f"{rows} rows x {codons} codons (prompt ATG), top-k 50, top-p 0.95, batch "
            f"{rows}, {plan.generate_runs} interleaved run(s) per side, median; a figure, no "
            f"target"
        ),
    }


# --------------------------------------------------------------------------------------
# 9. A mixed-length set: random vs grouped vs packed batching, and HF Trainer's
#    length-grouped sampler
# --------------------------------------------------------------------------------------

MIXED_MIN_ORF_CODONS = 30
HF_SIDE = "hf_group_by_length"
MIXED_SIDES = ("random", "grouped", "packed", HF_SIDE)
MIXED_TARGETS = (
    # (entry suffix, numerator side, denominator side or None for the share, target)
    ("share", "packed", None, 0.95),
    ("vs_random", "packed", "random", 1.5),
    ("vs_hf", "packed", HF_SIDE, 1.2),
)


@dataclasses.dataclass(frozen=True)
class MixedSet:
    cache_dir: Path
    """The prepared cache (`dstrain train --fasta CACHE_DIR` trains on it as it is)."""
    num_examples: int
    composition: dict[str, Any]


def build_mixed_set(tmp: Path, max_length: int) -> MixedSet:
    """Every ORF of >= 30 codons of the bundled SARS-CoV-2 genomes (`--frame all-orfs`,
    ORFs over `max_length` cut into windows) plus the bundled H3N2 HA/NA records read as
    the other rows read them (frame 0), in one token cache: the ORFs' codons are written
    back as FASTA records ([UNK] as NNN, which encodes to [UNK] again) beside the HA/NA
    records and the lot is prepared with the default frame, no validation split."""
    import numpy as np

    from dstrain.codons import UNK_ID, VOCAB
    from dstrain.fasta import bundled_fasta_paths, bundled_genomes_path
    from dstrain.prepare import prepare_dataset
    from dstrain.settings import DataSettings

    orfs = prepare_dataset(
        [bundled_genomes_path()],
        tmp / "mixed-orfs",
        DataSettings(
            frame="all-orfs",
            min_orf_codons=MIXED_MIN_ORF_CODONS,
            max_length=max_length,
            val_fraction=0.0,
        ),
    )
    fasta = tmp / "mixed.fasta"
    with open(fasta, "w", encoding="ascii") as out:
        for i in range(len(orfs.train)):
            codons = "".join("NNN" if t == UNK_ID else VOCAB[t] for t in orfs.train[i].tolist())
            out.write(f">sars_cov_2_orf_{i}\n{codons}\n")
        for path in bundled_fasta_paths():
            out.write(path.read_text(encoding="ascii").rstrip("\n") + "\n")
    prepared = prepare_dataset(
        [fasta], tmp / "mixed-cache", DataSettings(max_length=max_length, val_fraction=0.0)
    )
    lengths = prepared.train.lengths()
    orf_lengths = orfs.train.lengths()
    composition = {
        "examples": len(lengths),
        "codons": int(lengths.sum()),
        "min_codons": int(lengths.min()),
        "median_codons": float(np.median(lengths)),
        "max_codons": int(lengths.max()),
        "quartiles_codons": [float(q) for q in np.percentile(lengths, [25, 50, 75])],
        "max_length": max_length,
        "sars_cov_2_genomes": orfs.report.get("records"),
        "sars_cov_2_orfs": orfs.report.get("orfs"),
        "sars_cov_2_examples": len(orf_lengths),
        "sars_cov_2_codons": int(orf_lengths.sum()),
        "h3n2_examples": len(lengths) - len(orf_lengths),
        "h3n2_codons": int(lengths.sum() - orf_lengths.sum()),
        "min_orf_codons": MIXED_MIN_ORF_CODONS,
    }
    return MixedSet(prepared.cache_dir, len(lengths), composition)


def hf_megabatch_steps(num_examples: int, batch: int) -> int:
    """Batches in one mega-batch of transformers' LengthGroupedSampler at its default
    size (its docstring: 50 batches, or the number that makes 4 mega-batches, whichever is
    smaller); it sorts each mega-batch longest first."""
    return max(1, min(num_examples // (4 * batch), 50))


def dstrain_step_samples(rows: list[dict[str, Any]], warmup: int) -> list[dict[str, float]]:
    """Per optimizer step after the warm-up: seconds (deltas of metrics.jsonl's
    elapsed_s, logging every step), real codons and positions (the row's rates times it)."""
    samples = []
    for before, row in itertools.pairwise(rows):
        if row["step"] > warmup:
            seconds = row["elapsed_s"] - before["elapsed_s"]
            samples.append(
                {
                    "seconds": seconds,
                    "real_tokens": row["useful_tokens_per_s"] * seconds,
                    "positions": row["tokens_per_s"] * seconds,
                }
            )
    return samples


def side_figures(samples: list[dict[str, float]]) -> dict[str, float]:
    """One run's figures over its kept steps: rates are totals over total time (a step of
    long rows weighs as much as its seconds), s/step the median."""
    seconds = sum(s["seconds"] for s in samples)
    real = sum(s["real_tokens"] for s in samples)
    positions = sum(s["positions"] for s in samples)
    return {
        "useful_tokens_per_s": real / seconds,
        "tokens_per_s": positions / seconds,
        "useful_token_share": real / positions,
        "s_per_step": median([s["seconds"] for s in samples]),
        "positions_per_step": positions / len(samples),
        "steps": len(samples),
    }


def run_hf_trainer(
    out_dir: Path,
    model: str,
    steps: int,
    ds_config: Path,
    cache_dir: Path,
    seed: int,
    timeout_s: float = 1200,
) -> list[dict[str, float]]:
    """One HF Trainer run in a child process (its DeepSpeed and accelerate state stays
    there); per optimizer step: seconds, real codons, positions."""
    out_dir.mkdir(parents=True)
    spec = {
        "model": model,
        "steps": steps,
        "ds_config": str(ds_config),
        "cache_dir": str(cache_dir),
        "seed": seed,
        "out_dir": str(out_dir),
        "steps_path": str(out_dir / "steps.json"),
    }
    spec_path = out_dir / "spec.json"
    spec_path.write_text(json.dumps(spec), encoding="utf-8")
    env = dict(os.environ, TOKENIZERS_PARALLELISM="false")
    # One process outside a launcher: DeepSpeed otherwise tries MPI discovery (FACTS.md).
    env.update(RANK="0", WORLD_SIZE="1", LOCAL_RANK="0", MASTER_ADDR="127.0.0.1")
    env["MASTER_PORT"] = str(free_port())
    command = [sys.executable, str(Path(__file__).resolve()), "--hf-trainer-child", str(spec_path)]
    log_path = out_dir.parent / f"{out_dir.name}.log"
    with open(log_path, "wb") as log:
        proc = subprocess.Popen(
            command, env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True
        )
        try:
            code = proc.wait(timeout=timeout_s)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
            raise RuntimeError(
                f"HF Trainer run timed out after {timeout_s} s; see {log_path}"
            ) from None
    if code != 0:
        tail = "\n".join(log_path.read_text(errors="replace").splitlines()[-30:])
        raise RuntimeError(f"HF Trainer run exited {code}:\n{tail}")
    return json.loads((out_dir / "steps.json").read_text(encoding="utf-8"))


def hf_trainer_child(spec_path: Path) -> int:
    """The HF Trainer side, as a user would write it: the cache's train examples as a
    torch Dataset of {"input_ids"}, a collator padding right with [PAD] (labels -100 there,
    an attention mask), `train_sampling_strategy="group_by_length"` (transformers 5's name
    for `group_by_length=True`), `deepspeed=` the same JSON with every TrainingArguments
    value the JSON also sets taken from it, the same model and seed. A forward pre-hook
    counts real codons and positions, a callback times optimizer steps end to end."""
    spec = json.loads(spec_path.read_text(encoding="utf-8"))
    import numpy as np
    import torch

    from dstrain.ds_runtime import prepare_deepspeed

    # As dstrain's loop does: DeepSpeed's CPU accelerator, no shm comm op JIT build.
    prepare_deepspeed()
    from transformers import Trainer, TrainerCallback, TrainingArguments

    from dstrain.codons import PAD_ID
    from dstrain.model import build_model
    from dstrain.prepare import load_prepared

    train = load_prepared(Path(spec["cache_dir"])).train

    class Examples(torch.utils.data.Dataset):
        def __len__(self) -> int:
            return len(train)

        def __getitem__(self, index: int) -> dict[str, Any]:
            return {"input_ids": torch.from_numpy(train[index].astype(np.int64))}

    def collate(features: list[dict[str, Any]]) -> dict[str, Any]:
        longest = max(len(f["input_ids"]) for f in features)
        ids = torch.full((len(features), longest), PAD_ID, dtype=torch.long)
        mask = torch.zeros_like(ids)
        for row, feature in enumerate(features):
            ids[row, : len(feature["input_ids"])] = feature["input_ids"]
            mask[row, : len(feature["input_ids"])] = 1
        return {
            "input_ids": ids,
            "attention_mask": mask,
            "labels": ids.masked_fill(mask == 0, -100),
        }

    counts = {"real_tokens": 0, "positions": 0}
    rows: list[dict[str, float]] = []

    def count(module, args, kwargs):
        mask = kwargs["attention_mask"]
        counts["real_tokens"] += int(mask.sum())
        counts["positions"] += mask.numel()

    sync = torch.cuda.synchronize if torch.cuda.is_available() else (lambda: None)

    class StepClock(TrainerCallback):
        last = 0.0

        def on_train_begin(self, args, state, control, **kwargs):
            self.last = time.perf_counter()

        def on_step_end(self, args, state, control, **kwargs):
            sync()
            now = time.perf_counter()
            rows.append({"step": state.global_step, "seconds": now - self.last, **counts})
            counts.update(real_tokens=0, positions=0)
            self.last = now

    config = json.loads(Path(spec["ds_config"]).read_text(encoding="utf-8"))
    optimizer = config["optimizer"]["params"]
    args = TrainingArguments(
        output_dir=spec["out_dir"],
        deepspeed=spec["ds_config"],
        use_cpu=not torch.cuda.is_available(),
        bf16=config["bf16"]["enabled"],
        per_device_train_batch_size=config["train_micro_batch_size_per_gpu"],
        gradient_accumulation_steps=config["gradient_accumulation_steps"],
        learning_rate=optimizer["lr"],
        adam_beta1=optimizer["betas"][0],
        adam_beta2=optimizer["betas"][1],
        adam_epsilon=optimizer["eps"],
        weight_decay=optimizer["weight_decay"],
        max_grad_norm=config["gradient_clipping"],
        warmup_steps=config["scheduler"]["params"]["warmup_num_steps"],
        max_steps=spec["steps"],
        train_sampling_strategy="group_by_length",
        seed=spec["seed"],
        dataloader_num_workers=0,
        eval_strategy="no",
        save_strategy="no",
        logging_strategy="no",
        report_to="none",
        disable_tqdm=True,
    )
    torch.manual_seed(spec["seed"])
    model = build_model(spec["model"])
    model.config.use_cache = False
    model.register_forward_pre_hook(count, with_kwargs=True)
    trainer = Trainer(
        model=model,
        args=args,
        train_dataset=Examples(),
        data_collator=collate,
        callbacks=[StepClock()],
    )
    trainer.train()
    Path(spec["steps_path"]).write_text(json.dumps(rows), encoding="utf-8")
    return 0


def mixed_side_labels(plan: Plan) -> dict[str, str]:
    micro, budget = plan.mixed_micro_batch, plan.mixed_micro_batch * plan.mixed_max_length
    return {
        "random": f"dstrain `--batching random` (micro {micro})",
        "grouped": f"dstrain `--batching grouped --tokens-per-micro-batch {budget}`",
        "packed": f"dstrain `--batching packed --tokens-per-micro-batch {budget}`",
        HF_SIDE: f"HF Trainer, `group_by_length` sampler (micro {micro})",
    }


def mixed_why(
    numerator: str, denominator: str, sides: dict[str, dict[str, float]], plan: Plan
) -> str:
    """Useful tokens/s = useful-token share x positions/s: which factor made the ratio."""
    top, bottom = sides[numerator], sides[denominator]
    share = top["useful_token_share"] / bottom["useful_token_share"]
    speed = top["tokens_per_s"] / bottom["tokens_per_s"]
    names = {HF_SIDE: "the HF Trainer"}
    upper, lower = names.get(numerator, numerator), names.get(denominator, denominator)
    text = (
        f"useful tokens/s = useful-token share x positions/s: {upper}'s share is "
        f"{share:.2f}x {lower}'s ({top['useful_token_share']:.0%} vs "
        f"{bottom['useful_token_share']:.0%}), its positions/s {speed:.2f}x "
        f"({top['tokens_per_s']:,.0f} vs {bottom['tokens_per_s']:,.0f}; "
        f"{top['positions_per_step']:,.0f} vs {bottom['positions_per_step']:,.0f} positions "
        f"per step)"
    )
    if speed < 1:
        text += (
            f"; packed micro-batches are {plan.mixed_micro_batch} full "
            f"{plan.mixed_max_length}-codon rows, attention computed over each whole row (the "
            f"block-diagonal mask keeps examples apart but saves no arithmetic), against "
            f"{lower}'s shorter rows"
        )
    if share < 1.2 and denominator == HF_SIDE:
        text += (
            "; HF's length-sorted batches already carry little padding, so packing can "
            "only win on positions/s"
        )
    return text


def bench_mixed(
    plan: Plan, tmp: Path, model: str, runs: MixedRuns, mixed: MixedSet, ds_config: Path
) -> dict[str, dict[str, Any]]:
    if runs.warmup_steps < 1:
        raise ValueError("MixedRuns.warmup_steps must be >= 1: step 1 includes the set-up")
    micro, max_length = plan.mixed_micro_batch, plan.mixed_max_length
    budget = micro * max_length  # the worst random micro-batch: `micro` rows of max_length
    flags = {
        "random": ("--batching", "random"),
        "grouped": ("--batching", "grouped", "--tokens-per-micro-batch", str(budget)),
        "packed": ("--batching", "packed", "--tokens-per-micro-batch", str(budget)),
    }
    if runs.hf_steps is None:
        hf_steps = runs.warmup_steps + hf_megabatch_steps(mixed.num_examples, micro)
        hf_text = (
            f"HF {hf_steps}: the warm-up and one mega-batch of its length-grouped sampler, "
            f"which sorts each mega-batch longest first (fewer steps would sample only its "
            f"longest, least padded batches)"
        )
    else:
        hf_steps = runs.hf_steps
        hf_text = f"HF {hf_steps}"
    samples: dict[str, list[list[dict[str, float]]]] = {side: [] for side in MIXED_SIDES}
    for rep in range(runs.runs):  # interleaved: load drift hits every side alike
        for side, side_flags in flags.items():
            out_dir = tmp / f"mixed-{model}-{side}-{rep}"
            rows = run_dstrain(
                out_dir,
                model,
                runs.steps,
                ds_config,
                mixed.cache_dir,
                "--max-length",
                str(max_length),
                "--seed",
                str(rep),
                "--no-report",
                *side_flags,
                fasta=[mixed.cache_dir],
            )
            shutil.rmtree(out_dir / "checkpoints", ignore_errors=True)  # 0.3 GB for genslm_25M
            samples[side].append(dstrain_step_samples(rows, runs.warmup_steps))
        rows = run_hf_trainer(
            tmp / f"mixed-{model}-hf-{rep}", model, hf_steps, ds_config, mixed.cache_dir, seed=rep
        )
        samples[HF_SIDE].append(
            [
                {k: float(r[k]) for k in ("seconds", "real_tokens", "positions")}
                for r in rows
                if r["step"] > runs.warmup_steps
            ]
        )
    per_run = {side: [side_figures(s) for s in runs_] for side, runs_ in samples.items()}
    sides = {
        side: {
            key: median([figures[key] for figures in runs_])
            for key in (
                "useful_tokens_per_s",
                "tokens_per_s",
                "useful_token_share",
                "s_per_step",
                "positions_per_step",
            )
        }
        for side, runs_ in per_run.items()
    }
    for side in sides.values():
        for other in ("random", HF_SIDE):
            side[f"vs_{other}"] = side["useful_tokens_per_s"] / sides[other]["useful_tokens_per_s"]
    labels = mixed_side_labels(plan)
    short = {"random": "random", "grouped": "grouped", HF_SIDE: "HF Trainer group_by_length"}
    comp = mixed.composition
    set_text = (
        f"{comp['examples']} examples, {comp['codons']:,} codons: {comp['sars_cov_2_examples']} "
        f"from the {comp['sars_cov_2_orfs']} ORFs of >= {MIXED_MIN_ORF_CODONS} codons of "
        f"{comp['sars_cov_2_genomes']} SARS-CoV-2 genomes, {comp['h3n2_examples']} from the H3N2 "
        f"HA/NA records; length min/median/max {comp['min_codons']}/{comp['median_codons']:g}/"
        f"{comp['max_codons']} codons"
    )
    context = f"context {max_length} codons (longer ORFs and records cut into windows)"
    if plan.mode == "quick":
        context = f"quick mode: toy sizes, context {max_length} codons"
    elif max_length < UPSTREAM_MAX_LENGTH:
        context = (
            f"context {max_length} codons, not GenSLM's {UPSTREAM_MAX_LENGTH}: CPU time (on "
            f"the 2 cores this plan was sized on, genslm_25M trained ~150 codons/s, ~14 s per "
            f"{UPSTREAM_MAX_LENGTH}-codon row: too few steps per side in the section's ~10 "
            f"minutes); longer ORFs and records are cut into {max_length}-codon windows"
        )
    common = (
        f"set: {set_text}; {context}; ZeRO-2 bf16 (`dstrain gen-config --zero 2 --bf16 "
        f"--torch-adam --micro-batch {micro}`) on every side; token budget {budget} = micro {micro} x "
        f"{max_length}, the positions of the "
        f"worst random micro-batch, so no side may hold more activations than random's worst; "
        f"{runs.runs} repetition(s), each side in turn (dstrain.train.main in this process; "
        f"the HF Trainer in a child process, `use_cpu=True`), seed = repetition; steps per "
        f"run: dstrain {runs.steps}, {hf_text}; the first {runs.warmup_steps} of each run "
        f"dropped; rates = real codons (or positions) over the kept steps' seconds, medians "
        f"over repetitions"
    )
    detail = {
        "set": comp,
        "token_budget": budget,
        "micro_batch": micro,
        "max_length": max_length,
        "hf_steps": hf_steps,
        "sides": {
            side: {k: round(v, 4) for k, v in figures.items()} for side, figures in sides.items()
        },
        "labels": labels,
        "samples_per_run": {
            side: [{k: round(v, 4) for k, v in figures.items()} for figures in runs_]
            for side, runs_ in per_run.items()
        },
        "samples_per_step": {
            side: [[{k: round(v, 4) for k, v in s.items()} for s in run] for run in runs_]
            for side, runs_ in samples.items()
        },
    }
    entries: dict[str, dict[str, Any]] = {}
    for suffix, top, bottom, target in MIXED_TARGETS:
        if bottom is None:
            value = sides[top]["useful_token_share"]
            shares = ", ".join(
                f"{sides[s]['useful_token_share']:.0%} {short.get(s, s)}"
                for s in MIXED_SIDES
                if s != top
            )
            entry = {
                "title": f"Mixed-length set, {model}: useful-token share, packed",
                "unit": "share",
                "value": round(value, 4),
                **verdict(value, ">=", target, lambda x: f"{x:.1%}"),
                "summary": {
                    "dstrain": f"{value:.1%} (packed)",
                    "baseline": shares,
                    "result": f"{value:.1%}",
                },
                **detail,
                "note": "real codons over positions in the kept steps' micro-batches"
                + (
                    ""
                    if value >= target
                    else f" (packed rows end where the next example no longer fits: "
                    f"{sides[top]['positions_per_step']:,.0f} positions per step for a "
                    f"{budget}-token budget)"
                )
                + f"; {common}",
            }
        else:
            value = sides[top]["useful_tokens_per_s"] / sides[bottom]["useful_tokens_per_s"]
            entry = {
                "title": f"Mixed-length set, {model}: useful tokens/s, packed vs {short[bottom]}"
                + (" batching" if bottom == "random" else ""),
                "unit": "x",
                "median_useful_tokens_per_s": {
                    s: round(sides[s]["useful_tokens_per_s"], 1) for s in MIXED_SIDES
                },
                "value": round(value, 3),
                **verdict(value, ">=", target, fmt_ratio),
                "summary": {
                    "dstrain": f"{sides[top]['useful_tokens_per_s']:,.0f} tok/s (packed)",
                    "baseline": f"{sides[bottom]['useful_tokens_per_s']:,.0f} tok/s "
                    f"({labels[bottom]})",
                    "result": f"{value:.2f}x",
                },
                "note": f"{mixed_why(top, bottom, sides, plan)}; per-side figures in "
                f"mixed_{model}_share; {common}",
            }
        entries[f"mixed_{model}_{suffix}"] = entry
    return entries


# --------------------------------------------------------------------------------------
# Output
# --------------------------------------------------------------------------------------

TABLE_COLUMNS = ("benchmark", "dstrain", "baseline", "result", "target", "met", "others' CPU")
"""The last column: share of the machine's CPU other processes took meanwhile (noise)."""


def table_rows(results: dict[str, Any]) -> list[tuple[str, ...]]:
    rows = []
    for entry in results["benchmarks"].values():
        target_text = entry["target"]["text"] if entry.get("target") else ""
        met = entry.get("met")
        met_text = "n/a" if met is None else ("yes" if met else f"no ({entry['margin']:+.1%})")
        summary = entry["summary"]
        share = entry.get("other_processes_cpu_share")
        rows.append(
            (
                entry["title"],
                summary["dstrain"],
                summary["baseline"],
                summary["result"],
                target_text,
                met_text,
                "" if share is None or entry.get("skipped") else f"{share:.0%}",
            )
        )
    return rows


def format_console_table(results: dict[str, Any]) -> str:
    rows = [TABLE_COLUMNS, *table_rows(results)]
    widths = [max(len(row[i]) for row in rows) for i in range(len(TABLE_COLUMNS))]
    lines = [
        "  ".join(cell.ljust(w) for cell, w in zip(row, widths, strict=True)).rstrip()
        for row in rows
    ]
    lines.insert(1, "  ".join("-" * w for w in widths))
    return "\n".join(lines)


def describe_run(results: dict[str, Any]) -> str:
    """One paragraph: when, where, how loaded, which versions."""
    m, v, load = results["machine"], results["versions"], results["load_average"]
    gpu = m["gpu"] or "no GPU"
    return (
        f"{results['date']}, `{results['command']}` ({results['mode']} mode, "
        f"{results['duration_s']:.0f} s) on {m['cpu']}, {m['usable_cores']} cores, "
        f"{m['memory_gib']} GiB RAM, {gpu}; load average (1/5/15 min) "
        f"{'/'.join(map(str, load['before'] or []))} before, "
        f"{'/'.join(map(str, load['after'] or []))} after (the benchmark's own included). "
        f"dstrain {(results['git']['commit'] or '?')[:7]}, Python {v['python']}, torch {v['torch']}, "
        f"DeepSpeed {v['deepspeed']}, transformers {v['transformers']}."
    )


MIXED_COLUMNS = (
    "model",
    "batching",
    "useful-token share",
    "useful tokens/s",
    "s/step",
    "vs random",
    "vs HF group_by_length",
)


def mixed_table(results: dict[str, Any]) -> list[str]:
    """Section 9's sides, one row each (the HF Trainer's included), and what the set is;
    no lines for a results file without that section."""
    rows, sets = [], []
    for name, entry in results["benchmarks"].items():
        if not (name.startswith("mixed_") and "sides" in entry):
            continue
        model = name.removeprefix("mixed_").removesuffix("_share")
        for side, figures in entry["sides"].items():
            rows.append(
                (
                    model,
                    entry["labels"][side],
                    f"{figures['useful_token_share']:.1%}",
                    f"{figures['useful_tokens_per_s']:,.0f}",
                    f"{figures['s_per_step']:.2f}",
                    f"{figures['vs_random']:.2f}x",
                    f"{figures['vs_' + HF_SIDE]:.2f}x",
                )
            )
        comp = entry["set"]
        sets.append(
            f"{comp['examples']} examples, {comp['codons']:,} codons "
            f"({comp['sars_cov_2_examples']} "
            f"from the {comp['sars_cov_2_orfs']} ORFs of >= {comp['min_orf_codons']} codons of "
            f"the {comp['sars_cov_2_genomes']} bundled SARS-CoV-2 genomes, "
            f"{comp['h3n2_examples']} from the H3N2 HA/NA records), {comp['min_codons']} to "
            f"{comp['max_codons']} codons long (median {comp['median_codons']:g}), context "
            f"{entry['max_length']}; token budget {entry['token_budget']} = micro "
            f"{entry['micro_batch']} x {entry['max_length']}; ZeRO-2 bf16, CPU"
        )
    if not rows:
        return []
    head = "| " + " | ".join(MIXED_COLUMNS) + " |"
    rule = "|" + "|".join(" --- " for _ in MIXED_COLUMNS) + "|"
    body = ["| " + " | ".join(c.replace("|", "\\|") for c in row) + " |" for row in rows]
    return ["", f"Mixed-length set: {sets[0]}.", "", head, rule, *body]


def render_readme_block(results: dict[str, Any]) -> str:
    """The README's generated part (between the markers), from a results file."""
    head = "| " + " | ".join(TABLE_COLUMNS) + " |"
    rule = "|" + "|".join(" --- " for _ in TABLE_COLUMNS) + "|"
    body = [
        "| " + " | ".join(cell.replace("|", "\\|") for cell in row) + " |"
        for row in table_rows(results)
    ]
    return "\n".join([head, rule, *body, *mixed_table(results), "", describe_run(results)])


def update_readme(results: dict[str, Any], readme: Path = README_PATH) -> None:
    text = readme.read_text(encoding="utf-8")
    if README_BEGIN not in text or README_END not in text:
        raise SystemExit(f"{readme}: the Performance section markers are missing ({README_BEGIN})")
    before, rest = text.split(README_BEGIN, 1)
    _, after = rest.split(README_END, 1)
    block = render_readme_block(results)
    readme.write_text(f"{before}{README_BEGIN}\n{block}\n{README_END}{after}", encoding="utf-8")


def readme_block(readme: Path = README_PATH) -> str | None:
    """What README holds between the markers now (None without markers)."""
    text = readme.read_text(encoding="utf-8")
    if README_BEGIN not in text or README_END not in text:
        return None
    return text.split(README_BEGIN, 1)[1].split(README_END, 1)[0].strip("\n")


# --------------------------------------------------------------------------------------
# Main
# --------------------------------------------------------------------------------------


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--quick", action="store_true", help="Tiny sizes: a smoke run in seconds.")
    p.add_argument(
        "-o",
        "--output",
        type=Path,
        help="Results JSON (default: scripts/bench-results.json; "
        "with --quick a file in the temp directory).",
    )
    p.add_argument(
        "--models",
        help="Comma-separated models for the throughput comparison (default: genslm_tiny, "
        "genslm_small, genslm_25M; --quick: genslm_tiny).",
    )
    p.add_argument(
        "--only",
        help="Comma-separated subset: cli, data, throughput, overhead, memory, mfu, embed, "
        "generate, mixed.",
    )
    p.add_argument(
        "--peak-tflops", type=float, help="The GPU's dense bf16 peak, if not in the table."
    )
    p.add_argument(
        "--update-readme", action="store_true", help="Rewrite README's Performance table."
    )
    p.add_argument(
        "--render-readme",
        action="store_true",
        help="Run nothing: rewrite README's table from scripts/bench-results.json.",
    )
    p.add_argument("--keep-tmp", action="store_true", help="Keep the work directory (logs, runs).")
    # Internal: one HF Trainer run of section 9, in its own process (see run_hf_trainer).
    p.add_argument("--hf-trainer-child", type=Path, help=argparse.SUPPRESS)
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.hf_trainer_child:
        return hf_trainer_child(args.hf_trainer_child)
    if args.render_readme:
        update_readme(json.loads(RESULTS_PATH.read_text(encoding="utf-8")))
        say(f"updated the Performance table in {README_PATH} from {RESULTS_PATH}")
        return 0
    plan = QUICK if args.quick else FULL
    output = args.output or (
        Path(tempfile.gettempdir()) / "dstrain-bench-quick.json" if args.quick else RESULTS_PATH
    )
    everything = "cli,data,throughput,overhead,memory,mfu,embed,generate,mixed"
    parts = set((args.only or everything).split(","))
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    started = time.time()
    load_before = load_average()
    say(f"dstrain benchmarks ({plan.mode}); load average before: {load_before}")

    benchmarks: dict[str, Any] = {}
    tmp = Path(tempfile.mkdtemp(prefix="dstrain-bench-"))

    def step(name: str, run: Callable[[], dict[str, Any]]) -> None:
        t0, ticks = time.time(), cpu_ticks()
        entries = run()
        share = others_cpu_share(ticks, cpu_ticks())
        for entry in entries.values():
            entry["other_processes_cpu_share"] = share
        benchmarks.update(entries)
        took = "n/a" if share is None else f"{share:.0%}"
        say(f"  {name}: {time.time() - t0:.0f} s; other processes took {took} of the CPU")

    try:
        if "cli" in parts:  # first: nothing heavy is imported yet
            step("cli start-up", lambda: bench_cli(plan))
        models = args.models.split(",") if args.models else list(plan.throughput)
        if "data" in parts:
            step("data preparation", lambda: bench_data(plan, tmp))
        ds_config = write_ds_config(tmp)
        if "throughput" in parts:
            for model in models:
                runs = plan.throughput.get(model, DEFAULT_THROUGHPUT_RUNS)
                step(
                    f"throughput {model}",
                    lambda m=model, r=runs: {
                        f"throughput_{m}": bench_throughput(r, tmp, ds_config, m)
                    },
                )
        if "overhead" in parts:
            step(
                "loop overhead",
                lambda: {"loop_overhead": bench_loop_overhead(plan, tmp, ds_config)},
            )
        if "memory" in parts:
            step("memory estimate", lambda: {"memory_estimate": bench_memory(plan, tmp)})
        if "mfu" in parts:
            step("mfu", lambda: {"mfu": bench_mfu(plan, tmp, ds_config, args.peak_tflops)})
        if "embed" in parts:
            for model, count in plan.embed_records.items():
                step(
                    f"embed {model}",
                    lambda m=model, c=count: {f"embed_{m}": bench_embed(plan, m, c)},
                )
        if "generate" in parts:
            for model in plan.generate_models:
                step(
                    f"generate {model}",
                    lambda m=model: {f"generate_{m}": bench_generate(plan, m)},
                )
        if "mixed" in parts:
            mixed = build_mixed_set(tmp, plan.mixed_max_length)
            say(f"  mixed-length set: {mixed.composition}")
            mixed_config = write_ds_config(tmp, plan.mixed_micro_batch)
            for model, runs in plan.mixed.items():
                step(
                    f"mixed-length {model}",
                    lambda m=model, r=runs: bench_mixed(plan, tmp, m, r, mixed, mixed_config),
                )
    finally:
        if args.keep_tmp:
            say(f"work directory kept: {tmp}")
        else:
            shutil.rmtree(tmp, ignore_errors=True)

    results = {
        "command": "python scripts/bench.py" + (" --quick" if args.quick else ""),
        "mode": plan.mode,
        "date": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
        "duration_s": round(time.time() - started, 1),
        "git": git_state(),
        "machine": machine_info(),
        "versions": versions(),
        "load_average": {"before": load_before, "after": load_average()},
        "plan": dataclasses.asdict(plan),
        "benchmarks": benchmarks,
    }
    output.parent.mkdir(parents=True, exist_ok=True)
    output.write_text(json.dumps(results, indent=2) + "\n", encoding="utf-8")
    say()
    say(format_console_table(results))
    say()
    say(describe_run(results))
    say(f"wrote {output}")
    if args.update_readme:
        update_readme(results)
        say(f"updated the Performance table in {README_PATH}")
    noisy = [
        f"{k} ({e['other_processes_cpu_share']:.0%})"
        for k, e in benchmarks.items()
        if (e.get("other_processes_cpu_share") or 0) > NOISY_SHARE
    ]
    if noisy:
        say(
            "measured while other processes took a large share of the CPU: "
            + ", ".join(noisy)
            + "; run again on a quiet machine before publishing"
        )
    missed = [k for k, e in benchmarks.items() if e.get("met") is False]
    if missed:
        say("targets missed: " + ", ".join(missed) + " (see each entry's verdict and note)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
