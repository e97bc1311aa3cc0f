"""Typed, validated settings: the one settings tree dstrain reads.

Pure layer (L0): pydantic and the standard library only. Every field has a docstring;
pydantic turns it into the field description (and the CLI help reuses it). Fields that map
one to one onto a DeepSpeed key keep DeepSpeed's name. Cross-field rules live in one
validator per model, and each reports every problem it finds, not just the first.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Literal, get_args

from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    ValidationError,
    ValidationInfo,
    model_validator,
)

from dstrain.errors import DstrainError


class _Node(BaseModel):
    """Base for every settings node: unknown keys are errors, docstrings are descriptions."""

    # allow_inf_nan=False: NaN and ±Infinity pass every `ge`/`gt` bound otherwise.
    model_config = ConfigDict(
        extra="forbid", use_attribute_docstrings=True, validate_default=True, allow_inf_nan=False
    )

    @model_validator(mode="before")
    @classmethod
    def _no_bool_as_number(cls, data: object) -> object:
        """pydantic's lax mode reads true/false as 1/0 in a number field (`stage = true`
        became ZeRO stage 1): refuse them where the field takes no bool."""
        if isinstance(data, dict):
            for name, value in data.items():
                field = cls.model_fields.get(name)
                if isinstance(value, bool) and field and not _takes_bool(field.annotation):
                    raise ValueError(
                        f"{name}: must be a number, not {json.dumps(value)} (a bool); "
                        "write the number"
                    )
        return data


def _takes_bool(annotation: object) -> bool:
    """Whether a field's type admits a bool (bool itself, Any, or a union holding one)."""
    if annotation is bool or annotation is Any:
        return True
    return any(_takes_bool(arg) for arg in get_args(annotation) if not isinstance(arg, str))


# --------------------------------------------------------------------------------------
# Data: FASTA -> codon token ids -> batches
# --------------------------------------------------------------------------------------


