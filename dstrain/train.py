"""Fine-tune a GenSLM model on nucleotide FASTA with a DeepSpeed engine.

One process (CPU, or one GPU):
    dstrain train --model genslm_25M --fasta ha.fasta --deepspeed_config ds_configs/zero2_bf16.json
One node, 4 GPUs:
    deepspeed --num_gpus 4 dstrain/train.py --deepspeed_config ds_configs/zero2_bf16.json \
        --model genslm_25M --fasta ha.fasta --output-dir runs/ha
Two nodes (hostfile lines `node-a slots=4`, `node-b slots=4`):
    deepspeed --hostfile hostfiles/h dstrain/train.py --deepspeed_config ds_configs/zero2_bf16.json ...

The engine owns the step: per micro-batch `loss = engine(**batch).loss;
engine.backward(loss); engine.step()`. DeepSpeed scales the loss for accumulation and for
fp16, accumulates, clips and steps the optimizer only at accumulation boundaries (every
`gradient_accumulation_steps` micro-batches). Nothing here divides the loss, scales it or
calls the optimizer.

Batch arithmetic: global batch = micro batch x accumulation x data-parallel ranks, e.g.
4 sequences x 8 accum x 8 GPUs = 256 sequences/step = ~148k codons at ~579 codons per
H3N2 HA record.

Epoch tail: data flows as one stream of micro-batches, epoch after epoch (each epoch
reshuffled from seed + epoch by a DistributedSampler), so an accumulation window may span
an epoch boundary and no example is dropped mid-run. Only when the stream ends (the last
epoch) with a partial window pending are those few micro-batches dropped, never stepped
with a wrong scale; the log says how many.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import shlex
import signal
import sys
import time
from collections import deque
from datetime import timedelta
from pathlib import Path
from typing import Any

from dstrain.ds_check import load_checked_ds_config
from dstrain.ds_config import build_ds_config, render_ds_config, write_text_atomic
from dstrain.errors import DstrainError
from dstrain.settings import DataSettings, TrainSettings, make_deepspeed_settings

# --------------------------------------------------------------------------------------
# Settings
# --------------------------------------------------------------------------------------


def build_arg_parser() -> argparse.ArgumentParser:
    fields = TrainSettings.model_fields
    data_fields = DataSettings.model_fields

    def helptext(name: str, table=fields) -> str:
        return " ".join((table[name].description or "").split())

    p = argparse.ArgumentParser(
        prog="dstrain train",
        description="Fine-tune a GenSLM model with DeepSpeed ZeRO. With no arguments: "
        "genslm_tiny on the bundled H3N2 HA/NA set.",
    )
    p.add_argument(
        "--local_rank",
        "--local-rank",
        type=int,
        default=None,
        help="Set by the deepspeed launcher (read from LOCAL_RANK otherwise).",
    )
    p.add_argument("--deepspeed_config", "--deepspeed-config", help=helptext("deepspeed_config"))
    p.add_argument("--deepspeed", action="store_true", help="Accepted for compatibility.")
    p.add_argument("--model", help=helptext("model"))
    p.add_argument("--fasta", nargs="+", help=helptext("fasta"))
    p.add_argument("--cache-dir", help=helptext("cache_dir"))
    p.add_argument("--output-dir", help=helptext("output_dir"))
    p.add_argument("--max-steps", type=int, help=helptext("max_steps"))
    p.add_argument("--epochs", type=float, help=helptext("epochs"))
    p.add_argument("--eval-every", type=int, help=helptext("eval_every"))
    p.add_argument("--save-every", type=int, help=helptext("save_every"))
    p.add_argument("--log-every", type=int, help=helptext("log_every"))
    p.add_argument("--keep-best", type=int, help=helptext("keep_best"))
    p.add_argument("--resume", nargs="?", const="auto", help=helptext("resume"))
    p.add_argument("--init-checkpoint", help=helptext("init_checkpoint"))
    p.add_argument(
        "--trust-checkpoint", action="store_true", default=None, help=helptext("trust_checkpoint")
    )
    p.add_argument("--seed", type=int, help=helptext("seed"))
    p.add_argument("--frame", choices=["0", "orf"], help=helptext("frame", data_fields))
    p.add_argument(
        "--on-ambiguous",
        choices=["unk", "skip-record", "error"],
        help=helptext("on_ambiguous", data_fields),
    )
    p.add_argument("--max-length", type=int, help=helptext("max_length", data_fields))
    p.add_argument("--window-overlap", type=int, help=helptext("window_overlap", data_fields))
    p.add_argument("--val-fraction", type=float, help=helptext("val_fraction", data_fields))
    p.add_argument("--split-seed", type=int, help=helptext("split_seed", data_fields))
    p.add_argument(
        "--padding", choices=["longest", "max_length"], help=helptext("padding", data_fields)
    )
    p.add_argument(
        "--loss-on-pad",
        action="store_true",
        default=None,
        help=helptext("loss_on_pad", data_fields),
    )
    p.add_argument("--max-eval-batches", type=int, help=helptext("max_eval_batches"))
    p.add_argument("--skip-window", type=int, help=helptext("skip_window"))
    p.add_argument("--max-skipped-share", type=float, help=helptext("max_skipped_share"))
    p.add_argument(
        "--no-export",
        dest="export",
        action="store_false",
        default=None,
        help="Skip writing OUTPUT_DIR/export at the end.",
    )
    p.add_argument("--export-pt", action="store_true", default=None, help=helptext("export_pt"))
    p.add_argument(
        "--no-progress",
        dest="progress",
        action="store_false",
        default=None,
        help="No progress bar.",
    )
    p.add_argument("--timeout-s", type=float, help=helptext("timeout_s"))
    p.add_argument("--dump-params", action="store_true", default=None, help=helptext("dump_params"))
    p.add_argument("--settings", help="A JSON settings file (TrainSettings); flags override it.")
    p.add_argument(
        "--num-gpus",
        type=int,
        help="Hand off to the deepspeed launcher with this many local ranks.",
    )
    p.add_argument("--hostfile", help="Hand off to the deepspeed launcher with this hostfile.")
    return p


DEMO_EPOCHS = 12
"""Epochs of the no-argument demo (genslm_tiny on the bundled H3N2 set): ~200 steps."""

_DATA_FLAGS = (
    "frame",
    "on_ambiguous",
    "max_length",
    "window_overlap",
    "val_fraction",
    "split_seed",
    "padding",
    "loss_on_pad",
)
_LAUNCH_ONLY = ("local_rank", "deepspeed", "settings", "num_gpus", "hostfile")


def settings_from_args(args: argparse.Namespace) -> TrainSettings:
    """Merge a settings file (if any) and the flags into validated `TrainSettings`."""
    from pydantic import ValidationError

    from dstrain.settings import read_settings_file, settings_error_message

    data: dict[str, Any] = read_settings_file(args.settings) if args.settings else {}
    data.setdefault("data", {})
    if not (args.fasta or args.model or args.settings or args.epochs or args.max_steps):
        data.setdefault("epochs", DEMO_EPOCHS)  # the bundled demo: long enough to learn
    for name, value in vars(args).items():
        if value is None or name in _LAUNCH_ONLY:
            continue
        if name in _DATA_FLAGS:
            data["data"][name] = value
        else:
            data[name] = value
    try:
        return TrainSettings.model_validate(data)
    except ValidationError as exc:
        raise DstrainError(settings_error_message(exc, args.settings or "flags")) from None


# --------------------------------------------------------------------------------------
# Small helpers
# --------------------------------------------------------------------------------------


class RankZeroLog:
    """Prints on rank 0 only, without breaking the progress bar."""

    def __init__(self, rank: int):
        self.rank = rank
        self.bar = None

    def __call__(self, message: str = "") -> None:
        if self.rank != 0:
            return
        if self.bar is not None:
            self.bar.write(message)
        else:
            print(message, flush=True)


def rss_bytes() -> int:
    """Resident memory of this process now (Linux /proc; peak RSS elsewhere)."""
    try:
        with open("/proc/self/statm") as handle:
            return int(handle.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    except OSError:
        import resource

        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def default_ds_config(*, from_scratch: bool) -> dict[str, Any]:
    """The config used without --deepspeed_config: ZeRO-2, bf16 on GPUs that have it
    (fp32 on CPU, where bf16 matmuls are slow), micro batch 8, a short warm-up; lr 1e-3
    when training from scratch, 5e-5 when fine-tuning an --init-checkpoint."""
    import torch

    bf16 = torch.cuda.is_available() and torch.cuda.is_bf16_supported()
    settings = make_deepspeed_settings(
        {
            "precision": "bf16" if bf16 else "fp32",
            "zero_optimization": {"stage": 2},
            "batch": {"train_micro_batch_size_per_gpu": 8},
            "optimizer": {"lr": 1e-3 if from_scratch else 5e-5},
            "scheduler": {"type": "WarmupLR", "warmup_num_steps": 10},
            "steps_per_print": 1_000_000,  # dstrain logs every step itself
        },
        "dstrain's default DeepSpeed settings",
    )
    return build_ds_config(settings)


def precision_of(config: dict[str, Any]) -> str:
    if (config.get("fp16") or {}).get("enabled") is True:
        return "fp16"
    if (config.get("bf16") or config.get("bfloat16") or {}).get("enabled") is True:
        return "bf16"
    return "fp32"


def param_groups(model, weight_decay: float) -> list[dict[str, Any]]:
    """Weight decay on matrices only; biases and LayerNorm weights are not decayed."""
    decay, no_decay = [], []
    for name, param in model.named_parameters():
        if not param.requires_grad:
            continue
        (no_decay if param.ndim < 2 or "layernorm" in name.lower() else decay).append(param)
    return [
        {"params": decay, "weight_decay": weight_decay},
        {"params": no_decay, "weight_decay": 0.0},
    ]


def all_ranks_agree(dist, message: str | None) -> None:
    """Raise everywhere when any rank failed a step (message from the lowest such rank)."""
    messages = [None] * dist.get_world_size()
    dist.all_gather_object(messages, message)
    failed = [m for m in messages if m]
    if failed:
        raise same_on_all_ranks(DstrainError(failed[0]))


def same_on_all_ranks(exc: DstrainError) -> DstrainError:
    """Mark an error every rank raises alike, so that only rank 0 prints it."""
    exc.same_on_all_ranks = True
    return exc


# --------------------------------------------------------------------------------------
# Data
# --------------------------------------------------------------------------------------


def load_data(settings: TrainSettings, output_dir: Path, rank: int, dist):
    """Rank 0 tokenizes (or reuses the cache); the others wait, then open it."""
    from dstrain.fasta import bundled_fasta_paths
    from dstrain.prepare import MANIFEST_NAME, load_prepared, prepare_dataset

    sources = [Path(p) for p in settings.fasta] or bundled_fasta_paths()
    if len(sources) == 1 and (sources[0] / MANIFEST_NAME).is_file():
        cache_dir = sources[0]
        prepare = lambda: load_prepared(cache_dir)  # noqa: E731
    else:
        cache_dir = Path(settings.cache_dir) if settings.cache_dir else output_dir / "cache"
        prepare = lambda: prepare_dataset(sources, cache_dir, settings.data)  # noqa: E731
    prepared, failure = None, None
    if rank == 0:
        try:
            prepared = prepare()
        except DstrainError as exc:
            failure = str(exc)
    all_ranks_agree(dist, failure)
    if prepared is None:
        try:
            prepared = load_prepared(cache_dir)
        except DstrainError as exc:
            failure = (
                f"rank {rank} cannot open the token cache {cache_dir} that rank 0 wrote "
                f"({exc}). Every node must see the same output directory: use a shared "
                "file system, or pass --cache-dir on one."
            )
    all_ranks_agree(dist, failure)
    if len(prepared.train) == 0:
        raise DstrainError(
            f"no training examples in {cache_dir}; add records or lower --val-fraction."
        )
    return prepared, sources, cache_dir


def epoch_batches(
    num_examples: int, micro: int, epoch: int, seed: int, rank: int, world: int
) -> list[list[int]]:
    """This rank's micro-batches of example indices for one epoch."""
    from torch.utils.data import DistributedSampler

    sampler = DistributedSampler(
        range(num_examples), num_replicas=world, rank=rank, shuffle=True, seed=seed, drop_last=False
    )
    sampler.set_epoch(epoch)
    order = list(sampler)
    return [order[i : i + micro] for i in range(0, len(order), micro)]


