"""Elastic resume: a checkpoint written by one number of ranks continues on another.

The data position is pure plan arithmetic (`dstrain.batch_plan`: the rest of an epoch's
plan re-dealt over the new ranks), tested here for every batching mode, budgets and chains
of world sizes. Real engines then check the whole path: DeepSpeed's universal checkpoint
(converted once beside the tag, reused, pruned with it), the batch layout check, and
weights equal to a straight run's.
"""

from __future__ import annotations

import json
import shutil
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
from subprocs import deepspeed_launcher, run_cli, run_in_session
from test_batching import LAYOUTS

from dstrain.batch_plan import consumed_after, plan_epoch
from dstrain.errors import DstrainError

REPO = Path(__file__).resolve().parent.parent
TRAIN_PY = REPO / "dstrain" / "train.py"
HA_FASTA = REPO / "dstrain" / "data" / "ha_CY163680_sequences.fasta"

# --------------------------------------------------------------------------------------
# The data position: pure arithmetic
# --------------------------------------------------------------------------------------

LENGTHS = np.array((2048, 952, 1273, 419, 275, 222, 121, 75, 61, 38) * 9 + (579,) * 17)
"""107 examples of mixed lengths: no micro-batch count divides evenly over 2, 3 or 4."""


CHAINS = [(2, 1), (1, 2), (1, 4), (4, 1), (2, 4), (4, 2), (2, 1, 4), (4, 1, 2, 3), (3, 3)]
"""World sizes an epoch runs on, one after another (the last runs the epoch to its end)."""


def the_plan(mode: str, budget: int | None, world: int, epoch: int = 3):
    return plan_epoch(
        LENGTHS,
        mode=mode,
        micro=3,
        tokens_per_micro_batch=budget,
        max_length=2048,
        epoch=epoch,
        seed=5,
        world=world,
    )


def run_chain(mode, budget, chain, fractions) -> tuple[Counter, int, object]:
    """Micro-batches run (as tuples of example tuples) when an epoch planned for chain[0]
    ranks is run by chain[i] ranks for fractions[i] of each rank's share, then handed on
    (the last to the end); returns them, the padding run (the repeats some world reached
    at the end of the epoch, before or after a hand-over) and the plan."""
    plan = the_plan(mode, budget, chain[0])
    total = plan.num_real_micro_batches
    offset, ran, padding = 0, Counter(), 0
    for i, world in enumerate(chain):
        shares = [plan.share(rank, world=world, offset=offset) for rank in range(world)]
        assert len({len(share) for share in shares}) == 1  # no rank waits for another
        last = i == len(chain) - 1
        done = len(shares[0]) if last else int(fractions[i] * len(shares[0]))
        for share in shares:
            ran.update(tuple(map(tuple, rows)) for rows in share[:done])
        padding += max(0, done * world - (total - offset))
        offset = consumed_after(total, offset, world, done)
    assert offset == total
    return ran, padding, plan


@pytest.mark.parametrize(("mode", "budget"), LAYOUTS)
@pytest.mark.parametrize("chain", CHAINS)
def test_no_micro_batch_is_skipped_or_run_twice_across_world_sizes(mode, budget, chain):
    """Every micro-batch of the epoch's plan runs exactly once, however the ranks change
    part-way, except the last world's end-of-epoch padding (its first micro-batches
    again, fewer than its ranks); and the whole epoch's examples are covered."""
    for fractions in [(0.5, 0.5, 0.5), (0.0, 1.0, 0.3), (1.0, 0.0, 0.9), (0.2, 0.7, 0.0)]:
        ran, padding, plan = run_chain(mode, budget, chain, fractions)
        planned = Counter(
            tuple(map(tuple, plan.micro_batch(i))) for i in range(plan.num_real_micro_batches)
        )
        assert not planned - ran, "a planned micro-batch never ran"
        extra = ran - planned
        assert sum(extra.values()) == padding < max(chain)
        examples = Counter(i for batch in planned for row in batch for i in row)
        assert set(examples) == set(range(len(LENGTHS)))


@pytest.mark.parametrize(("mode", "budget"), LAYOUTS)
def test_an_unchanged_world_deals_the_plan_as_before(mode, budget):
    """Offset 0 on the plan's own world is the plan's own share (the path every run
    without a reshape takes); a resumed share after m micro-batches per rank continues
    with exactly the micro-batches the old ranks would have run next."""
    plan = the_plan(mode, budget, world=2)
    for rank in range(2):
        assert list(plan.share(rank, world=2, offset=0)) == list(plan.share(rank))
    straight = [plan.micro_batch(i) for i in range(plan.num_real_micro_batches)]
    offset = consumed_after(plan.num_real_micro_batches, 0, 2, 4)
    assert offset == 8
    one = plan.share(0, world=1, offset=offset)
    assert list(one) == straight[8:]


