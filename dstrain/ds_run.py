"""One typed reading of a DeepSpeed JSON config: the run DeepSpeed 0.19.8 will build.

Pure layer (L0): pydantic and the standard library. `resolve_ds_run(config)` turns a
parsed config dict into a frozen `DsRun` by the rules DeepSpeed itself applies when it
parses the same dict (deepspeed/runtime/config.py, precision_config.py, zero/config.py,
monitor/config.py), so that the estimate, the training banner, export and the launch
preflight describe the run the engine really builds:

- `bf16` wins over its old alias `bfloat16`, which is read only when `bf16` is absent
  or null; `"enabled": "yes"`, `1` and `"true"` all switch a block on (DeepSpeed's
  pydantic models coerce them), and so do they here.
- `"auto"` inside a pydantic-parsed block (fp16, bf16, zero_optimization, offload,
  monitors) is dropped by DeepSpeed before parsing, so the field keeps its default.
- `"zero_optimization": true` is the deprecated boolean form: stage 1 with the bucket
  from the top-level `allgather_size`; `false` is stage 0.
- Deprecated ZeRO keys land where DeepSpeed moves them: `cpu_offload: true` becomes a
  CPU optimizer offload, `cpu_offload_param: true` a CPU parameter offload, and
  `stage3_gather_fp16_weights_on_model_save` the 16-bit gather; each `stage3_*` knob is
  read under its alias or its short name.
- `overlap_comm` unset means on for stage 3 and off below.
- The batch triple is derived for a world size as DeepSpeed does, by integer division
  (`BatchRun.resolve`); whether the equation then holds is ds_check's business.

Nothing here judges a config; `dstrain.ds_check` does that. A value DeepSpeed would refuse
to parse raises `DstrainError` naming its JSON path (`load_ds_run` checks first, so the
training path never sees that).
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass, field
from enum import IntEnum
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError

from dstrain.errors import DstrainError

Precision = Literal["fp32", "fp16", "bf16"]
OffloadDevice = Literal["none", "cpu", "nvme"]

MONITORS = ("tensorboard", "wandb", "csv_monitor", "comet")
"""The monitor blocks DeepSpeed 0.19.8 reads (deepspeed/monitor/config.py)."""

FILE_MONITORS = ("tensorboard", "csv_monitor")
"""The monitors that write files under `output_path`; wandb and comet send to a service
and DeepSpeed refuses an `output_path` key in their blocks."""

MONITOR_PACKAGES = {"tensorboard": "tensorboard", "wandb": "wandb", "comet": "comet_ml"}
"""The package each monitor imports when DeepSpeed builds it (the csv monitor needs none)."""


# --------------------------------------------------------------------------------------
# The typed run
# --------------------------------------------------------------------------------------


@dataclass(frozen=True)
class LossScalingRun:
    """fp16 loss scaling as the engine will apply it (DeepSpeed's defaults when unset)."""

    loss_scale: float = 0.0
    """0 = dynamic scaling; anything else is a fixed scale."""
    initial_scale_power: int = 16
    loss_scale_window: int = 1000
    hysteresis: int = 2
    consecutive_hysteresis: bool = False
    min_loss_scale: float = 1.0

    @property
    def dynamic(self) -> bool:
        return self.loss_scale == 0


@dataclass(frozen=True)
class OffloadRun:
    """Where one ZeRO partition lives when it is not on the accelerator."""

    device: OffloadDevice = "none"
    nvme_path: str | None = None
    pin_memory: bool = True

    @property
    def enabled(self) -> bool:
        return self.device != "none"


@dataclass(frozen=True)
class ZeroRun:
    """`zero_optimization` after aliases, deprecated forms and defaults (elements, not bytes)."""

    stage: int = 0
    offload_optimizer: OffloadRun = field(default_factory=OffloadRun)
    offload_param: OffloadRun = field(default_factory=OffloadRun)
    overlap_comm: bool = False
    contiguous_gradients: bool = True
    reduce_bucket_size: int = 500_000_000
    allgather_bucket_size: int = 500_000_000
    stage3_prefetch_bucket_size: int = 50_000_000
    stage3_param_persistence_threshold: int = 100_000
    stage3_max_live_parameters: int = 1_000_000_000
    stage3_max_reuse_distance: int = 1_000_000_000
    stage3_gather_16bit_weights_on_model_save: bool = False
    sub_group_size: int = 1_000_000_000


@dataclass(frozen=True)
class BatchRun:
    """The batch triple as written (None = not in the file, or "auto")."""

    train_batch_size: int | None = None
    train_micro_batch_size_per_gpu: int | None = None
    gradient_accumulation_steps: int | None = None

    def resolve(self, world_size: int) -> tuple[int | None, int | None, int | None]:
        """(train_batch_size, micro batch, accumulation) DeepSpeed derives for `world_size`
        data-parallel ranks: given two, it finds the third by integer division; given only
        one of the batch sizes, accumulation is 1. None where nothing can be derived."""
        tbs = self.train_batch_size
        micro = self.train_micro_batch_size_per_gpu
        gas = self.gradient_accumulation_steps
        if tbs is not None and micro is not None and gas is not None:
            return tbs, micro, gas
        if tbs is not None and micro is not None:
            return tbs, micro, tbs // micro // world_size
        if tbs is not None and gas is not None:
            return tbs, tbs // world_size // gas, gas
        if micro is not None and gas is not None:
            return micro * gas * world_size, micro, gas
        if tbs is not None:
            return tbs, tbs // world_size, 1
        if micro is not None:
            return micro * world_size, micro, 1
        return None, None, gas


@dataclass(frozen=True)
class OptimizerRun:
    """The `optimizer` block: DeepSpeed lower-cases the names it knows itself."""

    type: str | None = None
    params: Mapping[str, Any] = field(default_factory=dict)

    @property
    def lr(self) -> float | None:
        value = self.params.get("lr")
        return float(value) if _is_number(value) else None

    @property
    def weight_decay(self) -> float:
        value = self.params.get("weight_decay", 0.0)
        return float(value) if _is_number(value) else 0.0

    @property
    def is_deepspeed_adam(self) -> bool:
        """`Adam` / `AdamW`: DeepSpeed picks the implementation (torch's, FusedAdam, CPU
        Adam) from `torch_adam` and the optimizer offload."""
        return isinstance(self.type, str) and self.type.lower() in ("adam", "adamw")

    @property
    def torch_adam(self) -> bool | None:
        """`params.torch_adam`: True torch's Adam(W), False DeepSpeed's own; None when the
        key is absent (auto: `choose_optimizer` decides per device). ds_check refuses
        anything but true and false."""
        value = self.params.get("torch_adam")
        return value if isinstance(value, bool) else None


@dataclass(frozen=True)
class SchedulerRun:
    """The `scheduler` block (type as written: DeepSpeed's scheduler names are exact)."""

    type: str | None = None
    params: Mapping[str, Any] = field(default_factory=dict)


@dataclass(frozen=True)
class ActivationCheckpointingRun:
    """dstrain turns on the model's per-layer recomputation when the block is present."""

    enabled: bool = False
    partition_activations: bool = False
    cpu_checkpointing: bool = False
    contiguous_memory_optimization: bool = False


@dataclass(frozen=True)
class MonitorRun:
    """One of DeepSpeed's metric monitors."""

    name: str
    enabled: bool = False
    output_path: str = ""
    job_name: str = ""


@dataclass(frozen=True)
class DsRun:
    """What DeepSpeed 0.19.8 builds from one config (frozen: read it, never edit it)."""

    precision: Precision = "fp32"
    fp16: LossScalingRun = field(default_factory=LossScalingRun)
    """Loss scaling; only used when precision is fp16."""
    zero: ZeroRun = field(default_factory=ZeroRun)
    batch: BatchRun = field(default_factory=BatchRun)
    optimizer: OptimizerRun = field(default_factory=OptimizerRun)
    scheduler: SchedulerRun = field(default_factory=SchedulerRun)
    gradient_clipping: float = 1.0
    """Global gradient-norm clip; 0 = none. DeepSpeed 0.19.8 clips at 1.0 when the key
    is absent."""
    activation_checkpointing: ActivationCheckpointingRun = field(
        default_factory=ActivationCheckpointingRun
    )
    monitors: tuple[MonitorRun, ...] = ()
    steps_per_print: int | None = None
    """None: DeepSpeed prints no progress lines of its own."""
    wall_clock_breakdown: bool = False
    grad_accum_dtype: str | None = None
    """`data_types.grad_accum_dtype` (None: the training dtype)."""
    notes: tuple[str, ...] = ()
    """How the file was read where that is not obvious (aliases, deprecated forms, "auto")."""

    @property
    def fp16_enabled(self) -> bool:
        return self.precision == "fp16"

    @property
    def bf16_enabled(self) -> bool:
        return self.precision == "bf16"

    def monitor(self, name: str) -> MonitorRun:
        for monitor in self.monitors:
            if monitor.name == name:
                return monitor
        return MonitorRun(name)

    def describe(self) -> str:
        """One line for banners: `bf16, ZeRO-2, optimizer offload cpu`."""
        parts = [self.precision, f"ZeRO-{self.zero.stage}"]
        for what, offload in (
            ("optimizer", self.zero.offload_optimizer),
            ("param", self.zero.offload_param),
        ):
            if offload.enabled:
                parts.append(f"{what} offload {offload.device}")
        if self.activation_checkpointing.enabled:
            parts.append("activation checkpointing")
        return ", ".join(parts)


# --------------------------------------------------------------------------------------
# Mirrors of the pydantic blocks DeepSpeed parses: same field types, so the same lax
# coercions ("true" -> True, 5e8 -> 500000000), and unknown keys left to ds_check.
# --------------------------------------------------------------------------------------


class _Mirror(BaseModel):
    model_config = ConfigDict(extra="ignore", populate_by_name=True)


class _Fp16(_Mirror):
    enabled: bool = False
    loss_scale: float = 0.0
    initial_scale_power: int = 16
    loss_scale_window: int = 1000
    hysteresis: int = 2
    consecutive_hysteresis: bool = False
    min_loss_scale: int = 1  # an int in DeepSpeed 0.19.8: 0.5 is refused


class _Bf16(_Mirror):
    enabled: bool = False


class _Offload(_Mirror):
    device: Literal["none", "cpu", "nvme"] = "none"
    nvme_path: str | None = None
    pin_memory: bool = True


class _Stage(IntEnum):
    disabled = 0
    optimizer_states = 1
    gradients = 2
    weights = 3


class _Zero(_Mirror):
    stage: _Stage = _Stage.disabled
    contiguous_gradients: bool = True
    reduce_bucket_size: int = Field(500_000_000, gt=0)
    allgather_bucket_size: int = Field(500_000_000, ge=0)
    overlap_comm: bool | None = None
    offload_param: _Offload | None = None
    offload_optimizer: _Offload | None = None
    sub_group_size: int = Field(1_000_000_000, ge=0)
    cpu_offload: bool | None = None
    cpu_offload_param: bool | None = None
    cpu_offload_use_pin_memory: bool | None = None
    prefetch_bucket_size: int = Field(50_000_000, ge=0, alias="stage3_prefetch_bucket_size")
    param_persistence_threshold: int = Field(
        100_000, ge=0, alias="stage3_param_persistence_threshold"
    )
    max_live_parameters: int = Field(1_000_000_000, ge=0, alias="stage3_max_live_parameters")
    max_reuse_distance: int = Field(1_000_000_000, ge=0, alias="stage3_max_reuse_distance")
    gather_16bit_weights_on_model_save: bool = Field(
        False, alias="stage3_gather_16bit_weights_on_model_save"
    )
    stage3_gather_fp16_weights_on_model_save: bool | None = None


class _Monitor(_Mirror):
    enabled: bool = False
    output_path: str = ""
    job_name: str = ""


def _is_auto(value: Any) -> bool:
    return isinstance(value, str) and value == "auto"


def _is_number(value: Any) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool) and math.isfinite(value)