# --------------------------------------------------------------------------------------
# Evaluation
# --------------------------------------------------------------------------------------


def evaluate(
    engine, dataset, collate, micro: int, rank: int, world: int, dist, max_batches: int | None
) -> tuple[float, int]:
    """Pad-masked validation loss: mean over every real label token on every rank.

    Each rank takes examples rank, rank + world, ...; every rank runs the same number of
    forwards (ZeRO-3 gathers parameters collectively), padding with zero-weight repeats.
    """
    import torch
    import torch.nn.functional as F

    n = len(dataset)
    mine = list(range(rank, n, world))
    batches = [mine[i : i + micro] for i in range(0, len(mine), micro)]
    count = torch.tensor([len(batches)], dtype=torch.long)
    dist.all_reduce(count, op=dist.ReduceOp.MAX)
    num_batches = int(count.item()) if max_batches is None else min(int(count.item()), max_batches)
    totals = torch.zeros(2, dtype=torch.float64)  # loss sum, tokens
    engine.eval()
    with torch.no_grad():
        for i in range(num_batches):
            weight = 1.0 if i < len(batches) else 0.0
            indices = batches[i] if i < len(batches) else [0]
            batch = collate([dataset[j] for j in indices])
            batch = {k: v.to(engine.device) for k, v in batch.items()}
            logits = engine(
                input_ids=batch["input_ids"],
                attention_mask=batch["attention_mask"],
                use_cache=False,
            ).logits
            labels = batch["labels"][:, 1:]
            loss_sum = F.cross_entropy(
                logits[:, :-1].float().reshape(-1, logits.size(-1)),
                labels.reshape(-1),
                ignore_index=-100,
                reduction="sum",
            )
            totals[0] += weight * loss_sum.double().cpu()
            totals[1] += weight * (labels != -100).sum().double().cpu()
    engine.train()
    dist.all_reduce(totals)
    tokens = int(totals[1].item())
    return (totals[0].item() / tokens if tokens else float("nan")), tokens


