"""The typed run (dstrain.ds_run) describes what DeepSpeed 0.19.8's own parser builds.

Each case is parsed twice: by `resolve_ds_run` (pure) and by DeepSpeed's
`DeepSpeedConfig` (the object `deepspeed.initialize` builds the engine from), and every
field the estimate, the banner, export and the launch preflight read is compared. No
expected value is written by hand: DeepSpeed is the reference.
"""

from __future__ import annotations

import json
import os

import pytest

from dstrain.ds_run import BatchRun, load_ds_run, resolve_ds_run
from dstrain.errors import DstrainError

BASE = {"train_micro_batch_size_per_gpu": 2}

CASES = {
    "empty": {},
    "bf16": {"bf16": {"enabled": True}},
    "bfloat16 alias": {"bfloat16": {"enabled": True}},
    "bf16 wins over bfloat16": {"bf16": {"enabled": False}, "bfloat16": {"enabled": True}},
    "null bf16 falls back to bfloat16": {"bf16": None, "bfloat16": {"enabled": True}},
    "enabled as a string": {"bf16": {"enabled": "true"}},
    "enabled as yes": {"bfloat16": {"enabled": "yes"}},
    "enabled as 1": {"fp16": {"enabled": 1}},
    "enabled auto": {"fp16": {"enabled": "auto"}},
    "fp16 with scaling": {
        "fp16": {
            "enabled": True,
            "loss_scale": 0,
            "initial_scale_power": 12,
            "loss_scale_window": 500,
            "hysteresis": 4,
            "consecutive_hysteresis": True,
            "min_loss_scale": 2,
        }
    },
    "fp16 static scale": {"fp16": {"enabled": True, "loss_scale": 128.0}},
    "fp16 auto knobs": {
        "fp16": {"enabled": True, "loss_scale_window": "auto", "hysteresis": "auto"}
    },
    "zero boolean true": {"zero_optimization": True},
    "zero boolean true with allgather_size": {"zero_optimization": True, "allgather_size": 1e7},
    "zero boolean false": {"zero_optimization": False},
    "zero 1": {"zero_optimization": {"stage": 1, "reduce_bucket_size": 5e7}},
    "zero 2 overlap": {"zero_optimization": {"stage": 2, "overlap_comm": True}},
    "zero 2 offload": {
        "zero_optimization": {
            "stage": 2,
            "offload_optimizer": {"device": "cpu", "pin_memory": False},
        }
    },
    "zero 2 deprecated cpu_offload": {"zero_optimization": {"stage": 2, "cpu_offload": True}},
    "zero 3 defaults": {"zero_optimization": {"stage": 3}},
    "zero 3 aliases": {
        "zero_optimization": {
            "stage": 3,
            "stage3_prefetch_bucket_size": 5e6,
            "stage3_param_persistence_threshold": 1e4,
            "stage3_max_live_parameters": 3e8,
            "stage3_max_reuse_distance": 2e8,
            "stage3_gather_16bit_weights_on_model_save": True,
            "sub_group_size": 1e8,
        }
    },
    "zero 3 short names": {
        "zero_optimization": {
            "stage": 3,
            "prefetch_bucket_size": 7,
            "max_live_parameters": 9,
            "param_persistence_threshold": 11,
            "max_reuse_distance": 13,
            "gather_16bit_weights_on_model_save": True,
        }
    },
    "zero 3 deprecated fp16 gather": {
        "zero_optimization": {"stage": 3, "stage3_gather_fp16_weights_on_model_save": True}
    },
    "zero 3 deprecated cpu_offload_param": {
        "zero_optimization": {"stage": 3, "cpu_offload_param": True}
    },
    "zero 3 nvme": {
        "zero_optimization": {
            "stage": 3,
            "offload_param": {"device": "nvme", "nvme_path": "/local_nvme"},
            "offload_optimizer": {"device": "nvme", "nvme_path": "/local_nvme"},
        }
    },
    "zero auto knobs": {
        "zero_optimization": {"stage": 3, "reduce_bucket_size": "auto", "overlap_comm": "auto"}
    },
    "stage as a string": {"zero_optimization": {"stage": "2"}},
    "clipping": {"gradient_clipping": 0.5},
    "optimizer": {
        "optimizer": {"type": "AdamW", "params": {"lr": 3e-4, "weight_decay": 0.1}},
        "scheduler": {"type": "WarmupLR", "params": {"warmup_num_steps": 5}},
    },
    "monitors": {
        "csv_monitor": {"enabled": True, "output_path": "m/", "job_name": "j"},
        "tensorboard": {"enabled": "true"},
    },
    "steps_per_print": {"steps_per_print": 7, "wall_clock_breakdown": True},
}


