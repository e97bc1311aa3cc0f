"""The engine loop end to end on CPU with real DeepSpeed engines (gloo, CPU accelerator).

In-process runs call `dstrain.train.main` the way `dstrain train` does; multi-rank and
signal tests start real processes (`deepspeed` launcher, `python dstrain/train.py`).
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from subprocs import clean_env, deepspeed_launcher, run_in_session

from dstrain.ds_config import build_ds_config, render_ds_config
from dstrain.errors import DstrainError
from dstrain.settings import make_deepspeed_settings

pytestmark = pytest.mark.slow

REPO = Path(__file__).resolve().parent.parent
TRAIN_PY = REPO / "dstrain" / "train.py"
HA_FASTA = REPO / "dstrain" / "data" / "ha_CY163680_sequences.fasta"


def write_config(path: Path, **settings) -> Path:
    base = {"scheduler": {"type": "none"}, "steps_per_print": 1_000_000, "optimizer": {"lr": 2e-3}}
    base.update(settings)
    path.write_text(render_ds_config(build_ds_config(make_deepspeed_settings(base))))
    return path


def train(*args: str) -> int:
    from dstrain.train import main

    # The end-of-run report.png has its own tests (test_report.py); ~1.7 s a run saved here.
    return main(["--no-progress", "--no-report", *map(str, args)])


def rows(run_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


def train_rows(run_dir: Path) -> list[dict]:
    return [r for r in rows(run_dir) if "loss" in r]


def latest_step_logged(run_dir: Path) -> int:
    """The highest step in metrics.jsonl so far (a line being written is skipped)."""
    path, best = run_dir / "metrics.jsonl", 0
    for line in path.read_text().splitlines() if path.exists() else []:
        try:
            best = max(best, json.loads(line).get("step", 0))
        except ValueError:
            continue
    return best


def load_params(path: Path) -> dict:
    import torch

    return torch.load(path, weights_only=True)


def assert_same_params(a: dict, b: dict, atol: float = 0.0) -> None:
    import torch

    assert a.keys() == b.keys()
    for name in a:
        torch.testing.assert_close(a[name], b[name], atol=atol, rtol=0, msg=name)


def run_process(command: list[str], timeout: float = 300):
    return run_in_session(command, timeout=timeout, cwd=REPO)


# --------------------------------------------------------------------------------------
# One rank, every stage
# --------------------------------------------------------------------------------------


@pytest.mark.parametrize("precision", ["fp32", "bf16"])
@pytest.mark.parametrize("stage", [0, 1, 2, 3])  # stage 3 last: it patches torch for good
def test_loss_falls_over_20_steps(tmp_path, stage, precision):
    config = write_config(
        tmp_path / "ds.json",
        precision=precision,
        zero_optimization={"stage": stage},
        batch={"train_micro_batch_size_per_gpu": 8},
    )
    run_dir = tmp_path / "run"
    assert (
        train(
            "--deepspeed_config",
            config,
            "--output-dir",
            run_dir,
            "--max-steps",
            20,
            "--eval-every",
            0,
            "--no-export",
        )
        == 0
    )
    losses = [r["loss"] for r in train_rows(run_dir)]
    assert len(losses) == 20
    first, last = sum(losses[:3]) / 3, sum(losses[-3:]) / 3
    assert last < first - 0.3, losses
    row = train_rows(run_dir)[-1]
    for key in (
        "step",
        "epoch",
        "loss",
        "lr",
        "loss_scale",
        "skipped_steps",
        "grad_norm",
        "samples_per_s",
        "useful_tokens_per_s",
        "tokens_per_s",
        "elapsed_s",
        "rss_bytes",
    ):
        assert key in row, key
    assert row["useful_tokens_per_s"] <= row["tokens_per_s"]
    assert (run_dir / "checkpoints" / "latest").read_text() == "step00000020"
    evals = [r for r in rows(run_dir) if "val_loss" in r]
    assert evals[-1]["step"] == 20
    assert evals[-1]["val_perplexity"] == pytest.approx(2.718281828 ** evals[-1]["val_loss"])


def test_invalid_config_stops_before_any_model_is_built(tmp_path, capsys):
    bad = tmp_path / "ds.json"
    bad.write_text(
        json.dumps(
            {
                "train_micro_batch_size_per_gpu": 4,
                "gradient_clipp1ng": 1,
                "zero_optimization": {"stage": 2, "offload_param": {"device": "cpu"}},
            }
        )
    )
    assert train("--deepspeed_config", bad, "--output-dir", tmp_path / "run") == 1
    err = capsys.readouterr().err
    assert "gradient_clipp1ng" in err and "offload_param" in err
    assert not (tmp_path / "run").exists()


def test_resume_from_a_missing_checkpoint_is_a_clear_error(tmp_path, capsys):
    code = train(
        "--output-dir", tmp_path / "run", "--resume", tmp_path / "nowhere", "--max-steps", 1
    )
    assert code == 1
    assert "does not exist" in capsys.readouterr().err


# --------------------------------------------------------------------------------------
# Gradient accumulation is the engine's: k x micro == one k-times-larger micro
# --------------------------------------------------------------------------------------


@pytest.mark.parametrize("stage", [0, 1, 2])
def test_accumulation_matches_a_larger_micro_batch(tmp_path, stage):
    # HA records all have 579 codons: every micro-batch has the same token count, so the
    # mean of k micro-batch means equals the mean over the large batch.
    results = {}
    for micro, accum in ((2, 4), (8, 1)):
        config = write_config(
            tmp_path / f"ds{micro}.json",
            precision="fp32",
            zero_optimization={"stage": stage},
            batch={"train_micro_batch_size_per_gpu": micro, "gradient_accumulation_steps": accum},
        )
        run_dir = tmp_path / f"run{micro}"
        assert (
            train(
                "--deepspeed_config",
                config,
                "--fasta",
                HA_FASTA,
                "--output-dir",
                run_dir,
                "--max-steps",
                3,
                "--eval-every",
                0,
                "--no-export",
                "--dump-params",
                "--cache-dir",
                tmp_path / "cache",
            )
            == 0
        )
        results[micro] = load_params(run_dir / "params_rank0.pt")
    assert_same_params(results[2], results[8], atol=1e-5)


# --------------------------------------------------------------------------------------
# fp16 loss scaling. DeepSpeed refuses fp16 on CPU ("Type fp16 is not supported on your
# device"); these tests patch only that accelerator check, and inject inf gradients with
# a hook on one weight (the only way to force an overflow on demand).
# --------------------------------------------------------------------------------------


# fp16_on_cpu and inject_inf: tests/conftest.py (shared with tests/test_report.py).


def fp16_config(path: Path, **scaling) -> Path:
    return write_config(
        path,
        precision="fp16",
        zero_optimization={"stage": 2},
        batch={"train_micro_batch_size_per_gpu": 4},
        fp16={"initial_scale_power": 8, "hysteresis": 1, **scaling},
    )


def test_fp16_overflow_skips_the_step_and_halves_the_scale(tmp_path, fp16_on_cpu, inject_inf):
    import torch

    inject_inf["poison"] = {3}  # the third backward = optimizer step 3
    run_dir = tmp_path / "run"
    assert (
        train(
            "--deepspeed_config",
            fp16_config(tmp_path / "ds.json"),
            "--output-dir",
            run_dir,
            "--max-steps",
            5,
            "--eval-every",
            0,
            "--no-export",
            "--dump-params",
        )
        == 0
    )
    by_step = {r["step"]: r for r in train_rows(run_dir)}
    assert by_step[2]["skipped_steps"] == 0 and by_step[3]["skipped_steps"] == 1
    assert by_step[3]["loss_scale"] == by_step[2]["loss_scale"] / 2
    assert by_step[5]["skipped_steps"] == 1
    params = load_params(run_dir / "params_rank0.pt")
    assert all(torch.isfinite(t).all() for t in params.values())


def test_fp16_repeated_overflows_stop_with_advice(tmp_path, fp16_on_cpu, inject_inf, capsys):
    inject_inf["poison"] = {"all"}
    code = train(
        "--deepspeed_config",
        fp16_config(tmp_path / "ds.json", initial_scale_power=3),
        "--output-dir",
        tmp_path / "run",
        "--max-steps",
        30,
        "--eval-every",
        0,
        "--no-export",
    )
    assert code == 1
    err = capsys.readouterr().err
    assert "fp16 training stopped at step" in err
    assert "bf16" in err and "learning rate" in err and "Traceback" not in err


def test_fp16_skip_share_guard(tmp_path, fp16_on_cpu, inject_inf, capsys):
    # Scale 2**8 never overflows by itself here (the first test shows clean steps), so only
    # the injected steps count: 3 of the last 4 > 50% stops at step 3, above the minimum.
    inject_inf["poison"] = {1, 2, 3}
    code = train(
        "--deepspeed_config",
        fp16_config(tmp_path / "ds.json"),
        "--output-dir",
        tmp_path / "run",
        "--max-steps",
        20,
        "--eval-every",
        0,
        "--no-export",
        "--skip-window",
        4,
        "--max-skipped-share",
        0.5,
    )
    assert code == 1
    err = capsys.readouterr().err
    assert "fp16 training stopped at step 3: 3 of the last 3 optimizer steps were skipped" in err


# --------------------------------------------------------------------------------------
# Export: HF directory with the engine model's logits
# --------------------------------------------------------------------------------------


# Export logits against the engine's at every stage and precision:
# tests/test_agreement.py::test_export_logits_equal_the_engines


def test_export_command_on_a_checkpoint(tmp_path):
    run_dir = tmp_path / "run"
    assert train("--output-dir", run_dir, "--max-steps", 2, "--eval-every", 0, "--no-export") == 0
    result = subprocess.run(
        [sys.executable, "-m", "dstrain", "export", str(run_dir), "-o", str(tmp_path / "hf")],
        capture_output=True,
        timeout=300,
        env=clean_env(),
        check=False,
    )
    assert result.returncode == 0, result.stderr.decode()[-2000:]
    assert (tmp_path / "hf" / "model.safetensors").exists()
    assert b"genslm_tiny" in result.stdout
    missing = subprocess.run(
        [
            sys.executable,
            "-m",
            "dstrain",
            "export",
            str(tmp_path / "no"),
            "-o",
            str(tmp_path / "hf2"),
        ],
        capture_output=True,
        timeout=120,
        env=clean_env(),
        check=False,
    )
    assert missing.returncode == 1 and b"does not exist" in missing.stderr
    assert b"Traceback" not in missing.stderr


def test_export_replaces_an_earlier_export_whole_or_not_at_all(tmp_path, monkeypatch):
    import torch

    from dstrain.export import export_checkpoint

    run_dir = tmp_path / "run"
    assert train("--output-dir", run_dir, "--max-steps", 1, "--eval-every", 0) == 0
    hf = run_dir / "export"
    (hf / "marker").write_text("the earlier export")
    with pytest.raises(DstrainError, match="pass --overwrite"):
        export_checkpoint(run_dir / "checkpoints", hf, overwrite=False)

    def full_disk(*_args, **_kwargs):
        raise RuntimeError("disk full")  # what torch.save raises on a full disk

    monkeypatch.setattr(torch, "save", full_disk)
    with pytest.raises(RuntimeError, match="disk full"):
        export_checkpoint(run_dir / "checkpoints", hf, export_pt=True)
    assert (hf / "marker").exists() and (hf / "model.safetensors").exists()
    assert sorted(p.name for p in run_dir.iterdir() if p.name.startswith(".export")) == []
    monkeypatch.undo()
    export_checkpoint(run_dir / "checkpoints", hf, export_pt=True)
    assert not (hf / "marker").exists() and (hf / "pytorch_model.pt").exists()

    not_a_model = tmp_path / "notes"
    (not_a_model / "todo.txt").parent.mkdir()
    (not_a_model / "todo.txt").write_text("keep me")
    with pytest.raises(DstrainError, match="not a model directory"):
        export_checkpoint(run_dir / "checkpoints", not_a_model)
    assert (not_a_model / "todo.txt").read_text() == "keep me"


# --------------------------------------------------------------------------------------
# Real processes: SIGTERM + resume, and two ranks through the deepspeed launcher
# --------------------------------------------------------------------------------------


def test_sigterm_then_resume_matches_a_straight_run(tmp_path):
    common = [
        sys.executable,
        str(TRAIN_PY),
        "--no-progress",
        "--model",
        "genslm_small",
        "--max-steps",
        "12",
        "--eval-every",
        "0",
        "--no-export",
        "--dump-params",
        "--fasta",
        str(HA_FASTA),
    ]
    straight = tmp_path / "straight"
    done = run_process([*common, "--output-dir", str(straight)])
    assert done.returncode == 0, done.stdout[-3000:]

    resumed = tmp_path / "resumed"
    proc = subprocess.Popen(
        [*common, "--output-dir", str(resumed)],
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        env=clean_env(),
        start_new_session=True,
        cwd=REPO,
    )
    deadline = time.time() + 300
    try:
        while time.time() < deadline:
            if latest_step_logged(resumed) >= 5:
                break
            assert proc.poll() is None, proc.stdout.read().decode()[-3000:]
            time.sleep(0.02)
        proc.send_signal(signal.SIGTERM)
        out, _ = proc.communicate(timeout=120)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
    assert proc.returncode == 0, out.decode()[-3000:]
    stopped_at = int((resumed / "checkpoints" / "latest").read_text().removeprefix("step"))
    assert 5 <= stopped_at < 12, out.decode()[-2000:]
    assert not (resumed / "params_rank0.pt").exists()

    again = run_process([*common, "--output-dir", str(resumed), "--resume", "auto"])
    assert again.returncode == 0, again.stdout[-3000:]
    assert f"at step {stopped_at}" in again.stdout
    steps = [r["step"] for r in train_rows(resumed)]
    assert steps == list(range(1, 13))
    assert_same_params(
        load_params(straight / "params_rank0.pt"), load_params(resumed / "params_rank0.pt")
    )


@pytest.mark.multiproc
@pytest.mark.parametrize("stage", [2, 3])
def test_two_ranks_through_the_deepspeed_launcher_agree(tmp_path, stage):

    config = write_config(
        tmp_path / "ds.json",
        precision="bf16",
        zero_optimization={"stage": stage},
        batch={"train_micro_batch_size_per_gpu": 4},
    )
    run_dir = tmp_path / "run"
    result = run_process(
        [
            *deepspeed_launcher(2),
            str(TRAIN_PY),
            "--deepspeed_config",
            str(config),
            "--output-dir",
            str(run_dir),
            "--max-steps",
            "6",
            "--eval-every",
            "3",
            "--dump-params",
            "--no-progress",
        ]
    )
    log = result.stdout
    assert result.returncode == 0, log[-4000:]
    assert "world size 2" in log
    assert_same_params(
        load_params(run_dir / "params_rank0.pt"), load_params(run_dir / "params_rank1.pt")
    )
    assert (run_dir / "export" / "model.safetensors").exists()
    assert train_rows(run_dir)[-1]["step"] == 6


def test_deepspeed_csv_monitor_and_best_checkpoints(tmp_path):
    from dstrain.checkpoints import read_index

    config = write_config(
        tmp_path / "ds.json",
        precision="fp32",
        zero_optimization={"stage": 1},
        batch={"train_micro_batch_size_per_gpu": 8},
        csv_monitor={"enabled": True, "job_name": "ha"},
    )
    run_dir = tmp_path / "run"
    assert (
        train(
            "--deepspeed_config",
            config,
            "--output-dir",
            run_dir,
            "--max-steps",
            8,
            "--eval-every",
            2,
            "--keep-best",
            1,
            "--no-export",
        )
        == 0
    )
    lr_csv = run_dir / "monitor" / "ha" / "Train_Samples_lr.csv"  # DeepSpeed's own monitor
    assert len(lr_csv.read_text().splitlines()) >= 8
    # dstrain's metrics rows go to the same monitors (DeepSpeed itself never sends the loss)
    loss_csv = run_dir / "monitor" / "ha" / "Train_Samples_loss.csv"
    losses = [float(line.split(",")[1]) for line in loss_csv.read_text().splitlines()[1:]]
    assert losses == pytest.approx([r["loss"] for r in train_rows(run_dir)])
    val_csv = run_dir / "monitor" / "ha" / "Train_Samples_val_loss.csv"
    assert len(val_csv.read_text().splitlines()) - 1 == len(
        [r for r in rows(run_dir) if "val_loss" in r]
    )
    ckpt = run_dir / "checkpoints"
    index = read_index(ckpt)
    kept = sorted(p.name for p in ckpt.glob("step*"))
    assert kept == sorted(e["tag"] for e in index)
    assert "step00000008" in kept and len(kept) <= 2
    evals = {r["step"]: r["val_loss"] for r in rows(run_dir) if "val_loss" in r}
    best_step = min(evals, key=evals.get)
    assert f"step{best_step:08d}" in kept


@pytest.mark.multiproc
def test_dstrain_train_hands_off_to_the_launcher(tmp_path):
    run_dir = tmp_path / "run"
    result = run_process(
        [
            sys.executable,
            "-m",
            "dstrain",
            "train",
            "--num-gpus",
            "2",
            "--output-dir",
            str(run_dir),
            "--max-steps",
            "2",
            "--eval-every",
            "0",
            "--no-export",
            "--dump-params",
            "--no-progress",
        ]
    )
    log = result.stdout
    assert result.returncode == 0, log[-4000:]
    assert "launching: " in log and "--num_gpus 2" in log and "world size 2" in log
    assert_same_params(
        load_params(run_dir / "params_rank0.pt"), load_params(run_dir / "params_rank1.pt")
    )


@pytest.mark.parametrize("preset", ["zero2_bf16_offload.json", "zero3_bf16_offload.json"])
def test_offload_presets_train(tmp_path, preset):
    # Optimizer offload runs DeepSpeed's CPU Adam, JIT-built on first use (~45 s, cached).
    run_dir = tmp_path / "run"
    assert (
        train(
            "--deepspeed_config",
            REPO / "ds_configs" / preset,
            "--output-dir",
            run_dir,
            "--max-steps",
            3,
            "--eval-every",
            0,
            "--no-export",
        )
        == 0
    )
    row = train_rows(run_dir)[-1]
    assert row["step"] == 3 and row["skipped_steps"] == 0


def test_init_checkpoint_from_an_official_genslm_file(tmp_path, capsys, make_upstream_checkpoint):
    import torch

    from dstrain.model import build_model

    torch.manual_seed(123)
    source = build_model("genslm_tiny")
    upstream = make_upstream_checkpoint(source, tmp_path / "genslm_tiny.pt")
    refused = train(
        "--output-dir", tmp_path / "no", "--init-checkpoint", upstream, "--max-steps", 1
    )
    assert refused == 1 and "--trust-checkpoint" in capsys.readouterr().err
    run_dir = tmp_path / "run"
    config = write_config(
        tmp_path / "ds.json",
        precision="fp32",
        zero_optimization={"stage": 0},
        optimizer={"lr": 1e-12},
    )
    assert (
        train(
            "--deepspeed_config",
            config,
            "--output-dir",
            run_dir,
            "--init-checkpoint",
            upstream,
            "--trust-checkpoint",
            "--max-steps",
            1,
            "--eval-every",
            0,
            "--no-export",
            "--dump-params",
        )
        == 0
    )
    trained = load_params(run_dir / "params_rank0.pt")
    for name, param in source.named_parameters():
        torch.testing.assert_close(trained[name], param.detach(), atol=1e-6, rtol=0)


def test_no_validation_split_still_finishes(tmp_path):
    run_dir = tmp_path / "run"
    assert train("--output-dir", run_dir, "--max-steps", 2, "--val-fraction", 0, "--no-export") == 0
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["val_loss"] is None and summary["steps"] == 2
    assert not [r for r in rows(run_dir) if "val_loss" in r]


def test_too_little_data_for_one_accumulation_window(tmp_path, capsys):
    config = write_config(
        tmp_path / "ds.json",
        precision="fp32",
        batch={"train_micro_batch_size_per_gpu": 8, "gradient_accumulation_steps": 32},
    )
    code = train("--deepspeed_config", config, "--output-dir", tmp_path / "run", "--epochs", 1)
    assert code == 1
    assert "no optimizer step would run" in capsys.readouterr().err


def test_epoch_tail_is_announced(tmp_path, capsys):
    # 129 train examples / micro 8 = 17 micro-batches; accumulation 4 -> 4 steps + 1 unused
    config = write_config(
        tmp_path / "ds.json",
        precision="fp32",
        batch={"train_micro_batch_size_per_gpu": 8, "gradient_accumulation_steps": 4},
    )
    assert (
        train(
            "--deepspeed_config",
            config,
            "--output-dir",
            tmp_path / "run",
            "--epochs",
            1,
            "--eval-every",
            0,
            "--no-export",
        )
        == 0
    )
    out = capsys.readouterr().out
    assert "0 -> 4 (17 micro-batches per epoch per rank; the last 1 micro-batch(es)" in out
    assert train_rows(tmp_path / "run")[-1]["step"] == 4


def test_resume_refuses_a_checkpoint_of_another_run(tmp_path, capsys):
    run_dir = tmp_path / "run"
    assert train("--output-dir", run_dir, "--max-steps", 2, "--no-export") == 0
    code = train(
        "--output-dir",
        run_dir,
        "--max-steps",
        4,
        "--resume",
        "auto",
        "--model",
        "genslm_small",
        "--seed",
        7,
    )
    assert code == 1
    err = capsys.readouterr().err
    assert "cannot resume" in err and "seed: checkpoint 0, now 7" in err
    assert "architecture" in err


@pytest.mark.multiproc
def test_two_ranks_match_one_rank_with_the_same_global_batch(tmp_path):
    """2 ranks x micro 4 == 1 rank x micro 8 (fp32 ZeRO-2; HA records have equal lengths,
    so the mean over ranks of per-rank means is the global mean)."""

    common = [
        "--fasta",
        str(HA_FASTA),
        "--max-steps",
        "3",
        "--eval-every",
        "0",
        "--no-export",
        "--dump-params",
        "--no-progress",
    ]
    one = tmp_path / "one"
    config8 = write_config(
        tmp_path / "ds8.json",
        precision="fp32",
        zero_optimization={"stage": 2},
        batch={"train_micro_batch_size_per_gpu": 8},
    )
    assert train("--deepspeed_config", config8, "--output-dir", one, *common[:-1]) == 0
    two = tmp_path / "two"
    config4 = write_config(
        tmp_path / "ds4.json",
        precision="fp32",
        zero_optimization={"stage": 2},
        batch={"train_micro_batch_size_per_gpu": 4},
    )
    result = run_process(
        [
            *deepspeed_launcher(2),
            str(TRAIN_PY),
            "--deepspeed_config",
            str(config4),
            "--output-dir",
            str(two),
            *common,
        ]
    )
    assert result.returncode == 0, result.stdout[-4000:]
    assert_same_params(
        load_params(one / "params_rank0.pt"), load_params(two / "params_rank0.pt"), atol=1e-5
    )


def test_bf16_stage0_export_holds_the_fp32_masters(tmp_path):
    import torch
    from safetensors.torch import load_file

    config = write_config(
        tmp_path / "ds.json",
        precision="bf16",
        zero_optimization={"stage": 0},
        batch={"train_micro_batch_size_per_gpu": 8},
    )
    run_dir = tmp_path / "run"
    assert (
        train(
            "--deepspeed_config",
            config,
            "--output-dir",
            run_dir,
            "--max-steps",
            3,
            "--eval-every",
            0,
            "--dump-params",
        )
        == 0
    )
    exported = load_file(run_dir / "export" / "model.safetensors")
    module = load_params(run_dir / "params_rank0.pt")  # the engine's bf16 weights
    name = "gpt_neox.layers.0.attention.query_key_value.weight"
    master = exported[name]
    assert master.dtype == torch.float32
    assert not torch.equal(master.to(torch.bfloat16).float(), master)  # real fp32 values
    assert torch.equal(master.to(torch.bfloat16).float(), module[name])  # bf16 = rounded master


def test_a_fresh_run_will_not_overwrite_an_earlier_one(tmp_path, capsys):
    run_dir = tmp_path / "run"
    assert train("--output-dir", run_dir, "--max-steps", 2, "--no-export") == 0
    latest = (run_dir / "checkpoints" / "latest").read_text()
    assert train("--output-dir", run_dir, "--max-steps", 2, "--seed", 5) == 1
    assert "already holds a run" in capsys.readouterr().err
    assert (run_dir / "checkpoints" / "latest").read_text() == latest


def test_resume_refuses_another_zero_stage(tmp_path, capsys):
    run_dir = tmp_path / "run"
    zero0 = write_config(tmp_path / "z0.json", precision="fp32", zero_optimization={"stage": 0})
    zero2 = write_config(tmp_path / "z2.json", precision="fp32", zero_optimization={"stage": 2})
    assert (
        train("--deepspeed_config", zero0, "--output-dir", run_dir, "--max-steps", 2, "--no-export")
        == 0
    )
    assert (
        train(
            "--deepspeed_config",
            zero2,
            "--output-dir",
            run_dir,
            "--max-steps",
            4,
            "--resume",
            "auto",
        )
        == 1
    )
    assert "zero_stage: checkpoint 0, now 2" in capsys.readouterr().err


def test_resume_mid_epoch_with_windows_spanning_epochs(tmp_path):
    """Accumulation 4 over 17 micro-batches per epoch: step 5's window takes the last
    micro-batch of epoch 0 and three of epoch 1. Stopping at step 4 and resuming to 8 must
    equal 8 straight steps exactly."""
    config = write_config(
        tmp_path / "ds.json",
        precision="fp32",
        zero_optimization={"stage": 1},
        batch={"train_micro_batch_size_per_gpu": 8, "gradient_accumulation_steps": 4},
    )
    common = ["--deepspeed_config", config, "--eval-every", 0, "--no-export", "--dump-params"]
    assert train(*common, "--output-dir", tmp_path / "straight", "--max-steps", 8) == 0
    resumed = tmp_path / "resumed"
    assert train(*common, "--output-dir", resumed, "--max-steps", 4) == 0
    assert train(*common, "--output-dir", resumed, "--max-steps", 8, "--resume", "auto") == 0
    assert [r["step"] for r in train_rows(resumed)] == list(range(1, 9))
    assert [r["epoch"] for r in train_rows(resumed)][4] > 1.0  # step 5 ends in epoch 1
    assert_same_params(
        load_params(tmp_path / "straight" / "params_rank0.pt"),
        load_params(resumed / "params_rank0.pt"),
    )


@pytest.mark.multiproc
def test_two_rank_sigterm_then_resume_matches_a_straight_run(tmp_path):
    """The scheduler's way: SIGTERM to the whole launcher group. Both ranks finish the
    step and save; `--resume auto` then ends exactly where a straight run does."""

    config = write_config(
        tmp_path / "ds.json",
        precision="fp32",
        zero_optimization={"stage": 2},
        batch={"train_micro_batch_size_per_gpu": 4},
    )

    def command(run_dir: Path, *extra: str) -> list[str]:
        return [
            *deepspeed_launcher(2),
            str(TRAIN_PY),
            "--deepspeed_config",
            str(config),
            "--model",
            "genslm_small",
            "--max-steps",
            "12",
            "--eval-every",
            "0",
            "--no-export",
            "--dump-params",
            "--no-progress",
            "--output-dir",
            str(run_dir),
            *extra,
        ]

    straight = tmp_path / "straight"
    done = run_process(command(straight))
    assert done.returncode == 0, done.stdout[-3000:]

    resumed = tmp_path / "resumed"
    proc = subprocess.Popen(
        command(resumed),
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        env=clean_env(),
        start_new_session=True,
    )
    try:
        deadline = time.time() + 300
        while time.time() < deadline and latest_step_logged(resumed) < 5:
            assert proc.poll() is None, proc.stdout.read().decode()[-3000:]
            time.sleep(0.02)
        os.killpg(proc.pid, signal.SIGTERM)  # launcher and ranks, as a scheduler would
        out, _ = proc.communicate(timeout=120)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
    stopped_at = int((resumed / "checkpoints" / "latest").read_text().removeprefix("step"))
    assert 5 <= stopped_at < 12, out.decode()[-3000:]

    again = run_process(command(resumed, "--resume", "auto"))
    assert again.returncode == 0, again.stdout[-3000:]
    final = load_params(straight / "params_rank0.pt")
    assert_same_params(final, load_params(resumed / "params_rank0.pt"))
    assert_same_params(final, load_params(resumed / "params_rank1.pt"))


@pytest.mark.parametrize(
    ("block", "described", "adam"),
    [
        (
            {"bfloat16": {"enabled": True}, "zero_optimization": {"stage": 1}},
            "bf16, ZeRO-1",
            {"torch_adam": True},
        ),
        ({"bf16": {"enabled": True}, "zero_optimization": False}, "bf16, ZeRO-0", {}),
    ],
)
def test_banner_and_estimate_describe_the_run_deepspeed_builds(
    tmp_path, capsys, block, described, adam
):
    """DeepSpeed's old `bfloat16` alias and the boolean `zero_optimization` form: the
    banner and its memory estimate follow what the engine really built (the banner also
    compares the engine with the typed run and would say where they differ). That the
    estimate's bytes follow the precision is tested on `estimate_from_flags` in
    test_memory.py; a genslm_tiny's model states round to 0.00 GiB either way. The
    device line names the optimizer: torch's AdamW on CPU whether asked for or left on
    auto (no torch_adam)."""
    config = {
        "train_micro_batch_size_per_gpu": 4,
        "optimizer": {"type": "AdamW", "params": {"lr": 1e-3, **adam}},
        **block,
    }
    path = tmp_path / "ds.json"
    path.write_text(json.dumps(config))
    args = ("--deepspeed_config", path, "--output-dir", tmp_path / "run", "--max-steps", 1)
    assert train(*args, "--eval-every", 0, "--no-export") == 0
    out = capsys.readouterr().out
    assert f"| {described} |" in out
    assert "  device cpu | bf16 | torch AdamW | attention sdpa\n" in out
    assert "torch_adam" not in (tmp_path / "run" / "ds_config.json").read_text() or adam
    assert "the engine differs" not in out
    stage = described.rsplit("-", 1)[1]
    assert f"memory estimate, ZeRO-{stage}, per GPU" in out


def test_a_checkpoint_from_before_new_architecture_fields_still_resumes(tmp_path, capsys):
    """Checkpoints record the architecture, data settings and optimizer; one written before
    a field existed (here the dropout, ORF and optimizer fields, as an older dstrain wrote
    it: without a manifest, so resumed with --trust-checkpoint) compares that field at its
    default (the optimizer: torch AdamW where its saved config says torch_adam true). A
    checkpoint of another optimizer is refused with the flag that picks it (loading torch
    AdamW's state into FusedAdam would crash at the first step)."""
    import torch

    from dstrain.checkpoints import MANIFEST_NAME

    run_dir = tmp_path / "run"
    assert train("--output-dir", run_dir, "--max-steps", 2, "--no-export") == 0
    (states,) = (run_dir / "checkpoints").glob("*/mp_rank_00_model_states.pt")
    saved = torch.load(states, weights_only=False)
    for key in ("hidden_dropout", "attention_dropout"):
        del saved["dstrain"]["architecture"][key]
    for key in ("min_orf_codons", "strands"):  # data fields added later: at their defaults
        del saved["dstrain"]["data_settings"][key]
    assert saved["dstrain"].pop("optimizer") == "AdamW"
    torch.save(saved, states)
    (states.parent / MANIFEST_NAME).unlink()
    args = ("--output-dir", run_dir, "--max-steps", 3, "--resume", "auto", "--no-export")
    args += ("--trust-checkpoint",)
    assert train(*args) == 0
    assert train_rows(run_dir)[-1]["step"] == 3

    (states,) = (run_dir / "checkpoints").glob("*3/mp_rank_00_model_states.pt")
    saved = torch.load(states, weights_only=False)
    saved["dstrain"]["optimizer"] = "FusedAdam"
    torch.save(saved, states)
    (states.parent / MANIFEST_NAME).unlink()
    capsys.readouterr()
    assert train(*args[:3], 4, *args[4:]) != 0
    err = capsys.readouterr().err
    assert "optimizer: checkpoint 'FusedAdam', now 'AdamW'" in err and "--fused-adam" in err


# --------------------------------------------------------------------------------------
# Planned batching (dstrain.batch_plan): token budgets, length groups, packed rows
# --------------------------------------------------------------------------------------

# One HA file in windows of 256 codons: 132 train examples of 256 and 67 codons. 3072
# tokens per micro-batch make 9 micro-batches an epoch grouped or packed (5 per rank on 2
# ranks, one repeated). Accumulation 2: step 3 ends mid-epoch and the 6 steps cross an
# epoch (two on 2 ranks), each with its own plan.
PLANNED = [("grouped", 3072), ("packed", 3072)]


def planned_args(tmp_path: Path, batching: str, budget: int) -> list:
    config = write_config(
        tmp_path / "ds.json",
        precision="fp32",
        zero_optimization={"stage": 1},
        batch={"train_micro_batch_size_per_gpu": 4, "gradient_accumulation_steps": 2},
    )
    return [
        "--deepspeed_config", config, "--fasta", HA_FASTA, "--max-length", 256,
        "--max-steps", 6, "--eval-every", 3, "--no-export", "--dump-params",
        "--batching", batching, "--tokens-per-micro-batch", budget,
    ]  # fmt: skip


@pytest.mark.parametrize(("batching", "budget"), PLANNED)
def test_resume_is_exact_with_planned_batching(tmp_path, capsys, batching, budget):
    """Resumed from step 3 (mid-epoch), a run with budget micro-batches ends exactly where a
    straight run does; a resume with other batching is refused."""
    from dstrain.checkpoints import tag_for_step

    common = planned_args(tmp_path, batching, budget)
    straight, resumed = tmp_path / "straight", tmp_path / "resumed"
    assert train(*common, "--output-dir", straight) == 0
    out = capsys.readouterr().out
    assert f"batching: {'grouped by length' if batching == 'grouped' else 'packed'}" in out
    assert train_rows(straight)[-1]["epoch"] > 1.0
    step3 = straight / "checkpoints" / tag_for_step(3)
    assert train(*common, "--output-dir", resumed, "--resume", step3) == 0
    assert [r["step"] for r in train_rows(resumed)] == [4, 5, 6]
    assert_same_params(
        load_params(straight / "params_rank0.pt"), load_params(resumed / "params_rank0.pt")
    )
    other = [*common[:-2], "--tokens-per-micro-batch", budget * 2]
    assert train(*other, "--output-dir", tmp_path / "other", "--resume", step3) == 1
    err = capsys.readouterr().err
    assert f"'tokens_per_micro_batch': {budget}, 'padding': 'longest'}}, now" in err
    assert "Resume with the same settings (--batching, --tokens-per-micro-batch" in err


@pytest.mark.multiproc
@pytest.mark.parametrize(("batching", "budget"), PLANNED)
def test_two_rank_planned_batching_resumes_exactly(tmp_path, batching, budget):
    """2 ranks, epochs whose micro-batches do not divide evenly over the ranks (the tail
    repeats the first): no rank waits at an epoch end, the ranks agree, and a resume from
    step 3 ends where the straight run does (2 launches per mode)."""
    from dstrain.checkpoints import tag_for_step

    common = [*deepspeed_launcher(2), str(TRAIN_PY), "--no-progress", "--no-report"]
    common += map(str, planned_args(tmp_path, batching, budget))
    straight, resumed = tmp_path / "straight", tmp_path / "resumed"
    done = run_process([*common, "--output-dir", str(straight)], timeout=240)
    assert done.returncode == 0, done.stdout[-4000:]
    assert "run again at the end so that every rank runs" in done.stdout
    step3 = straight / "checkpoints" / tag_for_step(3)
    again = run_process(
        [*common, "--output-dir", str(resumed), "--resume", str(step3)], timeout=240
    )
    assert again.returncode == 0, again.stdout[-4000:]
    final = load_params(straight / "params_rank0.pt")
    assert_same_params(final, load_params(straight / "params_rank1.pt"))
    assert_same_params(final, load_params(resumed / "params_rank0.pt"))
