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
reshuffled from seed + epoch and cut into micro-batches by `dstrain.batch_plan`: --batching
random, grouped or packed, by count or --tokens-per-micro-batch; every rank runs as many),
so an accumulation window may span an epoch boundary and no example is dropped mid-run.
With --epochs the run is planned as floor(epochs x micro-batches per epoch / accumulation)
optimizer steps (micro-batches per epoch as each epoch's plan makes them): the few
micro-batches left at the end of the final epoch (less than one window) are not used,
never stepped with a wrong scale, and the banner says how many. With --max-steps the
stream simply runs on until that step.

Learning rate: DeepSpeed's WarmupLR, WarmupDecayLR and WarmupCosineLR are functions of an
iteration count i: they warm up from warmup_min_lr (WarmupCosineLR: warmup_min_ratio x lr)
at i = 0 towards lr at i = warmup_num_steps, and the decaying two fall to their end value at
total_num_steps (WarmupCosineLR already at total_num_steps - 1: its cosine is one decay step
down at i = warmup_num_steps, so it never applies the peak lr itself). Left to itself DeepSpeed
0.19.8 runs optimizer step k (from 1) at i = k - 2 (the constructor sets the i = -1 rate,
the i = 0 one), so with warmup_min_lr 0 the first two steps run at lr 0. dstrain runs step
k at i = k (`align_lr_schedule`, on a fresh engine; a resume loads the saved i over it and
never advances it twice): a linear warm-up of W steps runs step k at k / W of the way up
and reaches lr at step W, and no step runs at warmup_min_lr. So that a
WarmupDecayLR run of total_num_steps steps does not spend its last step at warmup_min_lr,
dstrain hands that schedule total_num_steps + 1: it decays from lr at step
warmup_num_steps to warmup_min_lr just after step total_num_steps. (WarmupCosineLR's last
steps run at its floor, cos_min_ratio x lr.) Other schedules run as DeepSpeed steps them.
The `lr` in metrics.jsonl is the rate the optimizer applied in that step, read just before
`engine.step()`.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import json
import math
import os
import shlex
import shutil
import signal
import sys
import tempfile
import time
from collections import deque
from collections.abc import Callable
from datetime import timedelta
from pathlib import Path
from typing import Any

from dstrain.ds_config import render_ds_config, write_text_atomic
from dstrain.ds_run import (
    CheckedConfig,
    DsRun,
    load_ds_run,
    missing_monitor_packages,
    resolve_ds_run,
    with_monitor_dir,
)
from dstrain.ds_runtime import check_rendezvous_env
from dstrain.errors import DstrainError
from dstrain.settings import DataSettings, TrainSettings
from dstrain.watchdog import (
    Watchdog,
    parent_spec,
    set_parent_death_signal,
    start_watchdog,
    watch_parent,
)

# --------------------------------------------------------------------------------------
# Settings
# --------------------------------------------------------------------------------------


DEMO_PRESET: dict[str, Any] = {
    "epochs": 12,
    "deepspeed": {
        "batch": {"train_micro_batch_size_per_gpu": 8},
        "optimizer": {"lr": 1e-3},
        "scheduler": {"warmup_num_steps": 10},
        "steps_per_print": 1_000_000,
    },
}
"""The no-argument demo (genslm_tiny from scratch on the bundled H3N2 set, ~200 steps):
12 epochs, micro batch 8, 10 warm-up steps, lr 1e-3 (a from-scratch rate), and DeepSpeed's
own progress line off (the loop logs every step). Flags given still override it."""

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


def _positive_int(text: str) -> int:
    """--num-gpus: 0 would train in this process, -1 hand DeepSpeed every GPU; refuse both."""
    try:
        value = int(text)
    except ValueError:
        value = 0
    if not 1 <= value <= 2**31 - 1:
        raise argparse.ArgumentTypeError(f"{text!r} is not a whole number of GPUs from 1")
    return value


def build_arg_parser() -> argparse.ArgumentParser:
    """train's flags: TrainSettings' and DeepSpeedSettings' fields (`dstrain.cli_options`:
    name, type, default and help from each field), plus the launcher's few."""
    from dstrain.cli_options import (
        TRAIN_PRECISION_DEFAULT,
        add_argparse_arguments,
        deepspeed_specs,
        train_specs,
    )

    demo = DEMO_PRESET["deepspeed"]
    p = argparse.ArgumentParser(
        prog="dstrain train",
        description="Fine-tune a GenSLM model with DeepSpeed ZeRO. With none of "
        + ", ".join(
            "--" + name.replace("_", "-").replace("-config", "_config") for name in _RUN_SHAPING
        )
        + ": the demo preset, genslm_tiny from scratch on the bundled H3N2 HA/NA set with "
        f"epochs {DEMO_PRESET['epochs']}, micro batch "
        f"{demo['batch']['train_micro_batch_size_per_gpu']}, "
        f"warm-up {demo['scheduler']['warmup_num_steps']} steps, lr {demo['optimizer']['lr']:g} "
        "and DeepSpeed's own progress print off (flags still override it). The defaults "
        "shown below are the settings' own, used outside the demo.",
    )
    p.add_argument(
        "--local_rank",
        "--local-rank",
        type=int,
        default=None,
        help="Set by the deepspeed launcher (read from LOCAL_RANK otherwise).",
    )
    p.add_argument("--deepspeed", action="store_true", help="Accepted for compatibility.")
    add_argparse_arguments(p, train_specs())
    p.add_argument("--settings", help="A JSON settings file (TrainSettings); flags override it.")
    p.add_argument(
        "--num-gpus",
        type=_positive_int,
        help="Hand off to the deepspeed launcher with this many local ranks.",
    )
    p.add_argument("--hostfile", help="Hand off to the deepspeed launcher with this hostfile.")
    group = p.add_argument_group(
        "DeepSpeed settings (instead of --deepspeed_config; the same flags as `dstrain "
        "gen-config`)",
        "Without --deepspeed_config the DeepSpeed config is built from these, checked like "
        "any file, and written to OUTPUT_DIR/ds_config.json. The precision default there "
        f"is {TRAIN_PRECISION_DEFAULT}.",
    )
    add_argparse_arguments(group, deepspeed_specs(precision_default=TRAIN_PRECISION_DEFAULT))
    return p


def fresh_demo_dir(base: str = "runs/demo") -> str:
    """runs/demo, or runs/demo-2, -3, ... when an earlier demo run is there."""
    candidate, number = Path(base), 1
    while (candidate / "checkpoints").exists():
        number += 1
        candidate = Path(f"{base}-{number}")
    return str(candidate)


def is_demo(args: argparse.Namespace) -> bool:
    return all(getattr(args, name) is None for name in _RUN_SHAPING)


def settings_from_args(args: argparse.Namespace) -> TrainSettings:
    """Merge a settings file (if any), the demo preset (for the demo) and the flags into
    validated `TrainSettings`."""
    from pydantic import ValidationError

    from dstrain.cli_options import flag_of_path, overrides_from_values, train_specs
    from dstrain.settings import apply_overrides, read_settings_file, settings_error_message

    specs = train_specs()
    data: dict[str, Any] = read_settings_file(args.settings) if args.settings else {}
    if is_demo(args):
        data.setdefault("epochs", DEMO_PRESET["epochs"])
        if args.output_dir is None and args.resume is None:
            data["output_dir"] = fresh_demo_dir()
    data = apply_overrides(data, overrides_from_values(specs, vars(args)))
    try:
        return TrainSettings.model_validate(data)
    except ValidationError as exc:
        lines = settings_error_message(exc, args.settings or "flags").split("\n  ")
        for index, line in enumerate(lines[1:], start=1):
            path, _, rest = line.partition(": ")
            flag = flag_of_path(specs, path)
            lines[index] = f"{flag}: {rest}" if flag else line
        raise DstrainError("\n  ".join(lines), exit_code=2) from None


def deepspeed_flags(args: argparse.Namespace) -> dict[str, Any]:
    """The DeepSpeed flags given (dest -> value); a usage error next to --deepspeed_config."""
    from dstrain.cli_options import deepspeed_specs

    given = {}
    for spec in deepspeed_specs():
        value = getattr(args, spec.dest)
        if value is not None:
            given[spec.flag_for(value)] = (spec.dest, value)
    if given and args.deepspeed_config is not None:
        raise DstrainError(
            f"give --deepspeed_config or DeepSpeed flags ({', '.join(given)}), not both: "
            "put those settings in the JSON (dstrain gen-config writes one), or drop "
            "--deepspeed_config",
            exit_code=2,
        )
    return dict(given.values())


def train_ds_config(flags: dict[str, Any], *, demo: bool, world_size: int) -> CheckedConfig:
    """The DeepSpeed config without --deepspeed_config: DeepSpeedSettings' defaults, the
    demo preset for the demo, the device's precision (bf16 on a GPU with native bf16, else
    fp32: bf16 matmuls are slow on CPUs), then the DeepSpeed flags given; checked like any
    file, each problem naming its flag."""
    from dstrain.cli_options import deepspeed_specs, ds_config_from_flags

    base = json.loads(json.dumps(DEMO_PRESET["deepspeed"])) if demo else {}
    base["precision"] = "bf16" if native_bf16() else "fp32"
    source = "the demo preset and DeepSpeed flags" if demo else "the DeepSpeed flags"
    config, warnings = ds_config_from_flags(
        deepspeed_specs(), flags, base, source, world_size=world_size
    )
    if int(os.environ.get("RANK", "0")) == 0:
        for warning in warnings:
            print(f"warning: {warning}", file=sys.stderr, flush=True)
    return CheckedConfig(config, resolve_ds_run(config), source)


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


RANK_ZERO_WAIT = timedelta(hours=24)
"""How long the other ranks wait while rank 0 picks, checks and (on another world size)
converts the checkpoint to resume: a universal conversion of billions of parameters reads
and writes the optimizer state twice, past any collective timeout. A rank 0 that dies
meanwhile is caught by the watchdog (setup is a long phase), not by this limit."""


def _default_store():
    """The process group's rendezvous store (None if this torch hides it)."""
    import torch.distributed as torch_dist

    try:
        return torch_dist.distributed_c10d._get_default_store()
    except (AttributeError, RuntimeError, ValueError):
        return None


def rank_zero_done(key: str) -> None:
    """Rank 0: tell the ranks in `wait_for_rank_zero(key)` to go on."""
    store = _default_store()
    if store is not None:
        store.set(key, "done")


def wait_for_rank_zero(key: str) -> None:
    """Ranks 1..N: wait, outside any collective and its timeout, until rank 0 has called
    `rank_zero_done(key)`."""
    store = _default_store()
    if store is not None:
        store.wait([key], RANK_ZERO_WAIT)


def same_on_all_ranks(exc: DstrainError) -> DstrainError:
    """Mark an error every rank raises alike, so that only rank 0 prints it."""
    exc.same_on_all_ranks = True
    return exc


# --------------------------------------------------------------------------------------
# Learning-rate schedule
# --------------------------------------------------------------------------------------


def warmup_schedule(engine):
    """The engine's DeepSpeed WarmupLR, WarmupDecayLR or WarmupCosineLR; None for no
    schedule or any other one (those run as DeepSpeed steps them)."""
    from deepspeed.runtime import lr_schedules

    schedule = getattr(engine, "lr_scheduler", None)
    kinds = (lr_schedules.WarmupLR, lr_schedules.WarmupCosineLR)  # WarmupDecayLR: a WarmupLR
    return schedule if isinstance(schedule, kinds) else None


def align_lr_schedule(engine) -> None:
    """A new engine's warm-up schedule as dstrain runs it (see the module docstring): at
    the first step's iteration, 1 (DeepSpeed's constructor leaves it at -1 with the
    iteration-0 rate; a `last_batch_iteration` L in the config starts at L + 2), and a
    WarmupDecayLR one step longer. Each `engine.step()` then adds 1 and every checkpoint
    saves the position, which a resume loads over this one (`sync_lr_to_schedule`)."""
    from deepspeed.runtime import lr_schedules

    schedule = warmup_schedule(engine)
    if schedule is None:
        return
    if isinstance(schedule, lr_schedules.WarmupDecayLR):  # the shape: not in checkpoints
        schedule.total_num_steps += 1
    schedule.step(schedule.last_batch_iteration + 2)


def sync_lr_to_schedule(engine) -> None:
    """After a checkpoint load: set the optimizer's rates from the restored schedule
    position, without moving it (DeepSpeed's load_state_dict restores the position only)."""
    schedule = warmup_schedule(engine)
    if schedule is not None:
        schedule.step(schedule.last_batch_iteration)


def scheduled_lr(engine, steps_ahead: int) -> float | None:
    """The first parameter group's rate `steps_ahead` optimizer steps after the next one
    (0: the next), read off the warm-up schedule without moving it; None without one.
    Skipped fp16 steps do not advance the schedule, so they shift this by as many."""
    schedule = warmup_schedule(engine)
    if schedule is None:
        return None
    now = schedule.last_batch_iteration
    try:
        schedule.last_batch_iteration = now + steps_ahead
        return float(schedule.get_lr()[0])
    finally:
        schedule.last_batch_iteration = now


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
            f"no training examples in {cache_dir}: the split hashes whole records into "
            "validation (all windows and ORFs of a record go together), so one or a few "
            "records, e.g. a single genome under --frame all-orfs, may all land there. Add "
            "records, lower --val-fraction (0 trains on all), or change --split-seed."
        )
    return prepared, sources, cache_dir


