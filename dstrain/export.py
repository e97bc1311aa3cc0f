"""Export a DeepSpeed checkpoint as an HF model directory (+ the codon tokenizer).

Heavy edge. Consolidates fp32 weights on the CPU with no process group: DeepSpeed's
zero_to_fp32 for ZeRO 1-3 (it reads the fp32 master partitions of every rank), and the
fp32 masters of `mp_rank_00_model_states.pt` for stage 0 (zero_to_fp32 cannot read those).
The result is written with `save_pretrained` (safetensors), so
`AutoModelForCausalLM.from_pretrained(dir)` and `AutoTokenizer.from_pretrained(dir)` load it;
its `generation_config.json` keeps special tokens out of sampling (`dstrain.model.
generation_config`). Formats: `hf` (that directory) and `upstream` (the same directory plus
`genslm_upstream.pt`, the `{"state_dict": ...}` file upstream's `genslm.GenSLM` class loads,
see `dstrain.model.save_upstream_pt`); `export_pt` adds a plain state dict
(`pytorch_model.pt`, transformers 5 names) to either.

Nothing of the checkpoint is unpickled before `verify_checkpoint` has checked it against its
manifest (zero_to_fp32 unpickles in full); a checkpoint without one needs `trust_checkpoint`.
"""

from __future__ import annotations

import contextlib
import functools
import io
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from dstrain.architectures import GenSLMArchitecture
from dstrain.checkpoints import (
    DamagedCheckpoint,
    read_model_states,
    resolve_checkpoint,
    tag_dirs,
    verify_checkpoint,
)
from dstrain.ds_run import resolve_ds_run
from dstrain.errors import DstrainError
from dstrain.publish import publish_dir

EXPORT_FORMATS = ("hf", "upstream")


def _check_export_dir(out_dir: Path, ckpt_dir: Path, *, overwrite: bool) -> None:
    """Replace an existing `out_dir` only with `overwrite`, only if it is a model directory,
    and never when it holds the checkpoint being exported."""
    if not out_dir.exists():
        return
    if not overwrite:
        raise DstrainError(f"{out_dir} exists; pass --overwrite to replace it.")
    resolved = out_dir.resolve()
    if resolved == ckpt_dir.resolve() or resolved in ckpt_dir.resolve().parents:
        raise DstrainError(
            f"{out_dir} holds the checkpoint being exported; choose another output "
            "directory (e.g. RUN_DIR/export)."
        )
    if not (out_dir / "config.json").is_file():
        raise DstrainError(
            f"{out_dir} exists and is not a model directory (no config.json), so "
            "--overwrite will not delete it; choose a new output directory."
        )


@dataclass(frozen=True)
class ExportResult:
    out_dir: Path
    architecture: str
    num_params: int
    step: int | None


def _stage0_masters(optimizer_state: dict[str, Any], model) -> dict[str, torch.Tensor]:
    """fp32 masters of a 16-bit stage-0 checkpoint, by parameter name, or {} if absent.

    DeepSpeed keeps them per parameter group, in the order dstrain built the groups
    (`weight_decay_groups`): as one tensor per parameter (`fp32_groups`, BF16/unfused
    optimizers) or as one flat tensor per group (`fp32_groups_flat`, FusedAdam's wrapper).
    """
    from dstrain.model import weight_decay_groups

    params = dict(model.named_parameters())
    masters: dict[str, torch.Tensor] = {}
    groups = optimizer_state.get("fp32_groups")
    flats = optimizer_state.get("fp32_groups_flat")
    for index, names in enumerate(weight_decay_groups(model)):
        if groups is not None and index < len(groups):
            tensors = list(groups[index])
        elif flats is not None and index < len(flats):
            sizes = [params[n].numel() for n in names]
            if sum(sizes) != flats[index].numel():
                return {}
            tensors = list(torch.split(flats[index].flatten(), sizes))
        else:
            return {}
        if len(tensors) != len(names):
            return {}
        for name, tensor in zip(names, tensors, strict=True):
            if tensor.numel() != params[name].numel():
                return {}
            masters[name] = tensor.reshape(params[name].shape).float()
    return masters


