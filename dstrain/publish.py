"""Publishing a directory atomically: readers find the old directory or the new one at
the target path, never a half-written one.

Pure layer (L0, stdlib only). One helper, `publish_dir`, used for every directory dstrain
hands to a user or to another rank: the `convert-checkpoint` output (dstrain/model.py),
the HF export (dstrain/export.py) and the token cache (dstrain/prepare.py). Single files
go through `dstrain.ds_config.write_text_atomic`; DeepSpeed checkpoint tags have their
own all-ranks protocol in dstrain/checkpoints.py.

The sequence, all in the target's parent directory (one file system, so renames are
atomic):

    .NAME.partial-XXXX/   written by the caller, every file fsynced
    NAME -> .NAME.old-XXXX/NAME      only if NAME exists
    .NAME.partial-XXXX -> NAME       put the old one back if this fails
    rm -r .NAME.old-XXXX/

A process killed while writing leaves NAME as it was plus a `.NAME.partial-*` sibling
(safe to delete). Killed between the two renames, NAME is missing and the previous
version waits in `.NAME.old-*/NAME`: POSIX has no portable directory swap.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import tempfile
from collections.abc import Callable, Iterator
from pathlib import Path


@contextlib.contextmanager
def publish_dir(
    target: str | os.PathLike[str], *, before_replace: Callable[[], None] | None = None
) -> Iterator[Path]:
    """Yield an empty staging directory beside `target`; when the block ends normally,
    fsync what was written there and rename it to `target`, replacing an existing one.

    `before_replace`, if given, runs after the block and before anything at `target` is
    touched (to re-check a refusal rule: time has passed since the caller first checked);
    it may raise. Whatever is raised, in the block or by `before_replace`, removes the
    staging directory and leaves `target` exactly as it was.
    """
    target = Path(target)
    target.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{target.name}.partial-", dir=target.parent))
    try:
        yield staging
        fsync_tree(staging)  # the data is on disk before any name points at it
        if before_replace is not None:
            before_replace()
        _swap_into_place(staging, target)
    finally:
        shutil.rmtree(staging, ignore_errors=True)  # already gone after a successful swap


def _swap_into_place(staging: Path, target: Path) -> None:
    """Rename `staging` to `target`; an existing `target` is moved aside first and removed
    only once the new one is in place (put back if the second rename fails)."""
    if not target.exists() and not target.is_symlink():
        os.rename(staging, target)
    else:
        aside = Path(tempfile.mkdtemp(prefix=f".{target.name}.old-", dir=target.parent))
        try:
            os.rename(target, aside / target.name)
        except BaseException:
            shutil.rmtree(aside, ignore_errors=True)
            raise
        try:
            os.rename(staging, target)
        except BaseException:
            os.rename(aside / target.name, target)
            os.rmdir(aside)
            raise
        shutil.rmtree(aside, ignore_errors=True)
    _fsync_dir(target.parent)  # make the renames themselves durable


def fsync_tree(root: Path) -> None:
    """fsync every file under `root`, then every directory (deepest first)."""
    for dirpath, _dirnames, filenames in os.walk(root, topdown=False):
        for name in filenames:
            path = os.path.join(dirpath, name)
            if os.path.islink(path):
                continue
            with open(path, "rb") as handle:
                os.fsync(handle.fileno())
        _fsync_dir(Path(dirpath))


def _fsync_dir(path: Path) -> None:
    """fsync a directory's entries where the platform allows it (not on Windows)."""
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass  # some file systems refuse fsync on a directory; the rename still happened
    finally:
        os.close(fd)
