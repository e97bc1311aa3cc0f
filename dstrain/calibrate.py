"""Calibration: measure the memory estimate's candidates on real engines, pick one.

`dstrain estimate --model genslm_25M --gpus-per-node 2 --measure -o ds.json` runs, for
each candidate the estimate says might fit (ZeRO stage x micro batch x activation
checkpointing x optimizer offload), a few training steps of a real engine on this machine,
built by `dstrain.train.build_engine` as `dstrain train` builds it, with the ranks the flags
give (`--gpus-per-node`, one node), on synthetic full-length batches (`--seq-len` random
codon ids), and records per rank:

- GPU: `torch.cuda.max_memory_allocated()` from just before the model is built;
- CPU: the peak resident set (VmHWM, reset by writing "5" to /proc/self/clear_refs) above
  the process's own baseline, the RSS after imports and process-group set-up (and one step
  of a throwaway 12k-parameter engine, `_warm_up`: DeepSpeed's first `initialize` imports
  ~50 MiB more) and before the model is built: the libraries alone take hundreds of MiB
  that no estimate of training state should count. Children run with
  MALLOC_MMAP_THRESHOLD_=65536 so glibc hands freed blocks back to the kernel at once and
  the resident set follows what is live;
- the step time (median of the steps after the first, which also builds Adam's state).

It prints the estimate (its total, and its peak: `StageEstimate.peak_bytes`, on a CPU
with only the bucket pages that become resident, `resident_estimate`) beside the
measurement and writes the fastest candidate (tokens/s) that fits with the headroom (GPU:
its memory x (1 - headroom); CPU: available RAM / ranks x (1 - headroom), the baseline
included) as a DeepSpeed JSON through gen-config's own path (settings ->
`ds_config_from_flags` -> checked JSON), so it validates and trains.

Each candidate is one launch of `python -m torch.distributed.run` running this module:
ZeRO-3 patches `torch.nn.functional.linear` for the rest of a process, and an OOM kill or
a hang takes only that launch down. A candidate that runs out of memory (CUDA OOM, a
failed CPU allocation, a rank killed by the kernel, the parent's RSS guard) or times out
is reported, not fatal.

The search (`CandidateSearch`, pure): families (offload, checkpointing, stage), cheapest
first; micro batches doubling within a family while the estimate says they fit, the
measurement fits and throughput still grows (by 5%). Activation checkpointing recomputes
the forward and optimizer offload moves the step to the CPU: both only buy memory, so
their families are measured only where the plain family hit a memory wall, and only at
larger micro batches than it reached. On a CPU-only machine optimizer offload is left out:
the "device" is the same RAM, so it saves nothing and JIT-builds DeepSpeed's CPUAdam.

Heavy edge: torch, deepspeed and transformers are imported inside functions only.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import math
import os
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import textwrap
import time
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any

from dstrain.errors import DstrainError
from dstrain.memory import GIB

THROUGHPUT_GAIN = 1.05
"""A doubled micro batch must raise tokens/s by this factor for the search to go on."""

MEMORY_STATUSES = ("oom", "killed", "over limit", "no fit")
"""Outcomes that mean a memory wall: larger micro batches of the family are not tried."""


# --------------------------------------------------------------------------------------
# Candidates and the search (pure)
# --------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True, order=True)
class Candidate:
    """One configuration to measure."""

    stage: int
    micro_batch: int
    checkpointing: bool = False
    """Full activation checkpointing (each layer recomputed in backward)."""
    offload: str = "none"
    """`offload_optimizer.device`: none or cpu."""

    @property
    def family(self) -> tuple[str, bool, int]:
        return self.offload, self.checkpointing, self.stage

    @property
    def label(self) -> str:
        text = f"ZeRO-{self.stage} micro {self.micro_batch}"
        if self.checkpointing:
            text += " ckpt"
        if self.offload != "none":
            text += f" offload {self.offload}"
        return text

    def gen_config_flags(self, precision: str) -> dict[str, Any]:
        """gen-config's parsed flags (dest -> value) for this candidate."""
        flags: dict[str, Any] = {
            "precision": precision,
            "zero": self.stage,
            "micro_batch": self.micro_batch,
        }
        if self.checkpointing:
            flags["activation_checkpointing"] = True
        if self.offload != "none":
            flags["offload_optimizer"] = self.offload
        return flags


@dataclasses.dataclass
class Measurement:
    """What one candidate did (bytes per rank, the largest rank's)."""

    candidate: Candidate
    estimate_bytes: int
    """`dstrain estimate`'s total per rank (model states + activations + buffers)."""
    compare_bytes: int
    """What the measurement is compared with: the estimate's peak, on a CPU-only machine
    with only the bucket pages that become resident (`estimate_candidate`)."""
    estimate_need_bytes: int
    """What the pre-filter compared with the limit (total, or start-up if larger)."""
    status: str
    """ok, no fit (measured over the limit), oom, killed, over limit (the RSS guard),
    timeout, failed, or skipped (the estimate says it does not fit)."""
    peak_bytes: int | None = None
    """Measured peak above the baseline, through engine start and the steps."""
    init_peak_bytes: int | None = None
    """Measured peak above the baseline through `deepspeed.initialize` only."""
    baseline_bytes: int | None = None
    """CPU: the RSS after imports and process-group set-up (not in `peak_bytes`)."""
    step_time_s: float | None = None
    tokens_per_s: float | None = None
    fits: bool | None = None
    detail: str = ""
    elapsed_s: float = 0.0
    """Wall time of the launch."""

    @property
    def ratio(self) -> float | None:
        if self.peak_bytes is None or not self.compare_bytes:
            return None
        return self.peak_bytes / self.compare_bytes


