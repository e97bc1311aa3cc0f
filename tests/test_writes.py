"""Output writes: never replace a device, FIFO or symlink; respect the umask; clean stale
temporaries of dead writers only; disk-full names the path and keeps the old output.

Disk-full is injected (an OSError(ENOSPC) from os.write / os.fsync: no small tmpfs can be
mounted here); FIFOs, symlinks, pids and (as root) device nodes are real.
"""

from __future__ import annotations

import errno
import os
import stat
import subprocess
import sys
from pathlib import Path

import pytest
from click.testing import CliRunner

from dstrain import publish
from dstrain.cli import cli
from dstrain.ds_config import write_bytes_atomic, write_text_atomic
from dstrain.errors import DstrainError
from dstrain.publish import WriteError, publish_dir, temp_name


def enospc(*args, **kwargs):
    raise OSError(errno.ENOSPC, "No space left on device")


def siblings(path: Path) -> list[str]:
    return sorted(p.name for p in path.parent.iterdir())


@pytest.fixture
def umask():
    previous = os.umask(0o022)
    yield lambda mask: os.umask(mask)
    os.umask(previous)


@pytest.fixture
def dead_pid():
    child = subprocess.Popen([sys.executable, "-c", "pass"])
    child.wait()
    return child.pid  # reaped: no process has this pid (pids are not reused this fast)


@pytest.fixture
def live_pid():
    child = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    yield child.pid
    child.kill()
    child.wait()


def stale_name(target: str, kind: str, pid: int) -> str:
    name = temp_name(target, kind)
    head, _pid, rand = name.rsplit(".", 2)
    return f"{head}.{pid}.{rand}"


# -- files -------------------------------------------------------------------------------


def test_fifo_at_the_target_without_a_reader_is_refused_not_waited_on(tmp_path):
    fifo = tmp_path / "out.json"
    os.mkfifo(fifo)
    with pytest.raises(WriteError, match=r"FIFO .* nothing is reading it"):
        write_text_atomic(fifo, "{}\n")
    assert stat.S_ISFIFO(fifo.lstat().st_mode) and siblings(fifo) == ["out.json"]


def test_fifo_with_a_reader_gets_the_bytes_and_stays_a_fifo(tmp_path):
    fifo = tmp_path / "out.json"
    os.mkfifo(fifo)
    reader = subprocess.Popen(["cat", str(fifo)], stdout=subprocess.PIPE)
    try:
        for _ in range(200):  # wait until cat has the FIFO open
            try:
                write_text_atomic(fifo, "hello\n")
                break
            except WriteError:
                import time

                time.sleep(0.01)
        assert reader.communicate(timeout=10)[0] == b"hello\n"
    finally:
        reader.kill()
    assert stat.S_ISFIFO(fifo.lstat().st_mode)


def test_a_symlink_is_written_through_and_kept(tmp_path):
    real = tmp_path / "real" / "ds.json"
    real.parent.mkdir()
    real.write_text("old")
    real.chmod(0o640)
    link = tmp_path / "ds.json"
    link.symlink_to(real)
    write_text_atomic(link, "new")
    assert link.is_symlink() and real.read_text() == "new"
    assert stat.S_IMODE(real.stat().st_mode) == 0o640  # a replaced file keeps its mode
    dangling = tmp_path / "dangling"
    dangling.symlink_to(tmp_path / "real" / "created.json")
    write_text_atomic(dangling, "x")
    assert dangling.is_symlink() and (tmp_path / "real" / "created.json").read_text() == "x"


@pytest.mark.parametrize(
    ("mask", "file_mode", "dir_mode"), [(0o022, 0o644, 0o755), (0o077, 0o600, 0o700)]
)
def test_new_files_and_directories_respect_the_umask(tmp_path, umask, mask, file_mode, dir_mode):
    umask(mask)
    write_text_atomic(tmp_path / "new" / "a.json", "{}")
    assert stat.S_IMODE((tmp_path / "new" / "a.json").stat().st_mode) == file_mode
    assert stat.S_IMODE((tmp_path / "new").stat().st_mode) == dir_mode
    with publish_dir(tmp_path / "cache") as staging:
        (staging / "f").write_text("x")
    assert stat.S_IMODE((tmp_path / "cache").stat().st_mode) == dir_mode


