"""Per-GPU memory of a GenSLM fine-tune under each ZeRO stage: pure arithmetic on bytes.

Pure layer (L0): the standard library and dstrain's pure modules only; no torch, no
deepspeed. `dstrain estimate` is a thin shell over this module, and the train loop calls
it for its start banner:

    from dstrain.memory import estimate_for_run, format_run_banner, format_peak_comparison
    estimate = estimate_for_run(arch, run, world_size=8, gpus_per_node=4, seq_len=2048)
    print(format_run_banner(estimate))                   # rank 0, before training
    ...
    peak = torch.cuda.max_memory_allocated()             # on a GPU, after training
    print(format_peak_comparison(estimate, peak))

Public API
----------
- `MemoryInputs` (model `ModelDims`, cluster, run, DeepSpeed `ZeroKnobs`) ->
  `estimate_zero_memory(inputs)` -> `MemoryEstimate` with one `StageEstimate` per ZeRO
  stage 0-3 and a recommendation.
- `estimate_for_run(arch, run, world_size, gpus_per_node, seq_len, ...)`: the same from a
  GenSLM architecture and the typed DeepSpeed run (`dstrain.ds_run.DsRun`: stage,
  buckets, offload, precision and micro batch as DeepSpeed resolves them).
- `format_estimate_table(estimate)` for people, `estimate_to_json(estimate)` for scripts,
  `format_run_banner` / `format_peak_comparison` for the train loop.
- `paper_model_states_bytes(...)`: the ZeRO paper's accounting, on its own.

Notation: Ψ parameters, N data-parallel ranks (the world size), b bytes per trained
parameter (2 for bf16/fp16, 4 for fp32), Adam's K. Sizes are bytes; GiB = 2**30 bytes.

Model states: the ZeRO paper and what DeepSpeed holds
-----------------------------------------------------
ZeRO (Rajbhandari et al., arXiv 1910.02054, section 5 and figure 1) counts mixed-precision
Adam as 2Ψ (16-bit params) + 2Ψ (16-bit grads) + KΨ with K = 12 (fp32 master copy,
momentum and variance), so per device: stage 0 (2+2+K)Ψ, stage 1 2Ψ + 2Ψ + KΨ/N,
stage 2 2Ψ + (2+K)Ψ/N, stage 3 (2+2+K)Ψ/N; 7.5B params at N = 64 give 120 / 31.4 /
16.6 / 1.9 GB. For fp32 training the same accounting has 4-byte params and grads and
K = 8 (the moments; the params are the master copy). `paper_model_states_bytes` is that.

`model_states_bytes` is what DeepSpeed 0.19 really holds per rank at the peak of a step
(measured on real two-rank CPU engines, tests/test_memory_engines.py, within 2%):

    stage  fp32 (b = 4)                 bf16 / fp16 (b = 2)         over the paper
    0      16Ψ                          20Ψ                         fp32 grads, mixed
    1      4Ψ + max(4Ψ, 8Ψ/N) + 12Ψ/N   2Ψ + max(2Ψ, 8Ψ/N) + 12Ψ/N  see below
    2      4Ψ + 20Ψ/N                   2Ψ + 20Ψ/N                  6Ψ/N (fp32 8Ψ/N)
    3      24Ψ/N + 4P                   22Ψ/N + 2P                  6Ψ/N (fp32 8Ψ/N)

(P: ZeRO-3's persistent parameters, below.) Measured at N = 2 on the 3.2M-parameter
test model, stages 0 / 1 / 2 / 3: 16.00 / 14.00 / 14.00 / 12.00 bytes per parameter in
fp32 and 20.00 / 12.00 / 12.00 / 11.00 in bf16; the formulas give the same, plus at
stage 3 0.1% for persistent parameters, which the step-time snapshot does not see.

- Stage 0 (runtime/fp16/unfused_optimizer.py, FP16_UnfusedOptimizer, used with a client
  torch optimizer): an fp32 master copy of every param and, in `step`, an fp32 copy of
  every grad beside the 16-bit grads: 2+2+4+4+8 = 20 bytes. fp32 stage 0 is the plain
  optimizer: 4+4+8 = 16. (With DeepSpeed's FusedAdam, which `dstrain train` builds on a
  GPU for an Adam block without torch_adam, the engine picks FP16_Optimizer,
  runtime/fp16/fused_optimizer.py, which also flattens the fp32 grads: about 8Ψ more,
  briefly. Not modelled.)
- Stages 1-3 keep a separate fp32 master partition even when training in fp32
  (stage_1_and_2.py `single_partition_of_fp32_groups` and stage3.py
  `fp32_partitioned_groups_flat` are clones), so fp32 is not "no master copy" there.
- The step peak: `flatten(averaged_gradients).to(fp32)` (stage_1_and_2.py `step`,
  stage3.py `_prepare_fp32_grad_for_sub_group`) briefly holds the 16-bit gradient
  partition, a flat 16-bit copy of it and its fp32 cast, beside the fp32 master and both
  moments: (2b + c + 12)Ψ/N, with c = 4 for the separate fp32 cast in mixed precision and
  0 in fp32 (the cast is the copy). DeepSpeed's own estimators
  (`estimate_zero2_model_states_mem_needs`: 2Ψ + 18Ψ/N) count 16-bit grads, fp32 grads,
  master and moments but not the flat copy (2Ψ/N more).
- Stage 1 before the gradient reduction holds every param's full gradient (bΨ), the
  paper's 2Ψ; whichever of that and the step peak is larger counts.
- Stage 3 also keeps a 16-bit gradient partition for the whole run
  (`grad_partitions_flat_buffer`, bΨ/N), and the full data of "persistent" params
  (numel <= `stage3_param_persistence_threshold`, parameter_offload.py) on every rank.
  The flat copy and the fp32 cast are per optimizer sub-group, so at most
  `sub_group_size` elements each. DeepSpeed's `estimate_zero3_model_states_mem_needs`
  says 18Ψ/N + 4 x largest layer; the difference is the 16-bit gradient partition and
  the flat copy (4Ψ/N); the largest layer is under "buffers" here (live parameters).

Communication buffers (per GPU, allocated whole at the configured sizes):
stage 0: the engine's flat all-reduce bucket, b x min(Ψ, 5e8) (engine.py,
`MEMORY_OPT_ALLREDUCE_SIZE`); stages 1-2: the gradient bucket, b x `reduce_bucket_size`,
twice with `overlap_comm` (stage_1_and_2.py `setup_buckets`; the parameter all-gather
writes in place and needs no bucket); stage 3: one gradient bucket, the flat copy of its
gradients that the reduce-scatter makes (b x min(bucket, Ψ)) and the gathered ("live")
parameters, b x min(Ψ, `stage3_max_live_parameters`, largest module +
`stage3_prefetch_bucket_size`). With optimizer offload, ZeRO-1/2 keep a GPU staging buffer
of the largest parameter (`temp_grad_buffer_for_gpu_offload`).

Activations (per GPU, one micro batch b_mb, s tokens, hidden h, heads a, MLP width i)
-----------------------------------------------------------------------------------------
Korthikanti et al. (arXiv 2205.05198, section 4.1): sbh(34 + 5as/h) bytes per layer
without recomputation, 16-bit activations, intermediate 4h, dropout everywhere. With the
MLP at width i that is 18sbh + 4sbi + 5as²b; `paper_activations_bytes` reports it (minus
the 5as²b score term with sdpa; 2sbh per layer with full recomputation).
`activations_bytes` is GPT-NeoX as transformers 5 runs it for GenSLM, counted tensor by
tensor with autograd's saved-tensor hooks (tests/test_memory_engines.py checks it), in
units of e = activation bytes (2, or 4 in fp32):
- every layer: 4sbh (the input, shared by both LayerNorms of the parallel residual; the
  QKV input; the attention-output input; the MLP input);
- attention, sdpa: 6sbh (the fused QKV output, kept alive by V's view of it; rotated Q
  and K; the output) + a·s·b fp32 log-sum-exp;
- attention, eager: Q and K (2sbh), V (sbh, or the whole 3sbh QKV output when b_mb = 1,
  whose V stays a view) and the scores: fp32 softmax plus its 16-bit cast, (4 + e)·as²b
  bytes (4·as²b in fp32);
- MLP: n·sbi, n = 8 for GenSLM's `gelu_fast` (its tanh formula runs as six elementwise
  ops that each save a tensor, then the fc2 input), 2 for exact `gelu` (the paper's),
  5 for `gelu_new`;
- GenSLM trains without dropout, so the paper's masks (as²b + 2sbh) are not stored;
- outside the layers: the final LayerNorm input and the LM-head input (2sbh) and the
  fp32 log-probabilities of the loss (4·b·s·vocab bytes).
With full activation checkpointing each layer keeps its input (sbh) and one layer is
recomputed at a time (its full activations). Gradients of activations (transient, in
the backward pass) are not counted.

Total, fit, recommendation
--------------------------
total = model states + activations + buffers: an upper bound, since the activations peak
in forward/backward and the fp32 gradient copies inside the optimizer step. `peak_bytes`
counts only the larger of the activations and the gradients made after them (stages 0-2:
all gradients, made in backward as the activations are freed; ZeRO-3: the step's copies
of a sub-group): 2 CPU ranks' measured peaks, and genslm_250M's on an H200 (1.85 GB below
the total, 8Ψ at N = 1), follow it. Fit is still judged on the total. Startup can
peak higher: without `zero.Init`, ZeRO-3 first moves the whole 16-bit model to each GPU
(bΨ). A stage fits when max(total, startup) <= (1 - headroom) x GPU memory, and the
CPU RAM per node (offload, and each rank building the fp32 model on CPU: 4Ψ x GPUs per
node) fits the node. The recommendation is the lowest stage that fits: stages 0-2 move
2Ψ per step (all-reduce = reduce-scatter + all-gather), stage 3 3Ψ (parameters are
gathered in forward and backward), per the ZeRO paper (section 7), and lower stages skip
the partition bookkeeping.

Offload (CPU RAM per node = GPUs per node x per-rank bytes; DeepSpeed's ZeRO-2 estimator
scales its CPU figure with the total GPU count instead): optimizer offload keeps the fp32
master, fp32 grads, moments and a 16-bit staging copy ((16 + b)Ψ/N) in CPU RAM;
parameter offload (stage 3 only) adds the 16-bit partition (bΨ/N). NVMe moves the fp32
state (16Ψ/N) or the params (bΨ/N) to disk and keeps pinned swap buffers in RAM
(approximate: DeepSpeed's default buffer counts). DeepSpeed ignores optimizer offload at
stage 0 and parameter offload below stage 3, and runs NVMe optimizer offload at stages
1-2 as CPU offload (stage_1_and_2.py only checks `device != none`).
"""