class CandidateSearch:
    """Which candidate to measure next, given what the earlier ones did (see the module
    docstring). `next_candidate()` returns None when the search is over; every candidate
    it returns must be answered with `record(candidate, status, tokens_per_s)`."""

    def __init__(
        self,
        stages: Sequence[int],
        micro_batches: Sequence[int],
        checkpointing: Sequence[bool],
        offloads: Sequence[str],
    ):
        self.micro_batches = sorted(set(micro_batches))
        self.families = [
            (offload, ckpt, stage)
            for offload in sorted(set(offloads), key=lambda o: o != "none")
            for ckpt in sorted(set(checkpointing))
            for stage in sorted(set(stages))
        ]
        self.largest_fit: dict[tuple[str, bool, int], int] = {}
        self.walled: set[tuple[str, bool, int]] = set()
        self.done: set[tuple[str, bool, int]] = set()
        self.last_throughput: dict[tuple[str, bool, int], float] = {}
        self.family_index = 0
        self.pending: Iterator[int] | None = None

    def _base(self, family: tuple[str, bool, int]) -> tuple[str, bool, int] | None:
        """The family this one only makes sense beyond (None: measure it from the start)."""
        offload, ckpt, stage = family
        if ckpt and (offload, False, stage) in self.families:
            return offload, False, stage
        if offload != "none" and ("none", ckpt, stage) in self.families:
            return "none", ckpt, stage
        return None

    def _micro_batches(self, family: tuple[str, bool, int]) -> list[int] | None:
        base = self._base(family)
        if base is None:
            return list(self.micro_batches)
        if base not in self.walled:
            return None  # the cheaper family never ran out of memory
        floor = self.largest_fit.get(base, 0)
        return [m for m in self.micro_batches if m > floor]

    def next_candidate(self) -> Candidate | None:
        while self.family_index < len(self.families):
            family = self.families[self.family_index]
            if self.pending is None and family not in self.done:
                micros = self._micro_batches(family)
                self.pending = iter(micros or [])
            micro = next(self.pending, None) if family not in self.done else None
            if micro is not None:
                offload, ckpt, stage = family
                return Candidate(stage, micro, ckpt, offload)
            self.done.add(family)
            self.family_index += 1
            self.pending = None
        return None

    def record(self, candidate: Candidate, status: str, tokens_per_s: float | None) -> None:
        family = candidate.family
        if status == "ok":
            previous = self.last_throughput.get(family)
            self.largest_fit[family] = candidate.micro_batch
            self.last_throughput[family] = tokens_per_s or 0.0
            if previous is not None and (tokens_per_s or 0.0) < previous * THROUGHPUT_GAIN:
                self.done.add(family)  # saturated: a larger micro batch buys no speed
            return
        if status in MEMORY_STATUSES or status == "skipped":
            self.walled.add(family)
        self.done.add(family)  # memory wall, time-out or failure: stop this family


def micro_batch_ladder(largest: int) -> list[int]:
    """1, 2, 4, ... up to `largest` (and `largest` itself)."""
    ladder = [2**k for k in range(int(math.log2(largest)) + 1)]
    return ladder if ladder[-1] == largest else [*ladder, largest]


# --------------------------------------------------------------------------------------
# The request, the machine, the estimate of a candidate
# --------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class CalibrationRequest:
    """What `dstrain estimate --measure` was asked (validated by `request_from_flags`)."""

    model: str
    ranks: int
    seq_len: int = 2048
    precision: str | None = None
    """None: as `dstrain train` picks it, bf16 on a GPU with native bf16, else fp32 (bf16
    matmuls are slow on CPUs)."""
    stages: tuple[int, ...] = (0, 1, 2, 3)
    micro_batches: tuple[int, ...] = (1, 2, 4, 8, 16)
    checkpointing: tuple[bool, ...] = (False, True)
    offloads: tuple[str, ...] | None = None
    """None: none and cpu on a GPU, none only on a CPU-only machine."""
    steps: int = 3
    headroom: float = 0.10
    max_candidates: int = 16
    timeout_s: float = 600.0
    gpu_mem_gib: float | None = None
    cpu_mem_gib: float | None = None
    """Override the detected GPU memory / available RAM (GiB)."""
    output: str | None = None


@dataclasses.dataclass(frozen=True)
class Machine:
    device: str
    """cuda or cpu."""
    description: str
    limit_bytes_per_rank: int
    """What a rank's measured peak (CPU: with its baseline) may reach."""
    guard_bytes: int
    """Host RAM all ranks together may hold before the candidate is killed."""
    native_bf16: bool = False
    """A GPU with bf16 in hardware (compute capability 8.0+)."""


def _meminfo_bytes(field: str) -> int:
    for line in Path("/proc/meminfo").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1]) * 1024
    raise DstrainError(f"/proc/meminfo has no {field}: --measure needs Linux")


