"""What the older engine tests could not see (issue 16): each test here fails on a
deliberate fault that the rest of the suite let through (scripts/mutants.py names them).

- the validation loss of two ranks is the whole split's, checked against a computation
  in this process with plain torch and transformers;
- resume is exact with dropout on (the RNG restore matters), under ZeRO-3, and keeps the
  fp16 loss scale and skipped-step count;
- a checkpoint of other data, another batch layout or another precision is refused.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import pytest
from subprocs import deepspeed_launcher, run_in_session
from test_train import (
    HA_FASTA,
    REPO,
    TRAIN_PY,
    assert_same_params,
    load_params,
    rows,
    train,
    train_rows,
    write_config,
)

pytestmark = pytest.mark.slow

DATA = REPO / "dstrain" / "data"
OTHER_HA_FASTA = DATA / "ha_EPI1857216_sequences.fasta"
QUIET = ("--eval-every", 0, "--no-export", "--dump-params")


def straight_and_resumed(tmp_path: Path, config: Path, *extra, steps: int) -> tuple[dict, dict]:
    """Final params of `steps` straight steps, and of steps/2 + `--resume auto` to `steps`."""
    common = ("--deepspeed_config", config, *QUIET, "--fasta", HA_FASTA, *extra)
    straight, resumed = tmp_path / "straight", tmp_path / "resumed"
    assert train(*common, "--output-dir", straight, "--max-steps", steps) == 0
    assert train(*common, "--output-dir", resumed, "--max-steps", steps // 2) == 0
    assert train(*common, "--output-dir", resumed, "--max-steps", steps, "--resume", "auto") == 0
    assert [r["step"] for r in train_rows(resumed)] == list(range(1, steps + 1))
    return load_params(straight / "params_rank0.pt"), load_params(resumed / "params_rank0.pt")


# --------------------------------------------------------------------------------------
# Two ranks: the validation loss is the whole split's
# --------------------------------------------------------------------------------------


def independent_val_loss(params: dict, val_ids: list) -> tuple[float, int]:
    """Summed next-token cross-entropy over every real token of every validation example,
    one unpadded example at a time (no dstrain batching, collator or evaluate)."""
    import numpy as np
    import torch
    import torch.nn.functional as F
    from transformers import GPTNeoXForCausalLM

    from dstrain.architectures import get_architecture
    from dstrain.model import gpt_neox_config

    model = GPTNeoXForCausalLM(gpt_neox_config(get_architecture("genslm_tiny"))).float()
    missing, unexpected = model.load_state_dict(params, strict=False)
    assert not unexpected and not [k for k in missing if not k.endswith("inv_freq")], missing
    model.eval()
    loss_sum, tokens = 0.0, 0
    with torch.no_grad():
        for ids in val_ids:
            ids = torch.tensor(np.asarray(ids, dtype=np.int64))[None]
            logits = model(input_ids=ids).logits[0, :-1].double()
            loss_sum += F.cross_entropy(logits, ids[0, 1:], reduction="sum").item()
            tokens += ids.size(1) - 1
    return loss_sum / tokens, tokens


@pytest.mark.multiproc
def test_two_rank_validation_equals_one_process_computation(tmp_path):
    from dstrain.prepare import load_prepared

    config = write_config(
        tmp_path / "ds.json",
        precision="fp32",
        zero_optimization={"stage": 2},
        batch={"train_micro_batch_size_per_gpu": 4},
    )
    run_dir = tmp_path / "run"
    result = run_in_session(
        [
            *deepspeed_launcher(2),
            str(TRAIN_PY),
            "--deepspeed_config",
            str(config),
            "--output-dir",
            str(run_dir),
            "--max-steps",
            "2",
            "--eval-every",
            "0",  # the final evaluation only, on the final weights
            "--no-export",
            "--dump-params",
            "--no-progress",
        ],
        timeout=300,
        cwd=REPO,
    )
    assert result.returncode == 0, result.stdout[-4000:]
    assert "world size 2" in result.stdout
    final = [r for r in rows(run_dir) if "val_loss" in r][-1]
    assert final["step"] == 2

    val = load_prepared(run_dir / "cache").val
    assert len(val) >= 4  # each rank evaluates several examples, rank 0 only half of them
    loss, tokens = independent_val_loss(
        load_params(run_dir / "params_rank0.pt"), [val[i] for i in range(len(val))]
    )
    assert final["val_tokens"] == tokens
    assert final["val_loss"] == pytest.approx(loss, rel=1e-5)


# --------------------------------------------------------------------------------------
# Resume is exact
# --------------------------------------------------------------------------------------


def test_resume_is_exact_with_dropout(tmp_path):
    import torch

    from dstrain.architectures import get_architecture
    from dstrain.model import build_model

    tiny = get_architecture("genslm_tiny")
    model_json = tmp_path / "tiny_dropout" / "config.json"
    model_json.parent.mkdir()
    model_json.write_text(
        json.dumps(
            {
                "model_type": "gpt_neox",
                "hidden_size": tiny.hidden_size,
                "num_hidden_layers": tiny.num_layers,
                "num_attention_heads": tiny.num_heads,
                "intermediate_size": tiny.intermediate_size,
                "vocab_size": tiny.vocab_size,
                "hidden_dropout": 0.1,
                "attention_dropout": 0.1,
            }
        )
    )
    # The model dstrain builds from this file really drops out: two train-mode forwards
    # differ, so the resumed run matches only if the RNG state comes back with it.
    model = build_model(model_json).train()
    ids = torch.tensor([[1, 10, 6, 16, 51, 5, 65, 2]])
    with torch.no_grad():
        assert not torch.equal(model(ids).logits, model(ids).logits)
        model.eval()
        assert torch.equal(model(ids).logits, model(ids).logits)

    config = write_config(
        tmp_path / "ds.json",
        precision="fp32",
        zero_optimization={"stage": 1},
        batch={"train_micro_batch_size_per_gpu": 4},
    )
    straight, resumed = straight_and_resumed(tmp_path, config, "--model", model_json, steps=6)
    assert_same_params(straight, resumed)


def test_fp16_loss_scale_survives_resume(tmp_path, fp16_on_cpu, inject_inf):
    # Patched: only DeepSpeed's CPU fp16-support check (fp16_on_cpu, tests/conftest.py).
    config = write_config(
        tmp_path / "ds.json",
        precision="fp16",
        zero_optimization={"stage": 2},
        batch={"train_micro_batch_size_per_gpu": 4},
        fp16={"initial_scale_power": 8, "hysteresis": 1},
    )
    inject_inf["poison"] = {2}  # the second backward = optimizer step 2 overflows
    run_dir = tmp_path / "run"
    common = ("--deepspeed_config", config, "--output-dir", run_dir, *QUIET)
    assert train(*common, "--max-steps", 3) == 0
    before = {r["step"]: r for r in train_rows(run_dir)}
    assert before[1]["loss_scale"] == 2.0**8 and before[1]["skipped_steps"] == 0
    assert before[3]["loss_scale"] == 2.0**7 and before[3]["skipped_steps"] == 1

    assert train(*common, "--max-steps", 5, "--resume", "auto") == 0
    after = {r["step"]: r for r in train_rows(run_dir)}
    assert sorted(after) == [1, 2, 3, 4, 5]
    assert inject_inf["backward"] == 5  # no overflow after the resume: 4 and 5 are clean
    for step in (4, 5):
        # the halved scale, not 2**initial_scale_power again; the skip still counted
        assert after[step]["loss_scale"] == 2.0**7, after[step]
        assert after[step]["skipped_steps"] == 1, after[step]


# --------------------------------------------------------------------------------------
# Resume refuses a checkpoint of another run, and leaves it as it was
# --------------------------------------------------------------------------------------


def snapshot(directory: Path) -> dict[str, str]:
    """Every file under `directory` with the SHA-256 of its bytes."""
    return {
        str(p.relative_to(directory)): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(directory.rglob("*"))
        if p.is_file()
    }


@pytest.fixture(scope="module")
def saved_run(tmp_path_factory):
    """A 2-step fp32 ZeRO-1 run on the HA FASTA, micro 4, accumulation 1: (config, run)."""
    base = tmp_path_factory.mktemp("saved")
    config = write_config(
        base / "ds.json",
        precision="fp32",
        zero_optimization={"stage": 1},
        batch={"train_micro_batch_size_per_gpu": 4, "gradient_accumulation_steps": 1},
    )
    run_dir = base / "run"
    args = ("--deepspeed_config", config, "--fasta", HA_FASTA, "--output-dir", run_dir)
    assert train(*args, "--max-steps", 2, "--eval-every", 0, "--no-export") == 0
    return config, run_dir


def assert_refused(saved_run, capsys, *changed, config=None) -> str:
    """Resume `saved_run` with `changed` flags: exit 1, and nothing in the run directory
    touched (checkpoints, settings.json, ds_config.json, metrics, token cache); returns
    stderr."""
    saved_config, run_dir = saved_run
    before = snapshot(run_dir)
    capsys.readouterr()
    code = train(
        "--deepspeed_config",
        config or saved_config,
        "--output-dir",
        run_dir,
        "--max-steps",
        4,
        "--eval-every",
        0,
        "--no-export",
        "--resume",
        "auto",
        *(changed or ("--fasta", HA_FASTA)),
    )
    err = capsys.readouterr().err
    assert code == 1, err
    assert "cannot resume" in err and "Traceback" not in err
    assert snapshot(run_dir) == before
    assert (run_dir / "checkpoints" / "latest").read_text() == "step00000002"
    return err


def test_resume_refuses_other_data(saved_run, capsys, tmp_path):
    # Another file of the same length and kind (HA genes): only its bytes differ. Its own
    # cache dir, so the saved run's token cache is not rebuilt from it.
    err = assert_refused(
        saved_run, capsys, "--fasta", OTHER_HA_FASTA, "--cache-dir", tmp_path / "cache"
    )
    assert "source_sha256: checkpoint" in err
    assert "batch:" not in err and "precision:" not in err


@pytest.mark.parametrize(("micro", "accum"), [(2, 1), (4, 2)])
def test_resume_refuses_other_batch_layout(saved_run, capsys, tmp_path, micro, accum):
    config = write_config(
        tmp_path / "ds.json",
        precision="fp32",
        zero_optimization={"stage": 1},
        batch={"train_micro_batch_size_per_gpu": micro, "gradient_accumulation_steps": accum},
    )
    err = assert_refused(saved_run, capsys, config=config)
    assert (
        "batch: checkpoint {'micro': 4, 'accum': 1, 'world': 1}, "
        f"now {{'micro': {micro}, 'accum': {accum}, 'world': 1}}" in err
    )


def test_resume_refuses_other_precision(saved_run, capsys, tmp_path):
    config = write_config(
        tmp_path / "ds.json",
        precision="bf16",
        zero_optimization={"stage": 1},
        batch={"train_micro_batch_size_per_gpu": 4, "gradient_accumulation_steps": 1},
    )
    err = assert_refused(saved_run, capsys, config=config)
    assert "precision: checkpoint 'fp32', now 'bf16'" in err


# Stage 3 last: it patches torch.nn.functional.linear for the rest of the process.


def test_zero3_resume_is_exact(tmp_path):
    config = write_config(
        tmp_path / "ds.json",
        precision="fp32",
        zero_optimization={"stage": 3},
        batch={"train_micro_batch_size_per_gpu": 4},
    )
    straight, resumed = straight_and_resumed(tmp_path, config, steps=6)
    assert_same_params(straight, resumed)