class DataSettings(_Node):
    """How nucleotide FASTA becomes training examples."""

    frame: Literal["0", "orf", "all-orfs"] = "0"
    """Reading frame: `0` reads each record from its first base (upstream GenSLM);
    `orf` keeps the longest ATG...stop open reading frame of each record; `all-orfs` makes
    every ATG...stop ORF of at least `min_orf_codons` codons its own example (genes from
    genomes; the report lists each ORF's coordinates)."""

    min_orf_codons: int = Field(default=30, ge=1)
    """`--frame all-orfs` only (ignored otherwise): shortest ORF kept, in codons counting
    the stop codon (30 keeps SARS-CoV-2's ORF10, 38 aa + stop = 39 codons)."""

    strands: Literal["forward", "both"] = "forward"
    """`--frame orf` and `all-orfs`: search the forward strand only, or also the reverse
    complement (a reverse-strand ORF is read from its own ATG; its coordinates are given
    on the forward strand)."""

    on_ambiguous: Literal["unk", "skip-record", "error"] = "unk"
    """What to do with a codon holding an IUPAC ambiguity code (N, R, Y, ...): map it to
    `[UNK]` (counted in the report), drop the whole record, or stop with an error."""

    max_length: int = Field(default=2048, ge=8, le=2**20)
    """Longest example in codon tokens (GenSLM's context is 2048). Longer records are cut
    into windows of this size, or truncated to it (see `long_records`)."""
    # le=2**20 (3 Mb, far above any gene): `--padding max_length` pads every example to
    # it, and 2**63-1 failed in torch's allocator with a traceback.

    window_overlap: int = Field(default=0, ge=0)
    """Codons shared by consecutive windows of a record longer than `max_length`."""

    val_fraction: float = Field(default=0.1, ge=0.0, lt=1.0)
    """Share of records held out for validation, chosen by hashing record IDs so the split
    stays stable when the FASTA grows."""

    split_seed: int = 0
    """Salt for the record-ID hash that assigns records to train or validation."""

    padding: Literal["longest", "max_length"] = "longest"
    """`longest` pads each batch to its longest example; `max_length` pads every example to
    `max_length` (upstream GenSLM's behaviour, mostly wasted compute)."""

    loss_on_pad: bool = False
    """Count padding positions in the loss (upstream GenSLM does; wrong, kept for
    reproducing old numbers). By default pad labels are -100 and ignored."""

    batching: Literal["random", "grouped", "packed"] = "random"
    """How examples make micro-batches (a seeded shuffle every epoch, the same number of
    micro-batches on every rank): `random` draws them in shuffled order (padding each to
    its longest); `grouped` sorts chunks of the shuffled examples by length so each
    micro-batch holds similar lengths, then shuffles the micro-batches; `packed` lays
    several whole examples end to end in rows of `max_length` codons (attention and
    positions restart at each example), nearly no padding."""

    tokens_per_micro_batch: int | None = Field(default=None, ge=1)
    """Token budget of a micro-batch: as many examples (rows when packed) as keep rows x
    longest row within it, e.g. 8192 = 16 examples of 512 codons or 4 of 2048. Unset:
    train_micro_batch_size_per_gpu examples (rows) per micro-batch."""

    partial_codon: Literal["drop", "unk"] = "drop"
    """A trailing 1-2 base remainder (frame 0): `drop` it (counted), or keep it as one
    `[UNK]` token at the end of the record, as upstream GenSLM's tokenizer does."""

    long_records: Literal["window", "truncate"] = "window"
    """A record longer than `max_length` codons: cut it into windows, or keep only its first
    `max_length` codons (upstream GenSLM's truncation; the cut codons are counted)."""

    on_invalid: Literal["error", "unk", "skip-record"] = "error"
    """A letter outside the nucleotide IUPAC alphabet (X, *, digits, ...): stop with an
    error, encode its codon as `[UNK]` (counted; upstream GenSLM's behaviour), or leave the
    record out (listed with the reason). Protein-looking records are never encoded."""

    @model_validator(mode="after")
    def _check_windows(self) -> DataSettings:
        if self.window_overlap >= self.max_length:
            raise ValueError(
                f"--window-overlap ({self.window_overlap}) must be smaller than --max-length "
                f"({self.max_length}): each window adds max_length - window_overlap new "
                f"codons. Lower --window-overlap (for example to {self.max_length // 4})"
            )
        if self.long_records == "truncate" and self.window_overlap:
            raise ValueError(
                f"--window-overlap ({self.window_overlap}) applies to --long-records window "
                f"only; --long-records truncate makes one example per record. Drop "
                f"--window-overlap or use --long-records window"
            )
        if self.frame != "0" and self.partial_codon == "unk":
            raise ValueError(
                f"--partial-codon unk applies to --frame 0 only (not --frame {self.frame}): "
                "an ORF is whole codons from ATG to its stop, so it has no trailing partial "
                "codon. Drop --partial-codon or use --frame 0"
            )
        if self.frame == "0" and self.strands == "both":
            raise ValueError(
                "--strands both applies to --frame orf and --frame all-orfs only: --frame 0 "
                "reads each record as given, from its first base. Drop --strands or use "
                "--frame orf or --frame all-orfs"
            )
        return self

    @model_validator(mode="after")
    def _check_batching(self) -> DataSettings:
        budget = self.tokens_per_micro_batch
        if self.batching == "packed" and self.loss_on_pad:
            raise ValueError(
                "--loss-on-pad trains on padding, and --batching packed leaves almost none (a "
                "packed row holds several examples). Drop --loss-on-pad, or use --batching "
                "random or grouped to reproduce upstream's pad-included loss"
            )
        row = "a packed row holds up" if self.batching == "packed" else None
        if self.padding == "max_length":
            row = "--padding max_length pads every row"
        if budget is not None and row and budget < self.max_length:
            raise ValueError(
                f"--tokens-per-micro-batch {budget} is smaller than one row: {row} to "
                f"--max-length {self.max_length} codons. Raise --tokens-per-micro-batch to at "
                f"least {self.max_length} (a multiple of it, e.g. {4 * self.max_length})"
            )
        return self


# --------------------------------------------------------------------------------------
# DeepSpeed: everything that ends up in the DeepSpeed JSON
# --------------------------------------------------------------------------------------


