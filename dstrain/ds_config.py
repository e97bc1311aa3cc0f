"""Settings -> DeepSpeed JSON.

Pure layer (L0). `build_ds_config` maps validated `DeepSpeedSettings` onto DeepSpeed's
own key names, in a fixed order, so the same settings always give the same bytes
(`render_ds_config`): the presets in ds_configs/ are checked for drift byte for byte.

Batch: without a pinned global batch the JSON carries only the micro batch and the
accumulation steps, and DeepSpeed derives train_batch_size = micro x accumulation x
data-parallel world size at start-up, so one file fits 1 GPU or 64.
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path
from typing import TYPE_CHECKING, Any

from dstrain.settings import (
    CometMonitor,
    DeepSpeedSettings,
    Monitor,
    Offload,
    WandbMonitor,
    ZeroSettings,
)

if TYPE_CHECKING:
    from dstrain.ds_check import Problem


def _offload_block(offload: Offload) -> dict[str, Any]:
    block: dict[str, Any] = {"device": offload.device}
    if offload.device == "nvme" and offload.nvme_path:
        block["nvme_path"] = offload.nvme_path
    block["pin_memory"] = offload.pin_memory
    return block


def _zero_block(zero: ZeroSettings) -> dict[str, Any]:
    block: dict[str, Any] = {"stage": zero.stage}
    # An offload is written whatever the stage, so `check_ds_config` sees (and refuses) one
    # the stage cannot do, exactly as in a foreign file.
    offloads = {
        name: _offload_block(offload)
        for name, offload in (
            ("offload_optimizer", zero.offload_optimizer),
            ("offload_param", zero.offload_param),
        )
        if offload.device != "none"
    }
    if zero.stage == 0:
        return block | offloads
    if zero.overlap_comm is not None:
        block["overlap_comm"] = zero.overlap_comm
    block["contiguous_gradients"] = zero.contiguous_gradients
    block["reduce_bucket_size"] = zero.reduce_bucket_size
    if zero.stage in (1, 2):
        block["allgather_bucket_size"] = zero.allgather_bucket_size
    else:
        block["stage3_prefetch_bucket_size"] = zero.stage3_prefetch_bucket_size
        block["stage3_param_persistence_threshold"] = zero.stage3_param_persistence_threshold
        block["stage3_max_live_parameters"] = zero.stage3_max_live_parameters
        block["stage3_max_reuse_distance"] = zero.stage3_max_reuse_distance
        block["stage3_gather_16bit_weights_on_model_save"] = (
            zero.stage3_gather_16bit_weights_on_model_save
        )
        block["sub_group_size"] = zero.sub_group_size
    return block | offloads


def _scheduler_block(settings: DeepSpeedSettings) -> dict[str, Any] | None:
    sched = settings.scheduler
    if sched.type == "none":
        return None
    if sched.type == "WarmupCosineLR":
        params: dict[str, Any] = {
            "total_num_steps": sched.total_num_steps,
            "warmup_min_ratio": sched.warmup_min_ratio,
            "warmup_num_steps": sched.warmup_num_steps,
            "cos_min_ratio": sched.cos_min_ratio,
            "warmup_type": sched.warmup_type,
        }
    else:
        params = {
            "warmup_min_lr": sched.warmup_min_lr,
            "warmup_max_lr": settings.optimizer.lr,
            "warmup_num_steps": sched.warmup_num_steps,
            "warmup_type": sched.warmup_type,
        }
        if sched.type == "WarmupDecayLR":
            params["total_num_steps"] = sched.total_num_steps
    return {"type": sched.type, "params": params}


def _monitor_block(monitor: Monitor) -> dict[str, Any]:
    return {"enabled": True, "output_path": monitor.output_path, "job_name": monitor.job_name}


def _service_block(monitor: WandbMonitor | CometMonitor) -> dict[str, Any]:
    """A wandb / comet block: `enabled`, then the fields in settings order; unset (None)
    ones are left out, so DeepSpeed and the service's own configuration decide them."""
    fields = monitor.model_dump(exclude={"enabled"}, exclude_none=True)
    return {"enabled": True, **fields}


