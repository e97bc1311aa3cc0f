"""The strict validator on hand-written (foreign) DeepSpeed configs."""

from __future__ import annotations

import copy
import json

import pytest

from dstrain.ds_check import (
    check_batch_arithmetic,
    check_ds_config,
    deepspeed_parser_problems,
    load_schema,
    parse_ds_json,
    validate_file,
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
        ({"fp16": {"enabled": "maybe"}}, "fp16.enabled", "true or false"),
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


def test_load_ds_run_raises_one_paragraph(tmp_path):
    from dstrain.ds_run import load_ds_run

    path = tmp_path / "ds.json"
    path.write_text(json.dumps({**BASE, "gradient_clipp1ng": 1}))
    with pytest.raises(DstrainError) as err:
        load_ds_run(str(path))
    assert "gradient_clipp1ng" in str(err.value) and "dstrain validate" in str(err.value)
    path.write_text(json.dumps(BASE))
    assert load_ds_run(str(path)).config == BASE


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


def problems_at(config, **kwargs):
    return {p.path: p for p in check_ds_config({**BASE, **config}, "c.json", **kwargs)}


@pytest.mark.parametrize(
    ("config", "path", "hint"),
    [
        ({"curriculum_learning": {"enabled": True}}, "curriculum_learning", "data_sampling"),
        ({"elasticity": {"enabled": True}}, "elasticity", "train_batch_size"),
        ({"amp": {"enabled": True}}, "amp", "torch_autocast"),
        (
            {"zero_optimization": {"stage": 3, "mics_shard_size": 2}},
            "zero_optimization.mics_shard_size",
            "ZeRO-3",
        ),
    ],
)
def test_removed_blocks_are_errors_that_say_what_replaced_them(config, path, hint):
    found = problems_at(config)[path]
    assert found.severity == "error"
    assert "refuses" in found.message and "0.19.8" in found.message
    assert hint in found.fix


def test_removed_keys_are_measured_apart_from_reads():
    schema = load_schema()
    assert "curriculum_learning" in schema["removed"][""]
    assert "curriculum_learning" not in schema["blocks"][""]
    assert "mics_shard_size" in schema["removed"]["zero_optimization"]


@pytest.mark.parametrize(
    ("config", "path"),
    [
        ({"sequence_parallel_size": 1, "data_parallel_size": 1}, None),
        ({"zero_optimization": True, "allgather_size": 1000}, "zero_optimization"),
        (
            {"optimizer": {"type": "AdamW", "params": {"fp32_optimizer_states": True}}},
            None,
        ),
        ({"activation_checkpointing": {"cpu_checkpointing": True}}, None),
        ({"compile": {"deepcompile": False}, "pipeline": {"use_reentrant": True}}, None),
        ({"data_efficiency": {"data_sampling": {"num_workers": 2}}}, None),
    ],
)
def test_keys_deepspeed_reads_outside_its_config_class_are_known(config, path):
    assert errors({**BASE, **config}) == {}
    if path is not None:  # the boolean ZeRO form is a warning only
        assert problems_at(config)[path].severity == "warning"


@pytest.mark.parametrize(("value", "words"), [(True, "stage 1"), (False, "stage 0")])
def test_boolean_zero_optimization_says_what_deepspeed_does(value, words):
    found = problems_at({"zero_optimization": value})["zero_optimization"]
    assert found.severity == "warning" and words in found.message


def test_allgather_size_without_boolean_zero_is_ignored_by_deepspeed():
    found = errors({"zero_optimization": {"stage": 1}, "allgather_size": 1000})
    assert "ignored" in found["allgather_size"].message


def test_comment_keys_are_notes_where_deepspeed_ignores_them():
    found = problems_at({"_comment": "x", "flops_profiler": {"_why": "y"}})
    assert found["_comment"].severity == "note"
    assert found["flops_profiler._why"].severity == "note"
    assert errors({**BASE, "_comment": "x"}) == {}
    # a pydantic-parsed block refuses any unknown key, `_` ones too
    strict = errors({"zero_optimization": {"stage": 1, "_comment": "x"}})
    assert "refuses" in strict["zero_optimization._comment"].message


@pytest.mark.parametrize(
    ("optimizer", "words"),
    [
        ("OneBitAdam", "AdamW"),
        ("ZeroOneAdam", "AdamW"),
        ("OneBitLamb", "Lamb"),
    ],
)
def test_one_bit_optimizers_are_errors(optimizer, words):
    found = errors({"optimizer": {"type": optimizer, "params": {"lr": 1e-3}}})
    assert "initialize" in found["optimizer.type"].message
    assert words in found["optimizer.type"].fix


@pytest.mark.parametrize(
    ("block", "kind", "ok"),
    [
        ("optimizer", "adamw", True),  # DeepSpeed lower-cases its own names
        ("optimizer", "SGD", True),  # torch.optim.SGD
        ("optimizer", "sgd", False),  # torch.optim.sgd is a module
        ("optimizer", "Shampoo", False),
        ("scheduler", "WarmupLR", True),
        ("scheduler", "StepLR", True),  # torch.optim.lr_scheduler.StepLR
        ("scheduler", "warmuplr", False),
    ],
)
def test_types_follow_deepspeeds_lookup(block, kind, ok):
    params = {"step_size": 10} if kind == "StepLR" else {}
    found = errors({block: {"type": kind, "params": params}})
    assert (f"{block}.type" not in found) == ok, found


def test_required_scheduler_params_and_missing_params_block():
    found = errors({"scheduler": {"type": "WarmupDecayLR", "params": {"warmup_num_steps": 5}}})
    assert "total_num_steps" in found["scheduler.params.total_num_steps"].message
    found = errors({"scheduler": {"type": "WarmupLR"}})
    assert "TypeError" in found["scheduler.params"].message


@pytest.mark.parametrize(
    ("config", "path", "words"),
    [
        (
            {"zero_optimization": {"stage": 0, "offload_optimizer": {"device": "cpu"}}},
            "zero_optimization.offload_optimizer.device",
            "stage 1, 2 or 3",
        ),
        (
            {
                "zero_optimization": {
                    "stage": 2,
                    "offload_optimizer": {"device": "nvme", "nvme_path": "/x"},
                }
            },
            "zero_optimization.offload_optimizer.device",
            "CPU offload",
        ),
        (
            {
                "scheduler": {
                    "type": "WarmupDecayLR",
                    "params": {"warmup_num_steps": 9, "total_num_steps": 3},
                }
            },
            "scheduler.params.warmup_num_steps",
            "longer than the schedule",
        ),
        (
            {"optimizer": {"type": "AdamW", "params": {"betas": [0.9, 1.0]}}},
            "optimizer.params.betas",
            "[0, 1)",
        ),
        (
            {"activation_checkpointing": {"contiguous_memory_optimization": True}},
            "activation_checkpointing.contiguous_memory_optimization",
            "partition_activations",
        ),
        ({"checkpoint": {"tag_validation": "often"}}, "checkpoint.tag_validation", "refuses"),
        ({"bf16": {"enabled": True}, "bfloat16": {"enabled": True}}, "bfloat16", "ignores"),
        ({"data_parallel_size": 2}, "data_parallel_size", "sequence_parallel_size"),
    ],
)
def test_cross_field_rules_live_here(config, path, words):
    found = errors(config)
    assert path in found, found
    assert words in found[path].message + found[path].fix


def test_batch_remainder_says_deepspeed_refuses():
    found = errors({"train_batch_size": 36, "train_micro_batch_size_per_gpu": 4}, world_size=8)
    assert "refuses" in found["train_batch_size"].message
    assert "drop the remainder" not in found["train_batch_size"].message


def test_deepspeed_complaint_is_reported_beside_ours(tmp_path):
    pytest.importorskip("deepspeed")
    path = tmp_path / "ds.json"
    path.write_text(json.dumps({**BASE, "gradient_clipp1ng": 1, "compile": {"disable": True}}))
    problems = validate_file(str(path))
    origins = {(p.origin, p.path) for p in problems if p.severity == "error"}
    assert ("dstrain", "gradient_clipp1ng") in origins
    assert ("dstrain", "compile.disable") in origins
    assert ("deepspeed", "compile.disable") in origins  # the model's path, not `disable`


def test_deepspeed_plain_errors_get_a_path():
    pytest.importorskip("deepspeed")
    problems = deepspeed_parser_problems({**BASE, "elasticity": {"enabled": True}}, "x")
    assert problems[0].path == "elasticity"
    bf16 = deepspeed_parser_problems({**BASE, "bfloat16": {"enabled": True, "x": 1}}, "x")
    assert bf16[0].path == "bfloat16.x"


# --------------------------------------------------------------------------------------
# Value types measured from DeepSpeed's models (ds_schema.json["value_types"])
# --------------------------------------------------------------------------------------

# (block, verdict at `path`): "error" where DeepSpeed's parser refuses the value, "warning"
# where its lax coercion reads it as another JSON value, "ok" where it takes it as written.
VALUE_CASES = [
    # bool: pydantic's lax bool reads "true", "yes", 1, 0 and refuses the rest
    ({"zero_optimization": {"stage": 2, "overlap_comm": "maybe"}}, "error"),
    ({"zero_optimization": {"stage": 2, "overlap_comm": 2}}, "error"),
    ({"zero_optimization": {"stage": 2, "overlap_comm": "true"}}, "warning"),
    ({"zero_optimization": {"stage": 2, "overlap_comm": 1}}, "warning"),
    ({"zero_optimization": {"stage": 2, "overlap_comm": None}}, "ok"),  # Optional[bool]
    ({"fp16": {"enabled": "yes please"}}, "error"),
    # int with Field bounds; a whole float is an int, a fractional one is not
    ({"zero_optimization": {"stage": 2, "reduce_bucket_size": 0}}, "error"),  # gt=0
    ({"zero_optimization": {"stage": 2, "reduce_bucket_size": 5e8}}, "ok"),
    ({"zero_optimization": {"stage": 2, "reduce_bucket_size": 2.5}}, "error"),
    ({"zero_optimization": {"stage": 2, "reduce_bucket_size": "5e8"}}, "error"),
    ({"zero_optimization": {"stage": 2, "allgather_bucket_size": 0}}, "ok"),  # ge=0
    ({"zero_optimization": {"stage": 2, "allgather_bucket_size": -1}}, "error"),
    ({"zero_optimization": {"stage": 2, "allgather_bucket_size": "200"}}, "warning"),
    # fp16's scale keys: a validator refuses bools (measured by probing), the type fractions
    ({"fp16": {"enabled": True, "min_loss_scale": 0.5}}, "error"),
    ({"fp16": {"enabled": True, "min_loss_scale": True}}, "error"),
    ({"fp16": {"enabled": True, "loss_scale_window": False}}, "error"),
    ({"fp16": {"enabled": True, "loss_scale": "x"}}, "error"),
    ({"fp16": {"enabled": True, "loss_scale": "128"}}, "warning"),
    ({"fp16": {"enabled": True, "loss_scale": -1}}, "error"),  # its validator: >= 0
    # float with bounds
    (
        {"zero_optimization": {"stage": 2, "offload_optimizer": {"device": "cpu", "ratio": 2}}},
        "error",
    ),
    (
        {"zero_optimization": {"stage": 3, "offload_optimizer": {"device": "cpu", "ratio": 0.5}}},
        "ok",
    ),
    # enums: ZeRO stage (int values: "2" and true coerce), offload device (strings)
    ({"zero_optimization": {"stage": 5}}, "error"),
    ({"zero_optimization": {"stage": "2"}}, "warning"),
    ({"zero_optimization": {"stage": True}}, "warning"),
    ({"zero_optimization": {"stage": 2, "offload_optimizer": {"device": "gpu"}}}, "error"),
    ({"zero_optimization": {"stage": 2, "offload_optimizer": {"device": "CPU"}}}, "error"),
    ({"weight_quantization": {"q_type": "symmetric"}}, "ok"),
    # Literal items of a list
    ({"compile": {"passes": ["z1", "zz"]}}, "error"),
    ({"compile": {"passes": "z1"}}, "error"),
    ({"compile": {"passes": ["z1"]}}, "ok"),
    ({"tensor_parallel": {"vocab_parallel_ce_backend": "cuda"}}, "error"),
    # a nested model needs an object; a model root too
    ({"zero_optimization": {"stage": 3, "offload_param": "cpu"}}, "error"),
    ({"comms_logger": True}, "error"),
    ({"tensorboard": "on"}, "error"),
    # str, path, dict, union, instance
    ({"wandb": {"project": 3}}, "error"),
    (
        {"zero_optimization": {"stage": 3, "offload_param": {"device": "nvme", "nvme_path": 7}}},
        "error",
    ),
    ({"tensor_parallel": {"partition_config": "x"}}, "error"),
    ({"zero_optimization": {"stage": 2, "zenflow": {"select_interval": 1.5}}}, "error"),
    ({"zero_optimization": {"stage": 2, "zenflow": {"select_interval": 4}}}, "ok"),
    ({"tensor_parallel": {"dtype": "bf16"}}, "error"),  # a torch.dtype: no JSON value is one
]


def _leaf(config: dict) -> str:
    """The dotted path of the one leaf a VALUE_CASES config sets besides `stage`."""
    block, node = next(iter(config.items()))
    path = [block]
    while isinstance(node, dict) and node:
        keys = [k for k in node if k not in ("stage", "enabled", "device")] or list(node)
        last = keys[-1]
        path.append(last)
        node = node[last]
    return ".".join(path)


def _verdict(config: dict, path: str) -> str:
    here = [p for p in check_ds_config({**BASE, **config}) if p.path.startswith(path)]
    return next((s for s in ("error", "warning") if any(p.severity == s for p in here)), "ok")


@pytest.mark.parametrize(("config", "verdict"), VALUE_CASES)
def test_value_types_mirror_deepspeeds_models(config, verdict):
    assert _verdict(config, _leaf(config)) == verdict


@pytest.mark.parametrize(("config", "verdict"), VALUE_CASES)
def test_value_type_verdicts_match_deepspeeds_parser(config, verdict):
    """Where DeepSpeed refuses, dstrain errs; where it accepts, dstrain at most warns."""
    pytest.importorskip("deepspeed")
    refused = deepspeed_parser_problems({**BASE, **config}, "x")
    assert bool(refused) == (verdict == "error"), refused


def test_value_type_errors_name_the_path_what_deepspeed_does_and_a_fix():
    found = errors({**BASE, "fp16": {"enabled": True, "min_loss_scale": 0.5}})
    problem = found["fp16.min_loss_scale"]
    assert "DeepSpeed's parser refuses it" in problem.message
    assert "fractional part" in problem.message and problem.fix == "write a whole number"
    item = errors({**BASE, "compile": {"passes": ["z1", "zz"]}})["compile.passes[1]"]
    assert item.message.startswith('"zz" is not one of "z1"')


@pytest.mark.parametrize(
    "config",
    [
        {"fp16": {"enabled": True, "loss_scale": "x"}},
        {"fp16": "yes"},
        {"zero_optimization": {"stage": 4}},
        {"zero_optimization": {"stage": 2, "reduce_bucket_size": -5}},
        {"zero_optimization": {"stage": 3, "offload_param": {"device": "gpu"}}},
        {"zero_optimization": {"stage": 3, "offload_param": "cpu"}},
    ],
)
def test_one_message_per_fault(config):
    problems = [p for p in check_ds_config({**BASE, **config}) if p.severity == "error"]
    assert len(problems) == 1, [p.format() for p in problems]


def test_rules_see_values_as_deepspeed_reads_them():
    # "true" and "yes" are both true to DeepSpeed, which then refuses fp16 + bf16 together
    found = errors({**BASE, "fp16": {"enabled": "true"}, "bf16": {"enabled": "yes"}})
    assert "both enabled" in found["bf16.enabled"].message
    # stage "3" is stage 3: offloading parameters is fine there
    config = {"stage": "3", "offload_param": {"device": "cpu"}}
    assert errors({**BASE, "zero_optimization": config}) == {}


def test_auto_values_are_left_to_the_auto_rule():
    config = {**BASE, "zero_optimization": {"stage": 2, "reduce_bucket_size": "auto"}}
    assert list(errors(config)) == ["zero_optimization.reduce_bucket_size"]
    assert errors(config, allow_auto=True) == {}


def test_value_types_were_measured_for_every_strict_block():
    schema = load_schema()
    assert set(schema["strict_blocks"]) <= set(schema["value_types"])
    fp16 = schema["value_types"]["fp16"]
    assert fp16["min_loss_scale"] == {"no_bool": True, "type": "int"}
    assert schema["value_types"]["zero_optimization"]["reduce_bucket_size"] == {
        "gt": 0,
        "type": "int",
    }
    # the leaf-module validator wraps a string in a list: left to DeepSpeed's parser
    assert "unchecked" in schema["value_types"]["zero_optimization.leaf_module"]["classes"]


# --------------------------------------------------------------------------------------
# Optimizer and scheduler params: what torch or DeepSpeed 0.19.8 refuse at initialize, or
# take unchecked and train wrongly with (measured: torch.optim.AdamW raises "Invalid
# learning rate/epsilon/weight_decay value/beta parameter"; lr_schedules.WarmupLR raises
# "warmup_num_steps must be a positive integer" for 0 and 10.0, and only logs a warning
# for an unknown warmup_type; a negative warmup_max_lr trains with a negative lr).
# --------------------------------------------------------------------------------------

_PARAM_BASE = {
    "train_micro_batch_size_per_gpu": 1,
    "optimizer": {"type": "AdamW", "params": {"lr": 1e-4}},
    "scheduler": {
        "type": "WarmupDecayLR",
        "params": {"warmup_num_steps": 10, "total_num_steps": 100, "warmup_max_lr": 1e-4},
    },
}


@pytest.mark.parametrize(
    "block, key, value, words",
    [
        ("optimizer", "lr", -1e-4, "must be a finite number > 0"),
        ("optimizer", "lr", [1e-4], "must be a finite number > 0"),
        ("optimizer", "lr", float("nan"), "not a finite number"),
        ("optimizer", "eps", -1e-8, "must be a finite number >= 0"),
        ("optimizer", "weight_decay", -0.1, "must be a finite number >= 0"),
        ("optimizer", "weight_decay", "0.1", "must be a finite number >= 0"),
        ("optimizer", "betas", [0.9], "must be two numbers in [0, 1)"),
        ("optimizer", "betas", [0.9, 1.0], "must be two numbers in [0, 1)"),
        ("optimizer", "amsgrad", "yes", "must be true or false"),
        ("scheduler", "warmup_num_steps", 0, "must be a whole number > 0"),
        ("scheduler", "warmup_num_steps", 10.0, "must be a whole number > 0"),
        ("scheduler", "warmup_num_steps", -5, "must be a whole number > 0"),
        ("scheduler", "warmup_max_lr", -1, "must be a finite number >= 0"),
        ("scheduler", "warmup_min_lr", "x", "must be a finite number >= 0"),
        ("scheduler", "warmup_type", "cosine", 'must be "log" or "linear"'),
        ("scheduler", "total_num_steps", 5, "warm-up (10 steps) is longer than the schedule"),
        ("scheduler", "total_num_steps", -3e5, "must be a finite number > 0"),
        ("scheduler", "last_batch_iteration", -2, "must be a whole number >= -1"),
    ],
)
def test_optimizer_and_scheduler_params_are_checked(block, key, value, words):
    config = copy.deepcopy(_PARAM_BASE)
    config[block]["params"][key] = value
    errors = [p for p in check_ds_config(config) if p.severity == "error"]
    assert any(words in p.message for p in errors), [p.format() for p in errors]
    assert all(p.path.startswith(f"{block}.params") or "finite" in p.message for p in errors)
    assert check_ds_config(_PARAM_BASE) == []


@pytest.mark.parametrize(
    "scheduler, params, words",
    [
        ("WarmupCosineLR", {"total_num_steps": 10, "cos_min_ratio": 2}, "<= 1"),
        ("OneCycle", {"cycle_min_lr": 0, "cycle_max_lr": -1}, ">= 0"),
        ("OneCycle", {"cycle_min_lr": 0, "cycle_max_lr": 1, "cycle_first_step_size": 0}, "> 0"),
        ("OneCycle", {"cycle_min_lr": 0, "cycle_max_lr": 1, "cycle_max_mom": 1.5}, "< 1"),
        ("LRRangeTest", {"lr_range_test_step_size": 0}, "whole number > 0"),
    ],
)
def test_other_schedulers_params(scheduler, params, words):
    config = {**_PARAM_BASE, "scheduler": {"type": scheduler, "params": params}}
    errors = [p.message for p in check_ds_config(config) if p.severity == "error"]
    assert any(words in m for m in errors), errors


def test_gen_config_refuses_what_deepspeed_refuses_at_initialize():
    from dstrain.cli_options import deepspeed_specs, ds_config_from_flags

    with pytest.raises(DstrainError, match=r"--warmup-steps\): Input should be greater"):
        ds_config_from_flags(deepspeed_specs(), {"warmup_steps": 0}, {}, "flags")
    with pytest.raises(DstrainError, match=r"--lr\): Input should be a finite number"):
        ds_config_from_flags(deepspeed_specs(), {}, {"optimizer": {"lr": float("inf")}}, "s")


def test_a_float_total_num_steps_passes_as_deepspeed_takes_it():
    """Megatron-style configs write step counts as 3e5: DeepSpeed's WarmupDecayLR only
    divides by total_num_steps, so it trains; warmup_num_steps must stay an int."""
    from dstrain.ds_check import check_ds_config

    config = {
        "train_micro_batch_size_per_gpu": 4,
        "scheduler": {
            "type": "WarmupDecayLR",
            "params": {"warmup_num_steps": 100, "total_num_steps": 3e5, "warmup_max_lr": 1e-4},
        },
    }
    assert not [p for p in check_ds_config(config) if p.severity == "error"]
    config["scheduler"]["params"]["warmup_num_steps"] = 100.0
    assert any("warmup_num_steps" in p.path for p in check_ds_config(config))