class LossScaling(_Node):
    """fp16 loss scaling (DeepSpeed's `fp16` block). Ignored, and refused if set, unless
    precision is fp16: bf16 and fp32 have the range to train without it."""

    loss_scale: float = Field(default=0.0, ge=0.0)
    """Static loss scale; 0 selects dynamic scaling (the usual choice)."""

    initial_scale_power: int = Field(default=16, ge=0, le=40)
    """Dynamic scaling starts at 2**initial_scale_power."""

    loss_scale_window: int = Field(default=1000, ge=1)
    """Clean (overflow-free) steps before the dynamic scale doubles."""

    hysteresis: int = Field(default=2, ge=1)
    """Overflows tolerated before the dynamic scale halves."""

    consecutive_hysteresis: bool = False
    """Refill the hysteresis budget after every clean step, not only at window ends."""

    min_loss_scale: int = Field(default=1, ge=1)
    """Floor of the dynamic scale, a whole number (DeepSpeed 0.19.8 refuses 0.5); another
    overflow there stops training."""


class Offload(_Node):
    """Where a ZeRO partition lives when it is not on the GPU."""

    device: Literal["none", "cpu", "nvme"] = "none"
    """`none` keeps it on the GPU; `cpu` moves it to host RAM; `nvme` to local NVMe."""

    nvme_path: str | None = None
    """Directory on a fast local NVMe drive; required when device is `nvme`."""

    pin_memory: bool = True
    """Page-lock host buffers: faster transfers, but pinned RAM cannot be swapped."""


class ZeroSettings(_Node):
    """ZeRO partitioning (DeepSpeed's `zero_optimization` block)."""

    stage: int = Field(default=2, ge=0, le=3)
    """0 = plain data parallel; 1 shards optimizer states; 2 also gradients; 3 also
    parameters. Higher stages save memory and communicate more."""

    offload_optimizer: Offload = Field(default_factory=Offload)
    """Offload of optimizer states and the fp32 master weights (stages 1-3; nvme needs 3)."""

    offload_param: Offload = Field(default_factory=Offload)
    """Offload of parameters (stage 3 only)."""

    overlap_comm: bool | None = None
    """Overlap gradient reduction with the backward pass; unset keeps DeepSpeed's default
    (on for stage 3, off otherwise)."""

    contiguous_gradients: bool = True
    """Copy gradients into one contiguous buffer as they are produced (less fragmentation)."""

    reduce_bucket_size: int = Field(default=500_000_000, ge=1)
    """Elements reduced at once (larger: faster, more memory)."""

    allgather_bucket_size: int = Field(default=500_000_000, ge=1)
    """Elements all-gathered at once after the step (stages 1-2)."""

    stage3_prefetch_bucket_size: int = Field(default=50_000_000, ge=0)
    """Stage 3: parameter elements fetched ahead of use."""

    stage3_param_persistence_threshold: int = Field(default=100_000, ge=0)
    """Stage 3: parameters smaller than this many elements are not partitioned."""

    stage3_max_live_parameters: int = Field(default=1_000_000_000, ge=1)
    """Stage 3: most parameter elements kept gathered on a GPU at once."""

    stage3_max_reuse_distance: int = Field(default=1_000_000_000, ge=0)
    """Stage 3: keep a gathered parameter if it is reused within this many elements."""

    stage3_gather_16bit_weights_on_model_save: bool = True
    """Stage 3: gather full 16-bit weights when saving, so the saved model is usable
    without running zero_to_fp32."""

    sub_group_size: int = Field(default=1_000_000_000, ge=1)
    """Stage 3: optimizer step granularity in elements (smaller: less peak memory)."""


class BatchSettings(_Node):
    """The batch triple. DeepSpeed's rule: train_batch_size =
    train_micro_batch_size_per_gpu x gradient_accumulation_steps x data-parallel ranks."""

    train_micro_batch_size_per_gpu: int = Field(default=4, ge=1)
    """Sequences per forward/backward pass on each GPU."""

    gradient_accumulation_steps: int = Field(default=1, ge=1)
    """Micro-batches whose gradients are summed before one optimizer step."""

    train_batch_size: int | None = Field(default=None, ge=1)
    """Global batch in sequences. Leave unset so DeepSpeed derives it from the world size
    and one JSON fits any cluster; pin it only to fix the global batch."""