@pytest.fixture(scope="module")
def deepspeed_config():
    """DeepSpeed's parser (no process group: it assumes world size 1)."""
    os.environ.setdefault("DS_ACCELERATOR", "cpu")
    pytest.importorskip("deepspeed")
    from deepspeed.runtime.config import DeepSpeedConfig

    return DeepSpeedConfig


def _offload_device(block) -> str:
    return "none" if block is None else str(getattr(block.device, "value", block.device))


@pytest.mark.parametrize("name", sorted(CASES))
def test_run_matches_deepspeeds_parser(name, deepspeed_config):
    config = {**BASE, **CASES[name]}
    theirs = deepspeed_config(json.loads(json.dumps(config)))
    ours = resolve_ds_run(config)

    assert ours.precision == (
        "fp16"
        if theirs.float16_config.enabled
        else "bf16"
        if theirs.bfloat16_config.enabled
        else "fp32"
    )
    fp16 = theirs.float16_config
    assert (
        ours.fp16.loss_scale,
        ours.fp16.initial_scale_power,
        ours.fp16.loss_scale_window,
        ours.fp16.hysteresis,
        ours.fp16.consecutive_hysteresis,
        ours.fp16.min_loss_scale,
    ) == (
        fp16.loss_scale,
        fp16.initial_scale_power,
        fp16.loss_scale_window,
        fp16.hysteresis,
        fp16.consecutive_hysteresis,
        fp16.min_loss_scale,
    )
    zero = theirs.zero_config
    assert ours.zero.stage == int(zero.stage)
    assert ours.zero.offload_optimizer.device == _offload_device(zero.offload_optimizer)
    assert ours.zero.offload_param.device == _offload_device(zero.offload_param)
    if zero.offload_optimizer is not None:
        assert ours.zero.offload_optimizer.pin_memory == zero.offload_optimizer.pin_memory
    assert ours.zero.overlap_comm == zero.overlap_comm
    assert ours.zero.contiguous_gradients == zero.contiguous_gradients
    assert ours.zero.reduce_bucket_size == zero.reduce_bucket_size
    assert ours.zero.allgather_bucket_size == zero.allgather_bucket_size
    assert ours.zero.stage3_prefetch_bucket_size == zero.prefetch_bucket_size
    assert ours.zero.stage3_param_persistence_threshold == zero.param_persistence_threshold
    assert ours.zero.stage3_max_live_parameters == zero.max_live_parameters
    assert ours.zero.stage3_max_reuse_distance == zero.max_reuse_distance
    assert ours.zero.stage3_gather_16bit_weights_on_model_save == (
        zero.gather_16bit_weights_on_model_save
    )
    assert ours.zero.sub_group_size == zero.sub_group_size
    assert ours.gradient_clipping == theirs.gradient_clipping
    assert ours.steps_per_print == theirs.steps_per_print
    assert ours.wall_clock_breakdown == theirs.wall_clock_breakdown
    assert (ours.optimizer.type or "").lower() == (theirs.optimizer_name or "").lower()
    assert dict(ours.optimizer.params) == (theirs.optimizer_params or {})
    assert ours.scheduler.type == theirs.scheduler_name
    assert dict(ours.scheduler.params) == (theirs.scheduler_params or {})
    for monitor in ("csv_monitor", "tensorboard", "wandb", "comet"):
        their_monitor = getattr(theirs.monitor_config, monitor)
        assert ours.monitor(monitor).enabled == their_monitor.enabled, monitor
    if ours.monitor("csv_monitor").enabled:
        assert (
            ours.monitor("csv_monitor").output_path == theirs.monitor_config.csv_monitor.output_path
        )


@pytest.mark.parametrize(
    "written",
    [
        (None, 4, None),
        (None, 4, 3),
        (32, 4, None),
        (32, None, 2),
        (32, None, None),
        (24, 4, 3),
        (30, 4, None),  # 30 // 4 // world: DeepSpeed drops the remainder, then its check fails
    ],
)
@pytest.mark.parametrize("world", [1, 2, 4])
def test_batch_derivation_matches_deepspeed(written, world, deepspeed_config):
    """`BatchRun.resolve` is DeepSpeed's own derivation, run for a chosen world size."""
    tbs, micro, gas = written
    config = {
        key: value
        for key, value in zip(
            ("train_batch_size", "train_micro_batch_size_per_gpu", "gradient_accumulation_steps"),
            written,
            strict=True,
        )
        if value is not None
    }
    parsed = deepspeed_config({"train_micro_batch_size_per_gpu": 1})  # any valid config
    # Re-run DeepSpeed's derivation (`_set_batch_related_parameters`) for this world size.
    parsed.world_size = world
    parsed.train_batch_size, parsed.train_micro_batch_size_per_gpu = tbs, micro
    parsed.gradient_accumulation_steps = gas
    parsed._set_batch_related_parameters()
    expected = (
        parsed.train_batch_size,
        parsed.train_micro_batch_size_per_gpu,
        parsed.gradient_accumulation_steps,
    )
    assert resolve_ds_run(config).batch.resolve(world) == expected


