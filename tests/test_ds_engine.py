"""Generated configs drive a real `deepspeed.initialize` on CPU for every ZeRO stage.

One process, one rank (DeepSpeed picks its CPU accelerator and gloo). fp16 is left to the
loss-scaling tests: DeepSpeed refuses it on CPU.
"""

from __future__ import annotations

import pytest

from dstrain.ds_config import build_ds_config
from dstrain.settings import make_deepspeed_settings

pytestmark = pytest.mark.slow


@pytest.mark.parametrize("precision", ["fp32", "bf16"])
@pytest.mark.parametrize("stage", [0, 1, 2, 3])  # stage 3 last: it patches torch for good
def test_generated_config_trains_one_step(stage, precision):
    import deepspeed
    import torch

    from dstrain.ds_runtime import prepare_deepspeed
    from dstrain.model import build_model

    prepare_deepspeed(timeout_s=120)
    settings = make_deepspeed_settings(
        {
            "precision": precision,
            "zero_optimization": {"stage": stage},
            "batch": {"train_micro_batch_size_per_gpu": 2, "gradient_accumulation_steps": 1},
            "optimizer": {"lr": 1e-3, "torch_adam": True},  # as dstrain train on CPU
            "scheduler": {"type": "none"},
            "steps_per_print": 1000,
        }
    )
    config = build_ds_config(settings)
    torch.manual_seed(0)
    model = build_model("genslm_tiny")
    engine, *_ = deepspeed.initialize(
        model=model, model_parameters=model.parameters(), config=config
    )
    assert engine.zero_optimization_stage() == stage
    assert engine.bfloat16_enabled() == (precision == "bf16")
    assert engine.train_batch_size() == 2  # derived: 2 x 1 x world size 1
    torch.manual_seed(1)
    ids = torch.randint(5, 69, (2, 16))
    batch = {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": ids}
    with torch.no_grad():
        before = engine(**batch).loss.item()
    for _ in range(3):
        loss = engine(**batch).loss
        engine.backward(loss)
        engine.step()
    with torch.no_grad():
        after = engine(**batch).loss.item()
    assert engine.global_steps == 3 and engine.skipped_steps == 0
    assert after < before
