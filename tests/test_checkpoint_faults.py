"""Faults injected into real checkpoints: forged pickles, damaged files, hostile `latest`,
a damaged checkpoints.json, a full disk during the save, a SIGKILL during the save.

One short real run (genslm_tiny, 1 rank on CPU, checkpoints at steps 2 and 4) is trained
once per module; each case damages a copy of it and runs `dstrain train --resume` /
`dstrain export` in-process, the way the CLI does.
"""

from __future__ import annotations

import json
import math
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from subprocs import clean_env
from test_train import REPO, rows, train, train_rows, write_config

from dstrain.checkpoints import (
    MANIFEST_NAME,
    hash_file,
    read_latest,
    tag_files,
    verify_checkpoint,
    write_manifest,
)

pytestmark = pytest.mark.slow

RUN_ARGS = ("--eval-every", 2, "--save-every", 2, "--keep-best", 2, "--no-export")


@pytest.fixture(scope="module")
def trained_run(tmp_path_factory) -> Path:
    """A finished 4-step run: intact checkpoints step00000002 and step00000004."""
    run_dir = tmp_path_factory.mktemp("trained") / "run"
    assert train("--output-dir", run_dir, "--max-steps", 4, *RUN_ARGS) == 0
    tags = sorted(p.name for p in (run_dir / "checkpoints").glob("step*"))
    assert tags == ["step00000002", "step00000004"]
    return run_dir


@pytest.fixture
def run_copy(trained_run, tmp_path) -> Path:
    copy = tmp_path / "run"
    shutil.copytree(trained_run, copy)
    return copy


def resume(run_dir: Path, *extra, max_steps: int = 5) -> int:
    return train("--output-dir", run_dir, "--max-steps", max_steps, *RUN_ARGS, *extra)


def assert_resumed_cleanly(run_dir: Path, out: str, tag: str, end: int = 5) -> None:
    """Resumed from `tag`, trained on to `end` with finite losses, one row per step."""
    assert f"resumed from {run_dir / 'checkpoints' / tag} at step" in out, out[-3000:]
    steps = [r["step"] for r in train_rows(run_dir)]
    assert steps == list(range(1, end + 1))
    assert all(math.isfinite(r["loss"]) for r in train_rows(run_dir))
    assert read_latest(run_dir / "checkpoints") == (f"step{end:08d}", None)


def export_cli(*args) -> int:
    from dstrain.cli import main

    try:
        main(["export", *map(str, args)])
    except SystemExit as exc:
        return int(exc.code or 0)
    return 0


# --------------------------------------------------------------------------------------
# A crafted pickle never runs
# --------------------------------------------------------------------------------------


class _CreatesMarker:
    """Unpickling this creates a file: the stand-in for code hidden in a checkpoint."""

    def __init__(self, marker: Path):
        self.marker = str(marker)

    def __reduce__(self):
        return (open, (self.marker, "w"))


def plant_pickle(tag_dir: Path, marker: Path, *, manifest: str) -> None:
    """Replace rank 0's model states with a crafted pickle; `manifest`: "stale" (left as
    it was), "forged" (rewritten with the new file's digest) or "removed"."""
    import torch

    torch.save({"module": _CreatesMarker(marker)}, tag_dir / "mp_rank_00_model_states.pt")
    if manifest == "forged":
        files = {name: hash_file(tag_dir / name) for name in tag_files(tag_dir)}
        write_manifest(tag_dir, tag=tag_dir.name, step=4, world_size=1, files=files)
    elif manifest == "removed":
        (tag_dir / MANIFEST_NAME).unlink(missing_ok=True)


@pytest.mark.parametrize("manifest", ["stale", "forged", "removed"])
def test_a_crafted_pickle_is_refused_by_export_and_resume(run_copy, tmp_path, capsys, manifest):
    marker = tmp_path / "code-ran"
    ckpt = run_copy / "checkpoints"
    plant_pickle(ckpt / "step00000004", marker, manifest=manifest)

    assert export_cli(run_copy, "-o", tmp_path / "hf") == 1
    err = capsys.readouterr().err
    assert "mp_rank_00_model_states.pt" in err or MANIFEST_NAME in err, err
    if manifest == "forged":  # the digests match: the tensors-only pre-load refuses it
        assert "holds a pickled builtins.open" in err or "holds a pickled io.open" in err, err
    assert not (tmp_path / "hf").exists()

    assert resume(run_copy, "--resume", ckpt / "step00000004") == 1
    assert "no fallback" in capsys.readouterr().err

    # --resume auto passes over the crafted tag to the intact one before it.
    assert resume(run_copy, "--resume", "auto") == 0
    out = capsys.readouterr().out
    assert "step00000004" in out and "falling back to" in out
    assert_resumed_cleanly(run_copy, out, "step00000002")
    assert not marker.exists()


