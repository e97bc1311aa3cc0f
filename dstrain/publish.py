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

A process killed while writing leaves NAME as it was plus a `.NAME.partial-*` sibling.
Killed between the two renames, NAME is missing and the previous version waits in
`.NAME.old-*/NAME`: POSIX has no portable directory swap. Temporary names embed the host
and pid of their writer (`.NAME.partial-HOST.PID.XXXX`), and the next write to the same
target removes those of a dead process on this host (putting a stranded `.NAME.old-*/NAME`
back first when NAME is missing), never those of a live concurrent writer or of another
host sharing the file system.

Single files go through `write_file_atomic` (what `dstrain.ds_config.write_bytes_atomic`
calls), same rules: `.NAME.tmp-HOST.PID.XXXX`, fsync, rename.

Both follow a symlink at the target and replace what it points to (the link stays), both
refuse a block device or a socket there, and `publish_dir` refuses any non-directory
special file. `write_file_atomic` writes straight into a character device or a FIFO that
is already there (`-o /dev/null`; a FIFO only when a reader has it open, never a hang),
and into whatever `/dev/stdout` leads to (a pipe, a terminal, or a redirected file,
appended to); there is nothing to rename onto them. New files get 0666 and new
directories 0777, less the umask; a replaced regular file keeps its mode. An OSError while
writing (disk full above all) becomes a `WriteError` (a `DstrainError` and an `OSError`)
naming the path and what was kept.
"""

from __future__ import annotations

import contextlib
import errno
import os
import re
import secrets
import shutil
import socket
import stat
import time
from collections.abc import Callable, Iterator
from pathlib import Path

from dstrain.errors import DstrainError

# A temporary name from an older dstrain (tempfile's `.NAME.XXXXXXXX.tmp`, no pid) is
# removed once it is this old: no write takes an hour.
LEGACY_STALE_S = 3600.0


class WriteError(DstrainError, OSError):
    """Writing an output failed: names the path, the cause and what was kept. Also an
    OSError, so callers that handle I/O failures keep doing so."""

    def __str__(self) -> str:
        return str(self.args[0])  # the message, not OSError's "[Errno N] ..." form


# --------------------------------------------------------------------------------------
# Temporary names and stale ones
# --------------------------------------------------------------------------------------


def _host_tag() -> str:
    return re.sub(r"[^A-Za-z0-9-]", "_", socket.gethostname().split(".")[0]) or "host"


def temp_name(target_name: str, kind: str) -> str:
    """`.NAME.KIND-HOST.PID.RANDOM`: who wrote it is in the name (see `clean_stale`)."""
    return f".{target_name}.{kind}-{_host_tag()}.{os.getpid()}.{secrets.token_hex(4)}"


def _pid_alive(pid: int) -> bool:
    if pid == os.getpid():
        return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True  # another user's live process
    return True


def _is_stale(entry: str, target_name: str, kinds: tuple[str, ...]) -> bool:
    for kind in kinds:
        prefix = f".{target_name}.{kind}-"
        if entry.startswith(prefix):
            parts = entry[len(prefix) :].rsplit(".", 2)
            if len(parts) != 3 or not parts[1].isdigit() or parts[0] != _host_tag():
                return False  # another host's, or not ours
            return not _pid_alive(int(parts[1]))
    return False


def clean_stale(target: Path, kinds: tuple[str, ...]) -> list[Path]:
    """Remove temporary siblings of `target` left by a dead process on this host; return
    them. A stranded `.NAME.old-*/NAME` is renamed back to NAME when NAME is missing."""
    removed: list[Path] = []
    try:
        entries = os.listdir(target.parent)
    except OSError:
        return removed
    legacy = re.compile(rf"\.{re.escape(target.name)}\.[A-Za-z0-9_]{{8}}\.tmp")
    now = time.time()
    for entry in sorted(entries):
        path = target.parent / entry
        stale = _is_stale(entry, target.name, kinds)
        if not stale and "tmp" in kinds and legacy.fullmatch(entry):
            with contextlib.suppress(OSError):
                stale = now - path.lstat().st_mtime > LEGACY_STALE_S
        if not stale:
            continue
        with contextlib.suppress(OSError):
            kept = path / target.name
            stranded = entry.startswith(f".{target.name}.old-") and kept.exists()
            if stranded and not target.exists() and not target.is_symlink():
                os.rename(kept, target)  # the previous version, put back
            if path.is_dir() and not path.is_symlink():
                shutil.rmtree(path)
            else:
                path.unlink()
            removed.append(path)
    return removed


def write_error(path: Path, exc: OSError, kept: str) -> WriteError:
    """`WriteError` for `exc` raised while writing `path`; `kept` says what is left."""
    reason = exc.strerror or str(exc)
    if exc.errno in (errno.ENOSPC, errno.EDQUOT):
        hint = "the disk (or your quota) is full there: free space, or write elsewhere"
    else:
        hint = "check the path and its permissions"
    where = f" ({exc.filename})" if exc.filename and str(exc.filename) != str(path) else ""
    error = WriteError(f"cannot write {path}: {reason}{where}; {kept}; {hint}")
    error.errno, error.strerror, error.filename = exc.errno, reason, str(path)
    return error


# --------------------------------------------------------------------------------------
# Files
# --------------------------------------------------------------------------------------


def _resolve_target(path: Path) -> Path:
    """The path to replace: a symlink's final target (the link itself stays)."""
    return Path(os.path.realpath(path)) if path.is_symlink() else path


