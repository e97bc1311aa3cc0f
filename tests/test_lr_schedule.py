"""The learning rate each optimizer step applies, and the pad-included validation loss.

Real `dstrain train` runs in this process (genslm_tiny, CPU DeepSpeed engines, a few
steps). The rate a step applies is read where the optimizer reads it: a global torch
optimizer step pre-hook records the parameter groups' `lr` as each step starts.
"""

from __future__ import annotations

import json

import pytest
from test_train import HA_FASTA, load_params, rows, train, train_rows

pytestmark = pytest.mark.slow

QUIET = ("--model", "genslm_tiny", "--fasta", HA_FASTA, "--eval-every", 0, "--no-export")


@pytest.fixture
def applied_lr(monkeypatch):
    """step (1, 2, ...) -> the rate the optimizer applied in that step, for every run the
    test makes (cleared by `applied_lr.clear()`). Every parameter group must agree."""
    from torch.optim.optimizer import register_optimizer_step_pre_hook

    import dstrain.train

    real_build, engines = dstrain.train.build_engine, []

    def build(*args, **kwargs):
        engine, optimizer = real_build(*args, **kwargs)
        engines.append(engine)
        return engine, optimizer

    monkeypatch.setattr(dstrain.train, "build_engine", build)
    seen: dict[int, set[float]] = {}

    def hook(optimizer, _args, _kwargs):  # ZeRO-1/2 step each group on its own: 2 calls
        step = engines[-1].global_steps + 1
        seen.setdefault(step, set()).update(float(g["lr"]) for g in optimizer.param_groups)

    class Applied:
        def __getitem__(self, step: int) -> float:
            (lr,) = seen[step]  # one rate per step, whatever the group
            return lr

        def steps(self) -> list[int]:
            return sorted(seen)

        def clear(self) -> None:
            seen.clear()

    handle = register_optimizer_step_pre_hook(hook)
    yield Applied()
    handle.remove()


def logged_lr(run_dir) -> dict[int, float]:
    return {r["step"]: r["lr"] for r in train_rows(run_dir)}


def test_default_schedule_runs_no_step_at_lr_0_and_logs_the_applied_rate(tmp_path, applied_lr):
    """The default WarmupLR (warm-up from 0, linear): DeepSpeed alone runs steps 1 and 2
    at lr 0 and dstrain used to log each step with the next step's rate."""
    from dstrain.settings import make_deepspeed_settings

    run_dir = tmp_path / "run"
    assert train(*QUIET, "--max-steps", 4, "--output-dir", run_dir) == 0
    assert applied_lr.steps() == [1, 2, 3, 4]
    assert all(applied_lr[step] > 0 for step in (1, 2, 3, 4))
    assert logged_lr(run_dir) == {step: applied_lr[step] for step in (1, 2, 3, 4)}
    # The documented semantics: step k at k / warmup_num_steps of the way to the peak.
    defaults = make_deepspeed_settings({})
    assert defaults.scheduler.warmup_min_lr == 0 and defaults.scheduler.warmup_type == "linear"
    peak, warmup = defaults.optimizer.lr, defaults.scheduler.warmup_num_steps
    for step in (1, 2, 3, 4):
        assert applied_lr[step] == pytest.approx(peak * step / warmup, rel=1e-12)
    # Without --loss-on-pad the evaluation rows are as they were.
    assert "val_loss_with_pad" not in [r for r in rows(run_dir) if "val_loss" in r][-1]


def foreign_config(path, scheduler: str, **params):
    """A DeepSpeed JSON as a user would write it (DeepSpeed's own defaults: log warm-up
    from 0 for WarmupLR / WarmupDecayLR, warmup_min_ratio 0 for WarmupCosineLR)."""
    config = {
        "train_micro_batch_size_per_gpu": 4,
        "gradient_accumulation_steps": 1,
        "steps_per_print": 1_000_000,
        "zero_optimization": {"stage": 1},
        "optimizer": {"type": "AdamW", "params": {"lr": 1e-3, "torch_adam": True}},
        "scheduler": {"type": scheduler, "params": params},
    }
    path.write_text(json.dumps(config, indent=2))
    return path


@pytest.mark.parametrize(
    ("scheduler", "params"),
    [
        ("WarmupLR", {"warmup_min_lr": 0, "warmup_max_lr": 1e-3, "warmup_num_steps": 3}),
        # total_num_steps = the run's 4: the cosine's last steps run at its floor, not 0.
        ("WarmupCosineLR", {"warmup_num_steps": 3, "total_num_steps": 4}),
    ],
)
def test_foreign_warmup_schedules_start_above_0(tmp_path, applied_lr, scheduler, params):
    config = foreign_config(tmp_path / "ds.json", scheduler, **params)
    run_dir = tmp_path / "run"
    assert (
        train(*QUIET, "--deepspeed_config", config, "--max-steps", 4, "--output-dir", run_dir) == 0
    )
    assert all(applied_lr[step] > 0 for step in (1, 2, 3, 4)), applied_lr.steps()
    assert logged_lr(run_dir) == {step: applied_lr[step] for step in (1, 2, 3, 4)}
    assert applied_lr[1] < applied_lr[2]  # still a warm-up