def test_a_passed_over_tag_is_set_aside_never_deleted(run_copy, capsys):
    """A tag that fails its check may only look damaged (a hand-copied .pt, a flaky file
    system): the fallback sets it aside as TAG.damaged, and the saves and prunes after the
    resume never delete it. A stray non-.pt file (a README) is not damage at all."""
    ckpt = run_copy / "checkpoints"
    (ckpt / "step00000002" / "README.txt").write_text("copied by hand")
    (ckpt / "step00000004" / "extra.pt").write_bytes(b"not from the save")
    assert resume(run_copy, "--resume", "auto", "--keep-best", 0) == 0
    out = capsys.readouterr().out
    assert_resumed_cleanly(run_copy, out, "step00000002")
    assert "Kept for inspection" in out
    assert (ckpt / "step00000004.damaged" / "extra.pt").is_file()
    assert sorted(p.name for p in ckpt.glob("step*")) == [
        "step00000004.damaged",
        "step00000005",
    ]


def test_trust_checkpoint_loads_a_checkpoint_without_manifest(run_copy, tmp_path, capsys):
    """What --trust-checkpoint is for (a checkpoint from an older dstrain), and what it
    costs: the same crafted file then runs (so the refusals above are what protects)."""
    ckpt = run_copy / "checkpoints"
    for tag in ("step00000002", "step00000004"):
        (ckpt / tag / MANIFEST_NAME).unlink()
    assert resume(run_copy, "--resume", "auto") == 1
    assert "found no intact checkpoint" in capsys.readouterr().err
    assert resume(run_copy, "--resume", "auto", "--trust-checkpoint", max_steps=4) == 0
    assert "resumed from" in capsys.readouterr().out

    marker = tmp_path / "code-ran"
    plant_pickle(ckpt / "step00000004", marker, manifest="removed")
    export_cli(ckpt / "step00000004", "-o", tmp_path / "hf", "--trust-checkpoint")
    assert marker.exists()


# --------------------------------------------------------------------------------------
# Damaged files: fall back to the older intact tag, or stop
# --------------------------------------------------------------------------------------