from __future__ import annotations

import dataclasses
import math
import textwrap
from typing import Any, Literal

from dstrain.architectures import GenSLMArchitecture, resolve_architecture
from dstrain.ds_run import DsRun, load_ds_run
from dstrain.errors import DstrainError

Precision = Literal["fp32", "fp16", "bf16"]
Offload = Literal["none", "cpu", "nvme"]
Attention = Literal["eager", "sdpa"]
Checkpointing = Literal["none", "full"]

GIB = 2**30
ADAM_K = 12
"""Bytes per parameter of mixed-precision Adam's optimizer state (ZeRO paper): fp32
master (4) + momentum (4) + variance (4). fp32 training: K = 8 (the moments only)."""

ALLREDUCE_BUCKET_NUMEL = 500_000_000
"""Stage 0's gradient all-reduce flattens up to this many elements at once
(deepspeed/runtime/engine.py, `MEMORY_OPT_ALLREDUCE_SIZE`)."""

SAVED_TENSORS_PER_MLP_ELEMENT = {"gelu_fast": 8, "gelu_new": 5, "gelu": 2}
"""Tensors of size s·b·i saved for backward by the MLP (fc1 output through fc2 input),
counted with autograd saved-tensor hooks on transformers' activations (torch 2.13).
Other activations fall back to the paper's 2 (a fused activation: its input, output)."""

OFFLOAD_OPTIMIZER_BUFFER_COUNT = 4
"""DeepSpeed's default `offload_optimizer.buffer_count` (pinned NVMe swap buffers)."""
OFFLOAD_PARAM_BUFFER_COUNT = 5
OFFLOAD_PARAM_BUFFER_NUMEL = 100_000_000
"""DeepSpeed's defaults for `offload_param.buffer_count` / `buffer_size` (elements)."""


# --------------------------------------------------------------------------------------
# Inputs
# --------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class ModelDims:
    """The numbers of a GPT-NeoX model the estimate needs. Shape fields may be None when
    only a parameter count is known; then activations, ZeRO-3 persistence and the
    largest layer are unknown (reported as such, not guessed)."""

    name: str
    """Registry name, config file name, or `custom`."""
    num_params: int
    """Ψ: every trained parameter (embeddings and LM head are untied in GenSLM)."""
    hidden_size: int | None = None
    """h."""
    num_layers: int | None = None
    """L."""
    num_heads: int | None = None
    """a."""
    intermediate_size: int | None = None
    """i, the MLP width (GenSLM's is not 4h)."""
    vocab_size: int = 69
    """GenSLM's codon vocabulary."""
    hidden_act: str = "gelu_fast"
    """transformers activation name: decides how much the MLP stores for backward."""

    @property
    def has_shape(self) -> bool:
        """Whether every shape number is known (activations can be estimated)."""
        return None not in (
            self.hidden_size,
            self.num_layers,
            self.num_heads,
            self.intermediate_size,
        )

    def tensor_numels(self) -> list[int] | None:
        """Element counts of the GPT-NeoX parameter tensors, one per tensor."""
        if not self.has_shape:
            return None
        h, i, v = self.hidden_size, self.intermediate_size, self.vocab_size
        assert h is not None and i is not None and self.num_layers is not None
        layer = [h, h, h, h, 3 * h * h, 3 * h, h * h, h, i * h, i, h * i, h]
        return [v * h] + layer * self.num_layers + [h, h, v * h]

    def module_numels(self) -> list[int] | None:
        """Parameters per leaf module (what ZeRO-3 gathers at once), as DeepSpeed's
        `estimate_zero3_model_states_mem_needs_all_live` counts a layer."""
        if not self.has_shape:
            return None
        h, i, v = self.hidden_size, self.intermediate_size, self.vocab_size
        assert h is not None and i is not None and self.num_layers is not None
        layer = [2 * h, 2 * h, 3 * h * h + 3 * h, h * h + h, i * h + i, h * i + h]
        return [v * h] + layer * self.num_layers + [2 * h, v * h]