# --------------------------------------------------------------------------------------
# The run
# --------------------------------------------------------------------------------------


class StopRequest:
    """SIGTERM / SIGINT: finish the current optimizer step, save, exit 0."""

    def __init__(self):
        self.signal_name: str | None = None

    def install(self):
        """Install the handlers; returns a function that puts the previous ones back."""
        previous = {
            sig: signal.signal(sig, self._handle) for sig in (signal.SIGTERM, signal.SIGINT)
        }
        return lambda: [signal.signal(sig, handler) for sig, handler in previous.items()]

    def _handle(self, signum, _frame) -> None:
        self.signal_name = signal.Signals(signum).name


class Fp16Guard:
    """Stops a run whose fp16 loss scaling has collapsed, with advice."""

    ADVICE = (
        "What to try: bf16 if the GPUs support it (dstrain gen-config --bf16); a lower "
        "learning rate or longer warm-up; gradient clipping (--clip 1.0); a higher "
        "min_loss_scale or a larger hysteresis."
    )

    def __init__(self, window: int, max_share: float, min_scale: float):
        self.recent: deque[bool] = deque(maxlen=window)
        self.max_share = max_share
        self.min_scale = min_scale

    def check(self, step: int, skipped: bool, scale: float | None) -> None:
        self.recent.append(skipped)
        if not skipped:
            return
        if scale is not None and scale <= self.min_scale:
            raise DstrainError(
                f"fp16 training stopped at step {step}: the loss scale fell to its minimum "
                f"({scale:g}) and gradients still overflow, so every step would be skipped. "
                + self.ADVICE
            )
        limit = self.max_share * self.recent.maxlen
        if sum(self.recent) > limit:
            raise DstrainError(
                f"fp16 training stopped at step {step}: {sum(self.recent)} of the last "
                f"{len(self.recent)} optimizer steps were skipped for overflow (limit "
                f"{self.max_share:.0%} of {self.recent.maxlen}). " + self.ADVICE
            )