def damage(path: Path, how: str) -> None:
    data = path.read_bytes()
    if how == "truncated":
        path.write_bytes(data[: len(data) // 2])
    elif how == "zero-byte":
        path.write_bytes(b"")
    elif how == "garbled":  # a few bytes flipped mid-file: same size, loads without a check
        middle = len(data) // 2
        path.write_bytes(data[:middle] + bytes(b ^ 0x5A for b in data[middle : middle + 8]))
        path.write_bytes(path.read_bytes() + data[middle + 8 :])
        assert path.stat().st_size == len(data)
    else:
        raise AssertionError(how)


@pytest.mark.parametrize("how", ["truncated", "zero-byte", "garbled"])
@pytest.mark.parametrize(
    "name",
    ["mp_rank_00_model_states.pt", "zero_pp_rank_0_mp_rank_00_optim_states.pt", MANIFEST_NAME],
)
def test_a_damaged_file_falls_back_to_the_older_tag(run_copy, capsys, name, how):
    path = run_copy / "checkpoints" / "step00000004" / name
    damage(path, how)
    assert resume(run_copy, "--resume", "auto") == 0
    out = capsys.readouterr().out
    assert f"checkpoint {path.parent} is damaged" in out, out[-3000:]
    if name != MANIFEST_NAME or how != "garbled":  # (a garbled manifest may still parse)
        assert str(path) in out
    if name != MANIFEST_NAME and how != "garbled":
        assert "the manifest says" in out and "bytes" in out  # found vs expected size
    if name != MANIFEST_NAME and how == "garbled":
        assert "has sha256" in out  # found vs expected digest
    assert "falling back to" in out
    assert_resumed_cleanly(run_copy, out, "step00000002")
    # The damaged step-4 tag was replaced by the resumed run's own save of step 4.
    ckpt = run_copy / "checkpoints"
    for entry in json.loads((ckpt / "checkpoints.json").read_text()):
        verify_checkpoint(ckpt, entry["tag"])


@pytest.mark.parametrize("damaged", ["missing-dir", "extra-file", "both-tags"])
def test_missing_tag_extra_file_and_nothing_intact(run_copy, capsys, damaged):
    ckpt = run_copy / "checkpoints"
    if damaged == "missing-dir":
        shutil.rmtree(ckpt / "step00000004")
    elif damaged == "extra-file":
        (ckpt / "step00000004" / "extra.pt").write_bytes(b"not from the save")
    else:
        damage(ckpt / "step00000004" / "mp_rank_00_model_states.pt", "garbled")
        damage(ckpt / "step00000002" / "mp_rank_00_model_states.pt", "zero-byte")
    metrics_before = (run_copy / "metrics.jsonl").read_text()
    code = resume(run_copy, "--resume", "auto")
    out, err = capsys.readouterr()
    if damaged == "both-tags":
        assert code == 1
        assert "found no intact checkpoint" in err and "an empty file" in err, err
        assert "step00000004" in err and "step00000002" in err
        assert (run_copy / "metrics.jsonl").read_text() == metrics_before
        assert "Traceback" not in err
    else:
        assert code == 0
        assert ("is missing" if damaged == "missing-dir" else "is not in the manifest") in out
        assert_resumed_cleanly(run_copy, out, "step00000002")


# --------------------------------------------------------------------------------------
# `latest` and checkpoints.json
# --------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "content",
    [b"", b"  \n", b"../../..", b"/etc", b"step00000004/../step00000002", b"\xff\xfe", b"step 4"],
    ids=["empty", "blank", "dotdot", "absolute", "slash", "not-utf8", "space"],
)
def test_a_hostile_or_empty_latest(run_copy, tmp_path, capsys, content):
    ckpt = run_copy / "checkpoints"
    (ckpt / "latest").write_bytes(content)
    metrics_before = (run_copy / "metrics.jsonl").read_text()

    # Without --resume: the run is kept as it is (no restart from step 0).
    assert train("--output-dir", run_copy, "--max-steps", 2, "--no-export") == 1
    assert "already holds a run" in capsys.readouterr().err
    assert (run_copy / "metrics.jsonl").read_text() == metrics_before
    assert sorted(p.name for p in ckpt.glob("step*")) == ["step00000002", "step00000004"]
    # export of the run directory refuses; --resume auto takes the newest intact tag.
    assert export_cli(run_copy, "-o", tmp_path / "hf") == 1
    assert "latest" in capsys.readouterr().err
    assert resume(run_copy, "--resume", "auto") == 0
    out = capsys.readouterr().out
    assert f"{ckpt / 'latest'}" in out and "falling back to" in out
    assert_resumed_cleanly(run_copy, out, "step00000004")


def test_fifos_planted_in_the_run_do_not_hang_the_resume(run_copy, capsys):
    """FIFOs as checkpoints.json, as `latest` and inside the newest tag: opening any of them
    for reading would wait for a writer forever (the alarm turns a hang into a failure).
    All three are damage: the resume falls back, and dstrain's own pointer files are
    replaced by plain files again."""
    import os
    import signal

    def hang(_signum, _frame):
        raise AssertionError("the resume blocked on a FIFO")

    ckpt = run_copy / "checkpoints"
    for path in (ckpt / "checkpoints.json", ckpt / "latest", ckpt / "step00000004" / "fifo.pt"):
        path.unlink(missing_ok=True)
        os.mkfifo(path)
    previous = signal.signal(signal.SIGALRM, hang)
    signal.alarm(90)
    try:
        assert resume(run_copy, "--resume", "auto") == 0
    finally:
        signal.alarm(0)
        signal.signal(signal.SIGALRM, previous)
    out = capsys.readouterr().out
    assert "not a regular file" in out and "falling back to" in out, out
    assert_resumed_cleanly(run_copy, out, "step00000002")
    assert (ckpt / "latest").is_file() and (ckpt / "checkpoints.json").is_file()


def test_a_symlinked_latest_is_never_written_through(run_copy, tmp_path, capsys):
    """`latest` linked to a file outside the run: the resume falls back and the next save
    replaces the link; the file it pointed at is untouched."""
    ckpt = run_copy / "checkpoints"
    victim = tmp_path / "victim.txt"
    victim.write_text("step00000004")
    (ckpt / "latest").unlink()
    (ckpt / "latest").symlink_to(victim)
    assert resume(run_copy, "--resume", "auto") == 0
    out = capsys.readouterr().out
    assert_resumed_cleanly(run_copy, out, "step00000004")
    assert victim.read_text() == "step00000004"
    assert not (ckpt / "latest").is_symlink()


def test_latest_may_not_link_out_of_the_run(run_copy, tmp_path, capsys):
    ckpt = run_copy / "checkpoints"
    elsewhere = tmp_path / "other-run"
    shutil.copytree(ckpt / "step00000004", elsewhere)
    (ckpt / "linked").symlink_to(elsewhere, target_is_directory=True)
    (ckpt / "latest").write_text("linked")
    assert resume(run_copy, "--resume", "auto") == 0
    out = capsys.readouterr().out
    assert "a link out of" in out
    assert_resumed_cleanly(run_copy, out, "step00000004")


@pytest.mark.parametrize(
    "text",
    [
        "{not json",
        '{"tag": "step00000004"}',
        '[{"tag": "step00000009", "step": 9, "val_loss": 1.0}]',
        '[{"tag": "step00000004", "step": 4, "val_loss": NaN}]',
        None,
    ],
    ids=["invalid-json", "wrong-shape", "missing-tag", "nan-loss", "deleted"],
)
def test_a_damaged_index_is_rebuilt(run_copy, capsys, text):
    ckpt = run_copy / "checkpoints"
    if text is None:
        (ckpt / "checkpoints.json").unlink()
    else:
        (ckpt / "checkpoints.json").write_text(text)
    assert resume(run_copy, "--resume", "auto", "--save-every", 1, max_steps=6) == 0
    out = capsys.readouterr().out
    assert "Rebuilt it from the tag directories" in out, out[-3000:]
    assert_resumed_cleanly(run_copy, out, "step00000004", end=6)
    index = json.loads((ckpt / "checkpoints.json").read_text())
    assert all((ckpt / e["tag"]).is_dir() for e in index)
    assert all(e["val_loss"] is None or math.isfinite(e["val_loss"]) for e in index)
    # val_loss of the rebuilt entries comes from metrics.jsonl: the best tags are kept.
    best = sorted((r["val_loss"], r["step"]) for r in rows(run_copy) if "val_loss" in r)[:2]
    assert {f"step{s:08d}" for _, s in best} <= {e["tag"] for e in index}


# --------------------------------------------------------------------------------------
# A full disk and a SIGKILL during the save
# --------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "error",
    [
        OSError(28, "No space left on device"),
        RuntimeError("[enforce fail at inline_container.cc:672] . unexpected pos 433664 vs 433552"),
    ],
    ids=["oserror", "runtimeerror"],
)
def test_a_full_disk_during_the_save(run_copy, monkeypatch, capsys, error):
    """The only fake: DeepSpeed's writer raises what torch.save raises on a full disk
    (RuntimeError "unexpected pos", measured on a full tmpfs) after writing one file."""
    from deepspeed.runtime.checkpoint_engine.torch_checkpoint_engine import TorchCheckpointEngine

    real_save, calls = TorchCheckpointEngine.save, {"n": 0}

    def full_disk(self, state_dict, path, *args, **kwargs):
        calls["n"] += 1
        if calls["n"] > 1:
            raise error
        return real_save(self, state_dict, path, *args, **kwargs)

    monkeypatch.setattr(TorchCheckpointEngine, "save", full_disk)
    ckpt = run_copy / "checkpoints"
    assert resume(run_copy, "--resume", "auto", "--save-every", 1) == 1
    err = capsys.readouterr().err
    assert "could not save checkpoint" in err and "step00000005.partial" in err, err
    assert f"The last good checkpoint, {ckpt / 'step00000004'}, is kept" in err
    assert "MiB free there" in err and "Traceback" not in err
    assert not list(ckpt.glob("*.partial"))
    assert read_latest(ckpt) == ("step00000004", None)

    monkeypatch.undo()
    assert resume(run_copy, "--resume", "auto") == 0
    assert_resumed_cleanly(run_copy, capsys.readouterr().out, "step00000004")