class OptimizerSettings(_Node):
    """AdamW (decoupled weight decay), built by DeepSpeed from the `optimizer` block."""

    lr: float = Field(default=5e-5, gt=0.0)
    """Peak learning rate."""

    betas: tuple[float, float] = (0.9, 0.999)
    """Adam's moment decay rates (beta1, beta2), each in [0, 1)."""

    eps: float = Field(default=1e-8, gt=0.0)
    """Adam's denominator term."""

    weight_decay: float = Field(default=0.01, ge=0.0)
    """Decoupled weight decay."""

    torch_adam: bool | None = None
    """Which Adam DeepSpeed builds. Unset (auto): the JSON leaves `torch_adam` out, so one
    file fits any machine, and `dstrain train` picks per device: DeepSpeed's FusedAdam on
    a GPU (a CUDA kernel JIT-compiled on first use, about a minute, then cached in
    ~/.cache/torch_extensions; torch's AdamW where it cannot be built) and torch's AdamW
    on CPU (no build; as fast there). true (--torch-adam): always torch's AdamW; false
    (--fused-adam): always FusedAdam. Optimizer offload always uses DeepSpeed's CPU Adam,
    whatever this says."""


class SchedulerSettings(_Node):
    """Learning-rate schedule (DeepSpeed's `scheduler` block).

    DeepSpeed's schedules are functions of an iteration i, 0 at the start of training.
    `dstrain train` runs optimizer step k (from 1) at i = k (DeepSpeed alone runs it at
    k - 2, the first two steps at warmup_min_lr), so no step runs at warmup_min_lr, and it
    gives WarmupDecayLR total_num_steps + 1, so a run of total_num_steps steps ends just
    above warmup_min_lr. The same holds for a --deepspeed_config file with these schedules.
    """

    type: Literal["none", "WarmupLR", "WarmupDecayLR", "WarmupCosineLR"] = "WarmupLR"
    """`WarmupLR` warms up then holds; `WarmupDecayLR` warms up then decays linearly to
    warmup_min_lr just after total_num_steps; `WarmupCosineLR` warms up then follows a
    cosine to cos_min_ratio x lr (reached at step total_num_steps - 1); `none` keeps lr
    constant."""

    warmup_num_steps: int = Field(default=100, ge=1)
    """Optimizer steps of warm-up: step k runs at k / warmup_num_steps of the way up
    (linear), lr from this step on (DeepSpeed counts 1 as 2, and refuses 0 at
    deepspeed.initialize)."""

    warmup_min_lr: float = Field(default=0.0, ge=0.0)
    """Learning rate the warm-up starts from (WarmupLR, WarmupDecayLR); no step runs at
    it, the first one is already a step up."""

    warmup_type: Literal["linear", "log"] = "linear"
    """Shape of the warm-up ramp."""

    total_num_steps: int | None = Field(default=None, ge=1)
    """Length of the schedule in optimizer steps (WarmupDecayLR, WarmupCosineLR), usually
    the run's: steps past it run at the end value (warmup_min_lr, cos_min_ratio x lr);
    `dstrain train` warns when that is 0."""

    warmup_min_ratio: float = Field(default=0.0, ge=0.0, le=1.0)
    """WarmupCosineLR: starting lr as a fraction of the peak."""

    cos_min_ratio: float = Field(default=0.0001, ge=0.0, le=1.0)
    """WarmupCosineLR: final lr as a fraction of the peak."""


class ActivationCheckpointing(_Node):
    """Recompute activations in the backward pass instead of storing them (DeepSpeed's
    `activation_checkpointing` block; dstrain's loop turns on the model's per-layer
    recomputation when it is enabled)."""

    enabled: bool = False
    """Recompute each transformer layer's activations: about 1/3 more compute, activation
    memory down to roughly the layer inputs."""

    partition_activations: bool = False
    """DeepSpeed's checkpointing API only (Megatron-style models): shard saved layer inputs
    across model-parallel ranks. dstrain's GPT-NeoX recomputation does not use it."""

    cpu_checkpointing: bool = False
    """DeepSpeed's checkpointing API only: keep saved layer inputs in host RAM (needs
    partition_activations). Not used by dstrain's GPT-NeoX recomputation."""

    contiguous_memory_optimization: bool = False
    """DeepSpeed's checkpointing API only: one contiguous checkpoint buffer (needs
    partition_activations). Not used by dstrain's GPT-NeoX recomputation."""


