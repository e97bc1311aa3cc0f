"""The strict validator on hand-written (foreign) DeepSpeed configs."""

from __future__ import annotations

import json

import pytest

from dstrain.ds_check import (
    check_batch_arithmetic,
    check_ds_config,
    deepspeed_parser_problems,
    load_checked_ds_config,
    parse_ds_json,
)
from dstrain.errors import DstrainError

BASE = {"train_micro_batch_size_per_gpu": 4, "gradient_accumulation_steps": 2}


def errors(config, **kwargs):
    return {p.path: p for p in check_ds_config(config, "c.json", **kwargs) if p.severity == "error"}


def test_clean_config_has_no_problems():
    assert (
        check_ds_config(
            {**BASE, "bf16": {"enabled": True}, "zero_optimization": {"stage": 2}}, world_size=4
        )
        == []
    )


@pytest.mark.parametrize(
    ("config", "path", "suggestion"),
    [
        ({"gradient_clipp1ng": 1.0}, "gradient_clipp1ng", "gradient_clipping"),
        ({"flops_profiler": {"enabeld": True}}, "flops_profiler.enabeld", "enabled"),
        ({"checkpoint": {"tag_valdation": "Warn"}}, "checkpoint.tag_valdation", "tag_validation"),
        (
            {"activation_checkpointing": {"partition_activation": True}},
            "activation_checkpointing.partition_activation",
            "partition_activations",
        ),
        (
            {"zero_optimization": {"stage": 2, "overlap_com": True}},
            "zero_optimization.overlap_com",
            "overlap_comm",
        ),
        (
            {"zero_optimization": {"stage": 3, "offload_param": {"device": "cpu", "pinmemory": 1}}},
            "zero_optimization.offload_param.pinmemory",
            "pin_memory",
        ),
        (
            {"optimizer": {"type": "AdamW", "params": {"lr": 1e-4, "weight_decy": 0.1}}},
            "optimizer.params.weight_decy",
            "weight_decay",
        ),
        (
            {"scheduler": {"type": "WarmupLR", "params": {"warmup_num_step": 10}}},
            "scheduler.params.warmup_num_step",
            "warmup_num_steps",
        ),
    ],
)
def test_unknown_keys_at_every_level_get_a_did_you_mean(config, path, suggestion):
    found = errors({**BASE, **config})
    assert path in found
    assert suggestion in found[path].fix


def test_auto_values_are_errors_unless_allowed():
    config = {
        **BASE,
        "fp16": {"enabled": "auto"},
        "zero_optimization": {"stage": 2, "reduce_bucket_size": "auto"},
    }
    found = errors(config)
    assert "trains in fp32" in found["fp16.enabled"].message
    assert "zero_optimization.reduce_bucket_size" in found
    assert errors(config, allow_auto=True) == {}


def test_auto_batch_key_explains_the_type_error():
    found = errors({"train_micro_batch_size_per_gpu": "auto", "train_batch_size": 8})
    assert "TypeError" in found["train_micro_batch_size_per_gpu"].message


@pytest.mark.parametrize(
    ("config", "path", "words"),
    [
        (
            {"zero_optimization": {"stage": 2, "offload_param": {"device": "cpu"}}},
            "zero_optimization.offload_param.device",
            "needs ZeRO stage 3",
        ),
        (
            {"zero_optimization": {"stage": 3, "offload_optimizer": {"device": "nvme"}}},
            "zero_optimization.offload_optimizer.nvme_path",
            "nvme_path is not set",
        ),
        ({"fp16": {"enabled": True}, "bf16": {"enabled": True}}, "bf16.enabled", "both enabled"),
        (
            {"bf16": {"enabled": True, "loss_scale_window": 100}},
            "bf16.loss_scale_window",
            "loss-scaling key under bf16",
        ),
        ({"gradient_clipping": -1}, "gradient_clipping", ">= 0"),
        ({"fp16": {"enabled": True, "loss_scale_window": 0}}, "fp16.loss_scale_window", ">= 1"),
        ({"fp16": {"enabled": True, "min_loss_scale": 0}}, "fp16.min_loss_scale", "> 0"),
        ({"zero_optimization": {"stage": 4}}, "zero_optimization.stage", "0, 1, 2 or 3"),
        ({"fp16": {"enabled": "true"}}, "fp16.enabled", "true or false"),
        (
            {"optimizer": {"type": "AdamW", "params": {"max_grad_norm": 1.0}}},
            "optimizer.params.max_grad_norm",
            "gradient_clipping",
        ),
    ],
)
def test_rules_deepspeed_skips(config, path, words):
    found = errors({**BASE, **config})
    assert path in found, found
    assert words in found[path].message + found[path].fix