def test_decay_schedule_ends_above_0_and_resume_continues_it_exactly(tmp_path, applied_lr):
    """WarmupDecayLR over the whole run (total_num_steps = the run's 6 steps): the last
    step runs above 0 (DeepSpeed's schedule is 0 at iteration total_num_steps), and a run
    stopped at step 3 and resumed applies the same rates (no second advance on resume)."""
    params = {"warmup_min_lr": 0, "warmup_max_lr": 1e-3, "warmup_type": "linear"}
    config = foreign_config(
        tmp_path / "ds.json", "WarmupDecayLR", warmup_num_steps=2, total_num_steps=6, **params
    )
    common = (*QUIET, "--deepspeed_config", config)
    straight = tmp_path / "straight"
    assert train(*common, "--max-steps", 6, "--output-dir", straight) == 0
    rates = {step: applied_lr[step] for step in range(1, 7)}
    assert all(rate > 0 for rate in rates.values()), rates
    assert rates[6] < rates[5] < rates[4]  # decaying, and not yet at 0
    # The documented shape: up to the peak at step 2, down to 0 just after step 6.
    shape = {1: 1 / 2, 2: 1.0, 3: 4 / 5, 4: 3 / 5, 5: 2 / 5, 6: 1 / 5}
    assert rates == pytest.approx({step: 1e-3 * share for step, share in shape.items()})
    assert logged_lr(straight) == rates

    applied_lr.clear()
    resumed = tmp_path / "resumed"
    assert train(*common, "--max-steps", 3, "--output-dir", resumed) == 0
    assert train(*common, "--max-steps", 6, "--output-dir", resumed, "--resume", "auto") == 0
    assert {step: applied_lr[step] for step in range(1, 7)} == rates
    assert logged_lr(resumed) == rates


def test_a_schedule_that_ends_at_lr_0_is_announced(tmp_path, capsys):
    """Steps past a WarmupDecayLR's total_num_steps run at warmup_min_lr (0): the user's
    config says so, dstrain trains it but warns at the start."""
    params = {"warmup_min_lr": 0, "warmup_max_lr": 1e-3, "warmup_num_steps": 1}
    config = foreign_config(tmp_path / "ds.json", "WarmupDecayLR", total_num_steps=2, **params)
    run_dir = tmp_path / "run"
    assert (
        train(*QUIET, "--deepspeed_config", config, "--max-steps", 3, "--output-dir", run_dir) == 0
    )
    out = capsys.readouterr().out
    assert "warning: the WarmupDecayLR schedule gives lr 0 at step 3" in out
    assert "set it to 3 (scheduler.params.total_num_steps in " in out
    assert logged_lr(run_dir)[3] == 0


def test_loss_on_pad_also_logs_upstreams_pad_included_val_loss(tmp_path, capsys):
    """Upstream GenSLM's val/loss: the HF model loss with labels = input_ids (pads and all)
    over every validation record padded to max_length; recomputed here with plain
    transformers on the run's final weights."""
    import torch
    from transformers import GPTNeoXForCausalLM

    from dstrain.architectures import get_architecture
    from dstrain.codons import PAD_ID
    from dstrain.model import gpt_neox_config
    from dstrain.prepare import load_prepared

    max_length = 640  # above every bundled HA record (~570 codons): each one is padded
    run_dir = tmp_path / "run"
    args = ("--max-steps", 1, "--loss-on-pad", "--max-length", max_length, "--dump-params")
    assert train(*QUIET, *args, "--output-dir", run_dir) == 0
    final = [r for r in rows(run_dir) if "val_loss" in r][-1]
    assert f"val_loss_with_pad {final['val_loss_with_pad']:.4f}" in capsys.readouterr().out

    model = GPTNeoXForCausalLM(gpt_neox_config(get_architecture("genslm_tiny"))).float()
    missing, unexpected = model.load_state_dict(load_params(run_dir / "params_rank0.pt"), False)
    assert not unexpected and not [k for k in missing if not k.endswith("inv_freq")], missing
    model.eval()
    val = load_prepared(run_dir / "cache").val
    losses = []
    with torch.no_grad():
        for index in range(len(val)):
            record = torch.tensor(val[index].astype("int64"))
            ids = torch.full((1, max_length), PAD_ID, dtype=torch.long)
            ids[0, : len(record)] = record
            mask = (torch.arange(max_length) < len(record)).long()[None]
            losses.append(model(input_ids=ids, attention_mask=mask, labels=ids).loss.item())
    assert len(losses) >= 2
    expected = sum(losses) / len(losses)  # every record has max_length - 1 positions
    assert final["val_loss_with_pad"] == pytest.approx(expected, abs=1e-5)
    assert abs(final["val_loss_with_pad"] - final["val_loss"]) > 1e-3