def sampler_order(num_examples: int, seed: int, epoch: int):
    """One epoch's shuffled example order, as torch's DistributedSampler draws it
    (torch.randperm seeded seed + epoch); every batching mode starts from it, and random
    batching without a token budget is exactly the sampler's layout."""
    import torch

    generator = torch.Generator()
    generator.manual_seed(seed + epoch)
    return torch.randperm(num_examples, generator=generator).numpy()


def plan_train_epoch(lengths, data: DataSettings, *, micro: int, epoch: int, seed: int, world: int):
    """The `dstrain.batch_plan.EpochPlan` of one training epoch under these data settings."""
    from dstrain.batch_plan import plan_epoch

    return plan_epoch(
        lengths,
        mode=data.batching,
        micro=micro,
        tokens_per_micro_batch=data.tokens_per_micro_batch,
        max_length=data.max_length,
        epoch=epoch,
        seed=seed,
        world=world,
        padding=data.padding,
        order=sampler_order(len(lengths), seed, epoch),
    )


def epoch_batches(
    num_examples: int, micro: int, epoch: int, seed: int, rank: int, world: int
) -> list[list[int]]:
    """This rank's micro-batches of example indices for one epoch of random batching
    without a budget (a DistributedSampler's shares cut into micro-batches)."""
    import numpy as np

    plan = plan_train_epoch(
        np.ones(num_examples, dtype=np.int64),
        DataSettings(max_length=8),
        micro=micro,
        epoch=epoch,
        seed=seed,
        world=world,
    )
    return [[row[0] for row in rows] for rows in plan.share(rank)]


# --------------------------------------------------------------------------------------
# Evaluation
# --------------------------------------------------------------------------------------


def evaluate(
    engine,
    dataset,
    collate,
    micro: int,
    rank: int,
    world: int,
    max_batches: int | None,
    all_reduce,
    *,
    with_pad: bool = False,
) -> tuple[float, int, float | None]:
    """Pad-masked validation loss: mean over every real next-codon token on every rank.

    Labels come from the attention mask, so pads never count, whatever --loss-on-pad says
    for training. Each rank takes examples rank, rank + world, ...; every rank runs the
    same number of forwards (ZeRO-3 gathers parameters collectively), padding with
    zero-weight repeats. `all_reduce(values, op)` sums floats over ranks.

    `with_pad` (--loss-on-pad) adds upstream GenSLM's `val/loss` from the same forwards:
    the mean cross-entropy over every next-token position of every example, pads included
    (upstream genslm/model.py passes labels=input_ids, nothing ignored, every record padded
    to max_length), so `collate` must then pad to max_length. Returns (masked loss, real
    next-codon tokens, pad-included loss or None).
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
    pad_loss_sum, positions = 0.0, 0.0
    engine.eval()
    with torch.no_grad():
        for i in range(num_batches):
            weight = 1.0 if i < len(batches) else 0.0
            batch = collate([dataset[j] for j in (batches[i] if weight else [0])])
            ids = batch["input_ids"].to(engine.device)
            mask = batch["attention_mask"].to(engine.device)
            logits = engine(input_ids=ids, attention_mask=mask, use_cache=False).logits
            flat_logits = logits[:, :-1].float().reshape(-1, logits.size(-1))
            labels = ids[:, 1:].masked_fill(mask[:, 1:] == 0, IGNORE_INDEX)
            loss = F.cross_entropy(
                flat_logits, labels.reshape(-1), ignore_index=IGNORE_INDEX, reduction="sum"
            )
            loss_sum += weight * loss.item()
            tokens += weight * (labels != IGNORE_INDEX).sum().item()
            if with_pad:
                every = ids[:, 1:].reshape(-1)
                pad_loss = F.cross_entropy(flat_logits, every, reduction="sum")
                pad_loss_sum += weight * pad_loss.item()
                positions += weight * every.numel()
    engine.train()
    loss_with_pad = None
    if with_pad:
        pad_loss_sum, positions = all_reduce([pad_loss_sum, positions])
        loss_with_pad = pad_loss_sum / positions if positions else float("nan")
    loss_sum, tokens = all_reduce([loss_sum, tokens])
    return (loss_sum / tokens if tokens else float("nan")), int(tokens), loss_with_pad


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


def run(
    settings: TrainSettings, ds_flags: dict[str, Any] | None = None, *, demo: bool = False
) -> int:
    """One training run. Without `settings.deepspeed_config` the DeepSpeed config comes
    from `ds_flags` (DeepSpeed flags given, dest -> value) over the settings' defaults and,
    for the `demo`, `DEMO_PRESET`."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    output_dir = Path(settings.output_dir)

    # 1. The DeepSpeed config: checked strictly before anything is built.
    if settings.deepspeed_config:
        try:
            checked = load_ds_run(settings.deepspeed_config, world_size=world)
        except DstrainError as exc:
            raise same_on_all_ranks(exc) from None
        config_source = settings.deepspeed_config
    else:
        try:
            checked = train_ds_config(ds_flags or {}, demo=demo, world_size=world)
        except DstrainError as exc:
            raise same_on_all_ranks(exc) from None
        config_source = "the demo preset" if demo else "DeepSpeed flags and defaults"
        config_source += " (written to ds_config.json)"
    checked = with_monitor_dir(checked, str(output_dir / "monitor"))  # "" = the run's dir
    missing = missing_monitor_packages(checked.run)
    if missing:  # DeepSpeed would fail inside deepspeed.initialize, after the model is built
        raise same_on_all_ranks(
            DstrainError(
                f"{config_source} turns on DeepSpeed monitors whose packages are not "
                f"installed: pip install {' '.join(missing)}, or turn the monitor off."
            )
        )
    check_zero_init(settings, checked)
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
    watchdog = start_watchdog(settings.hang_timeout)
    stop = StopRequest()
    restore_signals = stop.install()
    try:
        trainer = Trainer(settings, checked, config_source, arch, stop, watchdog)
        code = trainer.fit()
        watchdog.close()  # a rank that ends well is not a dead rank to the others
        return code
    except Exception as exc:
        if isinstance(exc, DstrainError):
            watchdog.note_failure()  # the others will say so, not that this rank died
        else:  # e.g. gloo: a peer closed the connection
            watchdog.explain_failure()  # names the rank that is gone and exits, if one is
        raise
    finally:
        restore_signals()


def _row_step(line: str) -> float:
    """The step of a metrics.jsonl line; a damaged line counts as past any step."""
    try:
        return json.loads(line).get("step", 0)
    except (ValueError, AttributeError):
        return math.inf


MAX_EPOCHS_PER_STEP = 1000
"""Most passes over the training data one optimizer step may take (accumulation spans
epochs on tiny data; 2**63 accumulation steps would run for ever without a word)."""


