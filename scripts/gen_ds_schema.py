#!/usr/bin/env python
"""Regenerate dstrain/ds_schema.json: every key the installed DeepSpeed reads, per block.

`dstrain validate` is pure (no deepspeed import), so it checks key names against this
committed table. The table is *measured*, not typed by hand:

- blocks DeepSpeed parses with pydantic models (`fp16`, `bf16`, `zero_optimization`, its
  offload blocks, the monitors, `comms_logger`): the models' field names and aliases;
- blocks and the top level that DeepSpeed reads with plain `dict.get` (where typos pass
  silently): the keys a recording dict sees while `DeepSpeedConfig` parses a config;
- optimizer and scheduler params: the constructor signatures DeepSpeed passes them to.

Run it after a DeepSpeed upgrade; tests/test_ds_schema.py fails while the file is stale.
Usage: python scripts/gen_ds_schema.py [--check]
"""

from __future__ import annotations

import argparse
import inspect
import json
import os
import sys
from pathlib import Path

SCHEMA_PATH = Path(__file__).resolve().parent.parent / "dstrain" / "ds_schema.json"

# Read through `param_dict.keys()` (which the recorder cannot attribute to a key) in
# deepspeed/runtime/config.py and deepspeed/autotuning/config.py.
_TOP_LEVEL_READ_VIA_KEYS = {"autotuning", "optimizer", "scheduler"}
_RECORDED_BLOCKS = ("activation_checkpointing", "flops_profiler", "checkpoint", "data_types", "aio")


class _RecordingDict(dict):
    """A dict that notes every key DeepSpeed asks it for."""

    def __init__(self, seen: set[str], *args):
        super().__init__(*args)
        self.seen = seen

    def get(self, key, default=None):
        self.seen.add(key)
        return super().get(key, default)

    def __getitem__(self, key):
        self.seen.add(key)
        return super().__getitem__(key)

    def __contains__(self, key):
        self.seen.add(key)
        return super().__contains__(key)


def _model_keys(model) -> list[str]:
    keys = set()
    for name, field in model.model_fields.items():
        keys.add(name)
        if field.alias:
            keys.add(field.alias)
    return sorted(keys)


def _signature_keys(fn, drop=("self", "optimizer", "params")) -> list[str]:
    return sorted(
        p.name
        for p in inspect.signature(fn).parameters.values()
        if p.name not in drop and p.kind not in (p.VAR_POSITIONAL, p.VAR_KEYWORD)
    )


def build_schema() -> dict:
    os.environ.setdefault("DS_ACCELERATOR", "cpu")
    import deepspeed
    import torch
    from deepspeed.comm.config import CommsLoggerConfig
    from deepspeed.monitor.config import CometConfig, CSVConfig, TensorBoardConfig, WandbConfig
    from deepspeed.ops.adam import FusedAdam
    from deepspeed.runtime import lr_schedules
    from deepspeed.runtime.config import DEEPSPEED_OPTIMIZERS, DeepSpeedConfig
    from deepspeed.runtime.precision_config import DeepSpeedBF16Config, DeepSpeedFP16Config
    from deepspeed.runtime.zero.config import DeepSpeedZeroConfig
    from deepspeed.runtime.zero.offload_config import (
        DeepSpeedZeroOffloadOptimizerConfig,
        DeepSpeedZeroOffloadParamConfig,
    )

    top_seen: set[str] = set()
    block_seen: dict[str, set[str]] = {name: set() for name in _RECORDED_BLOCKS}
    probe = _RecordingDict(top_seen, {"train_micro_batch_size_per_gpu": 1})
    for name in _RECORDED_BLOCKS:
        probe[name] = _RecordingDict(block_seen[name])
    top_seen.clear()
    DeepSpeedConfig(probe)

    adam_keys = set(_signature_keys(torch.optim.AdamW)) | set(_signature_keys(FusedAdam))
    adam_keys |= {"torch_adam", "adam_w_mode"}  # popped by DeepSpeed's engine before construction
    blocks = {
        "": sorted(top_seen | _TOP_LEVEL_READ_VIA_KEYS),
        "fp16": _model_keys(DeepSpeedFP16Config),
        "bf16": _model_keys(DeepSpeedBF16Config),
        "bfloat16": _model_keys(DeepSpeedBF16Config),
        "zero_optimization": _model_keys(DeepSpeedZeroConfig),
        "zero_optimization.offload_optimizer": _model_keys(DeepSpeedZeroOffloadOptimizerConfig),
        "zero_optimization.offload_param": _model_keys(DeepSpeedZeroOffloadParamConfig),
        "tensorboard": _model_keys(TensorBoardConfig),
        "csv_monitor": _model_keys(CSVConfig),
        "wandb": _model_keys(WandbConfig),
        "comet": _model_keys(CometConfig),
        "comms_logger": _model_keys(CommsLoggerConfig),
        "optimizer": ["legacy_fusion", "params", "type"],
        "scheduler": ["params", "type"],
        **{name: sorted(seen) for name, seen in block_seen.items()},
    }
    scheduler_params = {
        name: _signature_keys(getattr(lr_schedules, name))
        for name in ("WarmupLR", "WarmupDecayLR", "WarmupCosineLR", "OneCycle", "LRRangeTest")
    }
    return {
        "generated_by": "scripts/gen_ds_schema.py",
        "deepspeed_version": deepspeed.__version__,
        "blocks": dict(sorted(blocks.items())),
        "optimizer_types": sorted(DEEPSPEED_OPTIMIZERS),
        "scheduler_types": sorted(lr_schedules.VALID_LR_SCHEDULES),
        "optimizer_params": {"adam": sorted(adam_keys), "adamw": sorted(adam_keys)},
        "scheduler_params": scheduler_params,
    }


def render(schema: dict) -> str:
    return json.dumps(schema, indent=2) + "\n"


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--check", action="store_true", help="exit 1 if the file is stale")
    args = parser.parse_args()
    text = render(build_schema())
    if args.check:
        if SCHEMA_PATH.read_text() != text:
            print(f"{SCHEMA_PATH} is stale: run python scripts/gen_ds_schema.py", file=sys.stderr)
            return 1
        return 0
    SCHEMA_PATH.write_text(text)
    print(f"wrote {SCHEMA_PATH}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