def _without_auto(block: Mapping[str, Any]) -> dict[str, Any]:
    """DeepSpeed drops `"auto"` values of a pydantic block before parsing it."""
    return {k: v for k, v in block.items() if not _is_auto(v)}


def _parse(model: type[_Mirror], block: Any, path: str) -> Any:
    if block is None:
        block = {}
    if not isinstance(block, Mapping):
        raise DstrainError(f"DeepSpeed config: `{path}` must be an object, not {block!r}")
    try:
        return model.model_validate(_without_auto(block))
    except ValidationError as exc:
        problems = "; ".join(
            f"{'.'.join([path, *map(str, e['loc'])])}: {e['msg']}"
            for e in exc.errors(include_url=False)
        )
        raise DstrainError(f"DeepSpeed 0.19.8 refuses this config: {problems}") from None


def _whole(value: Any) -> int | None:
    """A batch number as DeepSpeed uses it; None for absent, "auto" or not a whole number."""
    if isinstance(value, bool) or not _is_number(value):
        return None
    return int(value) if float(value).is_integer() else None


# --------------------------------------------------------------------------------------
# Resolution
# --------------------------------------------------------------------------------------


def _precision(config: Mapping[str, Any], notes: list[str]) -> tuple[Precision, LossScalingRun]:
    fp16 = _parse(_Fp16, config.get("fp16"), "fp16")
    bf16_block, bf16_path = config.get("bf16"), "bf16"
    if bf16_block is None and "bfloat16" in config:
        bf16_block, bf16_path = config.get("bfloat16"), "bfloat16"
        notes.append("`bfloat16` is DeepSpeed's old name for `bf16`")
    elif bf16_block is not None and "bfloat16" in config:
        notes.append("`bfloat16` is ignored: DeepSpeed reads `bf16` when both are given")
    bf16 = _parse(_Bf16, bf16_block, bf16_path)
    if fp16.enabled and bf16.enabled:
        raise DstrainError("DeepSpeed 0.19.8 refuses this config: fp16 and bf16 are both enabled")
    for block, path in ((config.get("fp16"), "fp16"), (bf16_block, bf16_path)):
        if isinstance(block, Mapping) and _is_auto(block.get("enabled")):
            notes.append(f'{path}.enabled is "auto": DeepSpeed drops it (so it stays off)')
    scaling = LossScalingRun(
        loss_scale=fp16.loss_scale,
        initial_scale_power=fp16.initial_scale_power,
        loss_scale_window=fp16.loss_scale_window,
        hysteresis=fp16.hysteresis,
        consecutive_hysteresis=fp16.consecutive_hysteresis,
        min_loss_scale=float(fp16.min_loss_scale),
    )
    precision: Precision = "fp16" if fp16.enabled else "bf16" if bf16.enabled else "fp32"
    return precision, scaling