def test_consumed_after_counts_repeats_once():
    """Ranks already into the end-of-epoch repeats consumed the whole epoch, no more."""
    assert consumed_after(10, 0, 4, 3) == 10  # 12 dealt, the last 2 repeats
    assert consumed_after(10, 6, 3, 1) == 9
    assert consumed_after(10, 6, 3, 2) == 10
    assert consumed_after(10, 10, 2, 0) == 10


def test_a_universal_copy_is_no_tag_and_goes_with_its_tag(tmp_path):
    """TAG.universal is not a tag (listing, `--resume auto`), and publishing prunes it
    with its tag; a conversion killed part-way (`.partial`) is tidied at resume."""
    from dstrain.checkpoints import (
        _publish,
        find_resume_checkpoint,
        remove_stale_staging,
        tag_dirs,
        universal_path,
    )

    ckpt = tmp_path / "checkpoints"
    for name in ("step00000003", "step00000003.universal", "step00000006.universal.partial"):
        (ckpt / name).mkdir(parents=True)
    (ckpt / "step00000003.universal" / "zero").mkdir()
    assert tag_dirs(ckpt) == ["step00000003"]
    staging = ckpt / "step00000006.partial"
    staging.mkdir()
    _publish(ckpt, staging, "step00000006", 6, None, keep_best=2)
    assert not universal_path(ckpt, "step00000003").exists()
    assert not (ckpt / "step00000003").exists()
    assert remove_stale_staging(ckpt) and not (ckpt / "step00000006.universal.partial").exists()
    assert sorted(p.name for p in ckpt.iterdir()) == ["checkpoints.json", "latest", "step00000006"]
    with pytest.raises(DstrainError, match=r"no dstrain_manifest\.json"):
        find_resume_checkpoint(ckpt)


def test_reshape_names_what_it_cannot_convert(tmp_path, capsys):
    """`dstrain checkpoint reshape`: a missing path, a ZeRO-0 tag (nothing to convert) and
    a damaged one are one-paragraph errors, exit code 1, and nothing is written."""
    import torch

    from dstrain.checkpoints import hash_file, tag_for_step, write_manifest

    code, _out, err = run_cli(["checkpoint", "reshape", str(tmp_path / "nothing")], capsys)
    assert code == 1 and "does not exist" in err and "Traceback" not in err

    ckpt = tmp_path / "run" / "checkpoints"
    tag = tag_for_step(4)
    (ckpt / tag).mkdir(parents=True)
    states = ckpt / tag / "mp_rank_00_model_states.pt"
    torch.save({"module": {"w": torch.zeros(2)}}, states)  # stage 0: no *optim_states.pt
    files = {states.name: hash_file(states)}
    write_manifest(ckpt / tag, tag=tag, step=4, world_size=2, files=files)
    (ckpt / "latest").write_text(tag)
    code, _out, err = run_cli(["checkpoint", "reshape", str(tmp_path / "run")], capsys)
    assert code == 1 and "is a ZeRO-0 checkpoint" in err and "needs no conversion" in err

    torch.save({"module": {"w": torch.ones(2)}}, states)  # same size, other bytes
    code, _out, err = run_cli(["checkpoint", "reshape", str(ckpt / tag)], capsys)
    assert code == 1 and "is damaged" in err and "sha256" in err
    assert sorted(p.name for p in ckpt.iterdir()) == ["latest", tag]


# --------------------------------------------------------------------------------------
# Real engines: 2 ranks -> 1 and 1 -> 2 equal a straight run
# --------------------------------------------------------------------------------------

# HA genes all have the same length: each micro-batch's loss is a mean over its own
# tokens, so regrouping examples into other micro-batches (2 ranks x 1 vs 1 rank x 2
# accumulated) changes the gradient unless every example has as many tokens. Micro 1, 12
# steps of 2 sequences: all within epoch 0 (about 43 training examples), evaluated at
# step 6 so that --keep-best keeps the step-6 checkpoint to resume from.
STEPS, HALF = 12, 6


def write_config(path: Path, stage: int, accum: int) -> str:
    from dstrain.ds_config import build_ds_config, render_ds_config
    from dstrain.settings import make_deepspeed_settings

    base = {
        "scheduler": {"type": "none"},
        "steps_per_print": 1_000_000,
        "optimizer": {"lr": 2e-3},
        "precision": "fp32",
        "zero_optimization": {"stage": stage},
        "batch": {"train_micro_batch_size_per_gpu": 1, "gradient_accumulation_steps": accum},
    }
    path.write_text(render_ds_config(build_ds_config(make_deepspeed_settings(base))))
    return str(path)