@dataclasses.dataclass(frozen=True)
class RunPlan:
    """How far the run goes: fixed once the data and the batch layout are known."""

    micro_per_epoch: int
    """Micro-batches per epoch on each rank (the DistributedSampler pads every rank's share
    to ceil(examples / world), cut into micro-batches, the last one short); with a token
    budget or packing, those of epoch 0 (later epochs may differ by a few)."""

    total_steps: int
    """Optimizer steps the run ends at (--max-steps, or what --epochs give)."""

    unused_tail: int
    """Micro-batches at the end of the final epoch left out: fewer than one accumulation
    window, so they would make a step at the wrong scale (always 0 with --max-steps)."""


def plan_run(
    num_examples: int,
    *,
    world: int,
    micro: int,
    accum: int,
    epochs: float,
    max_steps: int | None,
    epoch_micro: Callable[[int], int] | None = None,
) -> RunPlan:
    """The run's plan, pure arithmetic. E.g. 96 examples on 2 ranks, micro 4, accum 4:
    ceil(48 / 4) = 12 micro-batches per epoch per rank; 2.5 epochs = 30 micro-batches
    = 7 steps of 4, and the last 2 micro-batches are not used.

    `epoch_micro(epoch)`: micro-batches per rank of each epoch where the batching plan sets
    them (a token budget, packing: they may vary from epoch to epoch); --epochs E then
    counts those of the first floor(E) epochs and the fraction of the next."""
    layout = f"{num_examples} examples / {world} ranks / micro batch {micro}"
    if epoch_micro is None:
        micro_per_epoch = math.ceil(math.ceil(num_examples / world) / micro)
    else:
        micro_per_epoch = epoch_micro(0)
        layout = f"{num_examples} examples on {world} ranks, micro-batches as --batching plans"
    if accum > MAX_EPOCHS_PER_STEP * micro_per_epoch:  # one step would (nearly) never end
        raise DstrainError(
            f"gradient_accumulation_steps {accum} would make one optimizer step read the "
            f"training data about {accum // micro_per_epoch:,} times over ({layout} = "
            f"{micro_per_epoch} micro-batch(es) per epoch); dstrain refuses more than "
            f"{MAX_EPOCHS_PER_STEP} epochs per step. Lower the accumulation (--grad-accum)"
            + (", or --tokens-per-micro-batch," if epoch_micro is not None else "")
            + " or give more data"
        )
    if max_steps is not None:  # the stream runs on across epochs until that step
        return RunPlan(micro_per_epoch=micro_per_epoch, total_steps=max_steps, unused_tail=0)
    if epoch_micro is None:
        planned_micro = _floor(epochs * micro_per_epoch)
    else:
        whole = math.floor(epochs)
        planned_micro = sum(epoch_micro(epoch) for epoch in range(whole))
        if epochs > whole:
            planned_micro += _floor((epochs - whole) * epoch_micro(whole))
    total_steps, unused_tail = divmod(planned_micro, accum)
    if total_steps == 0:
        raise DstrainError(
            f"no optimizer step would run: {epochs:g} epoch(s) give {planned_micro} "
            f"micro-batch(es) per rank ({layout}) but gradient_accumulation_steps is {accum}. "
            "Raise --epochs, or lower the micro batch (or --tokens-per-micro-batch) or "
            "accumulation."
        )
    return RunPlan(
        micro_per_epoch=micro_per_epoch, total_steps=total_steps, unused_tail=unused_tail
    )


OPTIMIZER_FLAGS = {
    "AdamW": "torch AdamW: --torch-adam",
    "FusedAdam": "FusedAdam: --fused-adam",
    "DeepSpeedCPUAdam": "DeepSpeed's CPU Adam: --offload-optimizer cpu",
}
"""The optimizer classes DeepSpeed builds for dstrain's configs, and the flag that picks each."""


def _saved_torch_adam(states: dict[str, Any]) -> bool:
    """Whether a checkpoint written before dstrain recorded its optimizer ran torch AdamW:
    its DeepSpeed config (saved in the model states) names torch_adam true."""
    config = states.get("ds_config")
    optimizer = config.get("optimizer") if isinstance(config, dict) else None
    params = optimizer.get("params") if isinstance(optimizer, dict) else None
    return isinstance(params, dict) and params.get("torch_adam") is True


def _floor(micro_batches: float) -> int:
    """Whole micro-batches of a fractional count; 0.29 x 100 is 28.999999999999996 in
    floating point and must still give 29."""
    return math.floor(micro_batches + 1e-9)


@dataclasses.dataclass
class LoopState:
    """Where the data stream and the evaluation stand. Saved in every checkpoint's
    client_state as a plain dict (`to_dict`) under "loop", restored with `from_dict`."""

    epoch: int = 0
    """The epoch being trained (its shuffle is seeded with seed + epoch)."""
    micro_in_epoch: int = 0
    """Micro-batches of `epoch` this rank has trained on; a resumed run starts after them."""
    samples_seen: int = 0
    """Sequences this rank trained on, all epochs (the summary sums over ranks)."""
    tokens_seen: int = 0
    """Positions fed to the model, pads included."""
    useful_tokens_seen: int = 0
    """Real codons fed to the model."""
    best_val_loss: float | None = None
    """Lowest finite validation loss so far (None before the first evaluation)."""
    last_val_loss: float | None = None
    """The latest evaluation's loss."""

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, saved: dict[str, Any]) -> LoopState:
        """The saved dict over the defaults (keys it lacks keep their start values)."""
        known = {f.name for f in dataclasses.fields(cls)}
        return cls(**{k: v for k, v in saved.items() if k in known})


LOOP_COUNTERS = ("samples_seen", "tokens_seen", "useful_tokens_seen")
"""The LoopState counters a checkpoint holds as whole-job figures (summed over ranks)."""


@dataclasses.dataclass
class EpochLayout:
    """How the current epoch's micro-batches are dealt when a run changed its world size
    part-way through it (`dstrain.batch_plan.consumed_after`). Saved in every checkpoint's
    client_state under "epoch_layout"; the defaults (no key: an older checkpoint) mean the
    epoch was planned for the world that runs it."""

    plan_world: int | None = None
    """Ranks the epoch's plan was made for (None: the ranks running it now)."""
    offset: int = 0
    """Micro-batches of that plan run before the ranks running it now took over."""

    @classmethod
    def from_dict(cls, saved: Any) -> EpochLayout:
        if not isinstance(saved, dict):
            return cls()
        world, offset = saved.get("plan_world"), saved.get("offset", 0)
        ok = isinstance(offset, int) and offset >= 0
        ok = ok and (world is None or (isinstance(world, int) and world >= 1))
        return cls(world, offset) if ok else cls()


@dataclasses.dataclass
class ThroughputWindow:
    """Training work on this rank since the last log row, evaluation or save."""

    loss_sum: float = 0.0
    """Sum of the micro-batch losses (the row's loss is loss_sum / micro_batches)."""
    micro_batches: int = 0
    """Micro-batches (forward + backward) in the window."""
    tokens: int = 0
    """Positions, pads included."""
    real_tokens: int = 0
    """Real codons (the `useful_tokens_per_s` column)."""
    samples: int = 0
    """Sequences (the `samples_per_s` column)."""
    started: float = dataclasses.field(default_factory=time.time)
    """time.time() when the window opened."""

    def add(self, loss: float, num_tokens: int, num_real_tokens: int, num_samples: int) -> None:
        """One micro-batch."""
        self.loss_sum += loss
        self.micro_batches += 1
        self.tokens += num_tokens
        self.real_tokens += num_real_tokens
        self.samples += num_samples

    def summed_over_ranks(self, all_reduce) -> ThroughputWindow:
        """The window of the whole job: every count summed by `all_reduce(list) -> list`
        (one collective: every rank must call it at the same step)."""
        loss, micro, tokens, real, samples = all_reduce(
            [self.loss_sum, self.micro_batches, self.tokens, self.real_tokens, self.samples]
        )
        return ThroughputWindow(
            loss, int(micro), int(tokens), int(real), int(samples), started=self.started
        )


def training_device_type() -> str:
    """The accelerator DeepSpeed will train on, as deepspeed.accelerator picks it:
    DS_ACCELERATOR when set, else `cuda` when torch sees a GPU, else `cpu`."""
    import torch

    forced = os.environ.get("DS_ACCELERATOR")
    if forced:
        return forced
    return "cuda" if torch.cuda.is_available() and torch.cuda.device_count() > 0 else "cpu"


def native_bf16() -> bool:
    """A GPU with bf16 in hardware (compute capability 8.0+). torch's plain
    `is_bf16_supported()` is also True on a V100, where it emulates bf16, slowly."""
    import torch

    return torch.cuda.is_available() and torch.cuda.is_bf16_supported(including_emulation=False)


def fused_adam_status() -> tuple[str, str | None]:
    """(how FusedAdam gets onto this machine, why it cannot or None), for
    `choose_optimizer` on a GPU: prebuilt in the DeepSpeed wheel, or JIT-built by
    DeepSpeed's op builder, which needs ninja and a CUDA toolkit (nvcc) even to load a
    cached build; torch's pip wheels bring no nvcc."""
    from deepspeed.git_version_info import installed_ops

    if installed_ops.get("fused_adam"):
        return "prebuilt in the DeepSpeed wheel", None
    from torch.utils.cpp_extension import CUDA_HOME

    root = os.environ.get("TORCH_EXTENSIONS_DIR") or "~/.cache/torch_extensions"
    how = f"JIT-built on first use, ~1 min, cached in {root}"
    if CUDA_HOME is None:
        return how, "no CUDA toolkit (nvcc) to build it; set CUDA_HOME"
    if shutil.which("ninja") is None:
        return how, "no ninja on PATH to build it (pip install ninja)"
    return how, None


def probe_fused_adam() -> str | None:
    """None when DeepSpeed's FusedAdam loads here (JIT-building it if it is not cached),
    else why not: the op builder also needs an nvcc matching torch's CUDA version, and a
    build can fail for reasons no file check sees. Probed before the model is built, so a
    failure costs a fallback to torch AdamW instead of a crash inside initialize."""
    from deepspeed.ops.op_builder import FusedAdamBuilder

    try:
        FusedAdamBuilder().load(verbose=False)
    except Exception as exc:  # any build or load failure means: not on this machine
        first = (str(exc).strip().splitlines() or [type(exc).__name__])[0]
        return f"its build failed: {first[:200]}"
    return None