def _write_all(fd: int, data: bytes) -> None:
    view = memoryview(data)
    while view:
        written = os.write(fd, view)
        view = view[written:]


def _is_descriptor_alias(path: Path) -> bool:
    """`/dev/stdout`, `/dev/fd/1`, `/proc/self/fd/1`...: an open descriptor, not a file."""
    text = os.path.abspath(path)
    if text.startswith(("/dev/stdout", "/dev/stderr", "/dev/fd/", "/proc/")):
        return True
    with contextlib.suppress(OSError):
        return path.is_symlink() and os.readlink(path).startswith(("/proc/", "/dev/fd/"))
    return False


def _write_into_special(path: Path, data: bytes, mode: int) -> None:
    """Write into an existing character device, FIFO or descriptor alias, no rename (there
    is nothing to rename onto it). A FIFO with no reader is refused at once instead of
    blocking; a regular file behind `/dev/stdout` is appended to, as the shell opened it."""
    kind = (
        "FIFO"
        if stat.S_ISFIFO(mode)
        else "character device"
        if stat.S_ISCHR(mode)
        else "file (written in place: part of the data may be there)"
    )
    flags = os.O_WRONLY | os.O_NONBLOCK | os.O_CLOEXEC | getattr(os, "O_NOCTTY", 0)
    if stat.S_ISREG(mode):
        flags |= os.O_APPEND
    try:
        fd = os.open(path, flags)
    except OSError as exc:
        if exc.errno == errno.ENXIO:
            raise WriteError(
                f"cannot write {path}: it is a FIFO (named pipe) and nothing is reading it; "
                "start the reader first, or give a regular file"
            ) from None
        raise write_error(path, exc, f"the {kind} was left as it was") from None
    try:
        os.set_blocking(fd, True)
        _write_all(fd, data)
    except OSError as exc:
        raise write_error(path, exc, f"the {kind} was left in place (not replaced)") from None
    finally:
        os.close(fd)