def model_dims_from_architecture(arch: GenSLMArchitecture) -> ModelDims:
    """The estimate's view of a GenSLM architecture."""
    return ModelDims(
        name=arch.name,
        num_params=arch.num_params(),
        hidden_size=arch.hidden_size,
        num_layers=arch.num_layers,
        num_heads=arch.num_heads,
        intermediate_size=arch.intermediate_size,
        vocab_size=arch.vocab_size,
        hidden_act=arch.hidden_act,
    )


@dataclasses.dataclass(frozen=True)
class ZeroKnobs:
    """The `zero_optimization` keys that move memory, under DeepSpeed's names and with
    DeepSpeed 0.19's defaults (deepspeed/runtime/zero/config.py)."""

    stage: int | None = None
    """The stage the DeepSpeed config asks for (marked in the table); None: no config."""
    reduce_bucket_size: int = 500_000_000
    """Elements in the gradient reduction bucket (ZeRO 1-3)."""
    allgather_bucket_size: int = 500_000_000
    """Elements per parameter all-gather call (ZeRO 1-2; gathers in place, no buffer)."""
    overlap_comm: bool | None = None
    """None: DeepSpeed's default (on for stage 3 only). ZeRO 1-2 double the bucket."""
    stage3_prefetch_bucket_size: int = 50_000_000
    """Elements of parameters ZeRO-3 gathers ahead of use."""
    stage3_max_live_parameters: int = 1_000_000_000
    """Most gathered parameter elements ZeRO-3 keeps at once."""
    stage3_param_persistence_threshold: int = 100_000
    """ZeRO-3 keeps parameters with at most this many elements whole on every rank."""
    sub_group_size: int = 1_000_000_000
    """ZeRO-3 steps the optimizer in sub-groups of about this many elements."""
    offload_optimizer: Offload = "none"
    """`offload_optimizer.device`."""
    offload_param: Offload = "none"
    """`offload_param.device` (ZeRO-3 only)."""


@dataclasses.dataclass(frozen=True)
class MemoryInputs:
    """Everything one estimate depends on."""

    model: ModelDims
    world_size: int = 1
    """N: data-parallel ranks (GPUs) in the job."""
    gpus_per_node: int = 1
    """Ranks sharing one node's CPU RAM."""
    micro_batch: int = 1
    """Sequences per GPU per forward pass (`train_micro_batch_size_per_gpu`)."""
    seq_len: int = 2048
    """Tokens per sequence (GenSLM's context is 2048 codons)."""
    precision: Precision = "bf16"
    optimizer: str = "adamw"
    """Adam family only (K = 12 mixed precision, 8 fp32)."""
    attention: Attention = "sdpa"
    activation_checkpointing: Checkpointing = "none"
    zero: ZeroKnobs = ZeroKnobs()
    zero_init: bool | None = None
    """Whether ZeRO-3 builds the model under `deepspeed.zero.Init` (partitioned as it is
    built: no GPU ever holds the whole 16-bit model, no rank the whole fp32 model on CPU).
    None: as `dstrain train` does, which is yes (False: `--no-zero-init`). Stages 0-2
    always build the whole fp32 model on every rank's CPU first."""
    gpu_mem_gib: float | None = None
    cpu_mem_gib: float | None = None
    """Per GPU / per node; None: fit is not judged."""
    headroom: float = 0.10
    """Share of GPU memory kept free for the CUDA context, NCCL and fragmentation."""
    notes: tuple[str, ...] = ()
    """Remarks from reading the inputs (e.g. values DeepSpeed would ignore)."""

    @property
    def num_nodes(self) -> int:
        return math.ceil(self.world_size / self.gpus_per_node)


# --------------------------------------------------------------------------------------
# Results
# --------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class StageEstimate:
    """One ZeRO stage, per GPU unless the name says per node."""

    stage: int
    configured: bool
    """The stage the DeepSpeed config asks for."""
    params_bytes: int
    """Parameters as trained (16-bit, or fp32), on the GPU."""
    gradients_bytes: int
    """Gradients at their peak: 16-bit partitions, flat copies, fp32 casts."""
    optimizer_states_bytes: int
    """fp32 master copy + Adam moments on the GPU (0 when offloaded)."""
    model_states_bytes: int
    """params + gradients + optimizer states: what DeepSpeed allocates."""
    paper_model_states_bytes: int
    """The ZeRO paper's accounting (no offload)."""
    activations_bytes: int | None
    """None when the model shape is unknown."""
    paper_activations_bytes: int | None
    comm_buffers: dict[str, int]
    """Named communication buffers (bucket sizes, ZeRO-3 live parameters)."""
    startup_bytes: int
    """GPU bytes while the engine starts (ZeRO-3 without zero.Init: the whole model)."""
    cpu_bytes_per_node: int
    """CPU RAM per node: offloaded state, or building the fp32 model on every rank."""
    cpu_offload_bytes_per_node: int
    nvme_bytes_per_node: int
    fits: bool | None
    """None when unknown (no GPU memory given, or activations unknown but model states
    alone fit)."""
    notes: tuple[str, ...] = ()
    exclusive_gradients_bytes: int = 0
    """The part of `gradients_bytes` that never coexists with the activations (see
    `_exclusive_gradients_bytes`)."""

    @property
    def comm_buffer_bytes(self) -> int:
        return sum(self.comm_buffers.values())

    @property
    def total_bytes(self) -> int:
        """Model states + activations (when known) + buffers."""
        return self.model_states_bytes + (self.activations_bytes or 0) + self.comm_buffer_bytes

    @property
    def peak_bytes(self) -> int:
        """The total less what never coexists: gradients the backward pass makes while it
        frees the activations, and the step's copies of them after it, so only the larger
        of the two counts (checked against measured peaks by `dstrain estimate --measure`)."""
        return self.total_bytes - min(self.activations_bytes or 0, self.exclusive_gradients_bytes)


@dataclasses.dataclass(frozen=True)
class MemoryEstimate:
    """Per-stage estimates for one set of inputs, and what to do."""

    inputs: MemoryInputs
    stages: tuple[StageEstimate, ...]
    recommended_stage: int | None
    recommendation: str

    def stage(self, stage: int) -> StageEstimate:
        return self.stages[stage]

    @property
    def usable_gpu_bytes(self) -> int | None:
        if self.inputs.gpu_mem_gib is None:
            return None
        return int(self.inputs.gpu_mem_gib * GIB * (1.0 - self.inputs.headroom))


# --------------------------------------------------------------------------------------
# Formulas
# --------------------------------------------------------------------------------------


def param_bytes(precision: str) -> int:
    """b: bytes per trained parameter (and gradient, and activation element)."""
    return 4 if precision == "fp32" else 2


def paper_model_states_bytes(
    num_params: int, stage: int, world_size: int, precision: str = "bf16"
) -> int:
    """ZeRO paper (arXiv 1910.02054, section 5.1), per device: params p, grads g, optimizer
    K bytes per parameter; mixed precision p = g = 2, K = 12; fp32 p = g = 4, K = 8.

    stage 0 (p + g + K)Ψ; 1 pΨ + gΨ + KΨ/N; 2 pΨ + (g + K)Ψ/N; 3 (p + g + K)Ψ/N.
    """
    p = g = param_bytes(precision)
    k = ADAM_K if precision != "fp32" else 8
    n, big_n = num_params, world_size
    if stage == 0:
        return (p + g + k) * n
    if stage == 1:
        return (p + g) * n + k * n // big_n
    if stage == 2:
        return p * n + (g + k) * n // big_n
    if stage == 3:
        return (p + g + k) * n // big_n
    raise ValueError(f"ZeRO stage must be 0-3, got {stage}")