def device_config(
    checked: CheckedConfig, log: Callable[[str], None] | None = None
) -> tuple[dict[str, Any], str]:
    """(the config for `deepspeed.initialize` on this machine, the optimizer it builds):
    `choose_optimizer` given this machine's device, after refusing bf16 on a GPU that
    only emulates it. On a GPU, a FusedAdam that is not prebuilt is built (or loaded from
    the cache) here, announced through `log` first."""
    from dstrain.ds_run import check_device_precision, choose_optimizer

    device = training_device_type()
    check_device_precision(
        checked.run, device, native_bf16=device != "cuda" or native_bf16(), source=checked.source
    )
    if device == "cpu":
        return choose_optimizer(checked.config, device)
    how, problem = fused_adam_status()
    _, planned = choose_optimizer(
        checked.config, device, fused_adam=how, fused_adam_problem=problem
    )
    if problem is None and planned.startswith("FusedAdam") and "JIT" in how:
        if log is not None:
            log(f"FusedAdam: loading DeepSpeed's op ({how}) ...")
        problem = probe_fused_adam()
    return choose_optimizer(checked.config, device, fused_adam=how, fused_adam_problem=problem)


def device_line(engine, precision: str, optimizer: str) -> str:
    """The banner's line of per-device choices: `device cuda:0 (NVIDIA H100 80GB HBM3) |
    bf16 | FusedAdam (...) | attention sdpa`."""
    import torch

    device = str(engine.device)
    if engine.device.type == "cuda":
        device += f" ({torch.cuda.get_device_name(engine.device)})"
    attention = getattr(engine.module.config, "_attn_implementation", None) or "default"
    return f"device {device} | {precision} | {optimizer} | attention {attention}"


def check_zero_init(settings: TrainSettings, checked: CheckedConfig) -> None:
    """--zero-init only with ZeRO stage 3 (checked before the data is prepared, and again
    by `build_engine` for its other callers)."""
    stage = checked.run.zero.stage
    if settings.zero_init and stage != 3:
        raise same_on_all_ranks(
            DstrainError(
                f"--zero-init (zero_init) needs ZeRO stage 3, but {checked.source} asks for "
                f"stage {stage}: deepspeed.zero.Init partitions parameters the way only "
                "stage 3 trains them. Drop --zero-init, or train with stage 3 (--zero 3, or "
                "zero_optimization.stage 3 in the JSON)."
            )
        )


def build_engine(
    arch,
    settings: TrainSettings,
    checked: CheckedConfig,
    log: Callable[[str], None] | None = None,
):
    """(the model (random or --init-checkpoint weights, SDPA attention) wrapped by
    `deepspeed.initialize` with the config `device_config` makes for this machine, the
    optimizer it built in words).

    Under ZeRO stage 3 (unless `settings.zero_init` is False) the model is built inside
    `deepspeed.zero.Init` with that config and loads --init-checkpoint module by module,
    so no rank holds it whole; the weights equal the plain build's for the same seed."""
    import deepspeed
    import torch

    from dstrain.model import build_model, load_init_checkpoint

    run = checked.run
    check_zero_init(settings, checked)
    # Refuses emulated bf16 before anything is built; CPU: torch AdamW for an auto block.
    config, optimizer = device_config(checked, log)
    config = json.loads(json.dumps(config))  # plain dicts (see deepspeed.initialize below)
    zero_init = run.zero.stage == 3 and settings.zero_init is not False
    torch.manual_seed(settings.seed)
    model = build_model(arch, attn_implementation="sdpa", zero_init=config if zero_init else None)
    if settings.init_checkpoint:
        load_init_checkpoint(
            model, settings.init_checkpoint, trust_checkpoint=settings.trust_checkpoint
        )
    model.config.use_cache = False
    if run.activation_checkpointing.enabled:
        # The block asks for recomputation; DeepSpeed's own checkpointing API serves
        # Megatron-style models, so GPT-NeoX recomputes its layers through HF's switch.
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    groups = param_groups(model, run.optimizer.weight_decay)
    try:
        engine, *_ = deepspeed.initialize(
            # Plain dicts (ds_check's duplicate-key-tracking dict subclass is not one):
            # DeepSpeed pickles this config into every checkpoint, which must load with
            # torch.load(weights_only=True) (dstrain.checkpoints.checkpoint_globals).
            model=model,
            model_parameters=groups,
            config=json.loads(json.dumps(config)),
        )
    except ValueError as exc:
        if "not supported on your device" not in str(exc):
            raise
        raise DstrainError(
            f"{run.precision} is not supported on this device ({exc}). fp16 needs a "
            "GPU; on CPU use bf16 or fp32 (dstrain gen-config --bf16 / --fp32)."
        ) from None
    align_lr_schedule(engine)  # a resume then loads the checkpoint's position over it
    return engine, optimizer