def common_args(config: str, run_dir: Path) -> list[str]:
    return [
        "--deepspeed_config", config, "--fasta", str(HA_FASTA), "--max-steps", str(STEPS),
        "--eval-every", str(HALF), "--max-eval-batches", "1", "--keep-best", "2",
        "--no-export", "--dump-params", "--no-progress", "--no-report",
        "--output-dir", str(run_dir),
    ]  # fmt: skip


def train_in_process(*args: str) -> int:
    from dstrain.train import main

    return main(list(args))


def two_ranks(*args: str):
    result = run_in_session([*deepspeed_launcher(2), str(TRAIN_PY), *args], timeout=300, cwd=REPO)
    assert result.returncode == 0, result.stdout[-4000:]
    return result.stdout


def cut_back_to_half(straight: Path, copy: Path) -> Path:
    """A copy of a finished run as it stood after step HALF (its checkpoint of that step,
    `latest` naming it); returns the copy's checkpoint of step HALF."""
    from dstrain.checkpoints import tag_for_step

    shutil.copytree(straight, copy)
    ckpt = copy / "checkpoints"
    tag = tag_for_step(HALF)
    assert (ckpt / tag).is_dir()
    for path in ckpt.glob("step*"):
        if path.name != tag:
            shutil.rmtree(path)
    (ckpt / "latest").write_text(tag)
    index = [e for e in json.loads((ckpt / "checkpoints.json").read_text()) if e["tag"] == tag]
    (ckpt / "checkpoints.json").write_text(json.dumps(index))
    for name in ("params_rank0.pt", "params_rank1.pt", "summary.json"):
        (copy / name).unlink(missing_ok=True)
    return ckpt / tag


def max_weight_difference(a: Path, b: Path) -> float:
    import torch

    first, second = torch.load(a, weights_only=True), torch.load(b, weights_only=True)
    assert first.keys() == second.keys()
    return max((first[k] - second[k]).abs().max().item() for k in first)


def summary(run_dir: Path) -> dict:
    return json.loads((run_dir / "summary.json").read_text())


@pytest.mark.slow
@pytest.mark.multiproc
def test_two_ranks_resume_on_one_with_double_accumulation(tmp_path, capsys):
    """ZeRO-2: 2 ranks x 6 steps, converted to a universal checkpoint by --resume auto on
    1 rank with accumulation 2: the 12 steps equal the straight 2-rank run's. A changed
    global batch is refused first, naming both layouts and the fix."""
    straight = tmp_path / "straight"
    two_ranks(*common_args(write_config(tmp_path / "ds1.json", 2, 1), straight))
    resumed = tmp_path / "resumed"
    tag_dir = cut_back_to_half(straight, resumed)
    killed = tag_dir.parent / f"{tag_dir.name}.universal.partial"  # a conversion killed
    killed.mkdir()

    same_accum = common_args(write_config(tmp_path / "ds1.json", 2, 1), resumed)
    assert train_in_process(*same_accum, "--resume", "auto") == 1
    err = capsys.readouterr().err
    assert "checkpoint: 2 ranks x micro 1 x accumulation 1 = 2 sequences per step" in err
    assert "now: 1 rank x micro 1 x accumulation 1 = 1 sequences per step" in err
    assert "--grad-accum 2" in err and "Traceback" not in err
    assert not (tag_dir.parent / f"{tag_dir.name}.universal").exists()

    config2 = write_config(tmp_path / "ds2.json", 2, 2)
    args = common_args(config2, resumed)
    assert train_in_process(*args, "--resume", "auto", "--keep-best", "0") == 0
    out = capsys.readouterr().out
    assert (
        f"checkpoint {tag_dir.name} was written by 2 ranks, converted to a universal "
        f"checkpoint at {tag_dir}.universal, resuming on 1 rank" in out
    )
    assert "goes on after 12 of its" in out  # 6 steps x 2 ranks x 1 micro-batch
    assert not killed.exists()
    difference = max_weight_difference(straight / "params_rank0.pt", resumed / "params_rank0.pt")
    assert difference <= 1e-5
    assert summary(resumed)["samples_seen"] == summary(straight)["samples_seen"] == 2 * STEPS
    # --keep-best 0: the step-6 tag is pruned at the next save, and its universal copy too.
    assert sorted(p.name for p in tag_dir.parent.glob("step*")) == ["step00000012"]