def write_file_atomic(path: str | os.PathLike[str], data: bytes) -> None:
    """Write `data` to `path` so readers see the old file or the new one, never half.

    A regular file (or none) at `path`: written to `.NAME.tmp-HOST.PID.XXXX` beside it,
    fsynced, renamed over it; a new file gets 0666 less the umask, a replaced one keeps
    its mode. A symlink: its target is replaced that way and the link stays. A character
    device or a FIFO already there: written into directly (no atomicity to offer; a FIFO
    without a reader is refused rather than waited on); so is `/dev/stdout` (or
    `/dev/fd/N`, `/proc/...`) whatever it leads to, appending to a regular file there. A directory, block device or
    socket: refused. Stale temporaries of a dead writer of the same target are removed
    first. Any OSError becomes a `WriteError` naming the path and what was kept; the
    temporary file is removed.
    """
    path = Path(path)
    try:
        st = path.stat()  # follows links, /proc/self/fd/N included
    except FileNotFoundError:
        st = None
    except OSError as exc:
        raise write_error(path, exc, "nothing was written") from None
    if st is not None:
        special = stat.S_ISCHR(st.st_mode) or stat.S_ISFIFO(st.st_mode)
        if special or (stat.S_ISREG(st.st_mode) and _is_descriptor_alias(path)):
            _write_into_special(path, data, st.st_mode)
            return
        if not stat.S_ISREG(st.st_mode):
            what = "a directory" if stat.S_ISDIR(st.st_mode) else "a block device or socket"
            raise WriteError(
                f"cannot write {path}: it is {what}, and dstrain will not replace it with a "
                "file; give a file path"
            )
    target = _resolve_target(path)
    kept = f"the previous {target} is untouched" if st is not None else "nothing was written there"
    try:
        target.parent.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise write_error(path, exc, "nothing was written") from None
    clean_stale(target, ("tmp",))
    tmp = target.parent / (temp_name(target.name, "tmp"))
    try:
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o666)
        try:
            if st is not None:
                os.fchmod(fd, stat.S_IMODE(st.st_mode))
                if os.geteuid() == 0:  # root replacing a user's file: it stays theirs
                    with contextlib.suppress(OSError):
                        os.fchown(fd, st.st_uid, st.st_gid)
            _write_all(fd, data)
            os.fsync(fd)
        finally:
            os.close(fd)
        os.replace(tmp, target)
    except OSError as exc:
        with contextlib.suppress(OSError):
            tmp.unlink()
        raise write_error(path, exc, kept) from None
    except BaseException:
        with contextlib.suppress(OSError):
            tmp.unlink()
        raise
    _fsync_dir(target.parent)


# --------------------------------------------------------------------------------------
# Directories
# --------------------------------------------------------------------------------------


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

    A symlink at `target` is followed: the directory it points to is replaced, the link
    stays. A FIFO, device or socket there is refused before anything is written. The
    staging directory gets 0777 less the umask. Stale `.NAME.partial-*` / `.NAME.old-*`
    siblings of a dead process on this host are removed first. An OSError of the publish
    itself, or a disk-full error from the block, becomes a `WriteError` naming `target`.
    """
    link = Path(target)
    target = _resolve_target(link)
    with contextlib.suppress(OSError):  # a parent that cannot be made fails below
        target.parent.mkdir(parents=True, exist_ok=True)
        clean_stale(target, ("partial", "old"))  # may put a stranded previous one back
    with contextlib.suppress(FileNotFoundError):
        mode = target.stat().st_mode
        if not (stat.S_ISDIR(mode) or stat.S_ISREG(mode)):
            raise WriteError(
                f"cannot write {link}: it is a FIFO, device or socket, and dstrain will not "
                "replace it with a directory; give a directory path"
            )
    existed = target.exists()
    kept = f"the previous {target} is untouched" if existed else "nothing was written there"
    try:
        target.parent.mkdir(parents=True, exist_ok=True)
        staging = target.parent / temp_name(target.name, "partial")
        os.mkdir(staging, 0o777)
    except OSError as exc:
        raise write_error(link, exc, "nothing was written") from None
    try:
        try:
            yield staging
        except OSError as exc:
            if exc.errno in (errno.ENOSPC, errno.EDQUOT):
                raise write_error(link, exc, f"{kept}; the partial output was removed") from None
            raise
        try:
            fsync_tree(staging)  # the data is on disk before any name points at it
            if before_replace is not None:
                before_replace()
            _swap_into_place(staging, target)
        except WriteError:
            raise
        except OSError as exc:
            raise write_error(link, exc, f"{kept}; the partial output was removed") from None
    finally:
        shutil.rmtree(staging, ignore_errors=True)  # already gone after a successful swap


def _swap_into_place(staging: Path, target: Path) -> None:
    """Rename `staging` to `target`; an existing `target` is moved aside first and removed
    only once the new one is in place (put back if the second rename fails)."""
    if not target.exists() and not target.is_symlink():
        os.rename(staging, target)
    else:
        aside = target.parent / temp_name(target.name, "old")
        os.mkdir(aside, 0o700)
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
