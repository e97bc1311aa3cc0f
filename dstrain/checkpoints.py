"""DeepSpeed checkpoints for a run: save, keep `latest` + the best k, resume.

Heavy edge (torch, deepspeed). Layout under OUTPUT_DIR/checkpoints/:

    step00000120/          one `engine.save_checkpoint` tag (every rank's shards)
    latest                 the tag to resume from (DeepSpeed's own pointer format)
    checkpoints.json       every kept tag with its step and validation loss

An interrupted save never spoils the last good checkpoint: DeepSpeed writes into a new
tag directory, and only after every rank has finished does rank 0 replace `latest` and
`checkpoints.json` (each by an atomic rename) and delete tags that are neither `latest`
nor among the best `keep_best` by validation loss (half-written tags included).
"""

from __future__ import annotations

import json
import random
import shutil
from pathlib import Path
from typing import Any

import numpy as np
import torch

from dstrain.ds_config import write_text_atomic
from dstrain.errors import DstrainError

INDEX_NAME = "checkpoints.json"


def tag_for_step(step: int) -> str:
    return f"step{step:08d}"


def capture_rng_state() -> dict[str, Any]:
    """Every RNG the loop draws from, to restore on resume."""
    state = {
        "python": random.getstate(),
        "numpy": np.random.get_state(),
        "torch": torch.get_rng_state(),
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def restore_rng_state(state: dict[str, Any]) -> None:
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def read_index(ckpt_dir: Path) -> list[dict[str, Any]]:
    path = ckpt_dir / INDEX_NAME
    if not path.exists():
        return []
    return json.loads(path.read_text(encoding="utf-8"))


def read_latest_tag(ckpt_dir: Path) -> str | None:
    path = ckpt_dir / "latest"
    if not path.exists():
        return None
    tag = path.read_text(encoding="utf-8").strip()
    return tag or None


def kept_tags(index: list[dict[str, Any]], latest: str, keep_best: int) -> set[str]:
    """`latest` plus the `keep_best` lowest validation losses."""
    scored = sorted(
        (e for e in index if e.get("val_loss") is not None),
        key=lambda e: (e["val_loss"], -e["step"]),
    )
    return {latest, *(e["tag"] for e in scored[:keep_best])}


def save_run_checkpoint(
    engine: Any,
    ckpt_dir: Path,
    step: int,
    client_state: dict[str, Any],
    *,
    val_loss: float | None,
    keep_best: int,
) -> str:
    """Save a checkpoint on every rank, then (rank 0) publish it and prune old ones.

    Every rank writes into a staging tag (`TAG.partial`); only when all succeeded does
    rank 0 rename it to TAG (replacing an older copy of the same step), then move
    `latest`. A rank that fails makes every rank raise the same error, not hang.
    """
    import deepspeed.comm as dist

    tag = tag_for_step(step)
    staging = f"{tag}.partial"
    failure = None
    try:
        engine.save_checkpoint(
            str(ckpt_dir), tag=staging, client_state=client_state, save_latest=False
        )
    except OSError as exc:
        failure = (
            f"rank {dist.get_rank()} could not save checkpoint {ckpt_dir / tag}: "
            f"{exc.strerror or exc}. The last good checkpoint is untouched."
        )
    failures = [None] * dist.get_world_size()
    dist.all_gather_object(failures, failure)
    if any(failures):
        if dist.get_rank() == 0:
            shutil.rmtree(ckpt_dir / staging, ignore_errors=True)
        raise DstrainError(next(f for f in failures if f))
    if dist.get_rank() == 0:
        older = ckpt_dir / f"{tag}.old"  # an earlier copy of this step, e.g. before a resume
        if (ckpt_dir / tag).exists():
            (ckpt_dir / tag).rename(older)
        (ckpt_dir / staging).rename(ckpt_dir / tag)
        shutil.rmtree(older, ignore_errors=True)
        index = [e for e in read_index(ckpt_dir) if e["tag"] != tag]
        index.append({"tag": tag, "step": step, "val_loss": val_loss})
        keep = kept_tags(index, tag, keep_best)
        index = [e for e in index if e["tag"] in keep]
        write_text_atomic(ckpt_dir / INDEX_NAME, json.dumps(index, indent=2) + "\n")
        write_text_atomic(ckpt_dir / "latest", tag)
        for path in ckpt_dir.glob("step*"):
            if path.is_dir() and path.name not in keep:
                shutil.rmtree(path, ignore_errors=True)
    dist.barrier()
    return tag


def read_model_states(ckpt_dir: Path, tag: str) -> dict[str, Any]:
    """Rank 0's model-states file of a tag (named `zero_pp_rank_0_...` under ZeRO-3)."""
    for name in ("mp_rank_00_model_states.pt", "zero_pp_rank_0_mp_rank_00_model_states.pt"):
        path = ckpt_dir / tag / name
        if path.exists():
            # A file dstrain wrote: DeepSpeed pickles its own objects into it.
            return torch.load(path, map_location="cpu", weights_only=False)
    raise DstrainError(
        f"{ckpt_dir / tag} is not a complete DeepSpeed checkpoint (no rank-0 model states file)."
    )


def resolve_checkpoint(spec: str | Path) -> tuple[Path, str]:
    """(checkpoint dir, tag) for a run's checkpoints dir, a run dir, or one tag dir."""
    path = Path(spec)
    if not path.exists():
        raise DstrainError(
            f"checkpoint {path} does not exist. Pass a run's output directory, "
            "its checkpoints/ directory, or one step directory inside it."
        )
    for candidate in (path, path / "checkpoints"):
        tag = read_latest_tag(candidate)
        if tag is not None:
            if not (candidate / tag).is_dir():
                raise DstrainError(
                    f"{candidate / 'latest'} names {tag}, but {candidate / tag} "
                    "is missing. Point at a step directory that exists."
                )
            return candidate, tag
    if path.is_dir() and any(path.glob("*mp_rank_*_model_states.pt")):
        return path.parent, path.name
    raise DstrainError(
        f"{path} holds no DeepSpeed checkpoint (no `latest` file and no "
        "*model_states.pt). Pass a directory written by dstrain train."
    )


def load_run_checkpoint(engine: Any, ckpt_dir: Path, tag: str) -> dict[str, Any]:
    """Load model, optimizer, scheduler and loss scale; return the client state."""
    path, client_state = engine.load_checkpoint(str(ckpt_dir), tag=tag)
    if path is None:
        raise DstrainError(
            f"DeepSpeed could not load checkpoint {ckpt_dir / tag}: it is "
            "incomplete or from another world size or ZeRO stage."
        )
    return client_state or {}