def _offload(block: _Offload | None) -> OffloadRun:
    if block is None:
        return OffloadRun()
    return OffloadRun(block.device, block.nvme_path, block.pin_memory)


def _zero(config: Mapping[str, Any], notes: list[str]) -> ZeroRun:
    block = config.get("zero_optimization", {})
    if isinstance(block, bool):
        # The deprecated boolean form: true = stage 1, bucket from top-level allgather_size.
        notes.append(
            f"`zero_optimization: {str(block).lower()}` is DeepSpeed's deprecated form: "
            f"stage {int(block)}"
        )
        block = {"stage": int(block)}
        if block["stage"] and "allgather_size" in config:
            block["allgather_bucket_size"] = config["allgather_size"]
    zero = _parse(_Zero, block, "zero_optimization")
    stage = int(zero.stage)
    offload_optimizer, offload_param = (
        _offload(zero.offload_optimizer),
        _offload(zero.offload_param),
    )
    # Deprecated switches that DeepSpeed turns into offload blocks.
    if zero.cpu_offload:
        offload_optimizer = OffloadRun("cpu")
        notes.append("zero_optimization.cpu_offload is deprecated: read as a CPU optimizer offload")
    if zero.cpu_offload_param:
        offload_param = OffloadRun("cpu")
        notes.append(
            "zero_optimization.cpu_offload_param is deprecated: read as a CPU param offload"
        )
    gather = zero.gather_16bit_weights_on_model_save
    if zero.stage3_gather_fp16_weights_on_model_save is not None:
        gather = zero.stage3_gather_fp16_weights_on_model_save
    overlap = zero.overlap_comm if zero.overlap_comm is not None else stage == 3
    return ZeroRun(
        stage=stage,
        offload_optimizer=offload_optimizer,
        offload_param=offload_param,
        overlap_comm=overlap,
        contiguous_gradients=zero.contiguous_gradients,
        reduce_bucket_size=zero.reduce_bucket_size,
        allgather_bucket_size=zero.allgather_bucket_size,
        stage3_prefetch_bucket_size=zero.prefetch_bucket_size,
        stage3_param_persistence_threshold=zero.param_persistence_threshold,
        stage3_max_live_parameters=zero.max_live_parameters,
        stage3_max_reuse_distance=zero.max_reuse_distance,
        stage3_gather_16bit_weights_on_model_save=gather,
        sub_group_size=zero.sub_group_size,
    )