def test_enospc_names_the_path_and_keeps_the_old_file(tmp_path, monkeypatch):
    target = tmp_path / "ds.json"
    target.write_text("old")
    monkeypatch.setattr(publish.os, "write", enospc)
    with pytest.raises(DstrainError) as info:
        write_bytes_atomic(target, b"new")
    message = str(info.value)
    assert str(target) in message and "No space left" in message
    assert "previous" in message and "untouched" in message and "disk" in message
    assert isinstance(info.value, OSError) and info.value.errno == errno.ENOSPC
    monkeypatch.undo()
    assert target.read_text() == "old" and siblings(target) == ["ds.json"]


def test_stale_temp_files_of_dead_writers_are_cleaned_live_ones_kept(tmp_path, dead_pid, live_pid):
    target = tmp_path / "ds.json"
    dead = tmp_path / stale_name("ds.json", "tmp", dead_pid)
    live = tmp_path / stale_name("ds.json", "tmp", live_pid)
    other_host = tmp_path / f".ds.json.tmp-elsewhere.{dead_pid}.abcd1234"
    legacy_old, legacy_new = tmp_path / ".ds.json.abcd_123.tmp", tmp_path / ".ds.json.efgh_456.tmp"
    for path in (dead, live, other_host, legacy_old, legacy_new):
        path.write_text("half")
    os.utime(legacy_old, (0, 0))  # an old dstrain's mkstemp name, hours old
    write_text_atomic(target, "{}")
    assert not dead.exists() and not legacy_old.exists()
    assert live.exists() and other_host.exists() and legacy_new.exists()


def test_directories_devices_block_refused(tmp_path):
    (tmp_path / "d").mkdir()
    with pytest.raises(WriteError, match="is a directory"):
        write_text_atomic(tmp_path / "d", "x")


def test_dev_full_gives_disk_full_and_stays_a_device(tmp_path):
    node = tmp_path / "full"
    try:
        os.mknod(node, 0o666 | stat.S_IFCHR, os.makedev(1, 7))  # /dev/full
        os.open(node, os.O_WRONLY)
    except (PermissionError, OSError) as exc:
        pytest.skip(f"cannot make a device node here: {exc}")
    with pytest.raises(WriteError, match=r"No space left on device.*disk"):
        write_text_atomic(node, "{}")
    assert stat.S_ISCHR(node.lstat().st_mode) and siblings(node) == ["full"]
    null = tmp_path / "null"
    os.mknod(null, 0o666 | stat.S_IFCHR, os.makedev(1, 3))  # /dev/null: written into
    write_text_atomic(null, "{}")
    assert stat.S_ISCHR(null.lstat().st_mode)


def test_dash_o_dev_stdout_writes_to_the_pipe_or_the_redirected_file(tmp_path):
    command = [sys.executable, "-m", "dstrain", "gen-config", "--zero", "2", "-o", "/dev/stdout"]
    piped = subprocess.run(command, capture_output=True, timeout=60, check=True)
    assert b'"stage": 2' in piped.stdout and b"wrote /dev/stdout" in piped.stderr
    out = tmp_path / "out.json"
    with open(out, "wb") as handle:
        subprocess.run(command, stdout=handle, stderr=subprocess.DEVNULL, timeout=60, check=True)
    assert out.read_bytes() == piped.stdout and siblings(out) == ["out.json"]
    assert Path("/dev/stdout").is_symlink()


# -- directories -------------------------------------------------------------------------


def test_publish_dir_refuses_a_fifo_and_writes_through_a_symlink(tmp_path):
    fifo = tmp_path / "cache"
    os.mkfifo(fifo)
    with pytest.raises(WriteError, match="FIFO"), publish_dir(fifo):
        pytest.fail("the block must not run")
    assert stat.S_ISFIFO(fifo.lstat().st_mode)
    real = tmp_path / "real"
    real.mkdir()
    (real / "old").write_text("old")
    link = tmp_path / "out"
    link.symlink_to(real)
    with publish_dir(link) as staging:
        (staging / "new").write_text("new")
    assert link.is_symlink() and sorted(p.name for p in real.iterdir()) == ["new"]