def current_loss_scale(engine, precision: str) -> float | None:
    if precision != "fp16":
        return None
    optimizer = engine.optimizer
    scale = getattr(optimizer, "loss_scale", None)
    if scale is None:
        scale = getattr(optimizer, "cur_scale", None)
    return float(scale) if scale is not None else None


def run(settings: TrainSettings) -> int:
    rank = int(os.environ.get("RANK", "0"))
    world = int(os.environ.get("WORLD_SIZE", "1"))
    log = RankZeroLog(rank)
    output_dir = Path(settings.output_dir)

    # 1. The DeepSpeed config: checked strictly before anything is built.
    if settings.deepspeed_config:
        try:
            ds_config = load_checked_ds_config(settings.deepspeed_config, world_size=world)
        except DstrainError as exc:
            raise same_on_all_ranks(exc) from None
        config_source = settings.deepspeed_config
    else:
        ds_config = default_ds_config(from_scratch=settings.init_checkpoint is None)
        config_source = "dstrain defaults (written to ds_config.json)"
    precision = precision_of(ds_config)
    for monitor in ("csv_monitor", "tensorboard"):
        block = ds_config.get(monitor)
        if isinstance(block, dict) and block.get("enabled") and not block.get("output_path"):
            block["output_path"] = str(output_dir / "monitor")  # "" means the run's directory

    # 2. Processes.
    import deepspeed
    import deepspeed.comm as dist

    from dstrain.architectures import resolve_architecture
    from dstrain.ds_runtime import prepare_deepspeed

    arch = resolve_architecture(settings.model)
    if not arch.buildable:
        raise DstrainError(f"{arch.name} cannot be trained: {arch.why_not_buildable}")
    prepare_deepspeed(timeout_s=settings.timeout_s)
    deepspeed.init_distributed(timeout=timedelta(seconds=settings.timeout_s))
    rank, world = dist.get_rank(), dist.get_world_size()
    log.rank = rank
    stop = StopRequest()
    restore_signals = stop.install()
    try:
        return _train(
            settings, ds_config, config_source, precision, arch, stop, log, rank, world, output_dir
        )
    finally:
        restore_signals()


