"""Settings: defaults, field docs, cross-field rules, and the JSON they become."""

from __future__ import annotations

import json

import pytest

from dstrain.ds_config import (
    build_ds_config,
    check_built_config,
    render_ds_config,
    settings_path_of,
)
from dstrain.errors import DstrainError
from dstrain.settings import (
    DataSettings,
    DeepSpeedSettings,
    apply_overrides,
    make_deepspeed_settings,
)


def _all_fields(model):
    for name, field in model.model_fields.items():
        yield model, name, field
        annotation = field.annotation
        if isinstance(annotation, type) and hasattr(annotation, "model_fields"):
            yield from _all_fields(annotation)


@pytest.mark.parametrize("model", [DeepSpeedSettings, DataSettings])
def test_every_field_has_a_docstring(model):
    missing = [f"{m.__name__}.{n}" for m, n, f in _all_fields(model) if not f.description]
    assert missing == []


def test_unknown_setting_is_refused_with_its_path():
    with pytest.raises(DstrainError) as err:
        make_deepspeed_settings({"zero_optimization": {"stgae": 2}}, "s.json")
    assert "zero_optimization.stgae: unknown setting" in str(err.value)


def test_all_cross_field_problems_are_reported_together():
    """Settings refuse what the builder would drop; the JSON rules are ds_check's, run on the
    built config by `check_built_config`: both lists come back together, by settings path."""
    data = {
        "precision": "bf16",
        "fp16": {"hysteresis": 4},
        "zero_optimization": {"stage": 2, "offload_param": {"device": "nvme"}},
        "batch": {
            "train_micro_batch_size_per_gpu": 4,
            "gradient_accumulation_steps": 2,
            "train_batch_size": 12,
        },
        "scheduler": {"type": "WarmupDecayLR"},
    }
    with pytest.raises(DstrainError) as err:
        make_deepspeed_settings(data, "s.json")
    assert "loss scaling applies only to fp16" in str(err.value)
    settings = make_deepspeed_settings(data, "s.json", defer_rules=True)
    _, problems = check_built_config(settings, "s.json")
    errors = {p.path: p.message for p in problems if p.severity == "error"}
    assert "loss scaling applies only to fp16" in errors["fp16.hysteresis"]
    assert "nvme_path is not set" in errors["zero_optimization.offload_param.nvme_path"]
    assert "needs ZeRO stage 3" in errors["zero_optimization.offload_param.device"]
    assert "train_batch_size (12) is not a multiple" in errors["batch.train_batch_size"]
    assert "= 8" in errors["batch.train_batch_size"]
    assert "WarmupDecayLR needs total_num_steps" in errors["scheduler.total_num_steps"]


def test_settings_the_builder_would_drop_are_refused():
    cases = {
        "zero_optimization.reduce_bucket_size": {
            "zero_optimization": {"stage": 0, "reduce_bucket_size": 9}
        },
        "zero_optimization.allgather_bucket_size": {
            "zero_optimization": {"stage": 3, "allgather_bucket_size": 9}
        },
        "scheduler.total_num_steps": {"scheduler": {"type": "WarmupLR", "total_num_steps": 9}},
        "activation_checkpointing.partition_activations": {
            "activation_checkpointing": {"partition_activations": True}
        },
        "csv_monitor.output_path": {"csv_monitor": {"output_path": "x"}},
        "zero_optimization.offload_optimizer.nvme_path": {
            "zero_optimization": {"offload_optimizer": {"device": "cpu", "nvme_path": "/x"}}
        },
    }
    for path, data in cases.items():
        settings = make_deepspeed_settings(data, defer_rules=True)
        assert [p for p, _ in settings.unused_settings()] == [path]
        with pytest.raises(DstrainError, match=path):
            make_deepspeed_settings(data)


@pytest.mark.parametrize(
    "json_path, settings_path",
    [
        ("train_batch_size", "batch.train_batch_size"),
        ("bf16.enabled", "precision"),
        ("fp16.enabled", "precision"),
        ("fp16.hysteresis", "fp16.hysteresis"),
        ("optimizer.params.betas", "optimizer.betas"),
        ("scheduler.params.total_num_steps", "scheduler.total_num_steps"),
        ("scheduler.params.warmup_max_lr", "optimizer.lr"),
        ("activation_checkpointing", "activation_checkpointing.enabled"),
        ("zero_optimization.offload_param.device", "zero_optimization.offload_param.device"),
        ("zero_optimization.no_such_key", "zero_optimization"),
    ],
)
def test_json_paths_map_back_to_settings_fields(json_path, settings_path):
    assert settings_path_of(json_path) == settings_path