class Monitor(_Node):
    """A DeepSpeed metrics monitor (csv or tensorboard)."""

    enabled: bool = False
    """Write the training metrics with this monitor: lr and loss scale from DeepSpeed, and
    every number of dstrain's metrics.jsonl rows (loss, val_loss, tokens/s, ...)."""

    output_path: str = ""
    """Directory for the monitor's files; empty means the run's output directory."""

    job_name: str = "dstrain"
    """Sub-directory (tensorboard) or file prefix (csv) for this run."""


class WandbMonitor(_Node):
    """DeepSpeed's Weights & Biases monitor (the `wandb` block; rank 0 calls `wandb.init`,
    so the wandb package and a login, e.g. `WANDB_API_KEY`, are needed where it trains)."""

    enabled: bool = False
    """Log the training metrics to W&B (as the csv and tensorboard monitors write them)."""

    project: str = "dstrain"
    """W&B project the run is logged to."""

    group: str | None = None
    """W&B group, to gather related runs (e.g. the ranks of a sweep); unset: none."""

    team: str | None = None
    """W&B team (entity) that owns the project; unset: your default entity."""


class CometMonitor(_Node):
    """DeepSpeed's Comet monitor (the `comet` block; rank 0 calls `comet_ml.start`, so the
    comet_ml package is needed where it trains). Unset keys fall back to Comet's own
    configuration (`.comet.config`, `COMET_*` environment variables); the API key is
    deliberately not a setting: give it as `COMET_API_KEY`, not in a config file."""

    enabled: bool = False
    """Log the training metrics to Comet (as the csv and tensorboard monitors write them)."""

    project: str | None = None
    """Comet project name; unset: Comet's configuration (`COMET_PROJECT_NAME`)."""

    workspace: str | None = None
    """Comet workspace; unset: Comet's configuration (`COMET_WORKSPACE`)."""

    experiment_name: str | None = None
    """Name shown for this run in Comet; unset: Comet picks one."""

    samples_log_interval: int = Field(default=100, ge=1)
    """Send each metric to Comet once every this many training samples."""

    online: bool | None = None
    """False: keep an offline experiment on disk instead of sending it; unset: online."""

    mode: Literal["get", "create", "get_or_create"] | None = None
    """`get` continues an existing experiment, `create` always starts a new one,
    `get_or_create` (Comet's default when unset) does whichever applies."""