def detect_machine(request: CalibrationRequest) -> Machine:
    """This machine's device and the per-rank memory limit (imports torch)."""
    import torch

    available = (
        int(request.cpu_mem_gib * GIB)
        if request.cpu_mem_gib is not None
        else _meminfo_bytes("MemAvailable")
    )
    guard = int(available * 0.95)
    keep = 1.0 - request.headroom
    if torch.cuda.is_available() and torch.cuda.device_count() > 0:
        count = torch.cuda.device_count()
        if request.ranks > count:
            raise DstrainError(
                f"--gpus-per-node {request.ranks} but this machine has {count} GPU(s): "
                f"--measure starts that many ranks here; give --gpus-per-node {count} or less."
            )
        name, total, capability = _gpu_name_memory_capability()
        if request.gpu_mem_gib is not None:
            total = int(request.gpu_mem_gib * GIB)
        return Machine(
            "cuda",
            f"{request.ranks} x {name} ({total / GIB:.1f} GiB, {keep:.0%} usable)",
            int(total * keep),
            guard,
            native_bf16=capability >= 8.0,
        )
    limit = int(available / request.ranks * keep)
    return Machine(
        "cpu",
        f"{request.ranks} CPU ranks, {available / GIB:.1f} GiB RAM available "
        f"({limit / GIB:.2f} GiB per rank with {request.headroom:.0%} headroom)",
        limit,
        guard,
    )


def _gpu_name_memory_capability() -> tuple[str, int, float]:
    """GPU 0's name, memory in bytes and compute capability, from nvidia-smi when there is
    one: torch's `get_device_properties` would start a CUDA context in this parent
    process, on the GPU rank 0 measures."""
    try:
        out = subprocess.run(
            ["nvidia-smi", "--id=0", "--query-gpu=name,memory.total,compute_cap",
             "--format=csv,noheader,nounits"],
            capture_output=True, text=True, timeout=30, check=True,
        ).stdout  # fmt: skip
        name, mib, capability = out.strip().splitlines()[0].rsplit(",", 2)
        return name.strip(), int(float(mib)) * 2**20, float(capability)
    except (OSError, subprocess.SubprocessError, ValueError, IndexError):
        import torch

        props = torch.cuda.get_device_properties(0)
        return props.name, props.total_memory, props.major + props.minor / 10


def candidate_config(candidate: Candidate, precision: str) -> dict[str, Any]:
    """The candidate's DeepSpeed JSON, as `dstrain gen-config` writes it (checked)."""
    from dstrain.cli_options import deepspeed_specs, ds_config_from_flags

    config, _ = ds_config_from_flags(
        deepspeed_specs(), candidate.gen_config_flags(precision), {}, "dstrain estimate --measure"
    )
    return config


def builds_under_zero_init(stage: int) -> bool:
    """Whether `dstrain.train.build_engine` builds the model inside `deepspeed.zero.Init`
    at this stage (ZeRO-3), which the estimate's start-up figures depend on."""
    return stage == 3


