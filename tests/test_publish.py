"""dstrain.publish.publish_dir: the old directory or the new one, never half of either."""

from __future__ import annotations

import os

import pytest

from dstrain import publish as publish_module
from dstrain.publish import publish_dir


def _tree(root):
    return {
        str(path.relative_to(root)): path.read_text() for path in root.rglob("*") if path.is_file()
    }


def test_publishes_a_new_directory(tmp_path):
    target = tmp_path / "deeper" / "out"
    with publish_dir(target) as staging:
        assert staging.parent == target.parent and staging.name.startswith(".out.partial-")
        assert not target.exists()
        (staging / "sub").mkdir()
        (staging / "sub" / "a.txt").write_text("a")
    assert _tree(target) == {"sub/a.txt": "a"}
    assert sorted(p.name for p in target.parent.iterdir()) == ["out"]


def test_replaces_an_existing_directory_whole(tmp_path):
    target = tmp_path / "out"
    target.mkdir()
    (target / "old.txt").write_text("old")
    with publish_dir(target) as staging:
        (staging / "new.txt").write_text("new")
    assert _tree(target) == {"new.txt": "new"}
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]  # nothing left aside


@pytest.mark.parametrize("error", [RuntimeError("disk full"), KeyboardInterrupt()])
def test_failure_mid_write_leaves_the_old_directory(tmp_path, error):
    target = tmp_path / "out"
    target.mkdir()
    (target / "old.txt").write_text("old")
    with pytest.raises(type(error)), publish_dir(target) as staging:
        (staging / "half.txt").write_text("half")
        raise error
    assert _tree(target) == {"old.txt": "old"}
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]


def test_a_refusal_before_the_swap_leaves_the_old_directory(tmp_path):
    target = tmp_path / "out"
    target.mkdir()
    (target / "old.txt").write_text("old")

    def refuse():
        raise ValueError("not a model directory")

    with (
        pytest.raises(ValueError, match="not a model"),
        publish_dir(target, before_replace=refuse) as staging,
    ):
        (staging / "new.txt").write_text("new")
    assert _tree(target) == {"old.txt": "old"}
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]


def test_a_failed_final_rename_puts_the_old_directory_back(tmp_path, monkeypatch):
    target = tmp_path / "out"
    target.mkdir()
    (target / "old.txt").write_text("old")
    real_rename = os.rename

    def rename(src, dst):
        if str(src).startswith(str(tmp_path / ".out.partial-")):
            raise OSError(28, "No space left on device")
        real_rename(src, dst)

    monkeypatch.setattr(publish_module.os, "rename", rename)
    with pytest.raises(OSError, match="No space"), publish_dir(target) as staging:
        (staging / "new.txt").write_text("new")
    assert _tree(target) == {"old.txt": "old"}
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]


def test_files_are_fsynced_before_the_rename(tmp_path, monkeypatch):
    synced, order = [], []
    real_fsync, real_rename = os.fsync, os.rename
    monkeypatch.setattr(publish_module.os, "fsync", lambda fd: (synced.append(fd), real_fsync(fd)))
    monkeypatch.setattr(
        publish_module.os,
        "rename",
        lambda src, dst: (order.append(len(synced)), real_rename(src, dst)),
    )
    with publish_dir(tmp_path / "out") as staging:
        (staging / "a").write_bytes(b"1")
        (staging / "b").write_bytes(b"2")
    assert order and order[0] >= 3  # two files and the staging directory, then the rename