class DeepSpeedSettings(_Node):
    """Everything dstrain writes into a DeepSpeed JSON config."""

    precision: Literal["fp32", "fp16", "bf16"] = "bf16"
    """Training precision. bf16 (Ampere or newer GPUs, and CPUs) needs no loss scaling;
    fp16 (V100 and older) uses dynamic loss scaling; fp32 is slow and simple."""

    fp16: LossScaling = Field(default_factory=LossScaling)
    """fp16 loss scaling (only with precision fp16)."""

    zero_optimization: ZeroSettings = Field(default_factory=ZeroSettings)
    """ZeRO stage, offload and communication knobs."""

    batch: BatchSettings = Field(default_factory=BatchSettings)
    """Micro batch, gradient accumulation and the optional pinned global batch."""

    gradient_clipping: float = Field(default=1.0, ge=0.0)
    """Clip the global gradient norm to this value; 0 disables clipping."""

    optimizer: OptimizerSettings = Field(default_factory=OptimizerSettings)
    """AdamW hyper-parameters."""

    scheduler: SchedulerSettings = Field(default_factory=SchedulerSettings)
    """Learning-rate schedule."""

    activation_checkpointing: ActivationCheckpointing = Field(
        default_factory=ActivationCheckpointing
    )
    """Activation recomputation."""

    steps_per_print: int = Field(default=10, ge=1)
    """DeepSpeed prints its own progress line every this many optimizer steps."""

    wall_clock_breakdown: bool = False
    """Time forward, backward and step separately (adds synchronisation; for profiling)."""

    csv_monitor: Monitor = Field(default_factory=Monitor)
    """DeepSpeed's csv monitor."""

    tensorboard: Monitor = Field(default_factory=Monitor)
    """DeepSpeed's tensorboard monitor (needs the tensorboard package)."""

    wandb: WandbMonitor = Field(default_factory=WandbMonitor)
    """DeepSpeed's Weights & Biases monitor (needs the wandb package)."""

    comet: CometMonitor = Field(default_factory=CometMonitor)
    """DeepSpeed's Comet monitor (needs the comet_ml package)."""

    @model_validator(mode="after")
    def _check_combinations(self, info: ValidationInfo) -> DeepSpeedSettings:
        """Refuse settings the JSON builder would drop without a word (all at once).

        Rules about the JSON itself (offload below its stage, NVMe without a path, the batch
        equation, warm-up longer than the schedule, betas) live in `dstrain.ds_check`, which
        every built config goes through (`ds_config.check_built_config`), like any foreign
        file. With `context={"defer_rules": True}` these are left to the caller, which
        reports them together with the JSON checks (`gen-config`).
        """
        if (info.context or {}).get("defer_rules"):
            return self
        problems = [f"{path}: {message}" for path, message in self.unused_settings()]
        if problems:
            raise ValueError("\n".join(problems))
        return self

    def unused_settings(self) -> list[tuple[str, str]]:
        """(settings path, message) for each setting given that the built JSON would not
        carry, or that the builder cannot do without; every one, not just the first."""
        problems: list[tuple[str, str]] = []
        for key in sorted(self.fp16.model_fields_set):
            if self.precision != "fp16":
                problems.append(
                    (
                        f"fp16.{key}",
                        f"fp16 loss scaling is set but precision is {self.precision}: loss "
                        "scaling applies only to fp16; drop it or use --fp16",
                    )
                )
        zero = self.zero_optimization
        for key in sorted(zero.model_fields_set):
            stages = ZERO_KNOB_STAGES.get(key)
            if stages is not None and zero.stage not in stages:
                where = ", ".join(map(str, sorted(stages)))
                problems.append(
                    (
                        f"zero_optimization.{key}",
                        f"{key} applies to stage {where} only (stage is {zero.stage})",
                    )
                )
        offloads = {name: getattr(zero, name) for name in ("offload_optimizer", "offload_param")}
        if not any(o.device == "nvme" for o in offloads.values()):
            seen = set()  # one problem for one path set on both (gen-config's --nvme-path)
            for name, offload in offloads.items():
                path = offload.nvme_path
                if (
                    "nvme_path" in offload.model_fields_set
                    and path is not None
                    and path not in seen
                ):
                    seen.add(path)
                    problems.append(
                        (
                            f"zero_optimization.{name}.nvme_path",
                            "nvme_path is set but no offload goes to nvme: use "
                            "--offload-optimizer nvme / --offload-param nvme, or drop it",
                        )
                    )
        for name, offload in offloads.items():
            if offload.device == "none" and "pin_memory" in offload.model_fields_set:
                problems.append(
                    (f"zero_optimization.{name}.pin_memory", f"{name} is off (device none)")
                )
        sched = self.scheduler
        used = SCHEDULER_FIELDS[sched.type]
        for key in sorted(sched.model_fields_set - used - {"type"}):
            problems.append((f"scheduler.{key}", f"scheduler {sched.type} does not use {key}"))
        ac = self.activation_checkpointing
        if not ac.enabled:
            for key in sorted(ac.model_fields_set - {"enabled"}):
                problems.append(
                    (f"activation_checkpointing.{key}", "activation checkpointing is off")
                )
        monitor_flags = {
            "csv_monitor": "--csv-monitor DIR",
            "tensorboard": "--tensorboard DIR",
            "wandb": "--wandb PROJECT",
            "comet": "--comet PROJECT",
        }
        for name, flag in monitor_flags.items():
            monitor: Monitor | WandbMonitor | CometMonitor = getattr(self, name)
            if not monitor.enabled:
                for key in sorted(monitor.model_fields_set - {"enabled"}):
                    message = f"the {name} monitor is off: enable it ({flag}) or drop it"
                    problems.append((f"{name}.{key}", message))
        return problems


ZERO_KNOB_STAGES: dict[str, frozenset[int]] = {
    "overlap_comm": frozenset({1, 2, 3}),
    "contiguous_gradients": frozenset({1, 2, 3}),
    "reduce_bucket_size": frozenset({1, 2, 3}),
    "allgather_bucket_size": frozenset({1, 2}),
    "stage3_prefetch_bucket_size": frozenset({3}),
    "stage3_param_persistence_threshold": frozenset({3}),
    "stage3_max_live_parameters": frozenset({3}),
    "stage3_max_reuse_distance": frozenset({3}),
    "stage3_gather_16bit_weights_on_model_save": frozenset({3}),
    "sub_group_size": frozenset({3}),
}
"""ZeRO knobs and the stages at which dstrain's JSON carries them (DeepSpeed reads them
only there)."""

