"""DeepSpeed checkpoints for a run: save, verify, keep `latest` + the best k, resume.

Heavy edge (torch, deepspeed). Layout under OUTPUT_DIR/checkpoints/:

    step00000120/          one `engine.save_checkpoint` tag (every rank's shards)
      dstrain_manifest.json  size + sha256 of every file in the tag, versions, step
    latest                 the tag to resume from (DeepSpeed's own pointer format)
    checkpoints.json       every kept tag with its step and validation loss
    step00000120.universal/  DeepSpeed's universal copy of that tag, made by a resume on
                           another world size (or `dstrain checkpoint reshape`); not a tag:
                           reused while its tag is unchanged, deleted with its tag

An interrupted save never spoils the last good checkpoint: DeepSpeed writes into a new
tag directory (`TAG.partial`), rank 0 writes its manifest, and only after every rank has
finished does rank 0 rename it to TAG and replace `latest` and `checkpoints.json` (each by
an atomic rename), then delete tags that are neither `latest` nor among the best
`keep_best` by validation loss.

Trust: DeepSpeed's loaders (and zero_to_fp32) unpickle in full, which can run code hidden
in a file. So before anything of a tag is unpickled, `verify_checkpoint` checks it against
its manifest (every file present, no extra file, same size and sha256) and loads every
`.pt` with `torch.load(weights_only=True)` allowing only the few DeepSpeed and numpy
classes dstrain's own checkpoints hold (`checkpoint_globals`). A tag without a manifest
(an older dstrain, a copy by hand) passes only with `--trust-checkpoint`; a manifest that
does not match is damage, with or without it.
"""

from __future__ import annotations

import contextlib
import errno
import hashlib
import json
import math
import os
import pickle
import random
import re
import shutil
import stat
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import numpy as np
import torch

from dstrain.ds_config import write_text_atomic
from dstrain.errors import DstrainError
from dstrain.inputs import MAX_CONFIG_BYTES, InputError, read_regular_bytes

INDEX_NAME = "checkpoints.json"
UNIVERSAL_SUFFIX = ".universal"
MANIFEST_NAME = "dstrain_manifest.json"
MANIFEST_FORMAT = 1
_TAG_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]*")
_STEP_TAG = re.compile(r"step(\d+)")


class DamagedCheckpoint(DstrainError):
    """A tag that fails verification (missing, damaged, or not provably dstrain's own):
    `--resume auto` falls back past it; everything else stops with its message. `finding`
    is what is wrong with this tag, `advice` what to do (said once for several tags)."""

    def __init__(self, finding: str, *, advice: str = ""):
        super().__init__(f"{finding} {advice}".strip())
        self.finding, self.advice = finding, advice


_TRUST_ADVICE = (
    "Loading a checkpoint unpickles it, which can run code hidden in a file; only if you "
    "trust where it came from (e.g. an older dstrain, which wrote no manifest), pass "
    "--trust-checkpoint."
)


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


# --------------------------------------------------------------------------------------
# `latest` and checkpoints.json
# --------------------------------------------------------------------------------------


def read_latest(ckpt_dir: Path) -> tuple[str | None, str | None]:
    """(tag, problem) of `ckpt_dir/latest`: (None, None) when there is no such file. The tag
    must name an existing directory directly inside `ckpt_dir` (no `..`, `/`, absolute
    path, symlink out of the run, empty or non-UTF-8 text)."""
    path = ckpt_dir / "latest"
    if not path.exists() and not path.is_symlink():
        return None, None
    try:  # a regular file only: a FIFO planted as `latest` must not hang the resume
        text = read_regular_bytes(path, "checkpoint pointer", 4096).decode("utf-8")
    except UnicodeDecodeError:
        return None, f"{path} is not UTF-8 text (damaged)"
    except InputError as exc:
        return None, f"{exc} (damaged)"
    tag = text.strip()
    if not tag:
        return None, f"{path} is empty (damaged)"
    if not _TAG_NAME.fullmatch(tag):
        return None, (
            f"{path} holds {tag[:80]!r}, which is not the name of a directory inside {ckpt_dir}"
        )
    tag_dir = ckpt_dir / tag
    if not tag_dir.is_dir():
        return tag, f"{path} names {tag}, but {tag_dir} is missing"
    if tag_dir.resolve().parent != ckpt_dir.resolve():
        return None, f"{path} names {tag}, a link out of {ckpt_dir}"
    return tag, None


def read_latest_tag(ckpt_dir: Path) -> str | None:
    """The tag `latest` names, or None (no file, or one that names no tag of this run)."""
    tag, problem = read_latest(ckpt_dir)
    return None if problem else tag


def tag_dirs(ckpt_dir: Path) -> list[str]:
    """Published tag directories (`stepNNNNNNNN`), newest first."""
    if not ckpt_dir.is_dir():
        return []
    tags = [
        p.name
        for p in ckpt_dir.iterdir()
        if _STEP_TAG.fullmatch(p.name) and p.is_dir() and not p.is_symlink()
    ]
    return sorted(tags, key=lambda t: int(t[4:]), reverse=True)