def build_ds_config(settings: DeepSpeedSettings) -> dict[str, Any]:
    """The DeepSpeed config dict for `settings`, keys in a fixed order."""
    batch = settings.batch
    config: dict[str, Any] = {}
    if batch.train_batch_size is not None:
        config["train_batch_size"] = batch.train_batch_size
    config["train_micro_batch_size_per_gpu"] = batch.train_micro_batch_size_per_gpu
    config["gradient_accumulation_steps"] = batch.gradient_accumulation_steps
    config["gradient_clipping"] = settings.gradient_clipping
    config["steps_per_print"] = settings.steps_per_print
    config["wall_clock_breakdown"] = settings.wall_clock_breakdown
    if settings.precision == "bf16":
        config["bf16"] = {"enabled": True}
    elif settings.precision == "fp16":
        scaling = settings.fp16
        config["fp16"] = {
            "enabled": True,
            "loss_scale": scaling.loss_scale,
            "initial_scale_power": scaling.initial_scale_power,
            "loss_scale_window": scaling.loss_scale_window,
            "hysteresis": scaling.hysteresis,
            "consecutive_hysteresis": scaling.consecutive_hysteresis,
            "min_loss_scale": scaling.min_loss_scale,
        }
    config["zero_optimization"] = _zero_block(settings.zero_optimization)
    opt = settings.optimizer
    params: dict[str, Any] = {
        "lr": opt.lr,
        "betas": list(opt.betas),
        "eps": opt.eps,
        "weight_decay": opt.weight_decay,
    }
    if settings.zero_optimization.offload_optimizer.device != "none":
        # Optimizer offload runs DeepSpeed's CPU Adam (a C++ op, much faster on host
        # RAM than torch's): torch_adam true would override it.
        params["torch_adam"] = False
    elif opt.torch_adam is not None:
        params["torch_adam"] = opt.torch_adam
    # else auto: no key, and `dstrain train` picks FusedAdam on a GPU, torch's AdamW on
    # CPU (dstrain.ds_run.choose_optimizer), so the file fits any machine.
    config["optimizer"] = {"type": "AdamW", "params": params}
    scheduler = _scheduler_block(settings)
    if scheduler is not None:
        config["scheduler"] = scheduler
    ac = settings.activation_checkpointing
    if ac.enabled:
        config["activation_checkpointing"] = {
            "partition_activations": ac.partition_activations,
            "cpu_checkpointing": ac.cpu_checkpointing,
            "contiguous_memory_optimization": ac.contiguous_memory_optimization,
            "number_checkpoints": None,
            "synchronize_checkpoint_boundary": False,
            "profile": False,
        }
    if settings.csv_monitor.enabled:
        config["csv_monitor"] = _monitor_block(settings.csv_monitor)
    if settings.tensorboard.enabled:
        config["tensorboard"] = _monitor_block(settings.tensorboard)
    if settings.wandb.enabled:
        config["wandb"] = _service_block(settings.wandb)
    if settings.comet.enabled:
        config["comet"] = _service_block(settings.comet)
    return config


# Where `build_ds_config` takes each JSON key from, where the two names differ (the
# longest matching prefix wins; every other key has the settings field's own path).
_SETTINGS_OF_JSON = {
    "train_batch_size": "batch.train_batch_size",
    "train_micro_batch_size_per_gpu": "batch.train_micro_batch_size_per_gpu",
    "gradient_accumulation_steps": "batch.gradient_accumulation_steps",
    "bf16": "precision",
    "fp16.enabled": "precision",
    "optimizer.params": "optimizer",
    "scheduler.params.warmup_max_lr": "optimizer.lr",
    "scheduler.params": "scheduler",
}


def settings_path_of(json_path: str) -> str:
    """The `DeepSpeedSettings` field that writes DeepSpeed key `json_path`
    (`train_batch_size` -> `batch.train_batch_size`, `scheduler.params.total_num_steps` ->
    `scheduler.total_num_steps`); a key with no field of its own maps to its block's."""
    if json_path == "activation_checkpointing":  # the block's presence is the switch
        return "activation_checkpointing.enabled"
    parts = json_path.split(".")
    for cut in range(len(parts), 0, -1):
        mapped = _SETTINGS_OF_JSON.get(".".join(parts[:cut]))
        if mapped is not None:
            parts = [*mapped.split("."), *parts[cut:]]
            break
    while len(parts) > 1 and not _is_field(".".join(parts)):
        parts.pop()
    return ".".join(parts)


def _is_field(path: str) -> bool:
    model: Any = DeepSpeedSettings
    for part in path.split("."):
        fields = getattr(model, "model_fields", None)
        if not fields or part not in fields:
            return False
        model = fields[part].annotation
    return True


def check_built_config(
    settings: DeepSpeedSettings, source: str = "settings", *, world_size: int | None = None
) -> tuple[dict[str, Any], list[Problem]]:
    """Build the JSON for `settings` and check it as strictly as any foreign file.

    Returns the config and every problem: the settings the builder would drop
    (`DeepSpeedSettings.unused_settings`, for settings made with `defer_rules=True`), then
    `check_ds_config`'s. Each problem's `path` is the settings field to change (JSON paths
    are mapped back with `settings_path_of`), so a command can name the flag that sets it.
    """
    from dstrain.ds_check import Problem, check_ds_config

    config = build_ds_config(settings)
    problems = [Problem(source, path, message) for path, message in settings.unused_settings()]
    for problem in check_ds_config(config, source, world_size=world_size):
        problems.append(dataclasses.replace(problem, path=settings_path_of(problem.path)))
    return config, problems


def render_ds_config(config: dict[str, Any]) -> str:
    """JSON text as dstrain writes it: indent 2, insertion order, trailing newline."""
    return json.dumps(config, indent=2) + "\n"


def write_text_atomic(path: str | Path, text: str) -> None:
    """Write `text` to `path` so readers see the old file or the new one, never half.

    See `write_bytes_atomic`."""
    write_bytes_atomic(path, text.encode("utf-8"))


def write_bytes_atomic(path: str | Path, data: bytes) -> None:
    """Write `data` to `path` so readers see the old file or the new one, never half.

    `dstrain.publish.write_file_atomic`: a temporary `.NAME.tmp-HOST.PID.XXXX` beside it,
    fsynced and renamed over it; new files get 0666 less the umask, a replaced file keeps
    its mode. A symlink is written through (its target replaced, the link kept); a
    character device or FIFO already there is written into (`-o /dev/stdout`; a FIFO
    without a reader is refused, never waited on); a directory, block device or socket is
    refused. Errors are `dstrain.publish.WriteError` (a DstrainError and an OSError)
    naming the path and what was kept.
    """
    from dstrain.publish import write_file_atomic

    write_file_atomic(path, data)