@pytest.mark.slow
@pytest.mark.multiproc
def test_one_rank_resumes_on_two_through_a_reshaped_checkpoint(tmp_path, capsys):
    """ZeRO-3 (last: it patches torch for the rest of the process): 1 rank with
    accumulation 2, reshaped by hand with `dstrain checkpoint reshape` at step 6, resumed
    on 2 ranks reusing that copy: the 12 steps equal the straight 1-rank run's."""
    straight = tmp_path / "straight"
    assert train_in_process(*common_args(write_config(tmp_path / "ds2.json", 3, 2), straight)) == 0
    capsys.readouterr()
    resumed = tmp_path / "resumed"
    tag_dir = cut_back_to_half(straight, resumed)

    code, out, err = run_cli(["checkpoint", "reshape", str(resumed)], capsys)
    assert code == 0, err
    assert out.startswith(f"wrote {tag_dir}.universal: the universal checkpoint of {tag_dir}")
    assert "written by 1 rank(s)" in out
    code, _out, err = run_cli(["checkpoint", "reshape", str(tag_dir) + ".universal"], capsys)
    assert code == 1 and "is a universal copy" in err and "Traceback" not in err

    log = two_ranks(
        *common_args(write_config(tmp_path / "ds1.json", 3, 1), resumed), "--resume", "auto"
    )
    assert "already converted to a universal checkpoint" in log
    assert "rank(s) 1 had no saved RNG state and start from the seed" in log
    final = straight / "params_rank0.pt"
    assert max_weight_difference(final, resumed / "params_rank0.pt") <= 1e-5
    assert max_weight_difference(final, resumed / "params_rank1.pt") <= 1e-5
    assert summary(resumed)["samples_seen"] == summary(straight)["samples_seen"] == 2 * STEPS


def reshaped_trainer(lengths, mode: str, *, world: int, accum: int, epochs: float):
    """A Trainer with only what the data-position code reads (no engine, no data files):
    its real `_reshape_position`, `epoch_share` and planning."""
    from dstrain.settings import DataSettings, TrainSettings
    from dstrain.train import EpochLayout, Trainer, plan_run

    trainer = Trainer.__new__(Trainer)
    trainer.settings = TrainSettings(epochs=epochs, seed=5)
    trainer.data_settings = DataSettings(max_length=64, batching=mode)
    trainer.lengths = np.asarray(lengths)
    trainer.micro, trainer.world, trainer.accum, trainer.rank = 1, world, accum, 0
    trainer.layout, trainer.resume_lines, trainer._epoch_plan = EpochLayout(), [], None
    epoch_micro = None if mode == "random" else trainer.micro_per_epoch
    trainer.plan = plan_run(
        len(lengths),
        world=world,
        micro=1,
        accum=accum,
        epochs=epochs,
        max_steps=None,
        epoch_micro=epoch_micro,
    )
    return trainer


@pytest.mark.parametrize("mode", ["random", "grouped"])
@pytest.mark.parametrize(("old", "new"), [((2, 1), (1, 2)), ((1, 2), (2, 1))])
def test_epochs_after_a_reshape_train_every_example(mode, old, new):
    """--epochs 1 on 43 examples: 2 ranks pad the epoch to 44 micro-batches, 1 rank plans
    43. Stopped half-way and resumed on the other world size (the end step planned for
    the new one), the run still reaches every example but those of a final partial
    accumulation window, as any run's final epoch leaves out."""
    from dstrain.train import LoopState

    lengths = [20] * 43
    (old_world, old_accum), (new_world, new_accum) = old, new
    before = reshaped_trainer(lengths, mode, world=old_world, accum=old_accum, epochs=1)
    stop_step = before.plan.total_steps // 2
    done_per_rank = stop_step * old_accum
    trained = {
        i
        for rank in range(old_world)
        for rows in before.epoch_plan(0).share(rank)[:done_per_rank]
        for row in rows
        for i in row
    }
    after = reshaped_trainer(lengths, mode, world=new_world, accum=new_accum, epochs=1)
    loop = LoopState(epoch=0, micro_in_epoch=done_per_rank)
    after._reshape_position(loop, old_world)
    left = (after.plan.total_steps - stop_step) * new_accum
    for rank in range(new_world):
        after.rank = rank
        trained |= {i for rows in after.epoch_share(0)[:left] for row in rows for i in row}
    # Only a last partial accumulation window may stay out, as in any run's final epoch.
    missing = set(range(43)) - trained
    assert len(missing) <= after.plan.unused_tail < new_accum