def _index_entry(entry: Any) -> dict[str, Any] | None:
    """A checkpoints.json entry in its one valid shape, or None."""
    if not isinstance(entry, dict):
        return None
    tag, step, loss = entry.get("tag"), entry.get("step"), entry.get("val_loss")
    if not (isinstance(tag, str) and _TAG_NAME.fullmatch(tag)):
        return None
    if not isinstance(step, int) or isinstance(step, bool) or step < 0:
        return None
    if loss is not None and (
        not isinstance(loss, (int, float)) or isinstance(loss, bool) or not math.isfinite(loss)
    ):
        return None
    return {"tag": tag, "step": step, "val_loss": None if loss is None else float(loss)}


def check_index(ckpt_dir: Path) -> tuple[list[dict[str, Any]], list[str]]:
    """(valid entries that name an existing tag, problems found) of checkpoints.json."""
    path = ckpt_dir / INDEX_NAME
    if not path.exists():  # without it, the next save would prune every older tag
        return [], [f"{path} is missing"] if tag_dirs(ckpt_dir) else []
    try:
        raw = read_regular_bytes(path, "checkpoint index", MAX_CONFIG_BYTES)
        data = json.loads(raw.decode("utf-8"))
    except InputError as exc:
        return [], [str(exc)]
    except (ValueError, RecursionError) as exc:
        return [], [f"{path} is not readable JSON ({type(exc).__name__}: {str(exc)[:120]})"]
    if not isinstance(data, list):
        return [], [f"{path} holds a {type(data).__name__}, not a list of tags"]
    entries: list[dict[str, Any]] = []
    problems: list[str] = []
    for raw in data:
        entry = _index_entry(raw)
        if entry is None:
            problems.append(f"{path}: invalid entry {json.dumps(raw, default=str)[:80]}")
        elif not (ckpt_dir / entry["tag"]).is_dir():
            problems.append(f"{path}: entry {entry['tag']} names a missing directory")
        elif entry["tag"] not in {e["tag"] for e in entries}:
            entries.append(entry)
    return entries, problems


def read_index(ckpt_dir: Path) -> list[dict[str, Any]]:
    """The valid entries of checkpoints.json (a damaged file reads as what is valid in it)."""
    return check_index(ckpt_dir)[0]


def _val_losses_from_metrics(run_dir: Path) -> dict[int, float]:
    """step -> val_loss from the run's metrics.jsonl (to rebuild checkpoints.json)."""
    losses: dict[int, float] = {}
    path = run_dir / "metrics.jsonl"
    try:
        raw = read_regular_bytes(path, "metrics file", 2 * 2**30)
    except InputError:
        return losses
    lines = raw.decode("utf-8", errors="replace").splitlines()
    for line in lines:
        try:
            row = json.loads(line)
            step, loss = row["step"], row["val_loss"]
        except (ValueError, KeyError, TypeError):
            continue
        if isinstance(step, int) and isinstance(loss, (int, float)) and math.isfinite(loss):
            losses[step] = float(loss)
    return losses


def repair_index(ckpt_dir: Path, *, drop: tuple[str, ...] = ()) -> str | None:
    """Rank 0 at resume: rewrite a damaged checkpoints.json from the tag directories (step
    from each manifest or name, val_loss from metrics.jsonl) and drop the tags in `drop`
    (damaged ones passed over). Returns a note for the log, None when nothing changed."""
    entries, problems = check_index(ckpt_dir)
    dropped = [e["tag"] for e in entries if e["tag"] in drop]
    set_aside = [set_aside_damaged(ckpt_dir, tag) for tag in drop]
    kept_note = (
        f" Kept for inspection (never resumed or pruned; delete them when done): "
        f"{', '.join(str(p) for p in set_aside if p)}."
        if any(set_aside)
        else ""
    )
    if not problems and not dropped:
        return kept_note.strip() or None
    entries = [e for e in entries if e["tag"] not in drop]
    if problems:
        known = {e["tag"] for e in entries}
        losses = _val_losses_from_metrics(ckpt_dir.parent)
        for tag in tag_dirs(ckpt_dir):
            if tag in known or tag in drop:
                continue
            step = _manifest_step(ckpt_dir / tag)
            step = int(tag[4:]) if step is None else step
            entries.append({"tag": tag, "step": step, "val_loss": losses.get(step)})
        entries.sort(key=lambda e: e["step"])
    _remove_if_not_a_file(ckpt_dir / INDEX_NAME)
    write_text_atomic(ckpt_dir / INDEX_NAME, json.dumps(entries, indent=2) + "\n")
    if problems:
        return (
            f"{'; '.join(problems[:3])}{' ...' if len(problems) > 3 else ''}. Rebuilt it from "
            f"the tag directories ({len(entries)} tag(s)).{kept_note}"
        )
    return f"dropped damaged tag(s) {', '.join(dropped)} from {ckpt_dir / INDEX_NAME}.{kept_note}"


