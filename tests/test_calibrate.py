"""`dstrain estimate --measure` (dstrain/calibrate.py): the candidate search, the flags, the
estimate's peak, and a real 2-rank calibration whose written config then trains."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest
from subprocs import clean_env, run_cli, run_in_session

from dstrain.calibrate import Candidate, CandidateSearch, micro_batch_ladder
from dstrain.memory import estimate_from_flags

REPO = Path(__file__).resolve().parent.parent
HA_FASTA = REPO / "dstrain" / "data" / "ha_CY163680_sequences.fasta"


def drive(search: CandidateSearch, outcome) -> list[Candidate]:
    """Run the search to its end; `outcome(candidate)` -> (status, tokens/s)."""
    measured = []
    while (candidate := search.next_candidate()) is not None:
        measured.append(candidate)
        search.record(candidate, *outcome(candidate))
    return measured


# --------------------------------------------------------------------------------------
# The search (pure)
# --------------------------------------------------------------------------------------


def test_search_doubles_micro_batch_until_throughput_stops_growing():
    search = CandidateSearch([2], [1, 2, 4, 8, 16], [False, True], ["none"])
    speed = {1: 100.0, 2: 180.0, 4: 185.0, 8: 400.0, 16: 800.0}
    measured = drive(search, lambda c: ("ok", speed[c.micro_batch]))
    # 4 is under 5% faster than 2: no 8 or 16; no memory wall: no checkpointing family.
    assert [(c.micro_batch, c.checkpointing) for c in measured] == [
        (1, False),
        (2, False),
        (4, False),
    ]


def test_search_tries_checkpointing_only_beyond_a_memory_wall():
    search = CandidateSearch([0, 3], [1, 2, 4, 8], [False, True], ["none", "cpu"])

    def outcome(c: Candidate):
        limit = {(0, False): 2, (0, True): 4, (3, False): 8}.get((c.stage, c.checkpointing), 8)
        if c.offload == "cpu":
            limit = 8
        return ("ok", 100.0 * c.micro_batch) if c.micro_batch <= limit else ("oom", None)

    measured = drive(search, outcome)
    labels = [c.label for c in measured]
    # Stage 0 runs out of memory at micro 4: checkpointing from 4 up (not 1-2), whose own
    # wall at 8 opens the offload family beyond 4. Stage 3 never hits a wall: nothing more.
    assert labels == [
        "ZeRO-0 micro 1",
        "ZeRO-0 micro 2",
        "ZeRO-0 micro 4",
        "ZeRO-3 micro 1",
        "ZeRO-3 micro 2",
        "ZeRO-3 micro 4",
        "ZeRO-3 micro 8",
        "ZeRO-0 micro 4 ckpt",
        "ZeRO-0 micro 8 ckpt",
        "ZeRO-0 micro 4 offload cpu",
        "ZeRO-0 micro 8 offload cpu",
    ]  # offload fits up to 8 without a wall: no checkpointing with offload


def test_search_stops_a_family_at_a_failure_and_counts_a_skip_as_a_wall():
    search = CandidateSearch([1, 2], [1, 2, 4], [False, True], ["none"])
    status = {(1, 1, False): "failed", (2, 2, False): "skipped"}
    measured = drive(
        search,
        lambda c: (
            status.get((c.stage, c.micro_batch, c.checkpointing), "ok"),
            10.0 * c.micro_batch,
        ),
    )
    # Stage 1 failed (not memory): no more of it, no checkpointing; stage 2 skipped at 2
    # (the estimate says it does not fit): checkpointing from 2 up.
    assert [c.label for c in measured] == [
        "ZeRO-1 micro 1",
        "ZeRO-2 micro 1",
        "ZeRO-2 micro 2",
        "ZeRO-2 micro 2 ckpt",
        "ZeRO-2 micro 4 ckpt",
    ]


def test_micro_batch_ladder():
    assert micro_batch_ladder(1) == [1]
    assert micro_batch_ladder(16) == [1, 2, 4, 8, 16]
    assert micro_batch_ladder(12) == [1, 2, 4, 8, 12]


# --------------------------------------------------------------------------------------
# The estimate's peak
# --------------------------------------------------------------------------------------


@pytest.mark.parametrize("stage", [0, 1, 2, 3])
def test_peak_counts_activations_and_late_gradients_once(stage):
    est = estimate_from_flags(model_name="genslm_25M", gpus_per_node=2, seq_len=512)
    row = est.stage(stage)
    assert 0 < row.exclusive_gradients_bytes <= row.gradients_bytes
    if stage < 3:  # every gradient is made in backward and gone after the step
        assert row.exclusive_gradients_bytes == row.gradients_bytes
    else:  # the 16-bit gradient partition stays for the whole run
        assert row.exclusive_gradients_bytes < row.gradients_bytes
    overlap = min(row.activations_bytes, row.exclusive_gradients_bytes)
    assert row.peak_bytes == row.total_bytes - overlap
    assert row.peak_bytes >= row.total_bytes - row.activations_bytes


# --------------------------------------------------------------------------------------
# Flags: errors without a traceback, before any engine starts
# --------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("argv", "says"),
    [
        (["--params", "1e6", "--measure"], "--params (measuring builds a real model"),
        (["--model", "genslm_tiny", "--measure", "--nodes", "2"], "--nodes"),
        (["--model", "genslm_tiny", "--measure", "--stages", "1,5"], "--stages '1,5'"),
        (["--model", "genslm_tiny", "-o", "x.json"], "-o/--output only go with --measure"),
        (["--model", "genslm_tiny", "--steps", "2"], "--steps only go with --measure"),
        (["--model", "genslm_25B", "--measure"], "genslm_25B cannot be built"),
    ],
)
def test_bad_measure_flags_are_usage_errors(capsys, argv, says):
    code, out, err = run_cli(["estimate", *argv], capsys)
    assert code == 2, err
    assert says in err and "Traceback" not in err
    assert out == ""


def test_measure_refuses_offload_on_a_cpu_only_machine(capsys, tmp_path):
    pytest.importorskip("torch")
    import torch

    if torch.cuda.is_available():
        pytest.skip("a GPU machine measures optimizer offload")
    code, _, err = run_cli(
        ["estimate", "--model", "genslm_tiny", "--measure", "--offload-optimizer", "cpu",
         "-o", str(tmp_path / "ds.json")],
        capsys,
    )  # fmt: skip
    assert code == 2
    assert "CPU-only machine" in err and "Traceback" not in err


# --------------------------------------------------------------------------------------
# Real engines: 2 CPU ranks
# --------------------------------------------------------------------------------------


def estimate_measure(*args: str, timeout: float = 240):
    return run_in_session(
        [sys.executable, "-m", "dstrain", "estimate", "--model", "genslm_tiny", "--measure",
         "--gpus-per-node", "2", "--seq-len", "32", "--steps", "2", *args],
        timeout=timeout,
        env=clean_env(),
    )  # fmt: skip


@pytest.mark.slow
@pytest.mark.multiproc
def test_measure_writes_a_config_that_trains(tmp_path, capsys):
    """The acceptance command, held to one candidate: measured on 2 CPU ranks beside its
    estimate; the written JSON validates and trains."""
    from dstrain.ds_run import load_ds_run
    from dstrain.train import main as train_main

    config = tmp_path / "measured.json"
    proc = estimate_measure(
        "--stages", "2", "--micro-batch", "2", "--activation-checkpointing", "none",
        "-o", str(config), "--json",
    )  # fmt: skip
    assert proc.returncode == 0, proc.stdout[-3000:]
    report = json.loads(proc.stdout[proc.stdout.index("{") :])
    (row,) = report["candidates"]
    assert row["status"] == "ok" and row["chosen"], row
    assert (row["stage"], row["micro_batch"]) == (2, 2)
    assert row["measured_peak_bytes"] > 0 and row["baseline_bytes"] > 0
    assert row["ratio"] == pytest.approx(row["measured_peak_bytes"] / row["estimate_peak_bytes"])
    assert row["step_time_s"] > 0 and row["tokens_per_s"] > 0
    assert report["output"] == str(config)
    run = load_ds_run(str(config), world_size=1).run
    assert (run.zero.stage, run.batch.train_micro_batch_size_per_gpu) == (2, 2)
    assert json.loads(config.read_text()) == report["config"]

    out_dir = tmp_path / "run"
    code = train_main(
        ["--no-progress", "--no-report", "--no-export", "--deepspeed_config", str(config),
         "--fasta", str(HA_FASTA), "--max-length", "64", "--max-steps", "2",
         "--eval-every", "0", "--output-dir", str(out_dir)]
    )  # fmt: skip
    assert code == 0
    steps = [json.loads(x) for x in (out_dir / "metrics.jsonl").read_text().splitlines()]
    assert max(r.get("step", 0) for r in steps) == 2


@pytest.mark.slow
@pytest.mark.multiproc
def test_a_candidate_that_times_out_is_reported_not_fatal(tmp_path):
    proc = estimate_measure(
        "--stages", "0", "--micro-batch", "1", "--activation-checkpointing", "none",
        "--candidate-timeout", "1", "-o", str(tmp_path / "ds.json"),
    )  # fmt: skip
    assert proc.returncode == 1, proc.stdout[-3000:]
    assert "ZeRO-0 micro 1" in proc.stdout and "timeout" in proc.stdout
    assert "error: no candidate fits" in proc.stdout
    assert "Traceback" not in proc.stdout
    assert not (tmp_path / "ds.json").exists()