SCHEDULER_FIELDS: dict[str, frozenset[str]] = {
    "none": frozenset(),
    "WarmupLR": frozenset({"warmup_num_steps", "warmup_min_lr", "warmup_type"}),
    "WarmupDecayLR": frozenset(
        {"warmup_num_steps", "warmup_min_lr", "warmup_type", "total_num_steps"}
    ),
    "WarmupCosineLR": frozenset(
        {"warmup_num_steps", "warmup_type", "total_num_steps", "warmup_min_ratio", "cos_min_ratio"}
    ),
}
"""The scheduler settings each DeepSpeed schedule takes (the rest would be dropped)."""


def settings_error_message(exc: ValidationError, source: str) -> str:
    """Turn pydantic's report into one line per problem, naming each field by its path."""
    lines = []
    for error in exc.errors(include_url=False):
        where = ".".join(str(part) for part in error["loc"])
        message = error["msg"].removeprefix("Value error, ")
        if error["type"] == "extra_forbidden":
            message = "unknown setting"
        for part in message.splitlines():
            lines.append(f"{where}: {part}" if where else part)
    return f"invalid settings in {source}:\n  " + "\n  ".join(lines)


def read_settings_file(path: str | Path) -> dict:
    """Read a settings file (JSON, or TOML on Python 3.11+) into a plain dict.

    Bounded like every input (`dstrain.inputs`): a regular file of at most 16 MiB, strict
    UTF-8, nesting, NaN/Infinity, huge integers, lone surrogates and TOML dates refused.
    """
    from dstrain.inputs import decode_utf8, parse_json, parse_toml, read_regular_bytes

    path = Path(path)
    source = f"settings file {path}"
    text = decode_utf8(read_regular_bytes(path, "settings file"), source)
    if not text.strip():
        raise DstrainError(f"{source} is empty; write a JSON (or TOML) object of settings")
    data = parse_toml(text, source) if path.suffix == ".toml" else parse_json(text, source)
    if not isinstance(data, dict):
        raise DstrainError(f"{source} must hold an object at the top level")
    return data


def make_deepspeed_settings(
    data: dict, source: str = "settings", *, defer_rules: bool = False
) -> DeepSpeedSettings:
    """Validate a dict into `DeepSpeedSettings`, or raise one `DstrainError` listing every
    problem with its field path. `defer_rules` leaves `unused_settings()` to the caller."""
    try:
        return DeepSpeedSettings.model_validate(data, context={"defer_rules": defer_rules})
    except ValidationError as exc:
        raise DstrainError(settings_error_message(exc, source)) from None


def apply_overrides(data: dict, overrides: dict[str, object]) -> dict:
    """Return a copy of settings `data` with dotted-path `overrides` set (None = not given)."""
    merged = json.loads(json.dumps(data))
    for dotted, value in overrides.items():
        if value is None:
            continue
        node = merged
        *parents, leaf = dotted.split(".")
        for part in parents:
            node = node.setdefault(part, {})
        node[leaf] = value
    return merged


# --------------------------------------------------------------------------------------
# The training loop (dstrain/train.py); DeepSpeed's part lives in the JSON config
# --------------------------------------------------------------------------------------


MIN_HANG_TIMEOUT_S = 8.0
"""The shortest --hang-timeout: twice the watchdog's stale-heartbeat threshold (4 s)."""