def set_aside_damaged(ckpt_dir: Path, tag: str) -> Path | None:
    """Rename a damaged tag to `TAG.damaged` (`.damaged-2`, ...): out of the resume
    candidates and of every prune, so a tag that only *looks* damaged (a file copied in by
    hand, a read error on a flaky file system) is never deleted by dstrain. None when the
    tag directory is not there."""
    path = ckpt_dir / tag
    if not path.is_dir() or path.is_symlink():
        return None
    target, number = ckpt_dir / f"{tag}.damaged", 1
    while target.exists():
        number += 1
        target = ckpt_dir / f"{tag}.damaged-{number}"
    path.rename(target)
    return target


def remove_stale_staging(ckpt_dir: Path) -> list[str]:
    """Rank 0 before the first save: delete `TAG.partial` directories (a save that never
    finished) and `TAG.old` ones (a replaced copy; put back if TAG itself is gone)."""
    notes = []
    if not ckpt_dir.is_dir():
        return notes
    for path in sorted(ckpt_dir.iterdir()):
        if not path.is_dir() or path.is_symlink():
            continue
        if path.name.endswith(".partial"):
            shutil.rmtree(path, ignore_errors=True)
            what = "conversion" if path.name.endswith(f"{UNIVERSAL_SUFFIX}.partial") else "save"
            notes.append(f"removed {path} (a {what} that never finished)")
        elif path.name.endswith(".old") and _STEP_TAG.fullmatch(path.name[:-4]):
            published = ckpt_dir / path.name[:-4]
            if published.exists():
                shutil.rmtree(path, ignore_errors=True)
                notes.append(f"removed {path} (a replaced copy of {published.name})")
            else:
                path.rename(published)
                notes.append(f"restored {published} from {path.name} (an interrupted replace)")
    return notes


def kept_tags(index: list[dict[str, Any]], latest: str, keep_best: int) -> set[str]:
    """`latest` plus the `keep_best` lowest validation losses."""
    scored = sorted(
        (e for e in index if e.get("val_loss") is not None),
        key=lambda e: (e["val_loss"], -e["step"]),
    )
    return {latest, *(e["tag"] for e in scored[:keep_best])}


# --------------------------------------------------------------------------------------
# Manifests: written at publish time, checked before anything is unpickled
# --------------------------------------------------------------------------------------


def tag_files(tag_dir: Path) -> list[str]:
    """Every file of a tag (relative POSIX paths, sorted), the manifest itself aside."""
    names = []

    def unreadable(exc: OSError) -> None:  # os.walk would skip the directory silently
        raise exc

    for root, dirs, files in os.walk(tag_dir, onerror=unreadable):
        for name in dirs + files:
            path = Path(root) / name
            if path.is_symlink():  # followed three times (hash, pre-scan, load): refused
                raise DamagedCheckpoint(
                    f"checkpoint {tag_dir} is refused: {path} is a symbolic link; a "
                    "checkpoint written by dstrain train holds only files and directories."
                )
        for name in files:
            rel = (Path(root) / name).relative_to(tag_dir).as_posix()
            if rel != MANIFEST_NAME:
                names.append(rel)
    return sorted(names)


def hash_file(path: Path, *, sync: bool = False) -> dict[str, Any]:
    """{"size", "sha256"} of one file; with `sync`, flushed to disk on the way (at publish
    time: the bytes a manifest describes are durable before `latest` names them)."""
    # O_NONBLOCK, then regular files only: a FIFO planted in a tag must not hang the check.
    fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK)
    with os.fdopen(fd, "rb") as handle:
        if not stat.S_ISREG(os.fstat(fd).st_mode):
            raise DamagedCheckpoint(f"{path} is not a regular file; a checkpoint holds only files.")
        os.set_blocking(fd, True)
        digest = hashlib.sha256()
        while chunk := handle.read(1 << 20):  # hashlib.file_digest needs Python 3.11
            digest.update(chunk)
        digest = digest.hexdigest()
        if sync:
            os.fsync(fd)
        return {"size": os.fstat(fd).st_size, "sha256": digest}


