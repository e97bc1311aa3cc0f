"""Fine-tune a GenSLM model on nucleotide FASTA with a DeepSpeed engine.

One process (CPU, or one GPU):
    dstrain train --model genslm_25M --fasta ha.fasta --deepspeed_config ds_configs/zero2_bf16.json
One node, 4 GPUs:
    deepspeed --num_gpus 4 dstrain/train.py --deepspeed_config ds_configs/zero2_bf16.json \
        --model genslm_25M --fasta ha.fasta --output-dir runs/ha
Two nodes (hostfile lines `node-a slots=4`, `node-b slots=4`):
    deepspeed --hostfile hostfiles/two_nodes.example dstrain/train.py \
        --deepspeed_config ds_configs/zero2_bf16.json ...

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
an epoch boundary and no example is dropped mid-run. With --epochs the run is planned as
floor(epochs x micro-batches per epoch / accumulation) optimizer steps: the few
micro-batches left at the end of the final epoch (less than one window) are not used,
never stepped with a wrong scale, and the banner says how many. With --max-steps the
stream simply runs on until that step.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import shlex
import signal
import sys
import tempfile
import time
from collections import deque
from datetime import timedelta
from pathlib import Path
from typing import Any

from dstrain.ds_check import load_checked_ds_config, precision_of
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

_RUN_SHAPING = (
    "fasta",
    "model",
    "settings",
    "epochs",
    "max_steps",
    "deepspeed_config",
    "init_checkpoint",
)
"""Without any of these, `dstrain train` is the bundled demo."""

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


def fresh_demo_dir(base: str = "runs/demo") -> str:
    """runs/demo, or runs/demo-2, -3, ... when an earlier demo run is there."""
    candidate, number = Path(base), 1
    while (candidate / "checkpoints").exists():
        number += 1
        candidate = Path(f"{base}-{number}")
    return str(candidate)


def settings_from_args(args: argparse.Namespace) -> TrainSettings:
    """Merge a settings file (if any) and the flags into validated `TrainSettings`."""
    from pydantic import ValidationError

    from dstrain.settings import read_settings_file, settings_error_message

    data: dict[str, Any] = read_settings_file(args.settings) if args.settings else {}
    data.setdefault("data", {})
    if all(getattr(args, name) is None for name in _RUN_SHAPING):
        data.setdefault("epochs", DEMO_EPOCHS)  # the bundled demo: long enough to learn
        if args.output_dir is None and args.resume is None:
            data["output_dir"] = fresh_demo_dir()
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
        message = settings_error_message(exc, args.settings or "flags")
        for name in sorted(TrainSettings.model_fields, key=len, reverse=True):
            message = message.replace(f"\n  {name}:", f"\n  --{name.replace('_', '-')}:")
        for name in DataSettings.model_fields:
            message = message.replace(f"\n  data.{name}:", f"\n  --{name.replace('_', '-')}:")
        raise DstrainError(message, exit_code=2) from None


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


def param_groups(model, weight_decay: float) -> list[dict[str, Any]]:
    """Weight decay on matrices only; biases and LayerNorm weights are not decayed."""
    from dstrain.model import weight_decay_groups

    params = dict(model.named_parameters())
    decay, no_decay = weight_decay_groups(model)
    return [
        {"params": [params[n] for n in decay], "weight_decay": weight_decay},
        {"params": [params[n] for n in no_decay], "weight_decay": 0.0},
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
        except OSError as exc:
            failure = f"cannot write the token cache {cache_dir}: {exc.strerror or exc}"
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
    # Every rank must hold the same examples (a stale cache on an unshared disk would not).
    shape = (len(prepared.train), len(prepared.val), prepared.train.num_tokens)
    shapes = [None] * dist.get_world_size()
    dist.all_gather_object(shapes, shape)
    if len(set(shapes)) > 1:
        raise same_on_all_ranks(
            DstrainError(
                f"ranks see different token caches at {cache_dir} ((train, val, codons) per rank: "
                f"{shapes}). Every node must see the same output directory: use a shared file "
                "system, or pass --cache-dir on one."
            )
        )
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
    engine, dataset, collate, micro: int, rank: int, world: int, max_batches: int | None, all_reduce
) -> tuple[float, int]:
    """Pad-masked validation loss: mean over every real next-codon token on every rank.

    Labels come from the attention mask, so pads never count, whatever --loss-on-pad says
    for training. Each rank takes examples rank, rank + world, ...; every rank runs the
    same number of forwards (ZeRO-3 gathers parameters collectively), padding with
    zero-weight repeats. `all_reduce(values, op)` sums floats over ranks.
    """
    import deepspeed.comm as dist
    import torch
    import torch.nn.functional as F

    from dstrain.batching import IGNORE_INDEX

    mine = list(range(rank, len(dataset), world))
    batches = [mine[i : i + micro] for i in range(0, len(mine), micro)]
    most = int(all_reduce([len(batches)], op=dist.ReduceOp.MAX)[0])
    num_batches = most if max_batches is None else min(most, max_batches)
    loss_sum, tokens = 0.0, 0.0
    engine.eval()
    with torch.no_grad():
        for i in range(num_batches):
            weight = 1.0 if i < len(batches) else 0.0
            batch = collate([dataset[j] for j in (batches[i] if weight else [0])])
            ids = batch["input_ids"].to(engine.device)
            mask = batch["attention_mask"].to(engine.device)
            logits = engine(input_ids=ids, attention_mask=mask, use_cache=False).logits
            labels = ids[:, 1:].masked_fill(mask[:, 1:] == 0, IGNORE_INDEX)
            loss = F.cross_entropy(
                logits[:, :-1].float().reshape(-1, logits.size(-1)),
                labels.reshape(-1),
                ignore_index=IGNORE_INDEX,
                reduction="sum",
            )
            loss_sum += weight * loss.item()
            tokens += weight * (labels != IGNORE_INDEX).sum().item()
    engine.train()
    loss_sum, tokens = all_reduce([loss_sum, tokens])
    return (loss_sum / tokens if tokens else float("nan")), int(tokens)


# --------------------------------------------------------------------------------------
# The run
# --------------------------------------------------------------------------------------


class StopRequest:
    """SIGTERM / SIGINT: finish the current optimizer step, save, exit 0. Repeated SIGTERMs
    (a launcher forwarding the scheduler's) change nothing; a second Ctrl-C stops at once."""

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
        if signum == signal.SIGINT:
            signal.signal(signum, signal.default_int_handler)


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


def finite_or_none(value: float | None) -> float | None:
    """JSON has no NaN or inf: write them as null."""
    return value if value is not None and math.isfinite(value) else None


def perplexity(loss: float | None) -> float | None:
    """exp(mean loss) as a float (upstream took exp of the integer-truncated loss)."""
    if loss is None or not math.isfinite(loss):
        return None
    return math.exp(loss) if loss < 700 else math.inf


def check_output_dir(output_dir: Path) -> None:
    """Fail early, on every rank, if the run directory cannot be written."""
    try:
        output_dir.mkdir(parents=True, exist_ok=True)
        with tempfile.NamedTemporaryFile(dir=output_dir, prefix=".write-test-"):
            pass
    except OSError as exc:
        raise DstrainError(
            f"cannot write to the output directory {output_dir}: {exc.strerror or exc}. "
            "Pick a writable --output-dir."
        ) from None


def run(settings: TrainSettings) -> int:
    world = int(os.environ.get("WORLD_SIZE", "1"))
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
    for monitor in ("csv_monitor", "tensorboard"):
        block = ds_config.get(monitor)
        if isinstance(block, dict) and block.get("enabled") and not block.get("output_path"):
            block["output_path"] = str(output_dir / "monitor")  # "" means the run's directory
    check_output_dir(output_dir)

    # 2. Processes.
    import deepspeed
    from deepspeed.accelerator import get_accelerator

    from dstrain.architectures import resolve_architecture
    from dstrain.ds_runtime import prepare_deepspeed

    arch = resolve_architecture(settings.model)
    if not arch.buildable:
        raise DstrainError(f"{arch.name} cannot be trained: {arch.why_not_buildable}")
    prepare_deepspeed(timeout_s=settings.timeout_s)
    deepspeed.init_distributed(timeout=timedelta(seconds=settings.timeout_s))
    get_accelerator().set_device(int(os.environ.get("LOCAL_RANK", "0")))
    stop = StopRequest()
    restore_signals = stop.install()
    try:
        trainer = Trainer(settings, ds_config, config_source, arch, stop)
        return trainer.fit()
    finally:
        restore_signals()


def _row_step(line: str) -> float:
    """The step of a metrics.jsonl line; a damaged line counts as past any step."""
    try:
        return json.loads(line).get("step", 0)
    except (ValueError, AttributeError):
        return math.inf


class Trainer:
    """One run around one DeepSpeed engine. `fit` reads top to bottom: output, data, model
    and engine, plan, resume, banner, loop, finish; the other methods are its steps."""

    def __init__(
        self,
        settings: TrainSettings,
        ds_config: dict[str, Any],
        config_source: str,
        arch,
        stop: StopRequest,
    ):
        import deepspeed.comm as dist

        self.settings, self.ds_config, self.config_source = settings, ds_config, config_source
        self.arch, self.stop, self.dist = arch, stop, dist
        self.precision = precision_of(ds_config)
        self.rank, self.world = dist.get_rank(), dist.get_world_size()
        self.log = RankZeroLog(self.rank)
        self.output_dir = Path(settings.output_dir)
        self.ckpt_dir = self.output_dir / "checkpoints"
        self.loop = {
            "epoch": 0,
            "micro_in_epoch": 0,
            "samples_seen": 0,
            "tokens_seen": 0,
            "useful_tokens_seen": 0,
            "best_val_loss": None,
            "last_val_loss": None,
        }
        self.last_eval_step: int | None = None
        self.metrics = None
        self.bar = None

    # -- fit ------------------------------------------------------------------------------

    def fit(self) -> int:
        self.write_run_files()
        self.load_data()
        self.build_engine()
        self.plan()
        self.resume()
        self.banner()
        self.open_telemetry()
        try:
            stopped_by = self.train_loop()
        finally:
            if self.bar is not None:
                self.bar.close()
                self.log.bar = None
        if stopped_by:
            step = self.engine.global_steps
            self.log(f"{stopped_by}: stopping after step {step}")
            if step > self.start_step:
                self.save()
                self.log(
                    f"saved step {step}; resume with --resume auto --output-dir {self.output_dir}"
                )
            self.close_telemetry()
            return 0
        return self.finish()

    def write_run_files(self) -> None:
        if self.rank == 0:
            write_text_atomic(self.output_dir / "ds_config.json", render_ds_config(self.ds_config))
            write_text_atomic(
                self.output_dir / "settings.json", self.settings.model_dump_json(indent=2) + "\n"
            )

    def load_data(self) -> None:
        from dstrain.batching import CodonCollator, CodonDataset

        prepared, self.sources, self.cache_dir = load_data(
            self.settings, self.output_dir, self.rank, self.dist
        )
        self.prepared = prepared
        self.data_settings = prepared.settings.model_copy(
            update={
                "padding": self.settings.data.padding,
                "loss_on_pad": self.settings.data.loss_on_pad,
            }
        )
        self.train_set = CodonDataset(prepared.train)
        self.val_set = CodonDataset(prepared.val)
        self.collate = CodonCollator.from_settings(self.data_settings)

    def build_engine(self) -> None:
        import deepspeed
        import torch

        from dstrain.model import build_model, load_init_checkpoint

        torch.manual_seed(self.settings.seed)
        model = build_model(self.arch)
        if self.settings.init_checkpoint:
            load_init_checkpoint(
                model,
                self.settings.init_checkpoint,
                trust_checkpoint=self.settings.trust_checkpoint,
            )
        model.config.use_cache = False
        if "activation_checkpointing" in self.ds_config:
            model.gradient_checkpointing_enable(
                gradient_checkpointing_kwargs={"use_reentrant": False}
            )
        params = (self.ds_config.get("optimizer") or {}).get("params") or {}
        groups = param_groups(model, params.get("weight_decay", 0.0))
        try:
            self.engine, *_ = deepspeed.initialize(
                model=model, model_parameters=groups, config=self.ds_config
            )
        except ValueError as exc:
            if "not supported on your device" not in str(exc):
                raise
            raise DstrainError(
                f"{self.precision} is not supported on this device ({exc}). fp16 needs a "
                "GPU; on CPU use bf16 or fp32 (dstrain gen-config --bf16 / --fp32)."
            ) from None
        self.micro = self.engine.train_micro_batch_size_per_gpu()
        self.accum = self.engine.gradient_accumulation_steps()

    def plan(self) -> None:
        """Optimizer steps to run, and the epoch tail that cannot make a full window."""
        self.micro_per_epoch = math.ceil(math.ceil(len(self.train_set) / self.world) / self.micro)
        self.unused_tail = 0
        if self.settings.max_steps is not None:
            self.total_steps = self.settings.max_steps
            return
        planned_micro = int(self.settings.epochs * self.micro_per_epoch)
        self.total_steps, self.unused_tail = divmod(planned_micro, self.accum)
        if self.total_steps == 0:
            raise same_on_all_ranks(
                DstrainError(
                    f"no optimizer step would run: {self.settings.epochs:g} epoch(s) give "
                    f"{planned_micro} micro-batch(es) per rank ({len(self.train_set)} examples / "
                    f"{self.world} ranks / micro batch {self.micro}) but gradient_accumulation_steps "
                    f"is {self.accum}. Raise --epochs, or lower the micro batch or accumulation."
                )
            )

    def resume(self) -> None:
        from dstrain.checkpoints import load_run_checkpoint, restore_rng_state

        self.start_step = 0
        where, failure = None, None
        if self.rank == 0:
            try:
                where = self._resume_point()
                if where is not None:
                    self._check_resume_compatible(*where)
            except DstrainError as exc:
                failure = str(exc)
        all_ranks_agree(self.dist, failure)
        decision = [where]
        self.dist.broadcast_object_list(decision, src=0)
        if decision[0] is None:
            return
        ckpt_dir, tag = decision[0]
        client = load_run_checkpoint(self.engine, ckpt_dir, tag).get("dstrain", {})
        self.loop.update(client.get("loop", {}))
        rng = client.get("rng", {}).get(str(self.rank))
        if rng is not None:
            restore_rng_state(rng)
        self.start_step = self.engine.global_steps
        self._truncate_metrics(self.start_step)
        self.log(f"resumed from {ckpt_dir / tag} at step {self.start_step}")
        if self.start_step >= self.total_steps:
            self.log(
                f"the checkpoint is already at step {self.start_step}, the planned end "
                f"({self.total_steps}): nothing to train. Pass --max-steps to go further."
            )

    def _resume_point(self):
        from dstrain.checkpoints import read_latest_tag, resolve_checkpoint

        latest = read_latest_tag(self.ckpt_dir)
        if self.settings.resume == "auto":
            return resolve_checkpoint(self.ckpt_dir) if latest else None
        if self.settings.resume:
            return resolve_checkpoint(self.settings.resume)
        if latest:
            raise DstrainError(
                f"{self.ckpt_dir} already holds a run (latest checkpoint {latest}). Continue "
                "it with --resume auto, or start afresh in a new --output-dir."
            )
        return None

    def _check_resume_compatible(self, ckpt_dir: Path, tag: str) -> None:
        """The checkpoint must come from the same model, data, seed and batch layout."""
        from dstrain.checkpoints import read_model_states

        saved = read_model_states(ckpt_dir, tag).get("dstrain") or {}
        now = self.run_identity()
        diffs = [
            f"{key}: checkpoint {saved.get(key)!r}, now {value!r}"
            for key, value in now.items()
            if key in saved and saved[key] != value
        ]
        if diffs:
            raise DstrainError(
                f"cannot resume from {ckpt_dir / tag}: it was written by a different run "
                f"({'; '.join(diffs)}). Resume with the same settings, or start a new "
                "--output-dir (use --init-checkpoint with an export to keep the weights)."
            )

    def run_identity(self) -> dict[str, Any]:
        """What a resumed run must share with the run that saved the checkpoint."""
        return {
            "architecture": self.arch.to_dict(),
            "seed": self.settings.seed,
            "data_settings": self.data_settings.model_dump(exclude={"padding", "loss_on_pad"}),
            "source_sha256": [src.get("sha256") for src in self.prepared.manifest["sources"]],
            "batch": {"micro": self.micro, "accum": self.accum, "world": self.world},
            "zero_stage": self.engine.zero_optimization_stage(),
            "precision": self.precision,
        }

    def _truncate_metrics(self, step: int) -> None:
        """Drop metric rows past the resumed step (written before a crash)."""
        path = self.output_dir / "metrics.jsonl"
        if self.rank != 0 or not path.exists():
            return
        lines = path.read_text(encoding="utf-8").splitlines()
        kept = [line for line in lines if _row_step(line) <= step]
        if len(kept) != len(lines):
            write_text_atomic(path, "".join(line + "\n" for line in kept))

    def banner(self) -> None:
        from dstrain.memory import format_run_banner

        log, arch, engine, prepared = self.log, self.arch, self.engine, self.prepared
        seq_per_step = self.micro * self.accum * self.world
        mean_len = prepared.train.num_tokens / max(1, len(prepared.train))
        log(
            f"dstrain | {arch.name} ({arch.num_params():,} params) | {self.precision} | "
            f"ZeRO-{engine.zero_optimization_stage()} | world size {self.world} | "
            f"device {engine.device}"
        )
        log(f"  config: {self.config_source}")
        log(
            f"  data: {len(self.train_set)} train / {len(self.val_set)} val examples "
            f"({prepared.train.num_tokens:,} train codons, mean {mean_len:.0f}) from "
            f"{len(self.sources)} file(s); cache {self.cache_dir}"
            f"{' (reused)' if prepared.reused else ''}"
        )
        if len(self.val_set) == 0:
            log("  no validation examples (--val-fraction or too few records): no evaluation")
        log(
            f"  batch: {self.micro} micro x {self.accum} accum x {self.world} ranks = "
            f"{seq_per_step} sequences = ~{seq_per_step * mean_len:,.0f} codons per step; "
            f"padding {self.data_settings.padding}"
            f"{', loss on pads' if self.data_settings.loss_on_pad else ''}"
        )
        tail = (
            f"; the last {self.unused_tail} micro-batch(es) of the final epoch make a "
            "partial accumulation window and are not used"
            if self.unused_tail
            else ""
        )
        log(
            f"  steps: {engine.global_steps} -> {self.total_steps} ({self.micro_per_epoch} "
            f"micro-batches per epoch per rank{tail})"
        )
        longest = (
            self.data_settings.max_length
            if self.data_settings.padding == "max_length"
            else int(prepared.train.lengths().max())
        )
        self.estimate = estimate_run_memory(arch, self.ds_config, self.world, longest, self.micro)
        for line in format_run_banner(self.estimate).splitlines():
            log(f"  {line}")
        log(f"  outputs: {self.output_dir}")

    # -- telemetry -------------------------------------------------------------------------

    def open_telemetry(self) -> None:
        fp16 = self.ds_config.get("fp16") or {}
        self.guard = Fp16Guard(
            self.settings.skip_window,
            self.settings.max_skipped_share,
            float(fp16.get("min_loss_scale", 1.0)),
        )
        self.skipped_seen = self.engine.skipped_steps
        self.start_time = time.time()
        self.restart_window()
        if self.rank != 0:
            return
        mode = "a" if self.start_step else "w"  # a fresh run starts a fresh file
        self.metrics = open(self.output_dir / "metrics.jsonl", mode, encoding="utf-8")  # noqa: SIM115
        if self.settings.progress:
            from tqdm import tqdm

            self.bar = tqdm(
                total=self.total_steps,
                initial=self.engine.global_steps,
                unit="step",
                dynamic_ncols=True,
                file=sys.stderr,
            )
            self.log.bar = self.bar

    def close_telemetry(self) -> None:
        if self.metrics is not None:
            self.metrics.close()
            self.metrics = None

    def restart_window(self) -> None:
        """Start a new throughput window (after a log row, an evaluation or a save)."""
        self.window = [0.0] * 5  # loss sum, micro-batches, tokens, real tokens, samples
        self.window_t0 = time.time()

    def write_row(self, row: dict[str, Any]) -> None:
        if self.metrics is not None:
            clean = {k: finite_or_none(v) if isinstance(v, float) else v for k, v in row.items()}
            self.metrics.write(json.dumps(clean, allow_nan=False) + "\n")
            self.metrics.flush()

    def all_reduce(self, values: list[float], op=None) -> list[float]:
        """Sum (or `op`) floats over ranks, on the engine's device (NCCL needs CUDA)."""
        import torch

        tensor = torch.tensor(values, dtype=torch.float64, device=self.engine.device)
        self.dist.all_reduce(tensor, op=op or self.dist.ReduceOp.SUM)
        return tensor.tolist()

    def log_step(self, epoch_pos: float) -> None:
        import torch

        engine, step = self.engine, self.engine.global_steps
        skipped_now = engine.skipped_steps > self.skipped_seen
        self.skipped_seen = engine.skipped_steps
        scale = current_loss_scale(engine, self.precision)
        if skipped_now:
            self.log(f"step {step}: gradient overflow, step skipped; loss scale now {scale}")
        self.guard.check(step, skipped_now, scale)
        if step % self.settings.log_every == 0 or step == self.total_steps:
            loss, micro, tokens, useful, samples = self.all_reduce(self.window)
            elapsed = max(time.time() - self.window_t0, 1e-9)
            grad_norm = engine.get_global_grad_norm()
            row = {
                "step": step,
                "epoch": round(epoch_pos, 4),
                "loss": loss / max(micro, 1),
                "lr": engine.get_lr()[0],
                "loss_scale": scale,
                "skipped_steps": engine.skipped_steps,
                "grad_norm": float(grad_norm) if grad_norm is not None else None,
                "samples_per_s": samples / elapsed,
                "useful_tokens_per_s": useful / elapsed,
                "tokens_per_s": tokens / elapsed,
                "elapsed_s": round(time.time() - self.start_time, 3),
            }
            if torch.cuda.is_available():
                row["cuda_max_allocated_bytes"] = torch.cuda.max_memory_allocated()
            else:
                row["rss_bytes"] = rss_bytes()
            self.write_row(row)
            if self.bar is not None:
                self.bar.set_postfix(
                    loss=f"{row['loss']:.4f}",
                    lr=f"{row['lr']:.2e}",
                    tok_s=f"{row['useful_tokens_per_s']:.0f}",
                    refresh=False,
                )
            self.restart_window()
        if self.bar is not None:
            self.bar.update(1)

    # -- the loop ----------------------------------------------------------------------------

    def train_loop(self) -> str | None:
        """Micro-batches until total_steps; returns the signal name if one stopped it."""
        from dstrain.batching import count_tokens

        engine, settings, loop = self.engine, self.settings, self.loop
        if self.stop_requested():
            return self.stop.signal_name or "a signal on another rank"
        engine.train()
        try:
            while engine.global_steps < self.total_steps:
                batches = epoch_batches(
                    len(self.train_set),
                    self.micro,
                    loop["epoch"],
                    settings.seed,
                    self.rank,
                    self.world,
                )
                for index in range(loop["micro_in_epoch"], len(batches)):
                    batch = self.collate([self.train_set[i] for i in batches[index]])
                    counts = count_tokens(batch)
                    batch = {k: v.to(engine.device) for k, v in batch.items()}
                    loss = engine(**batch, use_cache=False).loss
                    engine.backward(loss)
                    boundary = engine.is_gradient_accumulation_boundary()
                    engine.step()
                    for i, value in enumerate(
                        (
                            loss.item(),
                            1,
                            counts.num_tokens,
                            counts.num_real_tokens,
                            len(batches[index]),
                        )
                    ):
                        self.window[i] += value
                    loop["micro_in_epoch"] = index + 1
                    loop["samples_seen"] += len(batches[index])
                    loop["tokens_seen"] += counts.num_tokens
                    loop["useful_tokens_seen"] += counts.num_real_tokens
                    if not boundary:
                        continue
                    self.log_step(loop["epoch"] + (index + 1) / len(batches))
                    if engine.global_steps >= self.total_steps:
                        return None  # done: finish() evaluates, saves and exports
                    if self.stop_requested():
                        return self.stop.signal_name or "a signal on another rank"
                    self.periodic_eval_and_save()
                loop["epoch"] += 1
                loop["micro_in_epoch"] = 0
        except Exception as exc:
            if "loss scale already at minimum" in str(exc):
                raise DstrainError(
                    f"fp16 training stopped at step {engine.global_steps}: DeepSpeed reports "
                    "the loss scale is at its minimum and gradients still overflow. "
                    + Fp16Guard.ADVICE
                ) from None
            raise
        return None

    def stop_requested(self) -> bool:
        """Whether any rank got SIGTERM/SIGINT (all ranks must stop at the same step)."""
        return (
            self.all_reduce([1.0 if self.stop.signal_name else 0.0], op=self.dist.ReduceOp.MAX)[0]
            > 0
        )

    def periodic_eval_and_save(self) -> None:
        step, settings = self.engine.global_steps, self.settings
        evaluated = settings.eval_every and step % settings.eval_every == 0
        if evaluated:
            self.run_eval()
        if (settings.save_every and step % settings.save_every == 0) or (
            evaluated and settings.save_every == 0
        ):
            self.save()
        self.restart_window()  # evaluation and saving are not training throughput

    def run_eval(self) -> float | None:
        if len(self.val_set) == 0:
            return None
        loss, tokens = evaluate(
            self.engine,
            self.val_set,
            self.collate,
            self.micro,
            self.rank,
            self.world,
            self.settings.max_eval_batches,
            self.all_reduce,
        )
        step = self.engine.global_steps
        self.last_eval_step = step
        self.loop["last_val_loss"] = loss
        best = self.loop["best_val_loss"]
        if math.isfinite(loss) and (best is None or loss < best):
            self.loop["best_val_loss"] = loss
        ppl = perplexity(loss)
        self.write_row(
            {
                "step": step,
                "val_loss": loss,
                "val_perplexity": ppl,
                "val_tokens": tokens,
                "elapsed_s": round(time.time() - self.start_time, 3),
            }
        )
        self.log(
            f"step {step}: val_loss {loss:.4f}, perplexity {'n/a' if ppl is None else f'{ppl:.3f}'}"
        )
        return loss

    def save(self) -> None:
        from dstrain.checkpoints import capture_rng_state, save_run_checkpoint

        if self.start_step and self.engine.global_steps == self.start_step:
            return  # this state was just loaded from that very checkpoint
        rngs = [None] * self.world
        self.dist.all_gather_object(rngs, capture_rng_state())
        step = self.engine.global_steps
        client_state = {
            "dstrain": {
                **self.run_identity(),
                "step": step,
                "loop": dict(self.loop),
                "rng": {str(r): s for r, s in enumerate(rngs)},
            }
        }
        val_loss = self.loop["last_val_loss"] if self.last_eval_step == step else None
        save_run_checkpoint(
            self.engine,
            self.ckpt_dir,
            step,
            client_state,
            val_loss=finite_or_none(val_loss),
            keep_best=self.settings.keep_best,
        )

    # -- the end --------------------------------------------------------------------------

    def finish(self) -> int:
        import torch

        from dstrain.memory import format_peak_comparison

        engine, log = self.engine, self.log
        if self.last_eval_step != engine.global_steps:
            self.run_eval()
        self.save()
        if self.settings.dump_params:
            dump_full_params(engine, self.output_dir / f"params_rank{self.rank}.pt")
        seen = self.all_reduce(
            [self.loop["samples_seen"], self.loop["tokens_seen"], self.loop["useful_tokens_seen"]]
        )
        self.dist.barrier()  # the rest is rank 0's alone: the other ranks may leave
        if self.rank != 0:
            return 0
        export_dir = self.export()
        elapsed = time.time() - self.start_time
        val_loss = self.loop["last_val_loss"] if len(self.val_set) else None
        peak = torch.cuda.max_memory_allocated() if torch.cuda.is_available() else rss_bytes()
        summary = {
            "steps": engine.global_steps,
            "skipped_steps": engine.skipped_steps,
            "val_loss": finite_or_none(val_loss),
            "val_perplexity": finite_or_none(perplexity(val_loss)),
            "best_val_loss": finite_or_none(self.loop["best_val_loss"]),
            "samples_seen": int(seen[0]),  # all ranks
            "tokens_seen": int(seen[1]),
            "useful_tokens_seen": int(seen[2]),
            "export_dir": str(export_dir) if export_dir else None,
            "elapsed_s": round(elapsed, 2),
            "peak_memory_bytes": peak,
        }
        write_text_atomic(
            self.output_dir / "summary.json", json.dumps(summary, indent=2, allow_nan=False) + "\n"
        )
        self.close_telemetry()
        if torch.cuda.is_available():
            log(format_peak_comparison(self.estimate, peak))
        quality = (
            "no validation loss"
            if summary["val_loss"] is None
            else f"val_loss {summary['val_loss']:.4f}, perplexity "
            f"{summary['val_perplexity'] or float('inf'):.3f}"
        )
        log(
            f"done: {summary['steps']} steps ({summary['skipped_steps']} skipped) in "
            f"{elapsed:.1f} s; {quality}; peak memory {peak / 2**20:,.0f} MiB"
        )
        log(
            f"outputs: {self.output_dir}/metrics.jsonl, {self.ckpt_dir}/"
            + (f", {export_dir} (AutoModelForCausalLM.from_pretrained)" if export_dir else "")
        )
        return 1 if self.settings.export and export_dir is None else 0

    def export(self) -> Path | None:
        """Rank 0: the HF export of the final checkpoint. A failure is reported (and makes
        the exit code 1) but leaves the checkpoints as they are."""
        from dstrain.export import export_checkpoint

        if not self.settings.export:
            return None
        export_dir = self.output_dir / "export"
        try:
            export_checkpoint(self.ckpt_dir, export_dir, export_pt=self.settings.export_pt)
        except Exception as exc:  # training succeeded; say why the export did not
            self.log(
                f"error: training finished and its checkpoints are saved, but the export "
                f"failed ({type(exc).__name__}: {exc}). Run `dstrain export {self.ckpt_dir} "
                "-o DIR` where every rank's checkpoint files are visible."
            )
            return None
        return export_dir


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
    launcher = subprocess.Popen(command, start_new_session=True)

    def forward(signum, _frame):  # the launcher and its ranks are in their own group
        os.killpg(launcher.pid, signum)

    previous = {sig: signal.signal(sig, forward) for sig in (signal.SIGTERM, signal.SIGINT)}
    try:
        return launcher.wait()
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)


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
    except OSError as exc:  # a path that cannot be read or written, named by the OS
        where = f" {exc.filename}" if exc.filename else ""
        print(
            f"error (rank {rank}): cannot use{where}: {exc.strerror or exc}",
            file=sys.stderr,
            flush=True,
        )
        return 1


if __name__ == "__main__":
    sys.exit(main())