def _train(
    settings, ds_config, config_source, precision, arch, stop, log, rank, world, output_dir
) -> int:
    import deepspeed
    import deepspeed.comm as dist
    import torch

    from dstrain.batching import CodonCollator, CodonDataset, count_tokens
    from dstrain.checkpoints import (
        capture_rng_state,
        load_run_checkpoint,
        read_latest_tag,
        resolve_checkpoint,
        restore_rng_state,
        save_run_checkpoint,
    )
    from dstrain.export import architecture_to_dict, export_checkpoint
    from dstrain.memory import format_peak_comparison, format_run_banner
    from dstrain.model import build_model, load_init_checkpoint

    if rank == 0:
        output_dir.mkdir(parents=True, exist_ok=True)
        write_text_atomic(output_dir / "ds_config.json", render_ds_config(ds_config))
        write_text_atomic(output_dir / "settings.json", settings.model_dump_json(indent=2) + "\n")
    ckpt_dir = output_dir / "checkpoints"

    # 3. Data.
    prepared, sources, cache_dir = load_data(settings, output_dir, rank, dist)
    data_settings = prepared.settings.model_copy(
        update={"padding": settings.data.padding, "loss_on_pad": settings.data.loss_on_pad}
    )
    train_set, val_set = CodonDataset(prepared.train), CodonDataset(prepared.val)
    collate = CodonCollator.from_settings(data_settings)

    # 4. Model.
    torch.manual_seed(settings.seed)
    model = build_model(arch)
    if settings.init_checkpoint:
        load_init_checkpoint(
            model, settings.init_checkpoint, trust_checkpoint=settings.trust_checkpoint
        )
    model.config.use_cache = False
    if "activation_checkpointing" in ds_config:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    weight_decay = ((ds_config.get("optimizer") or {}).get("params") or {}).get("weight_decay", 0.0)

    # 5. Engine.
    try:
        engine, _, _, _ = deepspeed.initialize(
            model=model, model_parameters=param_groups(model, weight_decay), config=ds_config
        )
    except ValueError as exc:
        if "not supported on your device" not in str(exc):
            raise
        raise DstrainError(
            f"{precision} is not supported on this device ({exc}). fp16 needs a GPU; on "
            "CPU use bf16 or fp32 (dstrain gen-config --bf16 / --fp32)."
        ) from None
    micro = engine.train_micro_batch_size_per_gpu()
    accum = engine.gradient_accumulation_steps()
    micro_per_epoch = math.ceil(math.ceil(len(train_set) / world) / micro)
    if settings.max_steps is not None:
        total_steps = settings.max_steps
    else:
        total_steps = max(1, int(settings.epochs * micro_per_epoch) // accum)

    # 6. Resume.
    state = {
        "epoch": 0,
        "micro_in_epoch": 0,
        "samples_seen": 0,
        "tokens_seen": 0,
        "useful_tokens_seen": 0,
        "best_val_loss": None,
        "last_val_loss": None,
    }
    resume_from = None
    if settings.resume == "auto":
        if read_latest_tag(ckpt_dir) is not None:
            resume_from = resolve_checkpoint(ckpt_dir)
    elif settings.resume:
        resume_from = resolve_checkpoint(settings.resume)
    if resume_from is not None:
        client = load_run_checkpoint(engine, *resume_from).get("dstrain", {})
        state.update(client.get("loop", {}))
        rng = client.get("rng", {}).get(str(rank))
        if rng is not None:
            restore_rng_state(rng)
        log(f"resumed from {resume_from[0] / resume_from[1]} at step {engine.global_steps}")

    # 7. Banner.
    seq_per_step = micro * accum * world
    mean_len = prepared.train.num_tokens / max(1, len(prepared.train))
    log(
        f"dstrain | {arch.name} ({arch.num_params():,} params) | {precision} | "
        f"ZeRO-{engine.zero_optimization_stage()} | world size {world} | "
        f"device {engine.device}"
    )
    log(f"  config: {config_source}")
    log(
        f"  data: {len(train_set)} train / {len(val_set)} val examples "
        f"({prepared.train.num_tokens:,} train codons, mean {mean_len:.0f}) from "
        f"{len(sources)} file(s); cache {cache_dir}"
        f"{' (reused)' if prepared.reused else ''}"
    )
    log(
        f"  batch: {micro} micro x {accum} accum x {world} ranks = {seq_per_step} sequences "
        f"= ~{seq_per_step * mean_len:,.0f} codons per step; padding {data_settings.padding}"
        f"{', loss on pads' if data_settings.loss_on_pad else ''}"
    )
    log(
        f"  steps: {engine.global_steps} -> {total_steps} ({micro_per_epoch} micro-batches "
        f"per epoch per rank)"
    )
    longest = (
        data_settings.max_length
        if data_settings.padding == "max_length"
        else int(prepared.train.lengths().max())
    )
    estimate = estimate_run_memory(arch, ds_config, world, longest, micro)
    for line in format_run_banner(estimate).splitlines():
        log(f"  {line}")
    log(f"  outputs: {output_dir}")

    # 8. Loop.
    fp16_block = ds_config.get("fp16") or {}
    guard = Fp16Guard(
        settings.skip_window,
        settings.max_skipped_share,
        float(fp16_block.get("min_loss_scale", 1.0)),
    )
    metrics_path = output_dir / "metrics.jsonl"
    metrics = open(metrics_path, "a", encoding="utf-8") if rank == 0 else None  # noqa: SIM115
    bar = None
    if rank == 0 and settings.progress:
        from tqdm import tqdm

        bar = tqdm(
            total=total_steps,
            initial=engine.global_steps,
            unit="step",
            dynamic_ncols=True,
            file=sys.stderr,
        )
        log.bar = bar
    start_time = time.time()
    window = {"loss": 0.0, "micro": 0, "tokens": 0, "useful": 0, "samples": 0, "t0": time.time()}
    last_eval_step = None
    dropped_tail = 0
    stopped_by = None
    val_loss = state["last_val_loss"]

    def write_row(row: dict[str, Any]) -> None:
        if metrics is not None:
            metrics.write(json.dumps(row) + "\n")
            metrics.flush()

    def client_state() -> dict[str, Any]:
        rngs = [None] * world
        dist.all_gather_object(rngs, capture_rng_state())
        return {
            "dstrain": {
                "architecture": architecture_to_dict(arch),
                "step": engine.global_steps,
                "loop": dict(state),
                "rng": {str(r): s for r, s in enumerate(rngs)},
                "data_settings": data_settings.model_dump(),
                "seed": settings.seed,
            }
        }

    def run_eval() -> float:
        nonlocal last_eval_step, val_loss
        loss, tokens = evaluate(
            engine, val_set, collate, micro, rank, world, dist, settings.max_eval_batches
        )
        last_eval_step = engine.global_steps
        val_loss = loss
        state["last_val_loss"] = loss
        if not math.isnan(loss) and (
            state["best_val_loss"] is None or loss < state["best_val_loss"]
        ):
            state["best_val_loss"] = loss
        row = {
            "step": engine.global_steps,
            "val_loss": loss,
            "val_perplexity": math.exp(loss) if not math.isnan(loss) else None,
            "val_tokens": tokens,
            "elapsed_s": round(time.time() - start_time, 3),
        }
        write_row(row)
        log(
            f"step {engine.global_steps}: val_loss {loss:.4f}, perplexity "
            f"{row['val_perplexity'] if row['val_perplexity'] is None else round(row['val_perplexity'], 3)}"
        )
        return loss

    def save() -> None:
        save_run_checkpoint(
            engine,
            ckpt_dir,
            engine.global_steps,
            client_state(),
            val_loss=val_loss if last_eval_step == engine.global_steps else None,
            keep_best=settings.keep_best,
        )

    def on_optimizer_step(epoch_pos: float) -> None:
        step = engine.global_steps
        skipped_now = engine.skipped_steps > on_optimizer_step.skipped
        on_optimizer_step.skipped = engine.skipped_steps
        scale = current_loss_scale(engine, precision)
        if skipped_now:
            log(f"step {step}: gradient overflow, step skipped; loss scale now {scale}")
        guard.check(step, skipped_now, scale)
        if step % settings.log_every == 0 or step == total_steps:
            sums = torch.tensor(
                [
                    window["loss"],
                    window["micro"],
                    window["tokens"],
                    window["useful"],
                    window["samples"],
                ],
                dtype=torch.float64,
            )
            dist.all_reduce(sums)
            elapsed = max(time.time() - window["t0"], 1e-9)
            grad_norm = engine.get_global_grad_norm()
            row = {
                "step": step,
                "epoch": round(epoch_pos, 4),
                "loss": sums[0].item() / max(sums[1].item(), 1),
                "lr": engine.get_lr()[0],
                "loss_scale": scale,
                "skipped_steps": engine.skipped_steps,
                "grad_norm": float(grad_norm) if grad_norm is not None else None,
                "samples_per_s": sums[4].item() / elapsed,
                "useful_tokens_per_s": sums[3].item() / elapsed,
                "tokens_per_s": sums[2].item() / elapsed,
                "elapsed_s": round(time.time() - start_time, 3),
            }
            if torch.cuda.is_available():
                row["cuda_max_allocated_bytes"] = torch.cuda.max_memory_allocated()
            else:
                row["rss_bytes"] = rss_bytes()
            write_row(row)
            if bar is not None:
                bar.set_postfix(
                    loss=f"{row['loss']:.4f}",
                    lr=f"{row['lr']:.2e}",
                    tok_s=f"{row['useful_tokens_per_s']:.0f}",
                    refresh=False,
                )
            window.update(loss=0.0, micro=0, tokens=0, useful=0, samples=0, t0=time.time())
        if bar is not None:
            bar.update(1)

    on_optimizer_step.skipped = engine.skipped_steps
    engine.train()
    try:
        epoch = state["epoch"]
        position = state["micro_in_epoch"]
        done = engine.global_steps >= total_steps
        while not done:
            batches = epoch_batches(len(train_set), micro, epoch, settings.seed, rank, world)
            for index in range(position, len(batches)):
                batch = collate([train_set[i] for i in batches[index]])
                counts = count_tokens(batch)
                batch = {k: v.to(engine.device) for k, v in batch.items()}
                loss = engine(**batch, use_cache=False).loss
                engine.backward(loss)
                boundary = engine.is_gradient_accumulation_boundary()
                engine.step()
                window["loss"] += loss.item()
                window["micro"] += 1
                window["tokens"] += counts.num_tokens
                window["useful"] += counts.num_real_tokens
                window["samples"] += len(batches[index])
                state["micro_in_epoch"] = index + 1
                state["samples_seen"] += len(batches[index])
                state["tokens_seen"] += counts.num_tokens
                state["useful_tokens_seen"] += counts.num_real_tokens
                if not boundary:
                    continue
                on_optimizer_step(epoch + (index + 1) / len(batches))
                step = engine.global_steps
                flag = torch.tensor([1.0 if stop.signal_name else 0.0])
                dist.all_reduce(flag, op=dist.ReduceOp.MAX)
                if flag.item() > 0:
                    stopped_by = stop.signal_name or "a signal on another rank"
                    done = True
                    break
                if settings.eval_every and step % settings.eval_every == 0 and step < total_steps:
                    run_eval()
                    if settings.save_every == 0:
                        save()
                if settings.save_every and step % settings.save_every == 0 and step < total_steps:
                    save()
                if step >= total_steps:
                    done = True
                    break
            else:
                epoch += 1
                position = 0
                state["epoch"], state["micro_in_epoch"] = epoch, 0
                if settings.max_steps is None and epoch >= math.ceil(settings.epochs):
                    dropped_tail = engine.micro_steps % accum
                    done = True
    except Exception as exc:
        if "loss scale already at minimum" in str(exc):
            raise DstrainError(
                f"fp16 training stopped at step {engine.global_steps}: DeepSpeed reports the "
                f"loss scale is at its minimum and gradients still overflow. " + Fp16Guard.ADVICE
            ) from None
        raise
    finally:
        if bar is not None:
            bar.close()
            log.bar = None

    if dropped_tail:
        log(
            f"the last {dropped_tail} micro-batch(es) formed a partial accumulation window "
            f"and were dropped (not stepped)"
        )
    if stopped_by:
        log(f"{stopped_by}: stopping after step {engine.global_steps}; saving a checkpoint")
        save()
        if metrics is not None:
            metrics.close()
        log(f"saved; resume with --resume auto --output-dir {output_dir}")
        return 0

    # 9. Final evaluation, checkpoint, export.
    if last_eval_step != engine.global_steps:
        run_eval()
    save()
    if settings.dump_params:
        dump_full_params(engine, output_dir / f"params_rank{rank}.pt")
    export_dir = None
    if settings.export and rank == 0:
        export_dir = output_dir / "export"
        try:
            export_checkpoint(ckpt_dir, export_dir, export_pt=settings.export_pt)
        except DstrainError as exc:
            log(
                f"export skipped: {exc} Run `dstrain export {ckpt_dir} -o DIR` where every "
                "rank's checkpoint files are visible."
            )
            export_dir = None
    dist.barrier()
    elapsed = time.time() - start_time
    summary = {
        "steps": engine.global_steps,
        "skipped_steps": engine.skipped_steps,
        "val_loss": val_loss,
        "val_perplexity": math.exp(val_loss)
        if val_loss is not None and not math.isnan(val_loss)
        else None,
        "best_val_loss": state["best_val_loss"],
        "samples_seen": state["samples_seen"],
        "useful_tokens_seen": state["useful_tokens_seen"],
        "tokens_seen": state["tokens_seen"],
        "elapsed_s": round(elapsed, 2),
        "peak_memory_bytes": torch.cuda.max_memory_allocated()
        if torch.cuda.is_available()
        else rss_bytes(),
    }
    if rank == 0:
        write_text_atomic(output_dir / "summary.json", json.dumps(summary, indent=2) + "\n")
        metrics.close()
    if torch.cuda.is_available():
        log(format_peak_comparison(estimate, torch.cuda.max_memory_allocated()))
    log(
        f"done: {summary['steps']} steps ({summary['skipped_steps']} skipped) in "
        f"{elapsed:.1f} s; val_loss {val_loss:.4f}, perplexity "
        f"{summary['val_perplexity']:.3f}; peak memory "
        f"{summary['peak_memory_bytes'] / 2**20:,.0f} MiB"
    )
    log(
        f"outputs: {output_dir}/metrics.jsonl, {ckpt_dir}/"
        + (f", {export_dir} (AutoModelForCausalLM.from_pretrained)" if export_dir else "")
    )
    return 0


def estimate_run_memory(arch, ds_config, world: int, seq_len: int, micro: int):
    """`dstrain estimate` for this run (per rank, configured stage)."""
    import torch

    from dstrain.memory import estimate_for_run

    local = int(os.environ.get("LOCAL_WORLD_SIZE", "0")) or (
        min(world, torch.cuda.device_count()) if torch.cuda.is_available() else 1
    )
    return estimate_for_run(
        arch,
        ds_config,
        world_size=world,
        gpus_per_node=local,
        seq_len=seq_len,
        micro_batch=micro,
        activation_checkpointing="full" if "activation_checkpointing" in ds_config else "none",
    )


def dump_full_params(engine, path: Path) -> None:
    """Every rank: the full fp32 parameters (gathered under ZeRO-3), for tests."""
    import deepspeed
    import torch

    params = list(engine.module.parameters())
    with deepspeed.zero.GatheredParameters(params, enabled=engine.zero_optimization_stage() == 3):
        state = {n: p.detach().float().cpu().clone() for n, p in engine.module.named_parameters()}
    torch.save(state, path)


# --------------------------------------------------------------------------------------
# Entry points
# --------------------------------------------------------------------------------------


def hand_off(args: argparse.Namespace, argv: list[str]) -> int:
    """`--num-gpus` / `--hostfile` outside a launcher: run the deepspeed launcher on us."""
    import subprocess

    from dstrain.launch import build_launcher_argv, preflight_launch

    train_args = _strip_launch_flags(argv)
    check = preflight_launch(train_args=train_args, num_gpus=args.num_gpus, hostfile=args.hostfile)
    for note in check.notes:
        print(f"note: {note}", flush=True)
    command = build_launcher_argv(
        train_args=train_args, num_gpus=args.num_gpus, hostfile=args.hostfile
    )
    print("launching: " + shlex.join(command), flush=True)
    return subprocess.call(command)


def _strip_launch_flags(argv: list[str]) -> list[str]:
    out, skip = [], False
    for item in argv:
        if skip:
            skip = False
            continue
        if item in ("--num-gpus", "--hostfile"):
            skip = True
            continue
        if item.startswith(("--num-gpus=", "--hostfile=")):
            continue
        out.append(item)
    return out


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    args = build_arg_parser().parse_args(argv)
    if args.local_rank is not None:
        os.environ.setdefault("LOCAL_RANK", str(args.local_rank))
    rank = int(os.environ.get("RANK", "0"))
    try:
        under_launcher = "LOCAL_RANK" in os.environ and "WORLD_SIZE" in os.environ
        if (args.num_gpus or args.hostfile) and not under_launcher:
            return hand_off(args, argv)
        return run(settings_from_args(args))
    except DstrainError as exc:
        if rank == 0:
            print(f"error: {exc}", file=sys.stderr, flush=True)
        elif not getattr(exc, "same_on_all_ranks", False):
            print(f"error (rank {rank}): {exc}", file=sys.stderr, flush=True)
        return exc.exit_code


if __name__ == "__main__":
    sys.exit(main())