def _typed_block(config: Mapping[str, Any], name: str) -> tuple[str | None, dict[str, Any]]:
    """(type, params) of the optimizer or scheduler block, read the way DeepSpeed does."""
    block = config.get(name)
    if not isinstance(block, Mapping) or "type" not in block:
        return None, {}
    kind = block["type"]
    params = block.get("params")
    return (kind if isinstance(kind, str) else None), dict(params) if isinstance(
        params, Mapping
    ) else {}


def _monitors(config: Mapping[str, Any]) -> tuple[MonitorRun, ...]:
    runs = []
    for name in MONITORS:
        if name not in config:
            continue
        parsed = _parse(_Monitor, config.get(name), name)
        runs.append(MonitorRun(name, parsed.enabled, parsed.output_path, parsed.job_name))
    return tuple(runs)


def _activation_checkpointing(config: Mapping[str, Any]) -> ActivationCheckpointingRun:
    block = config.get("activation_checkpointing")
    if not isinstance(block, Mapping):
        return ActivationCheckpointingRun()
    return ActivationCheckpointingRun(
        enabled=True,
        partition_activations=block.get("partition_activations") is True,
        cpu_checkpointing=block.get("cpu_checkpointing") is True,
        contiguous_memory_optimization=block.get("contiguous_memory_optimization") is True,
    )