def write_manifest(
    tag_dir: Path,
    *,
    tag: str,
    step: int,
    world_size: int,
    files: dict[str, dict[str, Any]],
    extra: dict[str, Any] | None = None,
) -> None:
    """TAG/dstrain_manifest.json, atomically and fsynced (with its directory); `extra`
    adds keys (a universal copy names the manifest it was converted from)."""
    import deepspeed

    import dstrain

    manifest = {
        "format": MANIFEST_FORMAT,
        "tag": tag,
        "step": step,
        "world_size": world_size,
        "written_at": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "versions": {
            "dstrain": dstrain.__version__,
            "deepspeed": deepspeed.__version__,
            "torch": torch.__version__,
        },
        **(extra or {}),
        "files": {name: files[name] for name in sorted(files)},
    }
    write_text_atomic(tag_dir / MANIFEST_NAME, json.dumps(manifest, indent=2) + "\n")
    fd = os.open(tag_dir, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _read_manifest(tag_dir: Path) -> dict[str, Any]:
    path = tag_dir / MANIFEST_NAME
    try:
        raw = read_regular_bytes(path, "checkpoint manifest", MAX_CONFIG_BYTES)
        manifest = json.loads(raw.decode("utf-8"))
    except (InputError, ValueError, RecursionError) as exc:
        raise DamagedCheckpoint(
            f"checkpoint {tag_dir} is damaged: its manifest {path} cannot be read "
            f"({type(exc).__name__}: {str(exc)[:120]})."
        ) from None
    files = manifest.get("files") if isinstance(manifest, dict) else None
    valid = (
        isinstance(files, dict)
        and manifest.get("format") == MANIFEST_FORMAT
        and all(
            isinstance(v, dict)
            and isinstance(v.get("size"), int)
            and isinstance(v.get("sha256"), str)
            and re.fullmatch(r"[0-9a-f]{64}", v["sha256"])
            for v in files.values()
        )
    )
    if not valid:
        raise DamagedCheckpoint(
            f"checkpoint {tag_dir} is damaged: its manifest {path} is not a dstrain "
            f"manifest (format {MANIFEST_FORMAT} with a size and sha256 for every file)."
        )
    return manifest


def _manifest_step(tag_dir: Path) -> int | None:
    try:
        step = _read_manifest(tag_dir).get("step")
    except DamagedCheckpoint:
        return None
    return step if isinstance(step, int) and not isinstance(step, bool) else None


def checkpoint_globals() -> list[Any]:
    """The classes (beyond tensors and containers) that the files of a checkpoint written
    by `dstrain train` hold, measured at ZeRO 0-3 with fp32, bf16 and fp16: DeepSpeed's
    loss scalers, ZeRO stage enum and bf16 fragment addresses, and numpy's RNG state
    array. `torch.load(weights_only=True)` rebuilds these and nothing else."""
    from deepspeed.runtime.fp16.loss_scaler import DynamicLossScaler, LossScaler
    from deepspeed.runtime.zero.config import ZeroStageEnum
    from deepspeed.utils.tensor_fragment import fragment_address

    return [
        LossScaler,
        DynamicLossScaler,
        ZeroStageEnum,
        fragment_address,
        np.ndarray,
        np.dtype,
        type(np.dtype(np.uint32)),  # numpy 2 pickles a dtype by its class
        np._core.multiarray._reconstruct,
    ]


def load_restricted(path: Path, *, mmap: bool = False) -> Any:
    """`torch.load` that cannot run code: tensors, containers and `checkpoint_globals`."""
    with torch.serialization.safe_globals(checkpoint_globals()):
        return torch.load(path, map_location="cpu", weights_only=True, mmap=mmap)


def _prescan(tag_dir: Path, name: str) -> None:
    """Load one .pt of a tag without running code; refuse anything dstrain never writes.
    mmap: the tensors are mapped, not read (the digest has read every byte already)."""
    try:
        load_restricted(tag_dir / name, mmap=True)
    except pickle.UnpicklingError as exc:
        found = re.search(r"GLOBAL ([\w.]+)", str(exc))
        what = f"a pickled {found.group(1)}" if found else "pickled objects"
        raise DamagedCheckpoint(
            f"checkpoint {tag_dir} is refused: {tag_dir / name} holds {what}, which "
            "checkpoints written by dstrain train never contain.",
            advice=_TRUST_ADVICE,
        ) from None
    except Exception as exc:  # torch raises many types for a file it cannot parse
        raise DamagedCheckpoint(
            f"checkpoint {tag_dir} is damaged: {tag_dir / name} is not a readable PyTorch "
            f"file ({type(exc).__name__}: {str(exc)[:160]})."
        ) from None


def verify_checkpoint(ckpt_dir: Path, tag: str, *, trust: bool = False) -> dict[str, Any] | None:
    """Check one tag before any of it is unpickled; raise `DamagedCheckpoint` naming the
    file and what differs. Returns the manifest (None: none, accepted by `trust`).

    Without `trust`: a manifest must exist and match (the same files, sizes and sha256),
    and every .pt must load with `load_restricted`. With `trust`: a missing manifest is
    accepted and nothing is pre-loaded, but a manifest that exists must still match.
    """
    tag_dir = ckpt_dir / tag
    if not tag_dir.is_dir():
        raise DamagedCheckpoint(f"checkpoint {tag_dir} is missing.")
    if not (tag_dir / MANIFEST_NAME).exists():
        if trust:
            return None
        raise DamagedCheckpoint(
            f"checkpoint {tag_dir} has no {MANIFEST_NAME} (the size and sha256 of every "
            "file, written by dstrain train with each checkpoint), so nothing shows its "
            "files are the ones dstrain wrote.",
            advice=_TRUST_ADVICE,
        )
    manifest = _read_manifest(tag_dir)
    try:
        _check_files(tag_dir, manifest["files"])
    except OSError as exc:  # the file system, not the checkpoint: stop, do not fall back
        raise DstrainError(
            f"cannot check checkpoint {tag_dir}: reading {exc.filename} failed "
            f"({exc.strerror or exc}). Nothing was loaded or changed; fix the file system "
            "(permissions, a stale NFS handle) and resume again."
        ) from None
    if not trust:
        for name in tag_files(tag_dir):
            if name.endswith(".pt"):
                _prescan(tag_dir, name)
    return manifest


def _check_files(tag_dir: Path, expected: dict[str, dict[str, Any]]) -> None:
    """The files of a tag against its manifest: the same names, sizes and sha256."""
    present = tag_files(tag_dir)
    missing = sorted(set(expected) - set(present))
    # A file the save did not write is damage only if something could unpickle it (a
    # README or an rsync leftover is not; DeepSpeed loads .pt files alone).
    extra = sorted(n for n in set(present) - set(expected) if n.endswith(".pt"))
    present = [n for n in present if n in expected]
    if missing or extra:
        parts = [f"{tag_dir / n} is missing" for n in missing[:3]]
        parts += [f"{tag_dir / n} is not in the manifest" for n in extra[:3]]
        raise DamagedCheckpoint(f"checkpoint {tag_dir} is damaged: {'; '.join(parts)}.")
    for name in present:
        want = expected[name]
        size = (tag_dir / name).stat().st_size
        if size != want["size"]:
            raise DamagedCheckpoint(
                f"checkpoint {tag_dir} is damaged: {tag_dir / name} has {size:,} bytes, "
                f"the manifest says {want['size']:,}"
                + (" (an empty file)." if size == 0 else " (truncated or rewritten).")
            )
        found = hash_file(tag_dir / name)["sha256"]
        if found != want["sha256"]:
            raise DamagedCheckpoint(
                f"checkpoint {tag_dir} is damaged: {tag_dir / name} has sha256 {found}, "
                f"the manifest says {want['sha256']} (its bytes changed after the save)."
            )


def find_resume_checkpoint(ckpt_dir: Path, *, trust: bool = False):
    """`--resume auto`: (ckpt_dir, tag, notes, damaged tags) of the newest intact tag,
    `latest` first; None when the run has no checkpoint at all. Every tag passed over is
    named in `notes`; raises when no tag is intact."""
    latest, problem = read_latest(ckpt_dir)
    tags = tag_dirs(ckpt_dir)
    if latest is None and problem is None and not tags:
        return None
    notes = [problem] if problem else []
    if latest is None and problem is None:
        notes.append(f"{ckpt_dir / 'latest'} is missing")
    candidates = ([latest] if latest and not problem else []) + [t for t in tags if t != latest]
    damaged: list[str] = []
    advice: list[str] = []
    for tag in candidates:
        try:
            verify_checkpoint(ckpt_dir, tag, trust=trust)
        except DamagedCheckpoint as exc:
            notes.append(exc.finding)
            advice += [exc.advice] if exc.advice and exc.advice not in advice else []
            damaged.append(tag)
            continue
        if notes:
            notes.append(f"falling back to {ckpt_dir / tag}, the newest intact checkpoint.")
        return ckpt_dir, tag, notes, tuple(damaged)
    raise DstrainError(
        f"--resume auto found no intact checkpoint in {ckpt_dir}: "
        + " ".join(n if n.endswith(".") else n + "." for n in [*notes, *advice])
        + " Otherwise restore the directory from a copy, or start afresh in a new "
        "--output-dir."
    )


# --------------------------------------------------------------------------------------
# Save, resolve, load
# --------------------------------------------------------------------------------------


def _disk_full(exc: BaseException) -> bool:
    """Whether a save failure may be a full disk (torch reports one as a RuntimeError
    that never says so: "unexpected pos N vs M")."""
    if isinstance(exc, OSError):
        return exc.errno in (errno.ENOSPC, errno.EDQUOT)
    return isinstance(exc, RuntimeError)


def _save_failure(ckpt_dir: Path, what: str, *, disk_full: bool) -> str:
    kept, _ = read_latest(ckpt_dir)
    kept = kept or next(iter(tag_dirs(ckpt_dir)), None)
    kept_text = (
        f"The last good checkpoint, {ckpt_dir / kept}, is kept (resume with --resume auto)"
        if kept
        else "No earlier checkpoint exists"
    )
    if not disk_full:
        return f"{what}. {kept_text}; the partial save was removed."
    try:
        free = f" ({shutil.disk_usage(ckpt_dir).free / 2**20:,.1f} MiB free there)"
    except OSError:
        free = ""
    return (
        f"{what}{free}. {kept_text}; the partial save was removed. Free space (or point "
        "--output-dir at a larger disk) and resume."
    )


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

    Every rank writes into a staging tag (`TAG.partial`) and hashes its share of the
    files; rank 0 writes the manifest, renames the staging tag to TAG (replacing an older
    copy of the same step), then moves `latest`. A rank that fails (a full disk raises
    OSError or torch's RuntimeError) makes every rank raise the same error, not hang.
    """
    import deepspeed.comm as dist

    rank, world = dist.get_rank(), dist.get_world_size()
    tag = tag_for_step(step)
    staging = ckpt_dir / f"{tag}.partial"

    def agree(failure: str | None) -> None:
        failures = [None] * world
        dist.all_gather_object(failures, failure)
        if any(failures):
            if rank == 0:
                shutil.rmtree(staging, ignore_errors=True)
            error = DstrainError(next(f for f in failures if f))
            error.same_on_all_ranks = True  # every rank raises it: only rank 0 prints it
            raise error

    failure = None
    try:
        engine.save_checkpoint(
            str(ckpt_dir), tag=staging.name, client_state=client_state, save_latest=False
        )
    except (OSError, RuntimeError) as exc:  # torch.save's disk-full error is a RuntimeError
        reason = exc.strerror if isinstance(exc, OSError) and exc.strerror else str(exc)
        where = getattr(exc, "filename", None) or staging
        failure = _save_failure(
            ckpt_dir,
            f"rank {rank} could not save checkpoint {where}: {reason.strip()[:300]}",
            disk_full=_disk_full(exc),
        )
    agree(failure)

    # Every rank hashes every world-th file, so a large checkpoint hashes in parallel.
    digests, failure = {}, None
    try:
        for name in tag_files(staging)[rank::world]:
            digests[name] = hash_file(staging / name, sync=True)
    except OSError as exc:
        failure = _save_failure(
            ckpt_dir,
            f"rank {rank} could not read back {exc.filename}: {exc.strerror or exc}",
            disk_full=_disk_full(exc),
        )
    shares = [None] * world
    dist.all_gather_object(shares, (digests, failure))
    agree(next((f for _d, f in shares if f), None))

    failure = None
    if rank == 0:
        try:
            files = {k: v for d, _f in shares for k, v in d.items()}
            for name in set(tag_files(staging)) - set(files):  # a file only rank 0 sees
                files[name] = hash_file(staging / name, sync=True)
            write_manifest(staging, tag=tag, step=step, world_size=world, files=files)
            _publish(ckpt_dir, staging, tag, step, val_loss, keep_best)
        except OSError as exc:
            failure = _save_failure(
                ckpt_dir,
                f"could not publish checkpoint {ckpt_dir / tag}: "
                f"{exc.filename or ''} {exc.strerror or exc}".replace("  ", " "),
                disk_full=_disk_full(exc),
            )
    agree(failure)
    return tag


def _publish(
    ckpt_dir: Path, staging: Path, tag: str, step: int, val_loss: float | None, keep_best: int
) -> None:
    """Rank 0: TAG.partial -> TAG, then checkpoints.json and `latest`, then prune."""
    older = ckpt_dir / f"{tag}.old"  # an earlier copy of this step, e.g. before a fallback
    if (ckpt_dir / tag).exists():
        (ckpt_dir / tag).rename(older)
    staging.rename(ckpt_dir / tag)
    shutil.rmtree(older, ignore_errors=True)
    index = [e for e in read_index(ckpt_dir) if e["tag"] != tag]
    index.append({"tag": tag, "step": step, "val_loss": val_loss})
    keep = kept_tags(index, tag, keep_best)
    index = [e for e in index if e["tag"] in keep]
    for own in (ckpt_dir / INDEX_NAME, ckpt_dir / "latest"):
        _remove_if_not_a_file(own)
    write_text_atomic(ckpt_dir / INDEX_NAME, json.dumps(index, indent=2) + "\n")
    write_text_atomic(ckpt_dir / "latest", tag)
    for path in ckpt_dir.glob("step*"):  # published tags only: never .damaged, never links
        if _STEP_TAG.fullmatch(path.name) and path.name not in keep and not path.is_symlink():
            shutil.rmtree(path, ignore_errors=True)
    for path in ckpt_dir.glob(f"step*{UNIVERSAL_SUFFIX}"):  # a universal copy goes with its tag
        source = path.name.removesuffix(UNIVERSAL_SUFFIX)
        if _STEP_TAG.fullmatch(source) and source not in keep and not path.is_symlink():
            shutil.rmtree(path, ignore_errors=True)


def _remove_if_not_a_file(path: Path) -> None:
    """dstrain's own pointer files are plain files: a FIFO, device or symlink found in
    their place is damage to remove, never a target to write into or through (a symlinked
    `latest` would otherwise have dstrain overwrite whatever it points at)."""
    try:
        mode = os.lstat(path).st_mode
    except FileNotFoundError:
        return
    if not stat.S_ISREG(mode) and not stat.S_ISDIR(mode):
        path.unlink()


def read_model_states(ckpt_dir: Path, tag: str, *, trust: bool = False) -> dict[str, Any]:
    """Rank 0's model-states file of a tag (named `zero_pp_rank_0_...` under ZeRO-3).
    Call `verify_checkpoint` first; without `trust` this load cannot run code either."""
    for name in ("mp_rank_00_model_states.pt", "zero_pp_rank_0_mp_rank_00_model_states.pt"):
        path = ckpt_dir / tag / name
        if path.exists():
            try:
                if trust:
                    return torch.load(path, map_location="cpu", weights_only=False)
                return load_restricted(path)
            except Exception as exc:  # a damaged file raises many types
                raise DamagedCheckpoint(
                    f"cannot read {path}: {type(exc).__name__}: {str(exc)[:200]}"
                ) from None
    raise DamagedCheckpoint(
        f"{ckpt_dir / tag} is not a complete DeepSpeed checkpoint (no rank-0 model states file)."
    )


def resolve_checkpoint(spec: str | Path) -> tuple[Path, str]:
    """(checkpoint dir, tag) for a run's checkpoints dir, a run dir, or one tag dir."""
    path = Path(spec)
    if path.name.endswith(UNIVERSAL_SUFFIX) and path.is_dir():
        tag = path.name.removesuffix(UNIVERSAL_SUFFIX)
        raise DstrainError(
            f"{path} is a universal copy that dstrain made of checkpoint {tag} for a resume on "
            f"another number of ranks. Pass {path.parent / tag} itself: a resume converts it "
            "again or reuses this copy."
        )
    if not path.exists():
        raise DstrainError(
            f"checkpoint {path} does not exist. Pass a run's output directory, "
            "its checkpoints/ directory, or one step directory inside it."
        )
    for candidate in (path, path / "checkpoints"):
        tag, problem = read_latest(candidate)
        if problem:
            raise DamagedCheckpoint(
                f"{problem}. Point at one step directory inside {candidate} instead "
                "(or, for training, use --resume auto, which falls back to an intact one)."
            )
        if tag is not None:
            return candidate, tag
    if path.is_dir() and (
        (path / MANIFEST_NAME).exists() or any(path.glob("*mp_rank_*_model_states.pt"))
    ):
        return path.parent, path.name
    raise DstrainError(
        f"{path} holds no DeepSpeed checkpoint (no `latest` file and no "
        "*model_states.pt). Pass a directory written by dstrain train."
    )


# --------------------------------------------------------------------------------------
# Universal checkpoints: a resume on another world size
# --------------------------------------------------------------------------------------


def universal_path(ckpt_dir: Path, tag: str) -> Path:
    """Where the universal copy of a tag is kept: `TAG.universal` beside it (not a tag name:
    tag listing, the index, pruning by name and `--resume auto` pass it by; it is deleted
    with its tag)."""
    return ckpt_dir / f"{tag}{UNIVERSAL_SUFFIX}"


def universal_checkpoint(
    ckpt_dir: Path, tag: str, *, trust: bool = False, verified: bool = True
) -> tuple[Path, bool]:
    """The universal copy of one tag (DeepSpeed's `ds_to_universal`), for a ZeRO 1-3 resume
    on another world size: (its directory, whether it was made now). A copy made earlier
    from the same files (its manifest names the tag's manifest by sha256, and it verifies)
    is reused; otherwise the tag is converted into `TAG.universal.partial/` and renamed into
    place, so a killed conversion leaves only a `.partial` directory (removed at the next
    resume). `ds_to_universal` unpickles the tag in full: it must have passed
    `verify_checkpoint` (`verified=False` verifies it here). Raises DstrainError naming
    what cannot be converted (a ZeRO-0 tag, which needs no conversion)."""
    if tag.endswith(UNIVERSAL_SUFFIX):
        raise DstrainError(f"{ckpt_dir / tag} is a universal copy already; name its tag.")
    tag_dir = ckpt_dir / tag
    manifest = None if verified else verify_checkpoint(ckpt_dir, tag, trust=trust)
    if manifest is None and (tag_dir / MANIFEST_NAME).exists():
        manifest = _read_manifest(tag_dir)
    if not any(tag_dir.glob("*optim_states.pt")):
        raise DstrainError(
            f"{tag_dir} is a ZeRO-0 checkpoint (no *optim_states.pt: every rank kept the whole "
            "optimizer state, saved once in mp_rank_00_model_states.pt). It needs no "
            "conversion: --resume loads it on any number of ranks as it is."
        )
    source = hash_file(tag_dir / MANIFEST_NAME)["sha256"] if manifest else None
    out = universal_path(ckpt_dir, tag)
    if out.is_dir() and not out.is_symlink() and source is not None:
        try:
            cached = verify_checkpoint(ckpt_dir, out.name)
        except DamagedCheckpoint:
            cached = None
        if cached and cached.get("source_manifest_sha256") == source:
            return out, False
    if out.exists() or out.is_symlink():  # stale (the tag was saved again) or damaged
        if out.is_dir() and not out.is_symlink():
            shutil.rmtree(out)
        else:
            out.unlink()
    staging = ckpt_dir / f"{out.name}.partial"
    shutil.rmtree(staging, ignore_errors=True)
    staging.mkdir()
    try:
        # ds_to_universal writes `latest_universal` beside its output: inside the staging dir.
        _convert_to_universal(tag_dir, staging / out.name, staging / "conversion.log")
        files = {
            name: hash_file(staging / out.name / name, sync=True)
            for name in tag_files(staging / out.name)
        }
        write_manifest(
            staging / out.name,
            tag=out.name,
            step=(manifest or {}).get("step", -1),
            world_size=(manifest or {}).get("world_size", -1),
            files=files,
            extra={"source_tag": tag, "source_manifest_sha256": source},
        )
        (staging / out.name).rename(out)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return out, True


def _convert_to_universal(tag_dir: Path, out: Path, log: Path) -> None:
    """DeepSpeed's ds_to_universal on one tag, its chatter (print, tqdm) sent to `log`."""
    import argparse

    from deepspeed.checkpoint.ds_to_universal import main as ds_to_universal

    from dstrain.ds_runtime import redirect_fds

    args = argparse.Namespace(
        input_folder=str(tag_dir),
        output_folder=str(out),
        num_extract_workers=1,  # no process pool inside a training rank
        num_merge_workers=1,
        keep_temp_folder=False,
        strict=True,
        # dstrain's model carries no universal-checkpoint info (a Megatron feature); the
        # converter then asks for this flag, which records the format version alone.
        inject_missing_state=True,
    )
    try:  # print and tqdm write to sys.stdout / sys.stderr, C code to the fds
        with (
            redirect_fds(log),
            open(log, "a") as sink,
            contextlib.redirect_stdout(sink),
            contextlib.redirect_stderr(sink),
        ):
            ds_to_universal(args)
    except Exception as exc:  # the converter raises assertions, OSError, KeyError, ...
        tail = log.read_text(errors="replace").strip().splitlines()[-3:] if log.exists() else []
        raise DstrainError(
            f"DeepSpeed's ds_to_universal could not convert {tag_dir} "
            f"({type(exc).__name__}: {str(exc)[:200]}"
            + (f"; its last output: {' | '.join(tail)[:300]}" if tail else "")
            + "). Nothing was written beside it; resume on the number of ranks that wrote it."
        ) from None


def restore_universal_param_groups(engine: Any, universal_dir: Path) -> None:
    """After a ZeRO-3 load of a universal checkpoint, undo two faults of DeepSpeed 0.19.8's
    loader (`load_hp_checkpoint_state_from_checkpoint_dir_stage3`; ZeRO 1-2 load right):
    it gives every parameter group the hyperparameters of the first, so dstrain's no-decay
    group (biases, norms) would go on with weight decay; and it gives every group the same
    `step` tensor, which torch's Adam advances in place once per group, so each optimizer
    step would count as several in the bias correction. Each group gets its own
    hyperparameters from the converted optimizer state back, and its own step."""
    if engine.zero_optimization_stage() != 3:
        return
    import torch

    state = engine.optimizer.optimizer.state
    for values in state.values():
        if torch.is_tensor(values.get("step")):
            values["step"] = values["step"].clone()
    # Memory-mapped: the file holds rank 0's whole fp32 partition and moments too.
    saved = load_restricted(universal_dir / "zero" / "optimizer_state.pt", mmap=True).get(
        "param_groups"
    )
    groups = engine.optimizer.optimizer.param_groups
    if not isinstance(saved, list) or len(saved) != len(groups):
        raise DstrainError(
            f"{universal_dir} holds {len(saved) if isinstance(saved, list) else 'no'} "
            f"optimizer parameter group(s), the optimizer has {len(groups)}: convert the "
            "checkpoint again (delete this directory) or resume on the world size that wrote it."
        )
    for group, own in zip(groups, saved, strict=True):
        group.update({key: value for key, value in own.items() if key != "params"})


def load_run_checkpoint(engine: Any, ckpt_dir: Path, tag: str) -> dict[str, Any]:
    """Load model, optimizer, scheduler and loss scale; return the client state.
    (DeepSpeed unpickles in full: the tag must have passed `verify_checkpoint`.)"""
    try:
        path, client_state = engine.load_checkpoint(str(ckpt_dir), tag=tag)
    except (OSError, RuntimeError, EOFError, ValueError, KeyError, pickle.UnpicklingError) as exc:
        raise DstrainError(
            f"DeepSpeed could not load checkpoint {ckpt_dir / tag}: "
            f"{type(exc).__name__}: {str(exc)[:200]}"
        ) from None
    if path is None:
        raise DstrainError(
            f"DeepSpeed could not load checkpoint {ckpt_dir / tag}: it is "
            "incomplete or from another world size or ZeRO stage."
        )
    return client_state or {}