def test_auto_batch_values_are_unknown():
    run = resolve_ds_run({"train_micro_batch_size_per_gpu": "auto", "train_batch_size": "auto"})
    assert run.batch == BatchRun()
    assert any("auto" in note for note in run.notes)


@pytest.mark.parametrize(
    ("config", "path"),
    [
        ({"fp16": {"enabled": True}, "bf16": {"enabled": True}}, "both"),
        ({"zero_optimization": {"stage": 5}}, "zero_optimization.stage"),
        ({"zero_optimization": {"stage": 2, "reduce_bucket_size": "big"}}, "reduce_bucket_size"),
        ({"zero_optimization": "yes"}, "zero_optimization"),
        ({"fp16": {"enabled": True, "min_loss_scale": 0.5}}, "fp16.min_loss_scale"),
    ],
)
def test_what_deepspeed_refuses_raises_with_the_path(config, path, deepspeed_config):
    with pytest.raises(DstrainError, match=r"refuses|must be an object") as info:
        resolve_ds_run(config)
    assert path in str(info.value) or path == "both"
    with pytest.raises(Exception):  # noqa: B017 - DeepSpeed raises assorted types
        deepspeed_config({**BASE, **config})


def test_describe_names_precision_stage_and_offload():
    run = resolve_ds_run(
        {
            "bfloat16": {"enabled": True},
            "zero_optimization": {"stage": 3, "offload_param": {"device": "cpu"}},
            "activation_checkpointing": {},
        }
    )
    assert run.describe() == "bf16, ZeRO-3, param offload cpu, activation checkpointing"


def test_load_ds_run_checks_before_resolving(tmp_path):
    good = tmp_path / "good.json"
    good.write_text(
        json.dumps({"train_micro_batch_size_per_gpu": 2, "bfloat16": {"enabled": True}})
    )
    checked = load_ds_run(str(good), world_size=2)
    assert checked.run.precision == "bf16"
    assert checked.run.batch.resolve(2) == (4, 2, 1)
    bad = tmp_path / "bad.json"
    bad.write_text(json.dumps({"train_micro_batch_size_per_gpu": 2, "zero_optimizaton": {}}))
    with pytest.raises(DstrainError, match="zero_optimizaton"):
        load_ds_run(str(bad))


# DeepSpeed names whose effect the typed run does not model (they move no memory and no
# precision/stage/offload decision dstrain makes), each with the reason.
UNMODELLED = {
    "cpu_offload_use_pin_memory": "deprecated and sets nothing in 0.19.8 (set_new_param False)",
    "stage3_model_persistence_threshold": "a ZeRO-3 partitioning detail, not in the estimate",
    "stage3_module_granularity_threshold": "a ZeRO-3 prefetch detail, not in the estimate",
    "stage3_use_all_reduce_for_fetch_params": "a ZeRO-3 communication detail",
    "stage3_allgather_sequential": "a ZeRO-3 communication detail",
}


def _keys(node) -> set[str]:
    if isinstance(node, dict):
        return set(node) | {k for value in node.values() for k in _keys(value)}
    return set()


def test_every_alias_and_deprecated_name_deepspeed_accepts_is_covered(deepspeed_config):
    """Read DeepSpeed's own models: every alias or deprecated field of the blocks the run
    reads appears in a case above (so an upgrade that adds one fails here)."""
    from deepspeed.runtime.precision_config import DeepSpeedBF16Config, DeepSpeedFP16Config
    from deepspeed.runtime.zero.config import DeepSpeedZeroConfig
    from deepspeed.runtime.zero.offload_config import (
        DeepSpeedZeroOffloadOptimizerConfig,
        DeepSpeedZeroOffloadParamConfig,
    )

    names = set()
    for model in (
        DeepSpeedZeroConfig,
        DeepSpeedZeroOffloadOptimizerConfig,
        DeepSpeedZeroOffloadParamConfig,
        DeepSpeedFP16Config,
        DeepSpeedBF16Config,
    ):
        for name, info in model.model_fields.items():
            if info.alias:
                names |= {info.alias, name}  # both spellings are accepted
            if (info.json_schema_extra or {}).get("deprecated"):
                names.add(name)
    names |= {"bfloat16"}  # the top-level alias of `bf16` (deepspeed/runtime/constants.py)
    covered = set().union(*(_keys(case) for case in CASES.values()))
    short = {n.removeprefix("stage3_") for n in UNMODELLED if n.startswith("stage3_")}
    missing = sorted(names - covered - set(UNMODELLED) - short)
    assert not missing, f"DeepSpeed accepts these names, no case covers them: {missing}"