def resolve_ds_run(config: Mapping[str, Any]) -> DsRun:
    """The run DeepSpeed 0.19.8 builds from the parsed config `config`.

    Raises `DstrainError` (naming the JSON path) where DeepSpeed's own parser would refuse
    a value it reads into the run; judging everything else is `ds_check`'s job.
    """
    notes: list[str] = []
    precision, scaling = _precision(config, notes)
    zero = _zero(config, notes)
    batch = BatchRun(*(_whole(config.get(key)) for key in _BATCH_KEYS))
    for key in _BATCH_KEYS:
        if _is_auto(config.get(key)):
            notes.append(f'{key} is "auto" (filled in by HF Trainer; plain DeepSpeed refuses it)')
    optimizer_type, optimizer_params = _typed_block(config, "optimizer")
    scheduler_type, scheduler_params = _typed_block(config, "scheduler")
    clip = config.get("gradient_clipping", 1.0)  # DeepSpeed's default, not "off"
    data_types = config.get("data_types")
    grad_accum_dtype = (
        data_types.get("grad_accum_dtype") if isinstance(data_types, Mapping) else None
    )
    steps_per_print = config.get("steps_per_print")
    return DsRun(
        precision=precision,
        fp16=scaling,
        zero=zero,
        batch=batch,
        optimizer=OptimizerRun(optimizer_type, optimizer_params),
        scheduler=SchedulerRun(scheduler_type, scheduler_params),
        gradient_clipping=float(clip) if _is_number(clip) else 1.0,
        activation_checkpointing=_activation_checkpointing(config),
        monitors=_monitors(config),
        steps_per_print=steps_per_print if _whole(steps_per_print) else None,
        wall_clock_breakdown=config.get("wall_clock_breakdown") is True,
        grad_accum_dtype=None if _is_auto(grad_accum_dtype) else grad_accum_dtype,
        notes=tuple(notes),
    )


_BATCH_KEYS = ("train_batch_size", "train_micro_batch_size_per_gpu", "gradient_accumulation_steps")


# --------------------------------------------------------------------------------------
# The checked loader: file -> problems -> DsRun
# --------------------------------------------------------------------------------------


@dataclass(frozen=True)
class CheckedConfig:
    """A DeepSpeed config that passed `ds_check`: the dict for `deepspeed.initialize`
    and the typed run every other reader uses."""

    config: Mapping[str, Any]
    run: DsRun
    source: str


def load_ds_run(
    path: str, *, world_size: int | None = None, allow_auto: bool = False
) -> CheckedConfig:
    """Read and check a DeepSpeed JSON (any error-level problem raises `DstrainError`
    listing all of them), then resolve it."""
    from dstrain.ds_check import check_ds_config, read_ds_json

    config, problems = read_ds_json(path)
    if config is not None:
        problems += check_ds_config(config, path, world_size=world_size, allow_auto=allow_auto)
    errors = [p for p in problems if p.severity == "error"]
    if errors:
        lines = "\n  ".join(p.format() for p in errors)
        raise DstrainError(
            f"the DeepSpeed config {path} (--deepspeed_config) has {len(errors)} "
            f"problem(s):\n  {lines}\n"
            f"Check it with `dstrain validate {path}`, or write a fresh one with "
            "`dstrain gen-config`."
        )
    assert config is not None
    return CheckedConfig(config, resolve_ds_run(config), path)


# --------------------------------------------------------------------------------------
# Per-device choices `dstrain train` makes on a checked config (pure: the caller asks the
# hardware; tests pass "cuda" without a GPU)
# --------------------------------------------------------------------------------------