@pytest.fixture
def small_tmpfs(tmp_path):
    """A 3 MiB tmpfs (room for the data cache and one checkpoint, not two): a real full
    disk. Needs root and mount rights; skipped elsewhere."""
    mount = tmp_path / "small"
    mount.mkdir()
    done = subprocess.run(
        ["mount", "-t", "tmpfs", "-o", "size=3m", "tmpfs", str(mount)],
        capture_output=True,
        check=False,
    )
    if done.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here: {done.stderr.decode().strip()}")
    try:
        yield mount
    finally:
        subprocess.run(["umount", "-l", str(mount)], check=False)


def test_a_real_full_disk(small_tmpfs, capsys):
    run_dir = small_tmpfs / "run"
    args = ("--output-dir", run_dir, "--eval-every", 0, "--save-every", 1, "--no-export")
    assert train(*args, "--max-steps", 3) == 1
    err = capsys.readouterr().err
    ckpt = run_dir / "checkpoints"
    assert f"could not save checkpoint {ckpt / 'step00000002.partial'}" in err, err
    assert f"The last good checkpoint, {ckpt / 'step00000001'}, is kept" in err
    assert "MiB free there" in err and "Traceback" not in err
    assert sorted(p.name for p in ckpt.glob("step*")) == ["step00000001"]
    verify_checkpoint(ckpt, "step00000001")