def test_publish_dir_cleans_dead_partials_keeps_live_and_restores_stranded(
    tmp_path, dead_pid, live_pid
):
    target = tmp_path / "cache"
    dead = tmp_path / stale_name("cache", "partial", dead_pid)
    live = tmp_path / stale_name("cache", "partial", live_pid)
    stranded = tmp_path / stale_name("cache", "old", dead_pid)
    for path in (dead, live, stranded / "cache"):
        path.mkdir(parents=True)
    (stranded / "cache" / "manifest.json").write_text("previous")
    # Killed between the two renames: `cache` is missing, the previous one is aside.
    publish.clean_stale(target, ("partial", "old"))
    assert (target / "manifest.json").read_text() == "previous"
    assert not dead.exists() and not stranded.exists() and live.exists()


def test_publish_dir_enospc_in_the_block_keeps_the_old_directory(tmp_path):
    target = tmp_path / "cache"
    target.mkdir()
    (target / "old").write_text("old")
    with pytest.raises(WriteError) as info, publish_dir(target):
        enospc()
    assert str(target) in str(info.value) and "untouched" in str(info.value)
    assert siblings(target) == ["cache"] and (target / "old").read_text() == "old"


# -- end to end through the CLI ----------------------------------------------------------


def test_gen_config_to_a_fifo_and_to_a_full_disk(tmp_path, monkeypatch):
    fifo = tmp_path / "ds.json"
    os.mkfifo(fifo)
    result = CliRunner().invoke(cli, ["gen-config", "-o", str(fifo)])
    assert result.exit_code == 1 and "nothing is reading it" in str(result.exception)
    assert stat.S_ISFIFO(fifo.lstat().st_mode)

    target = tmp_path / "kept.json"
    target.write_text("old")
    monkeypatch.setattr(publish.os, "write", enospc)
    result = CliRunner().invoke(cli, ["gen-config", "-o", str(target)])
    assert result.exit_code == 1 and f"cannot write {target}" in str(result.exception)
    monkeypatch.undo()
    assert target.read_text() == "old" and siblings(target) == ["ds.json", "kept.json"]


FASTA = ">a\nATGAAACCCGGGTTTTAA\n>b\nATGCCCAAAGGGTAA\n"


def test_prepare_to_a_fifo_and_to_a_full_disk(tmp_path, monkeypatch):
    fasta = tmp_path / "genes.fasta"
    fasta.write_text(FASTA)
    fifo = tmp_path / "fifo"
    os.mkfifo(fifo)
    result = CliRunner().invoke(cli, ["prepare", str(fasta), "-o", str(fifo)])
    assert result.exit_code != 0 and isinstance(result.exception, DstrainError), result.output
    # prepare refuses it itself ("not a cache directory"); publish_dir would too (above).
    assert str(fifo) in str(result.exception) and stat.S_ISFIFO(fifo.lstat().st_mode)

    cache = tmp_path / "cache"
    result = CliRunner().invoke(cli, ["prepare", str(fasta), "-o", str(cache)])
    assert result.exit_code == 0, result.output
    before = {p.name: p.read_bytes() for p in cache.iterdir()}
    fasta.write_text(FASTA + ">c\nATGTTTTAA\n")  # new input: the cache is rebuilt
    monkeypatch.setattr(publish.os, "fsync", enospc)  # the fsync before the swap fails
    result = CliRunner().invoke(cli, ["prepare", str(fasta), "-o", str(cache)])
    assert isinstance(result.exception, DstrainError), result.output
    message = str(result.exception)
    assert f"cannot write {cache}" in message and "untouched" in message, message
    monkeypatch.undo()
    assert {p.name: p.read_bytes() for p in cache.iterdir()} == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["cache", "fifo", "genes.fasta"]