FUSED_ADAM_JIT = "JIT-built on first use, ~1 min, cached in ~/.cache/torch_extensions"
"""How FusedAdam gets onto a machine whose DeepSpeed wheel was built without ops."""


def choose_optimizer(
    config: Mapping[str, Any],
    device_type: str,
    *,
    fused_adam: str = FUSED_ADAM_JIT,
    fused_adam_problem: str | None = None,
) -> tuple[dict[str, Any], str]:
    """(the config to hand `deepspeed.initialize` on a `device_type` machine, one line
    saying which optimizer DeepSpeed builds from it).

    Only an Adam/AdamW block without `torch_adam` (a generated config left on auto) is
    changed: on CPU it gets `torch_adam: true` (torch's AdamW; DeepSpeed would JIT-build
    its CPU FusedAdam for ~55 s and run no faster), and on an accelerator it keeps
    DeepSpeed's FusedAdam, unless `fused_adam_problem` says why it cannot be loaded
    there (no CUDA toolkit to build it): then torch's AdamW too. An explicit true/false
    is honoured; optimizer offload builds DeepSpeed's CPU Adam (DeepSpeed 0.19.8
    `get_optimizer_configuration`: torch_adam first, then the offload, then FusedAdam).
    `fused_adam` describes how FusedAdam gets here (prebuilt, or JIT and where cached).
    The input is never modified; the file written to the run directory stays as given.
    """
    run = resolve_ds_run(config)
    opt = run.optimizer
    if opt.type is None:
        return dict(config), "no optimizer block: DeepSpeed builds none"
    if not opt.is_deepspeed_adam:
        return dict(config), f"{opt.type} (from the config)"
    adamw = opt.type.lower() == "adamw" or opt.params.get("adam_w_mode", True) is not False
    torch_name = "torch AdamW" if adamw else "torch Adam"
    if opt.torch_adam is True:
        return dict(config), torch_name
    if run.zero.offload_optimizer.enabled:
        return dict(config), "DeepSpeed CPUAdam (optimizer offload; JIT-built on first use)"
    if opt.torch_adam is False:
        return dict(config), f"FusedAdam (torch_adam false; {fused_adam})"
    if device_type != "cpu" and fused_adam_problem is None:
        return dict(config), f"FusedAdam ({fused_adam})"
    block = dict(config["optimizer"])
    block["params"] = {**(block.get("params") or {}), "torch_adam": True}
    chosen = {**config, "optimizer": block}
    if device_type == "cpu":
        return chosen, torch_name
    return chosen, f"{torch_name} (FusedAdam unavailable: {fused_adam_problem})"


def check_device_precision(run: DsRun, device: str, *, native_bf16: bool, source: str) -> None:
    """Refuse bf16 on a CUDA GPU without native bf16 (compute capability below 8.0, e.g.
    V100, T4) before anything is built: torch emulates bf16 there, so DeepSpeed accepts
    the config and trains many times slower. `device` is the accelerator type
    (`cuda`, `cpu`, ...); CPUs train bf16 as before."""
    if device != "cuda" or not run.bf16_enabled or native_bf16:
        return
    raise DstrainError(
        f"the DeepSpeed config ({source}) enables bf16, but this GPU has no native bf16 "
        "(it needs compute capability 8.0 or newer: A100, H100; torch would emulate it, many "
        "times slower). "
        "Train in fp16 with loss scaling: `dstrain gen-config --fp16` for a new config, "
        "or `dstrain train --fp16` without --deepspeed_config (or --fp32)."
    )


def missing_monitor_packages(run: DsRun) -> list[str]:
    """The packages (pip names) that the enabled monitors need and this Python cannot find.
    DeepSpeed imports them inside `deepspeed.initialize`, after the model is built, and
    stops there with a bare ImportError; a training run checks them first."""
    import importlib.util

    return [
        package
        for name, package in MONITOR_PACKAGES.items()
        if run.monitor(name).enabled and importlib.util.find_spec(package) is None
    ]


def with_monitor_dir(checked: CheckedConfig, directory: str) -> CheckedConfig:
    """`checked` with every enabled file monitor (tensorboard, csv) that has no
    output_path writing under `directory` (DeepSpeed would write beside the launching
    script)."""
    config = dict(checked.config)
    for monitor in checked.run.monitors:
        if monitor.name in FILE_MONITORS and monitor.enabled and not monitor.output_path:
            config[monitor.name] = {**config[monitor.name], "output_path": directory}
    if config == checked.config:
        return checked
    return CheckedConfig(config, resolve_ds_run(config), checked.source)