def test_sigkill_during_the_save_then_resume(run_copy, tmp_path):
    """A real SIGKILL of the training process after the save's first file is written
    (deterministic: the writer kills its own process). `--resume auto` then removes the
    staging directory and an `.old` copy, and resumes from the last published tag."""
    script = tmp_path / "killed.py"
    script.write_text(
        "import os, signal, sys\n"
        "from deepspeed.runtime.checkpoint_engine.torch_checkpoint_engine import "
        "TorchCheckpointEngine as E\n"
        "real = E.save\n"
        "def save(self, *a, **k):\n"
        "    real(self, *a, **k)\n"
        "    os.kill(os.getpid(), signal.SIGKILL)\n"
        "E.save = save\n"
        "from dstrain.train import main\n"
        "sys.exit(main(sys.argv[1:]))\n"
    )
    ckpt = run_copy / "checkpoints"
    args = ["--no-progress", "--no-report", "--output-dir", str(run_copy), "--max-steps", "5"]
    args += [str(a) for a in (*RUN_ARGS, "--save-every", 1, "--resume", "auto")]
    env = clean_env(PYTHONPATH=str(REPO))
    killed = subprocess.run(
        [sys.executable, str(script), *args], cwd=REPO, env=env, capture_output=True, timeout=300
    )
    assert killed.returncode == -9, killed.stderr.decode()[-2000:]
    assert (ckpt / "step00000005.partial").is_dir()
    assert read_latest(ckpt) == ("step00000004", None)
    shutil.copytree(ckpt / "step00000002", ckpt / "step00000002.old")  # a replace cut short
    assert train(*args[2:]) == 0
    assert not list(ckpt.glob("*.partial")) and not list(ckpt.glob("*.old"))
    assert read_latest(ckpt) == ("step00000005", None)
    assert [r["step"] for r in train_rows(run_copy)] == [1, 2, 3, 4, 5]


# --------------------------------------------------------------------------------------
# The tensors-only pre-load accepts every checkpoint dstrain writes
# --------------------------------------------------------------------------------------


def test_every_stage_and_precision_passes_the_tensors_only_preload(tmp_path, fp16_on_cpu):
    """Engines built as `dstrain train` builds them (a DeepSpeed JSON read and checked,
    `build_engine`), one step each, saved as it saves them: every file loads with
    torch.load(weights_only=True) and `checkpoint_globals`. Stage 3 last (it patches torch
    for good); fp16 on CPU: only DeepSpeed's device check is patched."""
    import torch

    from dstrain.architectures import resolve_architecture
    from dstrain.checkpoints import capture_rng_state, save_run_checkpoint
    from dstrain.ds_run import load_ds_run
    from dstrain.ds_runtime import prepare_deepspeed
    from dstrain.settings import TrainSettings
    from dstrain.train import build_engine

    prepare_deepspeed(timeout_s=120)
    arch = resolve_architecture("genslm_tiny")
    ids = torch.randint(5, 69, (2, 12))
    for stage in (0, 1, 2, 3):
        for precision in ("fp32", "bf16", "fp16"):
            path = write_config(
                tmp_path / f"{precision}-{stage}.json",
                precision=precision,
                zero_optimization={"stage": stage},
                batch={"train_micro_batch_size_per_gpu": 2},
            )
            engine, _ = build_engine(arch, TrainSettings(), load_ds_run(str(path), world_size=1))
            loss = engine(input_ids=ids, attention_mask=torch.ones_like(ids), labels=ids).loss
            engine.backward(loss)
            engine.step()
            ckpt = tmp_path / f"{precision}-{stage}"
            client = {"dstrain": {"step": 1, "rng": {"0": capture_rng_state()}}}  # numpy too
            save_run_checkpoint(engine, ckpt, 1, client, val_loss=None, keep_best=1)
            manifest = verify_checkpoint(ckpt, "step00000001")
            assert manifest["files"] and manifest["step"] == 1, (stage, precision)