class Trainer:
    """One run around one DeepSpeed engine. `__init__` builds all of it (run files, data,
    engine, plan, resume point, banner, telemetry), so every attribute exists once it
    returns; `fit` runs the loop and the finish."""

    def __init__(
        self,
        settings: TrainSettings,
        checked: CheckedConfig,
        config_source: str,
        arch,
        stop: StopRequest,
        watchdog: Watchdog | None = None,
    ):
        import deepspeed.comm as dist

        from dstrain.batch_plan import check_budget, counts_vary
        from dstrain.batching import CodonCollator, CodonDataset, PackedCollator
        from dstrain.prepare import BATCH_TIME_FIELDS

        self.settings, self.checked, self.config_source = settings, checked, config_source
        self.run = checked.run  # the only reading of the DeepSpeed JSON (dstrain.ds_run)
        self.arch, self.stop, self.dist = arch, stop, dist
        self.watchdog = watchdog or Watchdog(0, 1, 0.0)  # an inert one
        self.precision = self.run.precision
        self.rank, self.world = dist.get_rank(), dist.get_world_size()
        self.log = RankZeroLog(self.rank)
        self.output_dir = Path(settings.output_dir)
        self.ckpt_dir = self.output_dir / "checkpoints"

        # Data: rank 0 tokenizes (or reuses the cache), every rank opens it.
        self.prepared, self.sources, self.cache_dir = load_data(
            settings, self.output_dir, self.rank, dist
        )
        # padding, loss_on_pad and batching act at batch time: this run's flags, not the cache's.
        self.data_settings = self.prepared.settings.model_copy(
            update={name: getattr(settings.data, name) for name in BATCH_TIME_FIELDS}
        )
        self.train_set = CodonDataset(self.prepared.train)
        self.val_set = CodonDataset(self.prepared.val)
        self.lengths = self.train_set.lengths()
        data = self.data_settings
        try:  # a budget that cannot hold the longest example: before any model is built
            check_budget(
                self.lengths,
                mode=data.batching,
                tokens_per_micro_batch=data.tokens_per_micro_batch,
                max_length=data.max_length,
                padding=data.padding,
            )
        except DstrainError as exc:
            raise same_on_all_ranks(exc) from None
        self.collate = CodonCollator.from_settings(self.data_settings)
        # Packed rows (several examples each) go through PackedCollator; other rows hold one.
        self.pack = PackedCollator.from_settings(data) if data.batching == "packed" else None
        self._epoch_plan: tuple[int, Any] | None = None
        # --loss-on-pad also reports upstream's pad-included validation loss, which pads
        # every example to max_length (the masked loss is the same at any padding).
        self.eval_collate = (
            CodonCollator.from_settings(
                self.data_settings.model_copy(update={"padding": "max_length"})
            )
            if self.data_settings.loss_on_pad
            else self.collate
        )

        # Model, engine, and the plan from the engine's batch layout.
        self.engine, self.optimizer_text = build_engine(arch, settings, checked, self.log)
        self.micro = self.engine.train_micro_batch_size_per_gpu()
        self.accum = self.engine.gradient_accumulation_steps()
        try:
            first = self.epoch_plan(0)
            if data.batching == "random" and data.tokens_per_micro_batch is None:
                epoch_micro = None  # DistributedSampler's arithmetic, as always
            elif counts_vary(data.batching, data.tokens_per_micro_batch):
                epoch_micro = self.micro_per_epoch
            else:
                epoch_micro = lambda _epoch: first.micro_per_rank  # noqa: E731
            self.plan = plan_run(
                len(self.train_set),
                world=self.world,
                micro=self.micro,
                accum=self.accum,
                epochs=settings.epochs,
                max_steps=settings.max_steps,
                epoch_micro=epoch_micro,
            )
        except DstrainError as exc:
            raise same_on_all_ranks(exc) from None

        # Resume point: loads the checkpoint into the engine, returns the loop state.
        self.layout = EpochLayout()  # a resume on another world size sets it
        self.resume_lines: list[str] = []  # logged at resume: a conversion, a new layout
        self.loop, self.start_step = self._resume()
        self.last_eval_step: int | None = None
        # Only now: a refused resume must leave the run's settings.json as it was.
        self._write_run_files()

        self.estimate = estimate_run_memory(
            arch, self.run, self.world, *self._activation_shape(), zero_init=settings.zero_init
        )
        self._banner()

        # Telemetry: the fp16 guard, the throughput window, metrics.jsonl, the bar.
        self.guard = Fp16Guard(
            settings.skip_window, settings.max_skipped_share, self.run.fp16.min_loss_scale
        )
        self.skipped_seen = self.engine.skipped_steps
        self.start_time = time.time()
        self.window = ThroughputWindow()
        self.metrics = self._open_metrics()
        self.bar = self._open_progress_bar()
        self.log.bar = self.bar

    # -- fit ------------------------------------------------------------------------------

    def fit(self) -> int:
        """The loop, then the finish (or, after SIGTERM/SIGINT, a save and exit 0)."""
        try:
            stopped_by = self.train_loop()
        finally:
            if self.bar is not None:
                self.bar.close()
                self.log.bar = None
        if stopped_by:
            self.watchdog.enter("stopping")
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

    # -- building (called from __init__ only) ----------------------------------------------

    def _write_run_files(self) -> None:
        if self.rank == 0:
            write_text_atomic(
                self.output_dir / "ds_config.json", render_ds_config(dict(self.checked.config))
            )
            write_text_atomic(
                self.output_dir / "settings.json", self.settings.model_dump_json(indent=2) + "\n"
            )

    def _resume(self) -> tuple[LoopState, int]:
        """Rank 0 picks the checkpoint (or none) and checks it; all ranks agree, then load
        it. Returns the loop state and the step the run starts from."""
        from dstrain.checkpoints import (
            load_run_checkpoint,
            remove_stale_staging,
            repair_index,
            restore_rng_state,
            restore_universal_param_groups,
        )

        where, failure, load = None, None, None
        ready = f"dstrain/resume-point/{self.output_dir.resolve()}"
        if self.rank == 0:
            try:
                where, notes, damaged = self._resume_point()
                saved_world = self.world
                if where is not None:
                    saved_world = self._check_resume_compatible(*where)
                # Only a run that goes ahead tidies its checkpoints (before its first save):
                # leftovers of a killed save or conversion, a damaged checkpoints.json rebuilt.
                notes += remove_stale_staging(self.ckpt_dir)
                notes.append(repair_index(self.ckpt_dir, drop=damaged))
                for note in filter(None, notes):
                    self.log(f"note: {note}")
                if where is not None:
                    load = self._load_point(*where, saved_world)
            except DstrainError as exc:
                failure = str(exc)
            except OSError as exc:  # every rank must hear of it, or the others would wait
                failure = f"cannot use {exc.filename}: {exc.strerror or exc}"
            finally:
                if self.world > 1:
                    rank_zero_done(ready)
        elif self.world > 1:  # a conversion may outlast the collectives' timeout
            wait_for_rank_zero(ready)
        all_ranks_agree(self.dist, failure)
        decision = [where, load]
        self.dist.broadcast_object_list(decision, src=0)
        if decision[0] is None:
            return LoopState(), 0
        (ckpt_dir, tag), (load_dir, load_tag, universal, saved_world) = decision
        # A universal checkpoint loads through DeepSpeed's `checkpoint.load_universal`, a
        # flag it reads only while loading: set for this one load (build_engine's config
        # stays the run's own, so later saves and loads are the ordinary kind).
        config = self.engine._config
        config.load_universal_checkpoint, plain = universal, config.load_universal_checkpoint
        try:
            client = load_run_checkpoint(self.engine, load_dir, load_tag).get("dstrain", {})
        finally:
            config.load_universal_checkpoint = plain
        if universal:
            try:
                restore_universal_param_groups(self.engine, load_dir / load_tag)
            except DstrainError as exc:
                raise same_on_all_ranks(exc) from None
        sync_lr_to_schedule(self.engine)  # the saved position, not advanced again
        saved_loop = client.get("loop", {})
        loop = LoopState.from_dict(saved_loop)
        # Counters come back as whole-job figures, carried by rank 0 (the summary sums
        # over ranks); checkpoints before that held rank 0's own count.
        scale = 1 if saved_loop.get("counters") == "global" else saved_world
        for name in LOOP_COUNTERS:
            setattr(loop, name, getattr(loop, name) * scale if self.rank == 0 else 0)
        self.layout = EpochLayout.from_dict(client.get("epoch_layout"))
        if saved_world != self.world:
            self._reshape_position(loop, saved_world)
        saved_rngs = client.get("rng", {})
        rng = saved_rngs.get(str(self.rank))
        if rng is not None:
            restore_rng_state(rng)
        fresh = [r for r in range(self.world) if str(r) not in saved_rngs]
        if fresh and saved_rngs:
            self.resume_lines.append(
                f"rank(s) {', '.join(map(str, fresh))} had no saved RNG state and start from "
                f"the seed ({self.settings.seed}); dropout is off in GenSLM configs, so this "
                "changes no result"
            )
        start_step = self.engine.global_steps
        self._truncate_metrics(start_step)
        self.log(f"resumed from {ckpt_dir / tag} at step {start_step}")  # details: the banner
        if start_step >= self.plan.total_steps:
            self.log(
                f"the checkpoint is already at step {start_step}, the planned end "
                f"({self.plan.total_steps}): nothing to train. Pass --max-steps to go further."
            )
        return loop, start_step

    def _resume_point(self):
        """Rank 0: ((ckpt_dir, tag) or None, notes for the log, damaged tags passed over).
        Every tag is verified (`dstrain.checkpoints.verify_checkpoint`) before it is read;
        only `--resume auto` falls back past a damaged one."""
        from dstrain.checkpoints import (
            DamagedCheckpoint,
            find_resume_checkpoint,
            read_latest,
            resolve_checkpoint,
            tag_dirs,
            verify_checkpoint,
        )

        trust = self.settings.trust_checkpoint
        if self.settings.resume == "auto":
            found = find_resume_checkpoint(self.ckpt_dir, trust=trust)
            if found is None:
                return None, [], ()
            ckpt_dir, tag, notes, damaged = found
            return (ckpt_dir, tag), notes, damaged
        if self.settings.resume:
            ckpt_dir, tag = resolve_checkpoint(self.settings.resume)
            try:
                verify_checkpoint(ckpt_dir, tag, trust=trust)
            except DamagedCheckpoint as exc:
                raise DstrainError(
                    f"{exc} --resume {self.settings.resume} names this checkpoint, so there is "
                    "no fallback: name another step directory, or use --resume auto (the "
                    "newest intact checkpoint of --output-dir)."
                ) from None
            return (ckpt_dir, tag), [], ()
        # Without --resume: any trace of a run (even a damaged `latest`) is kept as it is.
        latest, problem = read_latest(self.ckpt_dir)
        if latest or problem or tag_dirs(self.ckpt_dir):
            raise DstrainError(
                f"{self.ckpt_dir} already holds a run (latest checkpoint "
                f"{latest if latest and not problem else 'damaged: ' + str(problem)}). Continue "
                "it with --resume auto, or start afresh in a new --output-dir."
            )
        return None, [], ()

    def _check_resume_compatible(self, ckpt_dir: Path, tag: str) -> int:
        """The checkpoint must come from the same model, data, seed and batch layout (on
        another world size: the same micro batch and sequences per step). Returns the
        world size that wrote it."""
        from dstrain.checkpoints import read_model_states

        trust = self.settings.trust_checkpoint
        states = read_model_states(ckpt_dir, tag, trust=trust)
        saved = states.get("dstrain") or {}
        now = self.run_identity()
        if isinstance(saved.get("architecture"), dict):
            # Architecture fields added since the checkpoint was written (e.g. dropout)
            # compare at their defaults, so older checkpoints still resume.
            defaults = {
                f.name: f.default
                for f in dataclasses.fields(self.arch)
                if f.default is not dataclasses.MISSING
            }
            saved = {**saved, "architecture": {**defaults, **saved["architecture"]}}
        if isinstance(saved.get("data_settings"), dict):
            # Data fields added since (e.g. min_orf_codons, strands) compare at their defaults.
            from dstrain.prepare import BATCH_TIME_FIELDS
            from dstrain.settings import DataSettings

            defaults = DataSettings().model_dump(exclude=set(BATCH_TIME_FIELDS))
            saved = {**saved, "data_settings": {**defaults, **saved["data_settings"]}}
        if "data_settings" in saved and "batching" not in saved:  # written before --batching
            saved = {**saved, "batching": {"mode": "random", "tokens_per_micro_batch": None}}
        if "optimizer" not in saved and _saved_torch_adam(states):  # before the optimizer key
            saved = {**saved, "optimizer": "AdamW"}
        saved_batch = saved.get("batch")
        saved_world = self.world
        if isinstance(saved_batch, dict) and isinstance(saved_batch.get("world"), int):
            saved_world = saved_batch["world"]
        if saved_world != self.world:  # checked below, once the rest agrees
            saved = {k: v for k, v in saved.items() if k != "batch"}
        diffs = [
            f"{key}: checkpoint {saved.get(key)!r}, now {value!r}"
            for key, value in now.items()
            if key in saved and saved[key] != value
        ]
        fixes = []
        if "batching" in saved and saved["batching"] != now["batching"]:
            fixes.append("--batching, --tokens-per-micro-batch and --padding as the checkpoint has")
        if "optimizer" in saved and saved["optimizer"] != now["optimizer"]:
            # torch AdamW's state lacks FusedAdam's param-group keys: loading it would crash.
            flag = OPTIMIZER_FLAGS.get(saved["optimizer"], saved["optimizer"])
            fixes.append(f"the checkpoint's optimizer, {flag}; in a config file optimizer.params")
        if diffs:
            raise DstrainError(
                f"cannot resume from {ckpt_dir / tag}: it was written by a different run "
                f"({'; '.join(diffs)}). Resume with the same settings"
                + (f" ({'; '.join(fixes)})" if fixes else "")
                + ", or start a new --output-dir (use --init-checkpoint with an export to keep "
                "the weights)."
            )
        if saved_world != self.world:
            problem = self._layout_problem(saved_batch)
            if problem:
                raise DstrainError(f"cannot resume from {ckpt_dir / tag} {problem}")
        return saved_world

    def _layout_problem(self, saved: dict[str, Any]) -> str | None:
        """Why a checkpoint's batch layout cannot go on at this world size (None: it can).
        Another world size must keep the micro batch (the data is cut into micro-batches
        by it, and by the token budget, which the batching identity keeps) and the
        micro-batches per optimizer step, so that a step, the learning-rate schedule and
        the data position mean what they meant."""
        micro, accum, world = (saved.get(k) for k in ("micro", "accum", "world"))
        if not all(isinstance(v, int) and v >= 1 for v in (micro, accum, world)):
            return f"on another world size: its batch record {saved!r} is damaged."
        budget = self.data_settings.tokens_per_micro_batch

        def layout(w: int, m: int, a: int) -> str:
            if budget is None:
                unit = "rows" if self.data_settings.batching == "packed" else "sequences"
                count = f"{w * m * a} {unit}"
            else:
                count = f"{w * a} micro-batches of at most {budget:,} tokens"
            return f"{w} rank{'s' if w != 1 else ''} x micro {m} x accumulation {a} = {count}"

        now = layout(self.world, self.micro, self.accum)
        same_micro = micro == self.micro
        if same_micro and accum * world == self.accum * self.world:
            return None
        per_step = accum * world  # micro-batches per optimizer step
        if per_step % self.world == 0:
            fix = (
                f"keep the micro batch ({micro}; micro-batches are cut from the data by it) "
                f"and pass --grad-accum {per_step // self.world} "
                "(in a config file: train_micro_batch_size_per_gpu and "
                "gradient_accumulation_steps)"
            )
        else:
            divisors = [n for n in range(1, per_step + 1) if per_step % n == 0]
            fix = (
                f"no accumulation gives {per_step} micro-batches per step on {self.world} "
                f"ranks: resume on a number of ranks that divides {per_step} "
                f"({', '.join(map(str, divisors))}) with micro {micro}"
            )
        return (
            f"with this batch layout. checkpoint: {layout(world, micro, accum)} per step; "
            f"now: {now} per step. A resume on another number of ranks keeps the micro "
            "batch and the size of a step (so that the step count, the learning-rate "
            f"schedule and the data position mean what they meant): {fix}; or start a new "
            "--output-dir (--init-checkpoint with an export keeps the weights)."
        )

    def _load_point(self, ckpt_dir: Path, tag: str, saved_world: int):
        """Rank 0: (directory, tag, universal, saved world) to load. A checkpoint of this
        world size loads as it is; of another one, ZeRO-0 loads as it is too (every rank
        saved the whole optimizer state, in one file), ZeRO 1-3 through DeepSpeed's
        universal checkpoint, converted once and kept beside the tag."""
        from dstrain.checkpoints import universal_checkpoint

        if saved_world == self.world:
            return ckpt_dir, tag, False, saved_world
        ranks = f"{self.world} rank{'s' if self.world != 1 else ''}"
        if self.engine.zero_optimization_stage() == 0:
            self.resume_lines.append(
                f"checkpoint {tag} was written by {saved_world} ranks, resuming on {ranks} "
                "(ZeRO-0 keeps the whole optimizer state in one file: no conversion)"
            )
            return ckpt_dir, tag, False, saved_world
        # The other ranks wait in wait_for_rank_zero (setup: a long phase for the watchdog).
        self.log(
            f"checkpoint {tag} was written by {saved_world} ranks: preparing its universal copy "
            f"(a conversion takes minutes for billions of parameters; `dstrain checkpoint "
            f"reshape {ckpt_dir / tag}` does it ahead of time)"
        )
        path, made = universal_checkpoint(ckpt_dir, tag, trust=self.settings.trust_checkpoint)
        self.resume_lines.append(
            f"checkpoint {tag} was written by {saved_world} ranks, "
            f"{'converted' if made else 'already converted'} to a universal checkpoint at "
            f"{path}, resuming on {ranks}"
        )
        return path.parent, path.name, True, saved_world

    def _reshape_position(self, loop: LoopState, saved_world: int) -> None:
        """Every rank: the data position of a checkpoint written by `saved_world` ranks,
        on this world size. The epoch keeps the plan it was laid out with; its
        micro-batches that the old ranks had not reached go round-robin to these ranks,
        and the next epoch is planned for them (`dstrain.batch_plan.consumed_after`)."""
        from dstrain.batch_plan import consumed_after

        plan_world = self.layout.plan_world or saved_world
        plan = self._plan_epoch(loop.epoch, world=plan_world)
        total = plan.num_real_micro_batches
        offset = min(self.layout.offset, total)
        offset = consumed_after(total, offset, saved_world, loop.micro_in_epoch)
        self.layout = EpochLayout(plan_world, offset)
        loop.micro_in_epoch = 0
        self.resume_lines.append(
            f"data: epoch {loop.epoch} goes on after {offset} of its {total} micro-batches "
            f"(planned for {plan_world} rank(s)), the rest dealt over {self.world}; later "
            f"epochs are planned for {self.world}"
        )

    def run_identity(self) -> dict[str, Any]:
        """What a resumed run must share with the run that saved the checkpoint."""
        from dstrain.prepare import BATCH_TIME_FIELDS

        return {
            "architecture": self.arch.to_dict(),
            "seed": self.settings.seed,
            "data_settings": self.data_settings.model_dump(exclude=set(BATCH_TIME_FIELDS)),
            "batching": self._batching_identity(),
            "optimizer": type(self.engine.basic_optimizer).__name__,
            "source_sha256": [src.get("sha256") for src in self.prepared.manifest["sources"]],
            "batch": {"micro": self.micro, "accum": self.accum, "world": self.world},
            "zero_stage": self.engine.zero_optimization_stage(),
            "precision": self.precision,
        }

    def _batching_identity(self) -> dict[str, Any]:
        """What fixes the batch plan: mode and budget, and with a budget the padding (it
        decides how a budget cuts). Another plan would move every saved data position."""
        data = self.data_settings
        identity = {"mode": data.batching, "tokens_per_micro_batch": data.tokens_per_micro_batch}
        if data.tokens_per_micro_batch is not None:
            identity["padding"] = data.padding
        return identity

    def _truncate_metrics(self, step: int) -> None:
        """Drop metric rows past the resumed step (written before a crash)."""
        path = self.output_dir / "metrics.jsonl"
        if self.rank != 0 or not path.exists():
            return
        from dstrain.inputs import read_regular_bytes

        raw = read_regular_bytes(path, "metrics file", 2 * 2**30)  # never a FIFO: no hang
        lines = raw.decode("utf-8", errors="replace").splitlines()
        kept = [line for line in lines if _row_step(line) <= step]
        if len(kept) != len(lines):
            write_text_atomic(path, "".join(line + "\n" for line in kept))

    def _activation_shape(self) -> tuple[int, int]:
        """(tokens in the widest row, rows of a micro-batch that wide): what the activation
        estimate needs. With a token budget a micro-batch holds up to budget tokens, in rows
        as wide as the widest or in more, shorter ones: estimated as ceil(budget / widest)
        rows of the widest row (at least the budget's tokens, and the longest attention)."""
        data = self.data_settings
        if data.padding == "max_length" or data.batching == "packed":
            longest = data.max_length
        else:
            longest = int(self.lengths.max())
        budget = data.tokens_per_micro_batch
        return longest, self.micro if budget is None else math.ceil(budget / longest)

    # -- the batch plan -------------------------------------------------------------------

    def _plan_epoch(self, epoch: int, world: int | None = None):
        return plan_train_epoch(
            self.lengths,
            self.data_settings,
            micro=self.micro,
            epoch=epoch,
            seed=self.settings.seed,
            world=world or self.world,
        )

    def epoch_share(self, epoch: int):
        """This rank's micro-batches of `epoch`: its share of the epoch's plan, or after a
        resume on another world size part-way through it, its share of the rest of the
        plan the epoch was laid out with (`self.layout`)."""
        layout = self.layout
        if (layout.plan_world or self.world) == self.world and not layout.offset:
            return self.epoch_plan(epoch).share(self.rank)
        plan = self._plan_epoch(epoch, world=layout.plan_world)
        offset = min(layout.offset, plan.num_real_micro_batches)
        return plan.share(self.rank, world=self.world, offset=offset)

    def epoch_plan(self, epoch: int):
        """The EpochPlan of `epoch` (the latest one is kept: the loop asks once per epoch)."""
        if self._epoch_plan is None or self._epoch_plan[0] != epoch:
            self._epoch_plan = (epoch, self._plan_epoch(epoch))
        return self._epoch_plan[1]

    def micro_per_epoch(self, epoch: int) -> int:
        """Micro-batches per rank of `epoch` (planned, not kept: the run plan asks for many)."""
        if self._epoch_plan is not None and self._epoch_plan[0] == epoch:
            return self._epoch_plan[1].micro_per_rank
        return self._plan_epoch(epoch).micro_per_rank

    def collate_rows(self, rows: list[list[int]]) -> dict[str, Any]:
        """A planned micro-batch (rows of example indices) as model inputs."""
        if self.pack is not None:
            return self.pack([[self.train_set[i] for i in row] for row in rows])
        return self.collate([self.train_set[i] for row in rows for i in row])

    def _banner(self) -> None:
        from dstrain.memory import format_run_banner

        log, arch, engine, prepared = self.log, self.arch, self.engine, self.prepared
        seq_per_step = self.micro * self.accum * self.world
        mean_len = prepared.train.num_tokens / max(1, len(prepared.train))
        log(
            f"dstrain | {arch.name} ({arch.num_params():,} params) | {self.run.describe()} | "
            f"world size {self.world} | device {engine.device}"
        )
        log(f"  config: {self.config_source}")
        log(f"  {device_line(engine, self.precision, self.optimizer_text)}")
        if self.run.zero.stage == 3 and self.settings.zero_init is not False:
            log("  model: built under deepspeed.zero.Init (each rank holds its partitions only)")
        for line in self.resume_lines:  # a conversion, a new layout, fresh RNG states
            log(f"  resume: {line}")
        for note in self.run.notes:
            log(f"  config note: {note}")
        built = engine_run_mismatch(engine, self.run)
        if built:  # ds_run mirrors DeepSpeed's parser; a new DeepSpeed may read differently
            log(f"  warning: the engine differs from the config as dstrain read it: {built}")
        log(
            f"  data: {len(self.train_set)} train / {len(self.val_set)} val examples "
            f"({prepared.train.num_tokens:,} train codons, mean {mean_len:.0f}) from "
            f"{len(self.sources)} file(s); cache {self.cache_dir}"
            f"{' (reused)' if prepared.reused else ''}"
        )
        if len(self.val_set) == 0:
            log("  no validation examples (--val-fraction or too few records): no evaluation")
        data, first = self.data_settings, self.epoch_plan(0)
        if data.batching == "random" and data.tokens_per_micro_batch is None:
            micro = f"{self.micro} micro"
            per_step = f"{seq_per_step} sequences = ~{seq_per_step * mean_len:,.0f} codons"
        else:  # the plan sizes the micro-batches: epoch 0's mean
            micro = "planned micro"
            codons = first.num_tokens / first.num_micro_batches * self.accum * self.world
            per_step = f"~{codons:,.0f} codons (epoch 0's mean)"
        log(
            f"  batch: {micro} x {self.accum} accum x {self.world} ranks = {per_step} per "
            f"step; padding {data.padding}{', loss on pads' if data.loss_on_pad else ''}"
        )
        log(f"  {self._batching_line()}")
        plan = self.plan
        tail = (
            f"; the last {plan.unused_tail} micro-batch(es) of the final epoch make a "
            "partial accumulation window and are not used"
            if plan.unused_tail
            else ""
        )
        log(
            f"  steps: {engine.global_steps} -> {plan.total_steps} ({plan.micro_per_epoch} "
            f"micro-batches per epoch per rank{tail})"
        )
        lr_warning = self._zero_lr_warning()
        if lr_warning:
            log(f"  warning: {lr_warning}")
        for line in format_run_banner(self.estimate).splitlines():
            log(f"  {line}")
        log(f"  watchdog: {self.watchdog.describe()}")
        log(f"  outputs: {self.output_dir}")

    def _batching_line(self) -> str:
        """The banner's batching line: mode, budget or count, and epoch 0's plan."""
        data, first = self.data_settings, self.epoch_plan(0)
        unit = "rows" if data.batching == "packed" else "sequences"
        size = (
            f"micro-batches of at most {data.tokens_per_micro_batch:,} tokens (rows x longest row)"
            if data.tokens_per_micro_batch
            else f"{self.micro} {unit} per micro-batch"
        )
        how = {
            "random": "random",
            "grouped": "grouped by length",
            "packed": f"packed into rows of {data.max_length:,} codons",
        }[data.batching]
        repeats = ""
        if first.repeated_micro_batches:
            repeats = (
                f"; its first {first.repeated_micro_batches} micro-batch(es) "
                f"({first.repeated_examples} examples) run again at the end so that every rank "
                f"runs {first.micro_per_rank}"
            )
        elif first.repeated_examples:
            repeats = f"; {first.repeated_examples} example(s) repeated to fill every rank's share"
        return (
            f"batching: {how}, {size}; epoch 0: {first.micro_per_rank} micro-batches per rank, "
            f"{first.useful_share:.1%} of positions are codons{repeats}"
        )

    def _zero_lr_warning(self) -> str:
        """A warm-up schedule that runs the first or the last step of this run at lr 0
        (such a step leaves the weights as they are): a warning, as the config may mean
        it. "" when both rates are above 0, or for other schedules."""
        first, last = self.engine.global_steps + 1, self.plan.total_steps

        def at_zero(step: int) -> bool:
            return scheduled_lr(self.engine, step - first) == 0  # None: another schedule

        zero = []
        if first <= last and at_zero(first):
            zero.append(f"step {first}")
        if first < last and at_zero(last):
            low, high = first, last  # the rates rise, hold, then fall: find where 0 begins
            while high - low > 1:
                middle = (low + high) // 2
                low, high = (low, middle) if at_zero(middle) else (middle, high)
            zero.append(f"step {last}" if high == last else f"steps {high}-{last}")
        if not zero:
            return ""
        params = self.run.scheduler.params
        total = params.get("total_num_steps")
        if isinstance(total, int | float) and total < last:
            where = (
                f"scheduler.params.total_num_steps in {self.settings.deepspeed_config}"
                if self.settings.deepspeed_config
                else "--total-steps"
            )
            advice = (
                f"its total_num_steps ({total:g}) ends before this run (step {last}): set "
                f"it to {last} ({where})"
            )
        elif self.run.scheduler.type == "WarmupCosineLR":
            advice = "raise cos_min_ratio (the floor the last step runs at) or the optimizer lr"
        else:
            advice = "raise warmup_max_lr (or the optimizer lr)"
        return (
            f"the {self.run.scheduler.type} schedule gives lr 0 at {' and '.join(zero)}, "
            f"where the weights would not change; {advice}"
        )

    def _open_metrics(self):
        """Rank 0: metrics.jsonl, appended to on resume (a fresh run starts a fresh file)."""
        if self.rank != 0:
            return None
        mode = "a" if self.start_step else "w"
        return open(self.output_dir / "metrics.jsonl", mode, encoding="utf-8")  # closed by finish

    def _open_progress_bar(self):
        """Rank 0 with --progress: a tqdm bar on stderr, one tick per optimizer step."""
        if self.rank != 0 or not self.settings.progress:
            return None
        from tqdm import tqdm

        return tqdm(
            total=self.plan.total_steps,
            initial=self.engine.global_steps,
            unit="step",
            dynamic_ncols=True,
            file=sys.stderr,
        )

    # -- telemetry -------------------------------------------------------------------------

    def close_telemetry(self) -> None:
        if self.metrics is not None:
            self.metrics.close()
            self.metrics = None

    def restart_window(self) -> None:
        """Start a new throughput window (after a log row, an evaluation or a save)."""
        self.window = ThroughputWindow()

    def write_row(self, row: dict[str, Any]) -> None:
        if self.metrics is not None:
            clean = {k: finite_or_none(v) if isinstance(v, float) else v for k, v in row.items()}
            self.metrics.write(json.dumps(clean, allow_nan=False) + "\n")
            self.metrics.flush()
            self.write_monitor_events(clean)

    def write_monitor_events(self, row: dict[str, Any]) -> None:
        """Rank 0: a metrics row's numbers to DeepSpeed's enabled monitors (tensorboard,
        csv, wandb, comet) as `Train/Samples/<key>`. DeepSpeed 0.19.8's own engine sends
        them only lr, the loss scale and timings, never the loss. The x value is the
        engine's sample count, as for DeepSpeed's own events (Comet's
        samples_log_interval counts it too)."""
        monitor = getattr(self.engine, "monitor", None)
        if monitor is None or not monitor.enabled:
            return
        own = ("step", "lr", "loss_scale")  # the x axis, and what DeepSpeed writes itself
        events = [
            (f"Train/Samples/{key}", value, self.engine.global_samples)
            for key, value in row.items()
            if key not in own and isinstance(value, int | float) and not isinstance(value, bool)
        ]
        monitor.write_events(events)

    def all_reduce(self, values: list[float], op=None) -> list[float]:
        """Sum (or `op`) floats over ranks, on the engine's device (NCCL needs CUDA)."""
        import torch

        tensor = torch.tensor(values, dtype=torch.float64, device=self.engine.device)
        self.dist.all_reduce(tensor, op=op or self.dist.ReduceOp.SUM)
        return tensor.tolist()

    def log_step(self, epoch_pos: float, lr: float) -> None:
        """After each optimizer step: the fp16 guard, and every log_every steps a metrics
        row; `lr` is the rate the optimizer applied in the step, read before it (for a
        skipped fp16 step, the rate it would have applied, and the next one applies)."""
        import torch

        engine, step = self.engine, self.engine.global_steps
        skipped_now = engine.skipped_steps > self.skipped_seen
        self.skipped_seen = engine.skipped_steps
        scale = current_loss_scale(engine, self.precision)
        if skipped_now:
            self.log(f"step {step}: gradient overflow, step skipped; loss scale now {scale}")
        self.guard.check(step, skipped_now, scale)
        if step % self.settings.log_every == 0 or step == self.plan.total_steps:
            window = self.window.summed_over_ranks(self.all_reduce)
            elapsed = max(time.time() - window.started, 1e-9)
            grad_norm = engine.get_global_grad_norm()
            row = {
                "step": step,
                "epoch": round(epoch_pos, 4),
                "loss": window.loss_sum / max(window.micro_batches, 1),
                "lr": lr,
                "loss_scale": scale,
                "skipped_steps": engine.skipped_steps,
                "grad_norm": float(grad_norm) if grad_norm is not None else None,
                "samples_per_s": window.samples / elapsed,
                "useful_tokens_per_s": window.real_tokens / elapsed,
                "tokens_per_s": window.tokens / elapsed,
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
        """Micro-batches until the planned step; returns the signal name if one stopped it."""
        from dstrain.batching import count_tokens

        engine, loop = self.engine, self.loop
        total_steps = self.plan.total_steps
        if self.stop_requested():
            return self.stop.signal_name or "a signal on another rank"
        engine.train()
        self.watchdog.enter("first step")  # JIT builds and warm-up: a long phase
        try:
            while engine.global_steps < total_steps:
                batches = self.epoch_share(loop.epoch)
                # The share of the epoch run before (a resume on another world size).
                before = batches.offset / max(batches.plan.num_real_micro_batches, 1)
                for index in range(loop.micro_in_epoch, len(batches)):
                    rows = batches[index]
                    batch = self.collate_rows(rows)
                    counts = count_tokens(batch)
                    batch = {k: v.to(engine.device) for k, v in batch.items()}
                    loss = engine(**batch, use_cache=False).loss
                    engine.backward(loss)
                    boundary = engine.is_gradient_accumulation_boundary()  # ask before step()
                    if boundary:  # the rate this step applies (step() moves the schedule on)
                        step_lr = float(engine.get_lr()[0])
                    engine.step()
                    self.watchdog.micro_done()
                    num_samples = sum(map(len, rows))
                    self.window.add(
                        loss.item(), counts.num_tokens, counts.num_real_tokens, num_samples
                    )
                    loop.micro_in_epoch = index + 1
                    loop.samples_seen += num_samples
                    loop.tokens_seen += counts.num_tokens
                    loop.useful_tokens_seen += counts.num_real_tokens
                    if not boundary:
                        continue
                    self.watchdog.step_done(engine.global_steps)
                    done = before + (1 - before) * (index + 1) / len(batches)
                    self.log_step(loop.epoch + done, step_lr)
                    if engine.global_steps >= total_steps:
                        return None  # done: finish() evaluates, saves and exports
                    if self.stop_requested():
                        return self.stop.signal_name or "a signal on another rank"
                    self.periodic_eval_and_save()
                loop.epoch += 1
                loop.micro_in_epoch = 0
                self.layout = EpochLayout()  # a new epoch is planned for these ranks
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
            with self.watchdog.phase("eval"):
                self.run_eval()
        saved = (settings.save_every and step % settings.save_every == 0) or (
            evaluated and settings.save_every == 0
        )
        if saved:
            with self.watchdog.phase("save"):
                self.save()
        if evaluated or saved:
            self.restart_window()  # evaluation and saving are not training throughput

    def run_eval(self) -> float | None:
        if len(self.val_set) == 0:
            return None
        loss, tokens, loss_with_pad = evaluate(
            self.engine,
            self.val_set,
            self.eval_collate,
            self.micro,
            self.rank,
            self.world,
            self.settings.max_eval_batches,
            self.all_reduce,
            with_pad=self.data_settings.loss_on_pad,
        )
        step = self.engine.global_steps
        self.last_eval_step = step
        self.loop.last_val_loss = loss
        best = self.loop.best_val_loss
        if math.isfinite(loss) and (best is None or loss < best):
            self.loop.best_val_loss = loss
        ppl = perplexity(loss)
        row: dict[str, Any] = {"step": step, "val_loss": loss}
        with_pad = ""
        if loss_with_pad is not None:  # --loss-on-pad: upstream's pad-included val/loss too
            row["val_loss_with_pad"] = loss_with_pad
            with_pad = f", val_loss_with_pad {loss_with_pad:.4f}"
        row["val_perplexity"] = ppl
        row["val_tokens"] = tokens
        row["elapsed_s"] = round(time.time() - self.start_time, 3)
        self.write_row(row)
        self.log(
            f"step {step}: val_loss {loss:.4f}{with_pad}, perplexity "
            f"{'n/a' if ppl is None else f'{ppl:.3f}'}"
        )
        return loss

    def save(self) -> None:
        from dstrain.checkpoints import capture_rng_state, save_run_checkpoint

        if self.start_step and self.engine.global_steps == self.start_step:
            return  # this state was just loaded from that very checkpoint
        rngs = [None] * self.world
        self.dist.all_gather_object(rngs, capture_rng_state())
        step = self.engine.global_steps
        # The counters as whole-job figures: a resume on any world size carries them on.
        totals = self.all_reduce([getattr(self.loop, name) for name in LOOP_COUNTERS])
        loop = {**self.loop.to_dict(), **dict(zip(LOOP_COUNTERS, map(int, totals), strict=True))}
        client_state = {
            "dstrain": {
                **self.run_identity(),
                "step": step,
                "loop": {**loop, "counters": "global"},
                "epoch_layout": dataclasses.asdict(self.layout),
                "rng": {str(r): s for r, s in enumerate(rngs)},
            }
        }
        val_loss = self.loop.last_val_loss if self.last_eval_step == step else None
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

        engine, log, loop = self.engine, self.log, self.loop
        self.watchdog.enter("finish")  # evaluation, save, export, report: long
        if self.last_eval_step != engine.global_steps:
            self.run_eval()
        self.save()
        if self.settings.dump_params:
            dump_full_params(engine, self.output_dir / f"params_rank{self.rank}.pt")
        seen = self.all_reduce([loop.samples_seen, loop.tokens_seen, loop.useful_tokens_seen])
        self.dist.barrier()  # the rest is rank 0's alone: the other ranks may leave
        if self.rank != 0:
            return 0
        export_dir = self.export()
        elapsed = time.time() - self.start_time
        val_loss = loop.last_val_loss if len(self.val_set) else None
        peak = torch.cuda.max_memory_allocated() if torch.cuda.is_available() else rss_bytes()
        summary = {
            "steps": engine.global_steps,
            "skipped_steps": engine.skipped_steps,
            "val_loss": finite_or_none(val_loss),
            "val_perplexity": finite_or_none(perplexity(val_loss)),
            "best_val_loss": finite_or_none(loop.best_val_loss),
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
        report_path = self.write_report()  # after the summary: the report reads both files
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
            + (f", {report_path}" if report_path else "")
            + (f", {export_dir} (AutoModelForCausalLM.from_pretrained)" if export_dir else "")
        )
        return 1 if self.settings.export and export_dir is None else 0

    def write_report(self) -> Path | None:
        """Rank 0: OUTPUT_DIR/report.png from metrics.jsonl (`dstrain report`). A plot
        that fails is a warning: the run it would picture has already succeeded."""
        if not self.settings.report:
            return None
        from dstrain.report import REPORT_NAME, write_report

        path = self.output_dir / REPORT_NAME
        try:
            write_report([self.output_dir], path)
        except Exception as exc:  # matplotlib missing, a full disk, a metrics surprise
            self.log(
                f"warning: could not write {path} ({type(exc).__name__}: {exc}); the run "
                f"itself is complete. Try again with `dstrain report {self.output_dir}`."
            )
            return None
        return path

    def export(self) -> Path | None:
        """Rank 0: the HF export of the final checkpoint. A failure is reported (and makes
        the exit code 1) but leaves the checkpoints as they are."""
        from dstrain.export import export_checkpoint

        if not self.settings.export:
            return None
        export_dir = self.output_dir / "export"
        try:
            # The checkpoint this run just saved and hashed (or verified at resume).
            export_checkpoint(
                self.ckpt_dir,
                export_dir,
                export_pt=self.settings.export_pt,
                trust_checkpoint=self.settings.trust_checkpoint,
                verify=False,
            )
        except Exception as exc:  # training succeeded; say why the export did not
            self.log(
                f"error: training finished and its checkpoints are saved, but the export "
                f"failed ({type(exc).__name__}: {exc}). Run `dstrain export {self.ckpt_dir} "
                "-o DIR` where every rank's checkpoint files are visible."
            )
            return None
        return export_dir


def engine_run_mismatch(engine, run: DsRun) -> str:
    """What the built engine does differently from the typed run ("" when they agree)."""
    built = {
        "precision": "fp16"
        if engine.fp16_enabled()
        else "bf16"
        if engine.bfloat16_enabled()
        else "fp32",
        "ZeRO stage": engine.zero_optimization_stage(),
        "optimizer offload": _offload_device(engine.zero_offload_optimizer()),
        "param offload": _offload_device(engine.zero_offload_param()),
    }
    expected = {
        "precision": run.precision,
        "ZeRO stage": run.zero.stage,
        "optimizer offload": run.zero.offload_optimizer.device,
        "param offload": run.zero.offload_param.device,
    }
    return "; ".join(
        f"{key} {built[key]!r}, read as {expected[key]!r}"
        for key in built
        if built[key] != expected[key]
    )


def _offload_device(offload) -> str:
    """An engine's offload config (None when absent) as none / cpu / nvme."""
    device = getattr(offload, "device", None) or "none"
    return str(getattr(device, "value", device))


def estimate_run_memory(
    arch, run: DsRun, world: int, seq_len: int, micro: int, *, zero_init: bool | None = None
):
    """`dstrain estimate` for this run (per rank, configured stage); `zero_init` as
    `TrainSettings.zero_init` (None: zero.Init under stage 3, as `build_engine` does)."""
    import torch

    from dstrain.memory import estimate_for_run

    local = int(os.environ.get("LOCAL_WORLD_SIZE", "0")) or (
        min(world, torch.cuda.device_count()) if torch.cuda.is_available() else 1
    )
    return estimate_for_run(
        arch,
        run,
        world_size=world,
        gpus_per_node=local,
        seq_len=seq_len,
        micro_batch=micro,
        activation_checkpointing="full" if run.activation_checkpointing.enabled else "none",
        zero_init=zero_init,
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
    for warning in check.warnings:
        print(f"warning: {warning}", file=sys.stderr, flush=True)
    command = build_launcher_argv(
        train_args=train_args, num_gpus=args.num_gpus, hostfile=args.hostfile
    )
    print("launching: " + shlex.join(command), flush=True)
    # Our death must take the job down: the kernel sends the launcher SIGTERM
    # (PR_SET_PDEATHSIG) and each rank's watchdog watches DSTRAIN_PARENT.
    launcher = subprocess.Popen(
        command,
        start_new_session=True,
        env={**os.environ, "DSTRAIN_PARENT": parent_spec()},
        preexec_fn=set_parent_death_signal,
    )

    def forward(signum, _frame):  # the launcher and its ranks are in their own group
        # SIGHUP (a closed terminal, a lost ssh) stops the job like SIGTERM: save, exit.
        os.killpg(launcher.pid, signal.SIGTERM if signum == signal.SIGHUP else signum)

    forwarded = (signal.SIGTERM, signal.SIGINT, signal.SIGHUP)
    previous = {sig: signal.signal(sig, forward) for sig in forwarded}
    try:
        code = launcher.wait()
        # On SIGTERM DeepSpeed's runner dies at once while the ranks still save: stay
        # until the group is gone (the ranks take the group down when we go), bounded
        # by the launcher's own 30 s grace before it SIGKILLs them.
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            try:
                os.killpg(launcher.pid, 0)
            except (ProcessLookupError, PermissionError):
                break
            time.sleep(0.2)
        return code
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
    try:
        check_rendezvous_env()
    except DstrainError as exc:
        print(f"error: {exc}", file=sys.stderr, flush=True)
        return exc.exit_code
    rank = int(os.environ.get("RANK", "0"))
    try:
        under_launcher = "LOCAL_RANK" in os.environ and "WORLD_SIZE" in os.environ
        if (args.num_gpus or args.hostfile) and not under_launcher:
            return hand_off(args, argv)
        if under_launcher:
            watch_parent()  # the `dstrain train` that launched us, if one did
        settings = settings_from_args(args)
        return run(settings, deepspeed_flags(args), demo=is_demo(args))
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


def close_process_group() -> None:
    """Tear the process group down before the interpreter exits: left to exit-time
    destructors, gloo's threads now and then abort a rank that finished well
    ("terminate called without an active exception", exit -6). Only for a launched
    process: tests run `main` in one process and reuse its group."""
    torch_distributed = sys.modules.get("torch.distributed")
    if torch_distributed is None or not torch_distributed.is_initialized():
        return
    with contextlib.suppress(Exception):  # leaving anyway; the exit code is decided
        torch_distributed.destroy_process_group()


if __name__ == "__main__":
    exit_code = main()
    close_process_group()
    sys.exit(exit_code)