def estimate_candidate(
    request: CalibrationRequest, candidate: Candidate, config: dict[str, Any], device: str
) -> tuple[int, int, int]:
    """(`dstrain estimate`'s total per rank; its peak (`StageEstimate.peak_bytes`: the
    activations and the gradients made after them counted once), on a CPU
    `resident_estimate`'s, which a measurement is compared with; what must fit per rank:
    the larger of that peak and the start-up peak, on a CPU also each rank's share of the
    CPU RAM per node)."""
    from dstrain.architectures import resolve_architecture
    from dstrain.ds_run import resolve_ds_run
    from dstrain.memory import estimate_for_run

    estimate = estimate_for_run(
        resolve_architecture(request.model),
        resolve_ds_run(config),
        world_size=request.ranks,
        gpus_per_node=request.ranks,
        seq_len=request.seq_len,
        micro_batch=candidate.micro_batch,
        activation_checkpointing="full" if candidate.checkpointing else "none",
        zero_init=builds_under_zero_init(candidate.stage),
    )
    total = estimate.stage(candidate.stage).total_bytes
    if device == "cpu":
        estimate = resident_estimate(estimate)
    row = estimate.stage(candidate.stage)
    need = max(row.peak_bytes, row.startup_bytes)
    if device == "cpu":
        need = max(need, row.cpu_bytes_per_node // request.ranks)
    return total, row.peak_bytes, need


def resident_estimate(estimate):
    """The estimate of what becomes resident on a CPU "device": ZeRO's gradient buckets
    are `torch.empty(reduce_bucket_size)` (stage_1_and_2.py `setup_buckets`, stage3.py),
    whose pages the kernel backs only once gradients are written into them, so at most Ψ
    elements of a bucket ever count in the RSS. A GPU allocates the whole bucket
    (`max_memory_allocated` counts it), so `dstrain estimate` keeps the configured size."""
    from dstrain.memory import estimate_zero_memory

    inputs = estimate.inputs
    psi = inputs.model.num_params
    zero = dataclasses.replace(
        inputs.zero, reduce_bucket_size=min(inputs.zero.reduce_bucket_size, psi)
    )
    return estimate_zero_memory(dataclasses.replace(inputs, zero=zero))


# --------------------------------------------------------------------------------------
# One candidate: a launch, its guard, its result
# --------------------------------------------------------------------------------------


def _process_table() -> dict[int, tuple[int, int]]:
    """pid -> (parent pid, resident bytes) of every process (Linux /proc)."""
    page = os.sysconf("SC_PAGE_SIZE")
    table = {}
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/stat") as handle:
                fields = handle.read().rsplit(")", 1)[1].split()
        except OSError:
            continue
        table[int(entry)] = (int(fields[1]), int(fields[21]) * page)  # stat fields 4, 24
    return table


def _tree_rss_bytes(root: int, known: set[int]) -> int:
    """Resident bytes of `root` and its descendants; adds them to `known` (torchrun starts
    each rank in a session of its own, so a process group would miss them)."""
    table = _process_table()
    known.add(root)
    grew = True
    while grew:
        grew = False
        for pid, (parent, _) in table.items():
            if parent in known and pid not in known:
                known.add(pid)
                grew = True
    return sum(table[pid][1] for pid in known if pid in table)


def _kill_launched(known: set[int], marker: str) -> None:
    """SIGKILL every process of the launch still alive (checked by its command line, which
    names the launch's own directory, so a reused pid is left alone)."""
    for pid in known:
        try:
            with open(f"/proc/{pid}/cmdline", "rb") as handle:
                if marker.encode() not in handle.read():
                    continue
            os.kill(pid, signal.SIGKILL)
        except OSError:  # gone already
            continue


def child_env(device: str, ranks: int) -> dict[str, str]:
    env = dict(os.environ, PYTHONUNBUFFERED="1", TOKENIZERS_PARALLELISM="false")
    for key in ("RANK", "LOCAL_RANK", "WORLD_SIZE", "LOCAL_WORLD_SIZE", "MASTER_ADDR"):
        env.pop(key, None)
    env.pop("MASTER_PORT", None)
    if device == "cpu":
        env["MALLOC_MMAP_THRESHOLD_"] = "65536"  # freed blocks go back to the kernel at once
        env.setdefault("DS_ACCELERATOR", "cpu")
        # Ranks share the cores: more threads than cores each is many times slower.
        env.setdefault("OMP_NUM_THREADS", str(max(1, (os.cpu_count() or 1) // ranks)))
    return env


def _launch(
    command: list[str],
    log_path: Path,
    env: dict[str, str],
    timeout_s: float,
    guard_bytes: int,
    marker: str,
) -> tuple[int | None, str]:
    """Run a launcher; (exit code, why it was stopped: "", "timeout" or "over limit").
    `marker` is a string in every launched command line (the launch's directory)."""
    with open(log_path, "ab") as log:
        proc = subprocess.Popen(
            command, stdout=log, stderr=subprocess.STDOUT, env=env, start_new_session=True
        )
    deadline = time.monotonic() + timeout_s
    known: set[int] = set()
    stopped = ""
    try:
        while proc.poll() is None:
            if time.monotonic() > deadline:
                stopped = "timeout"
            elif _tree_rss_bytes(proc.pid, known) > guard_bytes:
                stopped = "over limit"
            if stopped:
                _kill_launched(known, marker)
                proc.wait()
                break
            time.sleep(0.2)
    finally:  # also on Ctrl-C: no rank is left behind
        _kill_launched(known, marker)
    return proc.returncode, stopped


def _log_tail(path: Path, lines: int = 20) -> str:
    try:
        text = path.read_text(errors="replace")
    except OSError:
        return ""
    return "\n".join(text.strip().splitlines()[-lines:])


def _classify_failure(ranks: list[dict[str, Any]], code: int | None, log: str) -> tuple[str, str]:
    """(status, detail) of a launch that did not bring back every rank's result."""
    for result in ranks:
        if result.get("status") == "oom":
            return "oom", f"rank {result['rank']}: {result['error']}"
    if "Signal 9" in log or "SIGKILL" in log or "exitcode  : -9" in log:
        return "killed", "a rank was killed by the kernel (SIGKILL: out of memory?)"
    for result in ranks:
        if result.get("status") == "failed":
            return "failed", f"rank {result['rank']}: {result['error']}"
    errors = [line for line in log.splitlines() if "Error" in line or "error:" in line]
    return "failed", (errors[-1] if errors else f"the launch exited {code}").strip()[:300]


def measure_candidate(
    request: CalibrationRequest,
    machine: Machine,
    candidate: Candidate,
    config: dict[str, Any],
    estimate: tuple[int, int, int],
    work_dir: Path,
) -> Measurement:
    """Launch `request.ranks` ranks on this machine for the candidate; never raises for
    what the candidate does (OOM, kill, time-out, failure)."""
    from dstrain.ds_config import render_ds_config
    from dstrain.ds_runtime import free_port

    out = work_dir / (
        f"zero{candidate.stage}_micro{candidate.micro_batch}"
        f"{'_ckpt' if candidate.checkpointing else ''}_{candidate.offload}"
    )
    out.mkdir(parents=True)
    config_path = out / "ds_config.json"
    config_path.write_text(render_ds_config(config), encoding="utf-8")
    command = [
        sys.executable, "-m", "torch.distributed.run",
        "--nproc_per_node", str(request.ranks),
        "--master_addr", "127.0.0.1", "--master_port", str(free_port()),
        "-m", "dstrain.calibrate",
        str(config_path), str(out), request.model, str(request.seq_len), str(request.steps),
        str(request.timeout_s),
    ]  # fmt: skip
    started = time.monotonic()
    log_path = out / "launch.log"
    code, stopped = _launch(
        command, log_path, child_env(machine.device, request.ranks), request.timeout_s,
        machine.guard_bytes, marker=str(out),
    )  # fmt: skip
    elapsed = time.monotonic() - started
    m = Measurement(candidate, *estimate, "failed", elapsed_s=elapsed)
    results = []
    for path in sorted(out.glob("rank*.json")):
        with contextlib.suppress(ValueError):  # half-written when its rank was killed
            results.append(json.loads(path.read_text()))
    if stopped == "timeout":
        m.status, m.detail = "timeout", f"no result within {request.timeout_s:g} s"
        return m
    if stopped == "over limit":
        m.status = "over limit"
        m.detail = f"the ranks together held over {machine.guard_bytes / GIB:.2f} GiB (killed)"
        return m
    ok = [r for r in results if r.get("status") == "ok"]
    if code != 0 or len(ok) < request.ranks:
        m.status, m.detail = _classify_failure(results, code, _log_tail(log_path, 60))
        return m
    m.peak_bytes = max(r["peak_bytes"] for r in ok)
    m.init_peak_bytes = max(r["init_peak_bytes"] for r in ok)
    m.baseline_bytes = max(r["baseline_bytes"] for r in ok)
    # Every rank waits for the slowest in each step's collectives: the slowest rank's median.
    m.step_time_s = max(statistics.median(r["step_times_s"][1:]) for r in ok)
    m.tokens_per_s = candidate.micro_batch * request.seq_len * request.ranks / m.step_time_s
    counted = m.peak_bytes + (m.baseline_bytes if machine.device == "cpu" else 0)
    m.fits = counted <= machine.limit_bytes_per_rank
    m.status = "ok" if m.fits else "no fit"
    m.detail = ok[0].get("optimizer", "")
    return m


# --------------------------------------------------------------------------------------
# The whole calibration
# --------------------------------------------------------------------------------------


@dataclasses.dataclass
class Calibration:
    request: CalibrationRequest
    machine: Machine
    measurements: list[Measurement]
    chosen: Measurement | None
    config: dict[str, Any] | None
    output: str | None
    notes: list[str]


def run_calibration(
    request: CalibrationRequest, progress: Callable[[str], None] = lambda _line: None
) -> Calibration:
    """Measure the candidates, pick the fastest that fits, write its JSON (see the module
    docstring). Raises `DstrainError` only for the request itself, or when nothing fits."""
    from dstrain.ds_config import render_ds_config, write_text_atomic

    machine = detect_machine(request)
    if request.precision is None:
        chosen = "bf16" if machine.native_bf16 else "fp32"
        request = dataclasses.replace(request, precision=chosen)
    if machine.device == "cpu" and request.precision == "fp16":
        raise DstrainError(
            "dstrain estimate --measure: fp16 needs a GPU (DeepSpeed refuses it on CPU); "
            "measure with --precision bf16 or fp32.",
            exit_code=2,
        )
    if machine.device == "cpu" and request.offloads and "cpu" in request.offloads:
        raise DstrainError(
            "dstrain estimate --measure: --offload-optimizer cpu on a CPU-only machine "
            "measures nothing useful: the optimizer already runs in host RAM (and DeepSpeed "
            "would JIT-build its CPUAdam). Drop the flag, or measure on the GPU machine.",
            exit_code=2,
        )
    notes: list[str] = []
    offloads = request.offloads
    if offloads is None:
        offloads = ("none", "cpu") if machine.device == "cuda" else ("none",)
        if machine.device == "cpu":
            notes.append(
                "optimizer offload not measured: on a CPU-only machine the optimizer already "
                "runs in host RAM, so offloading it saves nothing (and would JIT-build "
                "DeepSpeed's CPUAdam)"
            )
    search = CandidateSearch(request.stages, request.micro_batches, request.checkpointing, offloads)
    measurements: list[Measurement] = []
    launches = 0
    progress(f"measuring on {machine.description}: {request.model}, {request.precision}, "
             f"{request.seq_len} tokens per sequence, {request.steps} steps per candidate")  # fmt: skip
    work_dir = Path(tempfile.mkdtemp(prefix="dstrain-measure-"))
    try:
        while (candidate := search.next_candidate()) is not None:
            config = candidate_config(candidate, request.precision)
            total, compare, need = estimate_candidate(request, candidate, config, machine.device)
            baseline = max((m.baseline_bytes or 0 for m in measurements), default=0)
            if need + (baseline if machine.device == "cpu" else 0) > machine.limit_bytes_per_rank:
                m = Measurement(candidate, total, compare, need, "skipped")
                m.detail = (
                    f"the estimate ({need / GIB:.2f} GiB) is over "
                    f"{machine.limit_bytes_per_rank / GIB:.2f} GiB per rank"
                )
                measurements.append(m)
                search.record(candidate, "skipped", None)
                progress(f"  {candidate.label:<28} skipped: {m.detail}")
                continue
            if launches >= request.max_candidates:
                notes.append(
                    f"stopped after {launches} launches (--max-candidates {request.max_candidates})"
                    f"; {candidate.label} and any after it not measured"
                )
                break
            launches += 1
            progress(f"  [{launches}] {candidate.label:<28} estimate {compare / GIB:.3f} GiB ...")
            m = measure_candidate(
                request, machine, candidate, config, (total, compare, need), work_dir
            )
            measurements.append(m)
            search.record(candidate, m.status, m.tokens_per_s)
            progress("      " + _progress_result(m))
    finally:
        shutil.rmtree(work_dir, ignore_errors=True)

    fitting = [m for m in measurements if m.status == "ok"]
    chosen = max(fitting, key=lambda m: m.tokens_per_s or 0.0) if fitting else None
    config = output = None
    if chosen is not None:
        config = candidate_config(chosen.candidate, request.precision)
        output = request.output
        if output is not None:
            write_text_atomic(output, render_ds_config(config))
    return Calibration(request, machine, measurements, chosen, config, output, notes)


def _progress_result(m: Measurement) -> str:
    if m.peak_bytes is None:
        return f"{m.status}: {m.detail} ({m.elapsed_s:.0f} s)"
    return (
        f"{m.status}: peak {m.peak_bytes / GIB:.3f} GiB (estimate x {m.ratio:.2f}), "
        f"{m.step_time_s:.2f} s/step, {m.tokens_per_s:,.0f} tokens/s ({m.elapsed_s:.0f} s)"
    )


# --------------------------------------------------------------------------------------
# The command: flags -> request -> calibration -> table or JSON, and the file
# --------------------------------------------------------------------------------------

MEASURE_ONLY = {
    "output": "-o/--output",
    "steps": "--steps",
    "stages": "--stages",
    "max_micro_batch": "--max-micro-batch",
    "max_candidates": "--max-candidates",
    "candidate_timeout": "--candidate-timeout",
}
"""`dstrain estimate` flags that mean something only with --measure."""

NOT_WITH_MEASURE = {
    "params": "--params (measuring builds a real model: give --model NAME)",
    "hidden": "--hidden (give --model NAME)",
    "layers": "--layers (give --model NAME)",
    "heads": "--heads (give --model NAME)",
    "intermediate": "--intermediate (give --model NAME)",
    "nodes": "--nodes (--measure starts its ranks on this machine: one node)",
    "hostfile": "--hostfile (--measure starts its ranks on this machine: one node)",
    "ds_config_path": "--deepspeed_config (--measure writes a config the way gen-config does: "
    "give --precision, --micro-batch, --activation-checkpointing, --offload-optimizer)",
    "offload_param": "--offload-param (not measured)",
    "zero_init": "--zero-init/--no-zero-init (--measure builds as dstrain train does)",
    "plot_path": "--plot (draw the estimate without --measure)",
    "optimizer": "--optimizer (--measure trains with gen-config's AdamW)",
}


def refuse_measure_only_flags(given: set[str]) -> None:
    """A usage error for --measure's own flags given without it."""
    flags = [flag for name, flag in MEASURE_ONLY.items() if name in given]
    if flags:
        raise DstrainError(
            f"dstrain estimate: {', '.join(flags)} only go with --measure: add --measure to "
            "measure candidates on this machine, or drop them.",
            exit_code=2,
        )


def request_from_flags(params: dict[str, Any], given: set[str]) -> CalibrationRequest:
    """`dstrain estimate --measure`'s flags -> a request; every usage problem at once."""
    from dstrain.architectures import resolve_architecture

    problems = [flag for name, flag in NOT_WITH_MEASURE.items() if name in given]
    if params.get("model_name") is None:
        problems.append("--measure needs --model NAME (a registered size or a config.json)")
    if params.get("attention") == "eager":
        problems.append(
            "--attention eager (dstrain train builds SDPA attention; --measure measures that)"
        )
    stages: list[int] = []
    for part in str(params.get("stages", "0,1,2,3")).split(","):
        if part.strip() in ("0", "1", "2", "3"):
            stages.append(int(part))
        else:
            problems.append(f"--stages {params['stages']!r}: give stages 0-3, e.g. --stages 1,2")
            break
    if params.get("offload_optimizer") == "nvme":
        problems.append("--offload-optimizer nvme (not measured: give none or cpu)")
    if problems:
        raise DstrainError(
            "dstrain estimate --measure: not with " + "; ".join(problems) + ".", exit_code=2
        )
    arch = resolve_architecture(params["model_name"])
    if not arch.buildable:
        raise DstrainError(
            f"dstrain estimate --measure: {arch.name} cannot be built: {arch.why_not_buildable}",
            exit_code=2,
        )
    micro = params.get("micro_batch")
    ckpt = params.get("activation_checkpointing")
    offload = params.get("offload_optimizer")
    output = params.get("output")
    if output is None:
        output = "ds_config.json"
        if Path(output).exists():
            raise DstrainError(
                f"dstrain estimate --measure writes the chosen config to {output} in the "
                "current directory, which exists: give -o PATH (an existing PATH is replaced).",
                exit_code=2,
            )
    return CalibrationRequest(
        model=params["model_name"],
        ranks=params.get("gpus_per_node") or 1,
        seq_len=params.get("seq_len", 2048),
        precision=params.get("precision"),
        stages=tuple(sorted(set(stages))),
        micro_batches=(micro,) if micro else tuple(micro_batch_ladder(params["max_micro_batch"])),
        checkpointing=((ckpt == "full",) if "activation_checkpointing" in given else (False, True)),
        offloads=(offload,) if offload else None,
        steps=params.get("steps", 3),
        headroom=params.get("headroom", 0.10),
        max_candidates=params.get("max_candidates", 16),
        timeout_s=params.get("candidate_timeout", 600.0),
        gpu_mem_gib=params.get("gpu_mem_gib"),
        cpu_mem_gib=params.get("cpu_mem_gib"),
        output=output,
    )


def measure_command(params: dict[str, Any], given: set[str]) -> None:
    """`dstrain estimate --measure`: progress on stderr, the table (or --json) on stdout."""
    import click

    request = request_from_flags(params, given)
    cal = run_calibration(request, progress=lambda line: click.echo(line, err=True))
    if params.get("as_json"):
        click.echo(json.dumps(calibration_to_json(cal), indent=2))
    else:
        click.echo(format_calibration(cal))
    if cal.chosen is None:
        raise DstrainError(
            "no candidate fits on this machine (see the table): try --activation-checkpointing "
            "full, a shorter --seq-len, more ranks (--gpus-per-node), or a GPU with more memory."
        )


# --------------------------------------------------------------------------------------
# Output
# --------------------------------------------------------------------------------------


def _gib(nbytes: int | None) -> str:
    return "-" if nbytes is None else f"{nbytes / GIB:.3f}"


def format_calibration(cal: Calibration) -> str:
    """The measured-vs-estimated table and the choice, for people."""
    r = cal.request
    lines = [
        f"measured: {r.model}, {r.precision}, {r.seq_len} tokens x micro batch, {r.steps} steps, "
        f"{cal.machine.description}",
        "",
    ]
    cpu = cal.machine.device == "cpu"
    header = (
        f"{'candidate':<30}{'total':>8}{'peak':>8}{'measured':>9}{'ratio':>7}"
        f"{'base' if cpu else '':>6}{'s/step':>8}{'tokens/s':>10}  fits"
    )
    lines += [header, "-" * len(header)]
    for m in cal.measurements:
        mark = "*" if m is cal.chosen else " "
        ratio = f"{m.ratio:.2f}" if m.ratio is not None else "-"
        base = (
            "" if not cpu else "-" if m.baseline_bytes is None else f"{m.baseline_bytes / GIB:.2f}"
        )
        step = f"{m.step_time_s:.3f}" if m.step_time_s is not None else "-"
        speed = f"{m.tokens_per_s:,.0f}" if m.tokens_per_s is not None else "-"
        fits = {"ok": "yes", "no fit": "no"}.get(m.status, m.status)
        lines.append(
            f"{mark}{m.candidate.label:<29}{_gib(m.estimate_bytes):>8}{_gib(m.compare_bytes):>8}"
            f"{_gib(m.peak_bytes):>9}{ratio:>7}{base:>6}{step:>8}{speed:>10}  {fits}"
        )
    limit = f"{cal.machine.limit_bytes_per_rank / GIB:.2f} GiB per rank"
    legend = (
        "GiB per rank. total = dstrain estimate's total (model states + activations + buffers); "
        "peak = the estimate's peak (the activations and the gradients made after them "
        "counted once)"
    )
    if cpu:
        legend += (
            ", counting only the pages of ZeRO's gradient buckets that gradients fill (the "
            "rest of a torch.empty bucket never becomes resident on a CPU; a GPU allocates it "
            "whole); measured = peak RSS per rank above its baseline (base: the RSS after "
            "imports and process-group set-up, the libraries), through engine start and the "
            f"steps; ratio = measured / peak; fits = base + measured within {limit}."
        )
    else:
        legend += (
            "; measured = torch.cuda.max_memory_allocated from just before the model is "
            f"built; ratio = measured / peak; fits = measured within {limit}."
        )
    legend += " * = the one written."
    lines += ["", textwrap.fill(legend, len(header))]
    problems = [m for m in cal.measurements if m.status not in ("ok", "no fit", "skipped")]
    notes = cal.notes + [f"{m.candidate.label}: {m.status}: {m.detail}" for m in problems]
    if notes:
        lines += ["", "Notes:"]
        lines += [
            textwrap.fill(n, len(header), initial_indent="  - ", subsequent_indent="    ")
            for n in notes
        ]
    lines.append("")
    if cal.chosen is None:
        lines.append("No candidate fits: nothing written.")
    else:
        c = cal.chosen
        lines.append(
            f"Fastest that fits: {c.candidate.label} ({c.tokens_per_s:,.0f} tokens/s, "
            f"{_gib(c.peak_bytes)} GiB)."
        )
        if cal.output:
            lines.append(f"wrote {cal.output}")
    return "\n".join(lines)


def calibration_to_json(cal: Calibration) -> dict[str, Any]:
    """The calibration as a JSON-ready dict with a stable key order."""
    r = cal.request
    rows = []
    for m in cal.measurements:
        c = m.candidate
        rows.append(
            {
                "stage": c.stage,
                "micro_batch": c.micro_batch,
                "activation_checkpointing": c.checkpointing,
                "offload_optimizer": c.offload,
                "estimate_total_bytes": m.estimate_bytes,
                "estimate_peak_bytes": m.compare_bytes,
                "estimate_need_bytes": m.estimate_need_bytes,
                "status": m.status,
                "measured_peak_bytes": m.peak_bytes,
                "measured_init_peak_bytes": m.init_peak_bytes,
                "baseline_bytes": m.baseline_bytes,
                "ratio": m.ratio,
                "step_time_s": m.step_time_s,
                "tokens_per_s": m.tokens_per_s,
                "fits": m.fits,
                "chosen": m is cal.chosen,
                "detail": m.detail,
                "elapsed_s": round(m.elapsed_s, 1),
            }
        )
    return {
        "model": r.model,
        "ranks": r.ranks,
        "seq_len": r.seq_len,
        "precision": r.precision,
        "steps": r.steps,
        "device": cal.machine.device,
        "machine": cal.machine.description,
        "limit_bytes_per_rank": cal.machine.limit_bytes_per_rank,
        "measured": "max_memory_allocated"
        if cal.machine.device == "cuda"
        else "peak RSS above baseline",
        "candidates": rows,
        "chosen": None if cal.chosen is None else rows[cal.measurements.index(cal.chosen)],
        "config": cal.config,
        "output": cal.output,
        "notes": cal.notes,
    }


# --------------------------------------------------------------------------------------
# The child: one rank of one candidate (run by torch.distributed.run)
# --------------------------------------------------------------------------------------


def status_bytes(field: str) -> int:
    """`VmRSS` / `VmHWM` of this process in bytes (/proc/self/status gives kB)."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1]) * 1024
    raise RuntimeError(f"/proc/self/status has no {field}")


def reset_peak_rss() -> None:
    """VmHWM back to the current RSS (Linux >= 4.0)."""
    Path("/proc/self/clear_refs").write_text("5")


def measure_rank(
    config_path: str, model: str, seq_len: int, steps: int, timeout_s: float
) -> dict[str, Any]:
    """Build the engine as `dstrain train` does and time `steps` steps on random full-length
    batches; the peaks above this rank's baseline."""
    import gc
    from datetime import timedelta

    from dstrain.ds_runtime import prepare_deepspeed

    prepare_deepspeed(timeout_s=timeout_s)
    import deepspeed

    # Imports the engine would make inside build_engine count in the baseline, not the peak:
    # transformers' GPT-NeoX alone is ~110 MiB of code and data, no training state.
    import deepspeed.runtime.engine
    import deepspeed.runtime.zero.stage3
    import deepspeed.runtime.zero.stage_1_and_2
    import torch
    from deepspeed.accelerator import get_accelerator

    import dstrain.model  # noqa: F401
    from dstrain.architectures import resolve_architecture
    from dstrain.ds_run import load_ds_run
    from dstrain.settings import TrainSettings
    from dstrain.train import build_engine, training_device_type

    deepspeed.init_distributed(timeout=timedelta(seconds=timeout_s))
    get_accelerator().set_device(int(os.environ.get("LOCAL_RANK", "0")))
    rank, world = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
    arch = resolve_architecture(model)
    checked = load_ds_run(config_path, world_size=world)
    settings = TrainSettings(model=model, seed=0)
    cuda = training_device_type() == "cuda"

    def synchronize() -> None:
        if cuda:
            torch.cuda.synchronize()

    def peak() -> int:
        if cuda:
            return torch.cuda.max_memory_allocated() - base_allocated
        return status_bytes("VmHWM") - baseline

    _warm_up(checked)
    gc.collect()
    synchronize()
    baseline = status_bytes("VmRSS")
    reset_peak_rss()
    base_allocated = torch.cuda.memory_allocated() if cuda else 0
    if cuda:
        torch.cuda.reset_peak_memory_stats()
    engine, optimizer = build_engine(arch, settings, checked)
    init_peak = peak()
    micro = engine.train_micro_batch_size_per_gpu()
    generator = torch.Generator().manual_seed(rank)
    ids = torch.randint(0, arch.vocab_size, (micro, seq_len), generator=generator)
    ids = ids.to(engine.device)
    mask = torch.ones_like(ids)
    times = []
    for _ in range(steps):
        synchronize()
        started = time.perf_counter()
        loss = engine(input_ids=ids, attention_mask=mask, labels=ids).loss
        engine.backward(loss)
        engine.step()
        synchronize()
        times.append(time.perf_counter() - started)
    return {
        "status": "ok",
        "rank": rank,
        "baseline_bytes": 0 if cuda else baseline,
        "init_peak_bytes": init_peak,
        "peak_bytes": peak(),
        "step_times_s": times,
        "loss": float(loss),
        "optimizer": optimizer,
    }


def _warm_up(checked) -> None:
    """One step of a throwaway 12k-parameter engine with the candidate's config, before the
    baseline. DeepSpeed's first `initialize` imports ~570 more modules (sympy, networkx,
    torch's functorch, its own MoE and Triton code: ~50 MiB), and the kernel libraries set
    up thread pools and scratch space on first use: once per process, library overhead,
    not the training state the estimate counts. Its own memory is freed again."""
    import gc
    import json as json_module

    import deepspeed
    import torch
    import torch.nn.functional as F
    import torch.utils.checkpoint

    from dstrain.train import device_config

    class Toy(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.qkv = torch.nn.Linear(64, 192)
            self.head = torch.nn.Linear(64, 8)

        def forward(self, x, target):
            q, k, v = self.qkv(x).view(2, 16, 3, 4, 16).permute(2, 0, 3, 1, 4)
            attended = F.scaled_dot_product_attention(q, k, v, is_causal=True)
            hidden = F.gelu(attended.transpose(1, 2).reshape(2, 16, 64), approximate="tanh")
            return F.cross_entropy(self.head(hidden).float().view(32, 8), target)

    config, _ = device_config(checked)
    toy = Toy()
    engine, *_ = deepspeed.initialize(
        model=toy,
        model_parameters=toy.parameters(),
        config=json_module.loads(json_module.dumps(config)),
    )
    dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(checked.run.precision)
    x = torch.randn(2, 16, 64, dtype=dtype or torch.float32, device=engine.device)
    target = torch.zeros(32, dtype=torch.long, device=engine.device)
    engine.backward(engine(x, target))
    engine.step()
    engine.destroy()
    del engine, toy, x, target
    gc.collect()


def _is_out_of_memory(exc: BaseException) -> bool:
    text = str(exc)
    return type(exc).__name__ == "OutOfMemoryError" or (
        isinstance(exc, RuntimeError)
        and ("out of memory" in text or "can't allocate memory" in text)
    )


def child_main(argv: list[str]) -> int:
    """One rank: CONFIG OUT_DIR MODEL SEQ_LEN STEPS TIMEOUT_S -> OUT_DIR/rank{R}.json."""
    config_path, out_dir, model, seq_len, steps, timeout_s = argv
    rank = int(os.environ.get("RANK", "0"))
    try:
        result = measure_rank(config_path, model, int(seq_len), int(steps), float(timeout_s))
        code = 0
    except Exception as exc:  # reported by the parent, one line, not a traceback
        first = (str(exc).strip().splitlines() or [type(exc).__name__])[0][:300]
        status = "oom" if _is_out_of_memory(exc) else "failed"
        result = {"status": status, "rank": rank, "error": f"{type(exc).__name__}: {first}"}
        code = 3
    path = Path(out_dir) / f"rank{rank}.json"
    path.with_suffix(".tmp").write_text(json.dumps(result))
    path.with_suffix(".tmp").replace(path)
    if code == 0:
        from dstrain.train import close_process_group

        close_process_group()
    else:
        sys.stdout.flush()
        os._exit(code)  # peers may wait in a collective: the launcher stops them
    return code


if __name__ == "__main__":
    sys.exit(child_main(sys.argv[1:]))