class TrainSettings(_Node):
    """What `dstrain train` / `dstrain/train.py` does around the DeepSpeed engine."""

    model: str = "genslm_tiny"
    """Architecture: a registered name (genslm_tiny, genslm_25M, genslm_250M, genslm_2.5B)
    or a GPT-NeoX config.json."""

    fasta: list[str] = Field(default_factory=list)
    """Nucleotide FASTA files (plain or .gz), or one prepared cache directory; empty means
    the bundled H3N2 HA/NA set."""

    cache_dir: str | None = None
    """Where the token cache goes; default OUTPUT_DIR/cache."""

    deepspeed_config: str | None = None
    """DeepSpeed JSON; unset means one built from the DeepSpeed flags (gen-config's) over
    the DeepSpeed settings' defaults, written to OUTPUT_DIR/ds_config.json."""

    output_dir: str = Field(default="runs/demo", min_length=1)  # "" wrote into the cwd
    """Run directory: metrics.jsonl, checkpoints/, export/, cache/."""

    max_steps: int | None = Field(default=None, ge=1)
    """Stop after this many optimizer steps (default: run `epochs` epochs)."""

    epochs: float = Field(default=1.0, gt=0)
    """Passes over the training examples when max_steps is unset (fractions allowed)."""

    eval_every: int = Field(default=50, ge=0)
    """Evaluate every this many optimizer steps (0: only at the end)."""

    save_every: int = Field(default=0, ge=0)
    """Checkpoint every this many optimizer steps (0: at each evaluation and the end)."""

    log_every: int = Field(default=1, ge=1)
    """Write a metrics row every this many optimizer steps."""

    keep_best: int = Field(default=2, ge=0)
    """Checkpoints kept besides `latest`: the best this many by validation loss."""

    resume: str | None = None
    """`auto` continues from OUTPUT_DIR/checkpoints if there is one; a path resumes from
    that checkpoint directory."""

    init_checkpoint: str | None = None
    """Starting weights: an official GenSLM .pt file, an HF model directory, or an upstream
    GenSLM DeepSpeed checkpoint directory (consolidated with DeepSpeed's zero_to_fp32)."""

    trust_checkpoint: bool = False
    """Allow full unpickling of --init-checkpoint (official GenSLM files need it), and
    resume from a checkpoint without dstrain_manifest.json (an older dstrain's). Unpickling
    can run code hidden in a file: only for files from a source you trust."""

    zero_init: bool | None = None
    """Build the model inside deepspeed.zero.Init, partitioned as it is built, so that no
    rank ever holds the whole fp32 model (ZeRO stage 3 only; --init-checkpoint then loads
    one module at a time). Unset: on under stage 3. --no-zero-init builds the whole model
    on every rank first and lets the engine partition it: same weights, more memory."""

    seed: int = 0
    """Seeds weights, data order and every RNG."""

    data: DataSettings = Field(default_factory=DataSettings)
    """FASTA -> examples -> batches."""

    max_eval_batches: int | None = Field(default=None, ge=1)
    """Cap on validation micro-batches per rank (default: the whole validation split)."""

    skip_window: int = Field(default=50, ge=1)
    """fp16 guard: window of optimizer steps over which skipped (overflow) steps count."""

    max_skipped_share: float = Field(default=0.5, gt=0, le=1)
    """fp16 guard: stop when more than this share of the last `skip_window` steps were
    skipped for overflow."""

    export: bool = True
    """Write OUTPUT_DIR/export (HF model + tokenizer) at the end."""

    export_pt: bool = False
    """Also write OUTPUT_DIR/export/pytorch_model.pt, a plain fp32 state_dict."""

    report: bool = True
    """Write OUTPUT_DIR/report.png at the end (rank 0): loss, validation, learning rate,
    fp16 loss scale, throughput and memory against step, as `dstrain report` draws them."""

    progress: bool = True
    """Show a progress bar (rank 0)."""

    timeout_s: float = Field(default=600.0, gt=0)
    """Collective timeout: a dead rank ends the job after this long, not gloo's 30 min."""

    hang_timeout: float = Field(default=120.0, ge=0)
    """Seconds without progress (a finished micro-batch, outside saves, evaluation, the
    first step and other long phases) or without a heartbeat after which a rank counts as
    frozen and the job stops, naming it; 0 turns the frozen-rank check off (dead ranks are
    still caught). At least 8: heartbeats come every second, and a few missed ones are
    normal on a busy machine."""

    @model_validator(mode="after")
    def _check_hang_timeout(self) -> TrainSettings:
        if 0 < self.hang_timeout < MIN_HANG_TIMEOUT_S:
            raise ValueError(
                f"--hang-timeout {self.hang_timeout:g} is too short to tell a busy rank from a "
                f"frozen one (heartbeats come every second): give 0 (off) or at least "
                f"{MIN_HANG_TIMEOUT_S:g} seconds"
            )
        return self

    dump_params: bool = False
    """Test hook: each rank writes OUTPUT_DIR/params_rank{R}.pt with the final full fp32
    parameters (gathered under ZeRO-3)."""