def test_default_config_leaves_global_batch_to_deepspeed():
    config = build_ds_config(DeepSpeedSettings())
    assert "train_batch_size" not in config
    assert config["train_micro_batch_size_per_gpu"] == 4
    assert config["bf16"] == {"enabled": True} and "fp16" not in config
    assert config["zero_optimization"]["stage"] == 2


def test_pinned_global_batch_is_written_first():
    settings = make_deepspeed_settings(
        {
            "batch": {
                "train_batch_size": 64,
                "train_micro_batch_size_per_gpu": 4,
                "gradient_accumulation_steps": 2,
            }
        }
    )
    assert next(iter(build_ds_config(settings))) == "train_batch_size"


def test_fp16_block_carries_every_loss_scaling_knob():
    settings = make_deepspeed_settings(
        {
            "precision": "fp16",
            "fp16": {
                "loss_scale_window": 500,
                "initial_scale_power": 12,
                "hysteresis": 3,
                "consecutive_hysteresis": True,
                "min_loss_scale": 2,
            },
        }
    )
    fp16 = build_ds_config(settings)["fp16"]
    assert fp16 == {
        "enabled": True,
        "loss_scale": 0.0,
        "initial_scale_power": 12,
        "loss_scale_window": 500,
        "hysteresis": 3,
        "consecutive_hysteresis": True,
        "min_loss_scale": 2,
    }


def test_offload_uses_deepspeed_cpu_adam():
    settings = make_deepspeed_settings(
        {"zero_optimization": {"stage": 2, "offload_optimizer": {"device": "cpu"}}}
    )
    config = build_ds_config(settings)
    assert config["zero_optimization"]["offload_optimizer"] == {"device": "cpu", "pin_memory": True}
    assert config["optimizer"]["params"]["torch_adam"] is False


def test_stage3_knobs_only_at_stage3():
    s3 = build_ds_config(make_deepspeed_settings({"zero_optimization": {"stage": 3}}))
    s2 = build_ds_config(make_deepspeed_settings({"zero_optimization": {"stage": 2}}))
    assert s3["zero_optimization"]["stage3_gather_16bit_weights_on_model_save"] is True
    assert not any(k.startswith("stage3_") for k in s2["zero_optimization"])
    with pytest.raises(DstrainError, match="applies to stage 3 only"):
        make_deepspeed_settings(
            {"zero_optimization": {"stage": 1, "stage3_max_live_parameters": 10}}
        )


def test_cosine_schedule_params():
    settings = make_deepspeed_settings(
        {"scheduler": {"type": "WarmupCosineLR", "total_num_steps": 1000, "warmup_num_steps": 50}}
    )
    sched = build_ds_config(settings)["scheduler"]
    assert sched["type"] == "WarmupCosineLR"
    assert sched["params"]["total_num_steps"] == 1000
    assert "warmup_max_lr" not in sched["params"]


def test_rendering_is_stable():
    text = render_ds_config(build_ds_config(DeepSpeedSettings()))
    assert text.endswith("}\n") and text.startswith('{\n  "')
    assert text == render_ds_config(json.loads(text))


def test_apply_overrides_keeps_base_and_skips_unset():
    base = {"zero_optimization": {"stage": 3}, "precision": "fp16"}
    merged = apply_overrides(base, {"zero_optimization.reduce_bucket_size": 10, "precision": None})
    assert merged == {
        "zero_optimization": {"stage": 3, "reduce_bucket_size": 10},
        "precision": "fp16",
    }
    assert base == {"zero_optimization": {"stage": 3}, "precision": "fp16"}


def test_fractional_min_loss_scale_is_refused_as_deepspeed_would():
    """DeepSpeed 0.19.8 types fp16.min_loss_scale as an int: 0.5 would write a JSON its
    parser refuses, so the settings refuse it first, naming the field."""
    with pytest.raises(DstrainError, match=r"fp16\.min_loss_scale"):
        make_deepspeed_settings({"precision": "fp16", "fp16": {"min_loss_scale": 0.5}})


def test_a_bool_is_refused_where_a_number_goes():
    # pydantic's lax mode read `stage = true` as ZeRO stage 1, silently.
    with pytest.raises(DstrainError, match="stage: must be a number, not true"):
        make_deepspeed_settings({"zero_optimization": {"stage": True}})
    with pytest.raises(DstrainError, match="steps_per_print: must be a number, not false"):
        make_deepspeed_settings({"steps_per_print": False})
    # bool fields (and bool-or-None ones) still take bools
    settings = make_deepspeed_settings({"zero_optimization": {"overlap_comm": False}})
    assert settings.zero_optimization.overlap_comm is False