def test_min_loss_scale_zero_is_fine_with_static_scaling():
    assert errors({**BASE, "fp16": {"enabled": True, "loss_scale": 128, "min_loss_scale": 0}}) == {}


def test_stage3_keys_at_stage2_warn_but_pass():
    problems = check_ds_config(
        {**BASE, "zero_optimization": {"stage": 2, "stage3_max_live_parameters": 1e9}}
    )
    assert [p.severity for p in problems] == ["warning"]


def test_batch_equation_shows_the_numbers():
    found = errors({"train_batch_size": 10, **BASE}, world_size=1)
    message = found["train_batch_size"].message
    assert "train_batch_size (10) != train_micro_batch_size_per_gpu (4) x " in message
    assert "gradient_accumulation_steps (2) x world size (1) = 8" in message
    assert errors({"train_batch_size": 64, **BASE}, world_size=8) == {}


@pytest.mark.parametrize(
    ("tbs", "micro", "gas", "world", "bad"),
    [
        (32, 4, None, 8, False),  # DeepSpeed derives accumulation 1
        (36, 4, None, 8, True),  # 36 / 32 leaves a remainder
        (24, None, 3, 8, False),
        (16, None, None, 3, True),
        (None, 4, None, 16, False),
        (None, None, None, 2, True),
        (12, 4, 2, None, True),  # no world size makes 12 from 8
        (16, 4, 2, None, False),
    ],
)
def test_batch_arithmetic_mirrors_deepspeed(tbs, micro, gas, world, bad):
    assert (check_batch_arithmetic(tbs, micro, gas, world) is not None) == bad


def test_malformed_json_names_line_and_column():
    config, problems = parse_ds_json(b'{\n  "a": 1,\n  "b": \n}', "x.json")
    assert config is None
    assert "line 4, column 1" in problems[0].message


def test_duplicate_keys_are_found_at_depth():
    _, problems = parse_ds_json(b'{"zero_optimization": {"stage": 1, "stage": 2}}', "x.json")
    assert [p.path for p in problems] == ["zero_optimization.stage"]


@pytest.mark.parametrize(
    ("data", "words"),
    [
        (b"\x89PNG\r\n\x1a\n\x00\x00", "binary"),
        (b'{"a": "\xff\xfe"}', "UTF-8"),
        (b"", "empty"),
        (b"[1, 2]", "not an object"),
    ],
)
def test_unreadable_input(data, words):
    config, problems = parse_ds_json(data, "x.json")
    assert config is None and words in problems[0].message


def test_deepspeed_parser_reports_what_only_it_knows():
    pytest.importorskip("deepspeed")
    assert deepspeed_parser_problems({**BASE, "bf16": {"enabled": True}}, "x") == []
    problems = deepspeed_parser_problems({**BASE, "zero_optimization": {"stage": "two"}}, "x")
    assert problems and problems[0].origin == "deepspeed"
    assert problems[0].path == "zero_optimization.stage"


def test_load_checked_ds_config_raises_one_paragraph(tmp_path):
    path = tmp_path / "ds.json"
    path.write_text(json.dumps({**BASE, "gradient_clipp1ng": 1}))
    with pytest.raises(DstrainError) as err:
        load_checked_ds_config(str(path))
    assert "gradient_clipp1ng" in str(err.value) and "dstrain validate" in str(err.value)
    path.write_text(json.dumps(BASE))
    assert load_checked_ds_config(str(path)) == BASE


ASSETS = __import__("pathlib").Path(__file__).parent / "assets" / "ds"


def test_hf_trainer_config_passes_with_allow_auto_only():
    config = json.loads((ASSETS / "hf_trainer_zero3.json").read_text())
    assert [
        p for p in check_ds_config(config, allow_auto=True, world_size=8) if p.severity == "error"
    ] == []
    found = errors(config)
    assert {
        "fp16.enabled",
        "gradient_clipping",
        "train_batch_size",
        "zero_optimization.reduce_bucket_size",
    } <= found.keys()


def test_hf_trainer_config_through_deepspeeds_parser():
    pytest.importorskip("deepspeed")
    config = json.loads((ASSETS / "hf_trainer_zero3.json").read_text())
    assert deepspeed_parser_problems(config, "hf.json") == []


def test_null_values_are_fine():
    config = {
        **BASE,
        "activation_checkpointing": {"number_checkpoints": None},
        "pipeline": {"stages": "auto"},
    }
    assert check_ds_config(config) == []