def _persistent_numel(dims: ModelDims, threshold: int) -> int:
    """Elements of ZeRO-3 "persistent" parameters: tensors of at most `threshold`
    elements stay whole on every rank (parameter_offload.py `mark_persistent_parameters`)."""
    return sum(n for n in dims.tensor_numels() or [] if n <= threshold)


def _model_state_terms(inp: MemoryInputs, stage: int) -> tuple[int, int, int, list[str]]:
    """(params, gradients, optimizer states) bytes on one GPU at the step peak, and notes.

    See the module docstring for the table these implement and where each term lives in
    DeepSpeed's source.
    """
    n, big_n = inp.model.num_params, inp.world_size
    b = param_bytes(inp.precision)
    mixed = b != 4
    fp32_cast = 4 if mixed else 0  # a separate fp32 copy of each gradient
    shard = math.ceil(n / big_n)  # elements per rank (DeepSpeed pads partitions evenly)
    offload_opt = inp.zero.offload_optimizer != "none" and stage > 0
    notes: list[str] = []

    if stage == 0:
        # FP16_UnfusedOptimizer: 16-bit params and grads, fp32 master and fp32 grad copies;
        # fp32: the client optimizer on the model's own params and grads.
        master = 4 * n if mixed else 0
        return b * n, (b + fp32_cast) * n, master + 8 * n, notes
    if stage in (1, 2):
        params = b * n  # bit16_groups_flat: every param, flat
        # step(): averaged_gradients (16-bit partition) + flatten() copy + fp32 cast.
        step_grads = (2 * b + fp32_cast) * shard
        if offload_opt:
            # Gradients go bucket by bucket into the fp32 partition in CPU RAM; stage 1
            # still holds every full gradient until the reduction at the end of backward.
            return params, (b * n if stage == 1 else 0), 0, notes
        if stage == 1:
            return params, max(b * n, step_grads), 12 * shard, notes
        return params, step_grads, 12 * shard, notes
    # Stage 3.
    persistent = _persistent_numel(inp.model, inp.zero.stage3_param_persistence_threshold)
    if inp.model.tensor_numels() is None:
        notes.append("persistent parameters unknown without the model shape (counted as 0)")
    on_gpu_params = 0 if inp.zero.offload_param != "none" else b * shard
    params = on_gpu_params + b * persistent
    if offload_opt:
        return params, 0, 0, notes
    sub_group = min(shard, inp.zero.sub_group_size)
    # grad_partitions_flat_buffer (whole run) + flatten() copy and fp32 cast per sub-group.
    grads = b * shard + (b + fp32_cast) * sub_group
    return params, grads, 12 * shard, notes


def _exclusive_gradients_bytes(inp: MemoryInputs, stage: int, gradients: int) -> int:
    """Gradient bytes that exist only once the activations are freed. Stages 0-2 create
    their gradients in backward, layer by layer as the activations go, reduce them at the
    end of it, copy and cast them in the step and drop them afterwards (the engine zeroes
    `.grad` to None; ZeRO-1/2 rebuild their partition each step): all of them. ZeRO-3
    keeps its 16-bit gradient partition (`grad_partitions_flat_buffer`) for the whole run,
    so only the step's flat copy and fp32 cast of a sub-group count."""
    if stage < 3:
        return gradients
    if inp.zero.offload_optimizer != "none":
        return 0
    b = param_bytes(inp.precision)
    fp32_cast = 4 if b != 4 else 0
    shard = math.ceil(inp.model.num_params / inp.world_size)
    return (b + fp32_cast) * min(shard, inp.zero.sub_group_size)


def _largest(numels: list[int] | None) -> int:
    return max(numels) if numels else 0


def _comm_buffers(inp: MemoryInputs, stage: int) -> dict[str, int]:
    """Communication buffers on one GPU (see the module docstring)."""
    b = param_bytes(inp.precision)
    n = inp.model.num_params
    z = inp.zero
    if stage == 0:
        return {"allreduce_bucket_bytes": b * min(n, ALLREDUCE_BUCKET_NUMEL)}
    if stage in (1, 2):
        overlap = bool(z.overlap_comm)  # DeepSpeed's default: off below stage 3
        buffers = {"reduce_bucket_bytes": b * z.reduce_bucket_size * (2 if overlap else 1)}
        if z.offload_optimizer != "none":
            buffers["offload_staging_bytes"] = b * _largest(inp.model.tensor_numels())
        return buffers
    live = min(
        n,
        z.stage3_max_live_parameters,
        _largest(inp.model.module_numels()) + z.stage3_prefetch_bucket_size,
    )
    return {
        "reduce_bucket_bytes": b * z.reduce_bucket_size,
        # reduce_scatter_coalesced (runtime/comm/coalesced_collectives.py) torch.cat's the
        # bucket's gradients into one padded flat copy before the reduce-scatter.
        "reduce_scatter_copy_bytes": b * min(z.reduce_bucket_size, n),
        "live_params_bytes": b * live,
    }


def _offload_bytes_per_rank(inp: MemoryInputs, stage: int) -> tuple[int, int]:
    """(CPU RAM, NVMe) bytes one rank offloads at this stage."""
    z = inp.zero
    if stage == 0:
        return 0, 0
    n, big_n = inp.model.num_params, inp.world_size
    b = param_bytes(inp.precision)
    shard = math.ceil(n / big_n)
    cpu = nvme = 0
    if z.offload_optimizer != "none":
        if stage < 3 or z.offload_optimizer == "cpu":
            # fp32 master + fp32 grads + moments + 16-bit staging copy / 16-bit grad partition
            cpu += (16 + b) * shard
            if stage < 3:
                cpu += b * _largest(inp.model.tensor_numels())  # temp_grad_buffer_for_cpu_offload
        else:
            nvme += 16 * shard
            cpu += b * shard + OFFLOAD_OPTIMIZER_BUFFER_COUNT * 4 * min(shard, z.sub_group_size)
    if stage == 3 and z.offload_param == "cpu":
        cpu += b * shard
    elif stage == 3 and z.offload_param == "nvme":
        nvme += b * shard
        cpu += b * OFFLOAD_PARAM_BUFFER_COUNT * OFFLOAD_PARAM_BUFFER_NUMEL
    return cpu, nvme