def consolidated_fp32_state_dict(ckpt_dir: Path, tag: str, states: dict[str, Any], model):
    """Full fp32 weights of a checkpoint, keyed like the HF model's state_dict.

    ZeRO 1-3: DeepSpeed's zero_to_fp32 joins every rank's fp32 master partitions. Stage 0:
    fp32 runs' module weights are the masters; 16-bit runs keep their masters in the
    optimizer state (`_stage0_masters`), and an export never settles for rounded weights.
    """
    # The DeepSpeed config the engine ran with (DeepSpeed stores it in the model states).
    run = resolve_ds_run(states.get("ds_config") or {})
    if run.zero.stage == 0:
        state = {k: v.float() for k, v in states["module"].items()}
        if run.precision == "fp32":
            return state
        masters = _stage0_masters(states.get("optimizer") or {}, model)
        if not masters:
            raise DstrainError(
                f"{ckpt_dir / tag}: found no fp32 master weights in this 16-bit ZeRO-0 "
                "checkpoint's optimizer state (an optimizer layout dstrain does not know), "
                "and will not export rounded 16-bit weights as if they were fp32."
            )
        state.update(masters)
        return state
    from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint

    with contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(io.StringIO()):
        return get_fp32_state_dict_from_zero_checkpoint(str(ckpt_dir), tag=tag)


@dataclass(frozen=True)
class CheckpointModel:
    """A dstrain checkpoint's consolidated fp32 weights in a built model."""

    model: Any
    """The GPTNeoXForCausalLM, fp32 on the CPU, every weight from the checkpoint."""
    architecture: GenSLMArchitecture
    ckpt_dir: Path
    tag: str
    step: int | None
    num_params: int


def load_checkpoint_model(
    checkpoint: str | Path, *, trust_checkpoint: bool = False, verify: bool = True
) -> CheckpointModel:
    """Verify a dstrain checkpoint (run dir, checkpoints/ or one step dir) against its
    manifest, consolidate its fp32 weights and load them, strictly, into a built model.

    `verify=False` only for a checkpoint this process has just written or verified."""
    from dstrain.model import build_model, load_state_dict_strictly

    ckpt_dir, tag = resolve_checkpoint(checkpoint)
    if verify:
        try:
            verify_checkpoint(ckpt_dir, tag, trust=trust_checkpoint)
        except DamagedCheckpoint as exc:
            others = [str(ckpt_dir / t) for t in tag_dirs(ckpt_dir) if t != tag][:3]
            hint = f" Other checkpoints of this run: {', '.join(others)}." if others else ""
            raise DamagedCheckpoint(f"{exc}{hint}") from None
    states = read_model_states(ckpt_dir, tag, trust=trust_checkpoint)
    meta = states.get("dstrain") or {}
    if "architecture" not in meta:
        raise DstrainError(
            f"{ckpt_dir / tag} was not written by dstrain train (no architecture recorded), "
            "so its model shape is unknown. If it is an upstream GenSLM checkpoint, "
            "convert it with `dstrain convert-checkpoint` (--model NAME --trust-checkpoint)."
        )
    arch = GenSLMArchitecture(**meta["architecture"])
    model = build_model(arch)
    state = consolidated_fp32_state_dict(ckpt_dir, tag, states, model)
    load_state_dict_strictly(model, state, source=str(ckpt_dir / tag))
    step = meta.get("step")
    return CheckpointModel(
        model=model,
        architecture=arch,
        ckpt_dir=ckpt_dir,
        tag=tag,
        step=step if isinstance(step, int) else None,
        num_params=sum(t.numel() for t in state.values()),
    )


def export_checkpoint(
    checkpoint: str | Path,
    out_dir: str | Path,
    *,
    export_pt: bool = False,
    export_format: str = "hf",
    overwrite: bool = True,
    trust_checkpoint: bool = False,
    verify: bool = True,
) -> ExportResult:
    """Write `out_dir` (HF model + tokenizer [+ genslm_upstream.pt] [+ pytorch_model.pt])
    from a checkpoint; `export_format` is "hf" or "upstream" (see the module docstring).

    `verify=False` only for a checkpoint this process has just written or verified."""
    from dstrain.codons import build_hf_tokenizer
    from dstrain.model import UPSTREAM_PT_NAME, save_upstream_pt

    if export_format not in EXPORT_FORMATS:
        raise DstrainError(
            f"unknown export format {export_format!r}; choose one of {', '.join(EXPORT_FORMATS)}."
        )

    loaded = load_checkpoint_model(checkpoint, trust_checkpoint=trust_checkpoint, verify=verify)
    model, ckpt_dir = loaded.model, loaded.ckpt_dir
    out_dir = Path(out_dir)
    check = functools.partial(_check_export_dir, out_dir, ckpt_dir, overwrite=overwrite)
    check()
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()
    # A failed or interrupted export leaves an earlier export at out_dir as it was.
    with publish_dir(out_dir, before_replace=check) as staging:
        model.save_pretrained(staging, safe_serialization=True)
        build_hf_tokenizer().save_pretrained(staging)
        if export_pt:
            torch.save(model.state_dict(), staging / "pytorch_model.pt")
        if export_format == "upstream":
            save_upstream_pt(model, staging / UPSTREAM_PT_NAME)
    return ExportResult(out_dir, loaded.architecture.name, loaded.num_params, loaded.step)
