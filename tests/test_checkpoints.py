"""Checkpoint publication: `latest` moves only after a complete save; old tags are pruned."""

from __future__ import annotations

import pytest

from dstrain.checkpoints import kept_tags, read_index, read_latest_tag, resolve_checkpoint
from dstrain.errors import DstrainError


def test_kept_tags_are_latest_plus_best_k():
    index = [
        {"tag": "a", "step": 1, "val_loss": 3.0},
        {"tag": "b", "step": 2, "val_loss": 2.0},
        {"tag": "c", "step": 3, "val_loss": 2.5},
        {"tag": "d", "step": 4, "val_loss": None},
    ]
    assert kept_tags(index, "d", 1) == {"d", "b"}
    assert kept_tags(index, "d", 2) == {"d", "b", "c"}
    assert kept_tags(index, "a", 0) == {"a"}


def test_resolve_checkpoint_errors(tmp_path):
    with pytest.raises(DstrainError, match="does not exist"):
        resolve_checkpoint(tmp_path / "missing")
    with pytest.raises(DstrainError, match="holds no DeepSpeed checkpoint"):
        resolve_checkpoint(tmp_path)
    (tmp_path / "latest").write_text("step00000007")
    with pytest.raises(DstrainError, match="is missing"):
        resolve_checkpoint(tmp_path)


@pytest.mark.slow
def test_a_failed_save_leaves_the_last_good_checkpoint(tmp_path, monkeypatch):
    """A real engine; the disk 'fills up' halfway through the second save (the only fake:
    DeepSpeed's file writer raises after writing one file)."""
    import deepspeed
    import torch

    from dstrain.checkpoints import load_run_checkpoint, save_run_checkpoint
    from dstrain.ds_config import build_ds_config
    from dstrain.ds_runtime import prepare_deepspeed
    from dstrain.model import build_model
    from dstrain.settings import make_deepspeed_settings

    prepare_deepspeed(timeout_s=120)
    config = build_ds_config(
        make_deepspeed_settings(
            {
                "precision": "fp32",
                "zero_optimization": {"stage": 2},
                "optimizer": {"torch_adam": True},  # as dstrain train on CPU: no FusedAdam build
                "scheduler": {"type": "none"},
                "batch": {"train_micro_batch_size_per_gpu": 2},
            }
        )
    )
    torch.manual_seed(0)
    model = build_model("genslm_tiny")
    engine, *_ = deepspeed.initialize(
        model=model, model_parameters=model.parameters(), config=config
    )
    ids = torch.randint(5, 69, (2, 12))

    def step():
        loss = engine(input_ids=ids, attention_mask=torch.ones_like(ids), labels=ids).loss
        engine.backward(loss)
        engine.step()

    ckpt = tmp_path / "checkpoints"
    step()
    save_run_checkpoint(engine, ckpt, 1, {"dstrain": {"step": 1}}, val_loss=3.0, keep_best=1)
    good = {n: p.detach().clone() for n, p in engine.module.named_parameters()}
    step()

    writer = engine.checkpoint_engine
    real_save = writer.save
    calls = {"n": 0}

    def failing_save(state_dict, path, *args, **kwargs):
        calls["n"] += 1
        if calls["n"] > 1:
            raise OSError(28, "No space left on device")
        return real_save(state_dict, path, *args, **kwargs)

    monkeypatch.setattr(writer, "save", failing_save)
    with pytest.raises(DstrainError, match="No space left on device"):
        save_run_checkpoint(engine, ckpt, 2, {"dstrain": {"step": 2}}, val_loss=2.0, keep_best=1)
    assert read_latest_tag(ckpt) == "step00000001"
    assert [e["tag"] for e in read_index(ckpt)] == ["step00000001"]

    monkeypatch.setattr(writer, "save", real_save)
    client = load_run_checkpoint(engine, ckpt, "step00000001")
    assert client["dstrain"]["step"] == 1
    for name, param in engine.module.named_parameters():
        torch.testing.assert_close(param.detach(), good[name], rtol=0, atol=0)

    step()
    save_run_checkpoint(engine, ckpt, 3, {"dstrain": {"step": 3}}, val_loss=None, keep_best=1)
    assert read_latest_tag(ckpt) == "step00000003"
    assert sorted(p.name for p in ckpt.glob("step*")) == ["step00000001", "step00000003"]