def _activation_terms(
    dims: ModelDims,
    micro_batch: int,
    seq_len: int,
    precision: str,
    attention: str,
    checkpointing: str,
) -> tuple[int, int] | None:
    """(activations, paper activations) bytes for one micro batch, or None without a shape."""
    if not dims.has_shape:
        return None
    h, layers, a, i = dims.hidden_size, dims.num_layers, dims.num_heads, dims.intermediate_size
    assert h is not None and layers is not None and a is not None and i is not None
    b_mb, s, v = micro_batch, seq_len, dims.vocab_size
    e = param_bytes(precision)
    sbh, sbi, as2b = s * b_mb * h, s * b_mb * i, a * s * s * b_mb

    per_layer = 4 * sbh * e
    if attention == "sdpa":
        per_layer += 6 * sbh * e + 4 * a * s * b_mb
    else:
        v_elems = 3 * sbh if b_mb == 1 else sbh
        per_layer += (2 * sbh + v_elems) * e + (4 + (e if e != 4 else 0)) * as2b
    per_layer += SAVED_TENSORS_PER_MLP_ELEMENT.get(dims.hidden_act, 2) * sbi * e
    outside = 2 * sbh * e + 4 * b_mb * s * v
    if checkpointing == "full":
        activations = layers * sbh * e + per_layer + outside
    else:
        activations = layers * per_layer + outside

    # Korthikanti et al. in 16-bit units, scaled to e bytes: 18sbh + 4sbi + 5as²b per layer.
    paper_layer = 18 * sbh + 4 * sbi + (5 * as2b if attention == "eager" else 0)
    paper_layer = paper_layer * e // 2
    paper = layers * (2 * sbh * e // 2 if checkpointing == "full" else paper_layer)
    return activations, paper + 4 * b_mb * s * v


# --------------------------------------------------------------------------------------
# The estimate
# --------------------------------------------------------------------------------------


def _stage_estimate(inp: MemoryInputs, stage: int) -> StageEstimate:
    params, grads, optim, notes = _model_state_terms(inp, stage)
    model_states = params + grads + optim
    acts = _activation_terms(
        inp.model,
        inp.micro_batch,
        inp.seq_len,
        inp.precision,
        inp.attention,
        inp.activation_checkpointing,
    )
    buffers = _comm_buffers(inp, stage)
    b = param_bytes(inp.precision)
    partitioned_build = stage == 3 and inp.zero_init is not False
    startup = b * inp.model.num_params if stage == 3 and not partitioned_build else 0
    cpu_rank, nvme_rank = _offload_bytes_per_rank(inp, stage)
    cpu_offload_node = cpu_rank * inp.gpus_per_node
    # Without zero.Init each rank builds the whole model in fp32 on CPU before DeepSpeed
    # moves it; under zero.Init (stage 3) no rank holds more than its partition.
    cpu_load_node = 0 if partitioned_build else 4 * inp.model.num_params * inp.gpus_per_node
    cpu_node = max(cpu_offload_node, cpu_load_node)

    z = inp.zero
    if stage == 0 and (z.offload_optimizer != "none" or z.offload_param != "none"):
        notes.append("offload needs ZeRO 1-3; DeepSpeed ignores it at stage 0")
    elif stage < 3 and z.offload_param != "none":
        notes.append("offload_param needs ZeRO-3; DeepSpeed ignores it here")
    if 0 < stage < 3 and z.offload_optimizer == "nvme":
        notes.append("NVMe optimizer offload runs as CPU offload below ZeRO-3")

    activations = acts[0] if acts else None
    gpu_need = max(model_states + (activations or 0) + sum(buffers.values()), startup)
    fits: bool | None = None
    if inp.gpu_mem_gib is not None:
        fits = gpu_need <= inp.gpu_mem_gib * GIB * (1.0 - inp.headroom)
        if fits and activations is None:
            fits = None  # the known part fits; the unknown activations might not
        if inp.cpu_mem_gib is not None and cpu_node > inp.cpu_mem_gib * GIB:
            fits = False
            notes.append(f"needs {_gib(cpu_node)} GiB CPU RAM per node")
    return StageEstimate(
        stage=stage,
        configured=z.stage == stage,
        params_bytes=params,
        gradients_bytes=grads,
        optimizer_states_bytes=optim,
        model_states_bytes=model_states,
        paper_model_states_bytes=paper_model_states_bytes(
            inp.model.num_params, stage, inp.world_size, inp.precision
        ),
        activations_bytes=activations,
        paper_activations_bytes=acts[1] if acts else None,
        comm_buffers=buffers,
        startup_bytes=startup,
        cpu_bytes_per_node=cpu_node,
        cpu_offload_bytes_per_node=cpu_offload_node,
        nvme_bytes_per_node=nvme_rank * inp.gpus_per_node,
        fits=fits,
        notes=tuple(notes),
        exclusive_gradients_bytes=_exclusive_gradients_bytes(inp, stage, grads),
    )


def _gpu_need(row: StageEstimate) -> int:
    return max(row.total_bytes, row.startup_bytes)


def _what_ifs(inp: MemoryInputs) -> list[tuple[list[str], MemoryInputs]]:
    """Cumulative changes that shrink memory, cheapest first: (flags so far, inputs)."""
    steps: list[tuple[list[str], MemoryInputs]] = []
    flags: list[str] = []
    cur = inp
    if cur.activation_checkpointing == "none" and cur.model.has_shape:
        cur = dataclasses.replace(cur, activation_checkpointing="full")
        flags = [*flags, "--activation-checkpointing full"]
        steps.append((flags, cur))
    if cur.micro_batch > 1:
        cur = dataclasses.replace(cur, micro_batch=1)
        flags = [*flags, "--micro-batch 1"]
        steps.append((flags, cur))
    if cur.zero.offload_optimizer == "none":
        cur = dataclasses.replace(cur, zero=dataclasses.replace(cur.zero, offload_optimizer="cpu"))
        flags = [*flags, "--offload-optimizer cpu"]
        steps.append((flags, cur))
    if cur.zero.offload_param == "none":
        cur = dataclasses.replace(cur, zero=dataclasses.replace(cur.zero, offload_param="cpu"))
        flags = [*flags, "--offload-param cpu"]
        steps.append((flags, cur))
    if cur.zero_init is False:
        cur = dataclasses.replace(cur, zero_init=True)
        flags = [*flags, "--zero-init"]
        steps.append((flags, cur))
    return steps


def _recommend(inp: MemoryInputs, rows: tuple[StageEstimate, ...]) -> tuple[int | None, str]:
    """The lowest stage that fits, and why; or what to change when none does."""
    if inp.gpu_mem_gib is None:
        smallest = min(rows, key=_gpu_need)
        return None, (
            f"give --gpu-mem-gib to judge fit. The smallest per-GPU need is "
            f"ZeRO-{smallest.stage}'s, {_gib(_gpu_need(smallest))} GiB."
        )
    usable = inp.gpu_mem_gib * (1.0 - inp.headroom)
    limit = f"{usable:.1f} GiB usable per GPU"
    limit += f" ({inp.gpu_mem_gib:g} GiB less {inp.headroom:.0%} headroom)"
    for row in rows:
        if row.fits:
            why = (
                "stages 0-2 move 2Ψ bytes per step, stage 3 moves 3Ψ as it gathers parameters "
                "in forward and backward (ZeRO paper, section 7)"
                if row.stage < 3
                else "ZeRO-3 is the only stage that fits"
            )
            return row.stage, (
                f"ZeRO-{row.stage}, the lowest stage that fits: {_gib(_gpu_need(row))} of {limit}. "
                f"Lower stages communicate less: {why}."
            )
    for row in rows:
        if row.fits is None:
            return None, (
                f"ZeRO-{row.stage}'s model states and buffers fit, {_gib(_gpu_need(row))} of "
                f"{limit}, but the activations are unknown: give --hidden, --layers, --heads and "
                "--intermediate, or --model."
            )
    for flags, changed in _what_ifs(inp):
        fitting = [r for r in (_stage_estimate(changed, s) for s in range(4)) if r.fits]
        if fitting:
            best = fitting[0]
            return None, (
                f"no stage fits in {limit}. With {' '.join(flags)}, ZeRO-{best.stage} fits: "
                f"{_gib(_gpu_need(best))} GiB."
            )
    what_ifs = _what_ifs(inp)
    flags, changed = what_ifs[-1] if what_ifs else ([], inp)
    smallest = min((_stage_estimate(changed, s) for s in range(4)), key=_gpu_need)
    tried = f" even with {' '.join(flags)}" if flags else ""
    return None, (
        f"no stage fits in {limit}{tried}. The smallest need is ZeRO-{smallest.stage}'s, "
        f"{_gib(_gpu_need(smallest))} GiB: add GPUs (ZeRO-3 divides model states by the "
        "world size), use GPUs with more memory, or a shorter --seq-len."
    )


def estimate_zero_memory(inputs: MemoryInputs) -> MemoryEstimate:
    """Per-GPU memory for ZeRO stages 0-3 and the lowest stage that fits."""
    problems = []
    if inputs.model.num_params <= 0:
        problems.append(f"the model must have parameters (got {inputs.model.num_params})")
    if inputs.world_size < 1 or inputs.gpus_per_node < 1:
        problems.append(
            f"world size ({inputs.world_size}) and GPUs per node "
            f"({inputs.gpus_per_node}) must be >= 1"
        )
    if inputs.micro_batch < 1 or inputs.seq_len < 1:
        problems.append(
            f"micro batch ({inputs.micro_batch}) and sequence length "
            f"({inputs.seq_len}) must be >= 1"
        )
    if not 0.0 <= inputs.headroom < 1.0:
        problems.append(f"headroom must be in [0, 1), got {inputs.headroom}")
    for name, value, allowed in (
        ("precision", inputs.precision, ("fp32", "fp16", "bf16")),
        ("attention", inputs.attention, ("eager", "sdpa")),
        ("activation checkpointing", inputs.activation_checkpointing, ("none", "full")),
        ("offload_optimizer", inputs.zero.offload_optimizer, ("none", "cpu", "nvme")),
        ("offload_param", inputs.zero.offload_param, ("none", "cpu", "nvme")),
    ):
        if value not in allowed:
            problems.append(f"{name} must be one of {', '.join(allowed)}, got {value!r}")
    if problems:
        raise DstrainError("cannot estimate memory: " + "; ".join(problems) + ".")
    rows = tuple(_stage_estimate(inputs, stage) for stage in range(4))
    stage, text = _recommend(inputs, rows)
    return MemoryEstimate(inputs=inputs, stages=rows, recommended_stage=stage, recommendation=text)


# --------------------------------------------------------------------------------------
# DeepSpeed config -> inputs
# --------------------------------------------------------------------------------------


def zero_knobs_from_run(run: DsRun) -> ZeroKnobs:
    """The memory-moving ZeRO knobs of a typed DeepSpeed run."""
    zero = run.zero
    return ZeroKnobs(
        stage=zero.stage,
        reduce_bucket_size=zero.reduce_bucket_size,
        allgather_bucket_size=zero.allgather_bucket_size,
        overlap_comm=zero.overlap_comm,
        stage3_prefetch_bucket_size=zero.stage3_prefetch_bucket_size,
        stage3_max_live_parameters=zero.stage3_max_live_parameters,
        stage3_param_persistence_threshold=zero.stage3_param_persistence_threshold,
        sub_group_size=zero.sub_group_size,
        offload_optimizer=zero.offload_optimizer.device,
        offload_param=zero.offload_param.device,
    )


def run_estimate_notes(run: DsRun, world_size: int) -> tuple[int | None, tuple[str, ...]]:
    """(micro batch DeepSpeed will use at `world_size`, notes on how the run was read)."""
    notes = list(run.notes)
    written = run.batch.train_micro_batch_size_per_gpu
    _, micro, accum = run.batch.resolve(world_size)
    if written is None and micro is not None:
        notes.append(
            f"micro batch {micro} = train_batch_size {run.batch.train_batch_size} // "
            f"(gradient_accumulation_steps {accum} x world size {world_size})"
        )
    if run.grad_accum_dtype is not None:
        notes.append(
            "data_types.grad_accum_dtype is not modelled (gradients counted in the training dtype)"
        )
    return micro, tuple(notes)


def estimate_for_run(
    arch: GenSLMArchitecture,
    run: DsRun,
    world_size: int,
    gpus_per_node: int,
    seq_len: int,
    *,
    micro_batch: int | None = None,
    attention: Attention = "sdpa",
    activation_checkpointing: Checkpointing = "none",
    zero_init: bool | None = None,
    gpu_mem_gib: float | None = None,
    cpu_mem_gib: float | None = None,
) -> MemoryEstimate:
    """The estimate for a run the train loop is about to start.

    Stage, buckets, offload, precision and micro batch come from the typed DeepSpeed run
    (`dstrain.ds_run`); `micro_batch` overrides the config's. The row of the configured
    stage is `estimate.stage(estimate.inputs.zero.stage)`.
    """
    ds_micro, notes = run_estimate_notes(run, world_size)
    precision, zero = run.precision, zero_knobs_from_run(run)
    inputs = MemoryInputs(
        model=model_dims_from_architecture(arch),
        world_size=world_size,
        gpus_per_node=gpus_per_node,
        micro_batch=micro_batch or ds_micro or 1,
        seq_len=seq_len,
        precision=precision,
        attention=attention,
        activation_checkpointing=activation_checkpointing,
        zero=zero,
        zero_init=zero_init,
        gpu_mem_gib=gpu_mem_gib,
        cpu_mem_gib=cpu_mem_gib,
        notes=notes,
    )
    return estimate_zero_memory(inputs)


# Upper bounds on what `estimate` accepts, refused before anything is allocated (the
# per-tensor lists grow with the layer count: --layers 50000000 once took 9.4 GB and
# 58 s). Each is far beyond any real model; GenSLM 25B, the largest, has h 8196, 64
# layers, 64 heads, i 8000, 2.56e10 parameters, a 69-token vocabulary and 2048 tokens.
ESTIMATE_LIMITS: dict[str, float] = {
    "--params": 1e15,  # 40,000 x GenSLM 25B
    "--layers": 10_000,  # 156 x GenSLM 25B (published dense models stop near 200)
    "--hidden": 2**20,  # 128 x GenSLM 25B's 8196
    "--heads": 2**16,
    "--intermediate": 2**22,  # 524 x GenSLM 25B's 8000
    "--vocab": 2**24,  # 69 codons; the largest LLM vocabularies are ~2**18
    "--seq-len": 2**24,  # 8192 x GenSLM's 2048-token context
    "--micro-batch": 2**20,
    "--gpus-per-node": 1024,
    "--nodes": 2**20,
    "--gpu-mem-gib": 2**20,  # 1 PiB per GPU
    "--cpu-mem-gib": 2**30,  # 1 EiB per node
    "--headroom": 1,
}
_CONFIG_KEYS = {
    "num_layers": "--layers",
    "hidden_size": "--hidden",
    "num_attention_heads": "--heads",
    "intermediate_size": "--intermediate",
    "vocab_size": "--vocab",
}


def _bound_problems(values: dict[str, float | int | None]) -> list[str]:
    """Flags (or config.json keys) that are not finite or exceed `ESTIMATE_LIMITS`."""
    problems = []
    for name, value in values.items():
        if value is None or isinstance(value, bool):
            continue
        limit = ESTIMATE_LIMITS[_CONFIG_KEYS.get(name, name)]
        if not math.isfinite(value):
            problems.append(f"{name} must be a finite number, got {value}")
        elif value > limit:
            problems.append(
                f"{name} {_number(value)} is beyond what dstrain estimates (at most "
                f"{_number(limit)}, far beyond any real model or machine)"
            )
    return problems


def _number(value: float) -> str:
    return f"{int(value):,}" if float(value).is_integer() and abs(value) < 1e18 else f"{value:g}"


def estimate_from_flags(
    *,
    model_name: str | None = None,
    params: float | None = None,
    hidden: int | None = None,
    layers: int | None = None,
    heads: int | None = None,
    intermediate: int | None = None,
    vocab: int = 69,
    gpus_per_node: int | None = None,
    nodes: int | None = None,
    hostfile: str | None = None,
    gpu_mem_gib: float | None = None,
    cpu_mem_gib: float | None = None,
    headroom: float = 0.10,
    micro_batch: int | None = None,
    seq_len: int = 2048,
    precision: str | None = None,
    optimizer: str = "adamw",
    offload_optimizer: str | None = None,
    offload_param: str | None = None,
    activation_checkpointing: str = "none",
    attention: str = "sdpa",
    ds_config_path: str | None = None,
    zero_init: bool | None = None,
) -> MemoryEstimate:
    """`dstrain estimate`'s flags (None = not given) -> the estimate.

    Flags given win over the DeepSpeed config, which wins over defaults (bf16, micro
    batch 1, no offload). `--params` alone estimates model states and buffers only: the
    activations need all of --hidden, --layers, --heads and --intermediate, so without
    them they are reported as unknown ("?") and a stage whose known part fits is marked
    "?", not "yes". Every usage problem is reported at once (exit code 2).
    """
    from dstrain.hostfile import hostfile_world_size, parse_hostfile

    problems: list[str] = []
    dims_given = {
        "--hidden": hidden,
        "--layers": layers,
        "--heads": heads,
        "--intermediate": intermediate,
    }
    if model_name is not None and (
        params is not None or any(v is not None for v in dims_given.values())
    ):
        problems.append("give --model or --params (with --hidden etc.), not both")
    elif model_name is None and params is None and all(v is None for v in dims_given.values()):
        problems.append("give --model NAME (or a config.json), or --params N")
    missing = [flag for flag, v in dims_given.items() if v is None]
    if model_name is None and 0 < len(missing) < len(dims_given):
        problems.append(
            f"{', '.join(missing)} missing: the activation estimate needs all of "
            f"{', '.join(dims_given)} (leave them all out to estimate model states only)"
        )
    problems += _bound_problems(
        {
            "--params": params,
            "--gpu-mem-gib": gpu_mem_gib,
            "--cpu-mem-gib": cpu_mem_gib,
            "--headroom": headroom,
            "--layers": layers,
            "--hidden": hidden,
            "--heads": heads,
            "--intermediate": intermediate,
            "--vocab": vocab,
            "--seq-len": seq_len,
            "--micro-batch": micro_batch,
            "--gpus-per-node": gpus_per_node,
            "--nodes": nodes,
        }
    )
    if (
        params is not None
        and math.isfinite(params)
        and (params < 1 or not float(params).is_integer())
    ):
        problems.append(f"--params must be a whole number >= 1, got {params:g}")
    if hostfile is not None and (nodes is not None or gpus_per_node is not None):
        problems.append("give --hostfile or --nodes / --gpus-per-node, not both")
    if problems:
        raise DstrainError("dstrain estimate: " + "; ".join(problems) + ".", exit_code=2)

    notes: list[str] = []
    if hostfile is not None:
        entries = parse_hostfile(hostfile)
        world_size = hostfile_world_size(entries)
        gpus_per_node = max(e.slots for e in entries)
        if len({e.slots for e in entries}) > 1:
            notes.append(
                "hosts have different slot counts; CPU RAM per node assumes the largest, "
                f"{gpus_per_node}"
            )
    else:
        gpus_per_node = gpus_per_node or 1
        world_size = gpus_per_node * (nodes or 1)

    if model_name is not None:
        dims = model_dims_from_architecture(resolve_architecture(model_name))
        shape_problems = _bound_problems(
            {
                "num_layers": dims.num_layers,
                "hidden_size": dims.hidden_size,
                "num_attention_heads": dims.num_heads,
                "intermediate_size": dims.intermediate_size,
                "vocab_size": dims.vocab_size,
            }
        )
        if shape_problems:
            raise DstrainError(
                f"dstrain estimate: --model {model_name}: " + "; ".join(shape_problems) + ".",
                exit_code=2,
            )
    else:
        shape = ModelDims(
            name="custom",
            num_params=int(params or 0),
            hidden_size=hidden,
            num_layers=layers,
            num_heads=heads,
            intermediate_size=intermediate,
            vocab_size=vocab,
        )
        if params is None:  # every shape number is given: count like GenSLM's GPT-NeoX
            shape = dataclasses.replace(shape, num_params=sum(shape.tensor_numels() or []))
        dims = shape
        if not dims.has_shape:
            notes.append("activations unknown: give --hidden, --layers, --heads, --intermediate")

    zero = ZeroKnobs()
    ds_precision: str | None = None
    ds_micro: int | None = None
    if ds_config_path is not None:
        # HF Trainer configs are fine here: their "auto" values keep DeepSpeed's defaults.
        run = load_ds_run(ds_config_path, world_size=world_size, allow_auto=True).run
        ds_micro, ds_notes = run_estimate_notes(run, world_size)
        zero, ds_precision = zero_knobs_from_run(run), run.precision
        notes += ds_notes
    if offload_optimizer is not None:
        zero = dataclasses.replace(zero, offload_optimizer=offload_optimizer)
    if offload_param is not None:
        zero = dataclasses.replace(zero, offload_param=offload_param)

    inputs = MemoryInputs(
        model=dims,
        world_size=world_size,
        gpus_per_node=gpus_per_node,
        micro_batch=micro_batch or ds_micro or 1,
        seq_len=seq_len,
        precision=precision or ds_precision or "bf16",
        optimizer=optimizer,
        attention=attention,
        activation_checkpointing=activation_checkpointing,
        zero=zero,
        zero_init=zero_init,
        gpu_mem_gib=gpu_mem_gib,
        cpu_mem_gib=cpu_mem_gib,
        headroom=headroom,
        notes=tuple(notes),
    )
    return estimate_zero_memory(inputs)


# --------------------------------------------------------------------------------------
# Output
# --------------------------------------------------------------------------------------


def _gib(nbytes: int | None) -> str:
    return "?" if nbytes is None else f"{nbytes / GIB:.2f}"


def _describe_inputs(inp: MemoryInputs) -> list[str]:
    m = inp.model
    shape = (
        f"h {m.hidden_size}, {m.num_layers} layers, {m.num_heads} heads, i {m.intermediate_size}, "
        f"vocab {m.vocab_size}, {m.hidden_act}"
        if m.has_shape
        else "shape unknown: activations not estimated"
    )
    gpu = (
        f", {inp.gpu_mem_gib:g} GiB per GPU ({1 - inp.headroom:.0%} usable)"
        if inp.gpu_mem_gib is not None
        else ""
    )
    cpu = f", {inp.cpu_mem_gib:g} GiB CPU RAM per node" if inp.cpu_mem_gib is not None else ""
    k = ADAM_K if inp.precision != "fp32" else 8
    z = inp.zero
    return [
        f"model:   {m.name}, {m.num_params:,} params ({shape})",
        f"cluster: {inp.num_nodes} node(s) x {inp.gpus_per_node} GPU(s) = {inp.world_size} "
        f"ranks{gpu}{cpu}",
        f"run:     {inp.precision}, micro batch {inp.micro_batch} x {inp.seq_len} tokens, "
        f"{inp.optimizer} (K = {k}), attention {inp.attention}",
        f"         activation checkpointing {inp.activation_checkpointing}, offload optimizer "
        f"{z.offload_optimizer} / params {z.offload_param}"
        + (", ZeRO-3 built whole first (no zero.Init)" if inp.zero_init is False else ""),
    ]


def format_estimate_table(estimate: MemoryEstimate) -> str:
    """The estimate as a table for people (GiB = 2**30 bytes, per GPU unless per node)."""
    inp = estimate.inputs
    lines = [*_describe_inputs(inp), ""]
    header = (
        f"{'ZeRO':<6}{'params':>8}{'grads':>8}{'optim':>8}{'states':>9}{'(paper)':>9}"
        f"{'activ':>8}{'buffers':>9}{'total':>9}{'CPU/node':>10}  fits"
    )
    lines += [header, "-" * len(header)]
    for row in estimate.stages:
        mark = "*" if row.configured else " "
        fits = {True: "yes", False: "no", None: "?"}[row.fits]
        if row.startup_bytes > row.total_bytes:
            fits += f" (startup {_gib(row.startup_bytes)})"
        lines.append(
            f"{row.stage}{mark:<5}{_gib(row.params_bytes):>8}{_gib(row.gradients_bytes):>8}"
            f"{_gib(row.optimizer_states_bytes):>8}{_gib(row.model_states_bytes):>9}"
            f"{'(' + _gib(row.paper_model_states_bytes) + ')':>9}{_gib(row.activations_bytes):>8}"
            f"{_gib(row.comm_buffer_bytes):>9}{_gib(row.total_bytes):>9}"
            f"{_gib(row.cpu_bytes_per_node):>10}  {fits}"
        )
    width = len(header)
    legend = (
        "GiB per GPU. states = what DeepSpeed 0.19 allocates at the step peak; (paper) = the "
        "ZeRO paper's 2+2+K bytes/param accounting. total = states + activations + buffers, an "
        "upper bound: activations and the optimizer step peak at different moments. CPU/node: "
        "offloaded state, or every rank building the whole fp32 model on CPU at startup "
        "(stages 0-2; ZeRO-3 builds it partitioned, under zero.Init"
        + (", unless --no-zero-init as here)." if inp.zero_init is False else ").")
    )
    if inp.zero.stage is not None:
        legend += " * = the DeepSpeed config's stage."
    lines += ["", textwrap.fill(legend, width)]
    notes = list(inp.notes) + [f"ZeRO-{r.stage}: {n}" for r in estimate.stages for n in r.notes]
    if notes:
        lines += ["", "Notes:"]
        lines += [
            textwrap.fill(n, width, initial_indent="  - ", subsequent_indent="    ") for n in notes
        ]
    lines += ["", textwrap.fill(f"Recommendation: {estimate.recommendation}", width)]
    return "\n".join(lines)


def estimate_to_json(estimate: MemoryEstimate) -> dict[str, Any]:
    """The estimate as a JSON-ready dict with a stable key order."""
    inp = estimate.inputs
    m = inp.model
    stages = []
    for row in estimate.stages:
        stages.append(
            {
                "stage": row.stage,
                "configured": row.configured,
                "params_bytes": row.params_bytes,
                "gradients_bytes": row.gradients_bytes,
                "optimizer_states_bytes": row.optimizer_states_bytes,
                "model_states_bytes": row.model_states_bytes,
                "paper_model_states_bytes": row.paper_model_states_bytes,
                "activations_bytes": row.activations_bytes,
                "paper_activations_bytes": row.paper_activations_bytes,
                "comm_buffer_bytes": row.comm_buffer_bytes,
                "comm_buffers": dict(row.comm_buffers),
                "startup_bytes": row.startup_bytes,
                "total_bytes": row.total_bytes,
                "peak_bytes": row.peak_bytes,
                "cpu_bytes_per_node": row.cpu_bytes_per_node,
                "cpu_offload_bytes_per_node": row.cpu_offload_bytes_per_node,
                "nvme_bytes_per_node": row.nvme_bytes_per_node,
                "fits": row.fits,
                "notes": list(row.notes),
            }
        )
    return {
        "params": m.num_params,
        "model": {
            "name": m.name,
            "hidden_size": m.hidden_size,
            "num_layers": m.num_layers,
            "num_heads": m.num_heads,
            "intermediate_size": m.intermediate_size,
            "vocab_size": m.vocab_size,
            "hidden_act": m.hidden_act,
        },
        "cluster": {
            "world_size": inp.world_size,
            "gpus_per_node": inp.gpus_per_node,
            "nodes": inp.num_nodes,
            "gpu_mem_gib": inp.gpu_mem_gib,
            "usable_gpu_bytes": estimate.usable_gpu_bytes,
            "cpu_mem_gib": inp.cpu_mem_gib,
        },
        "run": {
            "precision": inp.precision,
            "micro_batch": inp.micro_batch,
            "seq_len": inp.seq_len,
            "optimizer": inp.optimizer,
            "attention": inp.attention,
            "activation_checkpointing": inp.activation_checkpointing,
            "zero_init": inp.zero_init is not False,  # ZeRO-3 builds under zero.Init
            "headroom": inp.headroom,
            "zero_optimization": dataclasses.asdict(inp.zero),
        },
        "stages": stages,
        "recommended_stage": estimate.recommended_stage,
        "recommendation": estimate.recommendation,
        "notes": list(inp.notes),
    }


def format_run_banner(estimate: MemoryEstimate) -> str:
    """A few lines for the train loop's start banner: the configured stage's estimate."""
    stage = estimate.inputs.zero.stage or 0
    row = estimate.stage(stage)
    lines = [
        f"memory estimate, ZeRO-{stage}, per GPU: {_gib(row.total_bytes)} GiB = model states "
        f"{_gib(row.model_states_bytes)} (params {_gib(row.params_bytes)}, "
        f"grads {_gib(row.gradients_bytes)}, optimizer {_gib(row.optimizer_states_bytes)}) "
        f"+ activations {_gib(row.activations_bytes)} "
        f"+ buffers {_gib(row.comm_buffer_bytes)}",
    ]
    if row.cpu_offload_bytes_per_node:
        lines.append(f"CPU RAM per node for offload: {_gib(row.cpu_offload_bytes_per_node)} GiB")
    if row.fits is False:
        lines.append(f"warning: this may not fit. {estimate.recommendation}")
    return "\n".join(lines)


def format_peak_comparison(estimate: MemoryEstimate, measured_peak_bytes: int) -> str:
    """One line for the end summary: the measured peak (e.g. torch.cuda.max_memory_allocated)
    beside the estimate for the configured stage."""
    stage = estimate.inputs.zero.stage or 0
    expected = estimate.stage(stage).total_bytes
    ratio = measured_peak_bytes / expected if expected else float("nan")
    return (
        f"peak GPU memory: measured {_gib(measured_peak_bytes)} GiB, "
        f"estimated {_gib(expected)} GiB "
        f"for ZeRO-{stage} (measured / estimated = {ratio:.2f})"
    )
