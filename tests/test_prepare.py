"""The token cache: built once, reused while inputs and settings match, never half-written."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from subprocs import run_cli

from dstrain import publish as publish_module
from dstrain.errors import DstrainError
from dstrain.fasta import bundled_fasta_paths, is_validation_record, read_fasta
from dstrain.prepare import load_prepared, prepare_dataset
from dstrain.settings import DataSettings

ASSETS = Path(__file__).parent / "assets" / "fasta"


@pytest.fixture
def fasta_copies(tmp_path) -> list[Path]:
    """Writable copies of the bundled H3N2 files (HA, HA, NA)."""
    out = tmp_path / "in"
    out.mkdir()
    return [Path(shutil.copy(p, out / p.name)) for p in bundled_fasta_paths()]


def _examples(split) -> list[bytes]:
    return [split[i].tobytes() for i in range(len(split))]


def test_prepare_writes_every_record_once_and_reuses(fasta_copies, tmp_path):
    cache = tmp_path / "cache"
    first = prepare_dataset(fasta_copies, cache, DataSettings())
    assert not first.reused
    assert isinstance(first.train.tokens, np.memmap)
    assert first.train.tokens.dtype == np.uint8
    report = first.report
    assert (report["records"], report["codons"]) == (144, 78_625)
    assert (report["unknown_codons"], report["partial_codons"]) == (6, 47)
    assert report["train"]["sequences"] + report["val"]["sequences"] == 144
    assert first.train.num_tokens + first.val.num_tokens == 78_625
    assert 0 < len(first.val) < 30  # val_fraction 0.1 of 144 records

    expected = sorted(
        r.ids.tobytes() for p in fasta_copies for r in read_fasta(p, DataSettings())[0]
    )
    assert sorted(_examples(first.train) + _examples(first.val)) == expected

    manifest = json.loads((cache / "manifest.json").read_text())
    assert [s["sha256"] for s in manifest["sources"]] == [
        s["sha256"] for s in first.manifest["sources"]
    ]
    assert manifest["settings"] == DataSettings().model_dump(mode="json")

    second = prepare_dataset(fasta_copies, cache, DataSettings())
    assert second.reused
    assert _examples(second.train) == _examples(first.train)
    loaded = load_prepared(cache)
    assert _examples(loaded.val) == _examples(first.val)
    assert loaded.settings == DataSettings()


def test_batch_time_settings_reuse_token_settings_rebuild(fasta_copies, tmp_path):
    cache = tmp_path / "cache"
    prepare_dataset(fasta_copies, cache, DataSettings())
    batch_only = DataSettings(padding="max_length", loss_on_pad=True)
    assert prepare_dataset(fasta_copies, cache, batch_only).reused

    windows = prepare_dataset(fasta_copies, cache, DataSettings(max_length=100))
    assert not windows.reused
    # 579 codons -> 6 windows (5 x 100 + 79); 480 or 481 -> 5 windows
    assert windows.report["windows"] == 96 * 6 + 48 * 5
    assert len(windows.train) + len(windows.val) == 96 * 6 + 48 * 5
    assert max(windows.train.lengths()) == 100
    assert windows.train.num_tokens + windows.val.num_tokens == 78_625  # nothing truncated

    orf = prepare_dataset(fasta_copies, cache, DataSettings(frame="orf"))
    assert not orf.reused
    assert set(orf.train.lengths()) == {567, 470}
    assert prepare_dataset(fasta_copies, cache, DataSettings(frame="orf")).reused


def test_changed_file_rebuilds_and_keeps_the_split(fasta_copies, tmp_path):
    cache = tmp_path / "cache"
    before = prepare_dataset(fasta_copies, cache, DataSettings(val_fraction=0.3))
    na = fasta_copies[2]
    extra = "".join(f">extra/{i}\n{'ATGAAACCC' * 10}{'GGG' * i}TAA\n" for i in range(20))
    na.write_text(na.read_text() + extra)
    after = prepare_dataset(fasta_copies, cache, DataSettings(val_fraction=0.3))
    assert not after.reused
    assert after.report["records"] == 164
    # Records already in validation stay there when the file grows.
    assert set(_examples(before.val)) <= set(_examples(after.val))
    assert set(_examples(before.train)) <= set(_examples(after.train))
    new_val = sum(is_validation_record(f"extra/{i}", 0.3, 0) for i in range(20))
    assert after.report["val"]["records"] == before.report["val"]["records"] + new_val


def test_failed_rebuild_leaves_the_old_cache(fasta_copies, tmp_path, monkeypatch):
    cache = tmp_path / "cache"
    good = prepare_dataset(fasta_copies, cache, DataSettings())
    bad_file = tmp_path / "protein.fasta"
    shutil.copy(ASSETS / "protein.fasta", bad_file)
    with pytest.raises(DstrainError, match="protein"):
        prepare_dataset([*fasta_copies, bad_file], cache, DataSettings())

    def interrupted(staging, cache_dir):
        raise KeyboardInterrupt

    monkeypatch.setattr(publish_module, "_swap_into_place", interrupted)
    with pytest.raises(KeyboardInterrupt):
        prepare_dataset(fasta_copies, cache, DataSettings(max_length=64))

    assert sorted(p.name for p in tmp_path.iterdir()) == ["cache", "in", "protein.fasta"]
    old = load_prepared(cache)
    assert old.manifest == good.manifest
    assert _examples(old.train) == _examples(good.train)


def test_damaged_cache_is_rebuilt_or_reported(fasta_copies, tmp_path):
    cache = tmp_path / "cache"
    prepare_dataset(fasta_copies, cache, DataSettings())
    tokens = cache / "train_tokens.bin"
    tokens.write_bytes(tokens.read_bytes()[:-10])
    with pytest.raises(DstrainError, match="damaged"):
        load_prepared(cache)
    rebuilt = prepare_dataset(fasta_copies, cache, DataSettings())
    assert not rebuilt.reused
    assert load_prepared(cache).train.num_tokens == rebuilt.train.num_tokens


def test_refuses_to_replace_a_directory_that_is_not_a_cache(fasta_copies, tmp_path):
    target = tmp_path / "results"
    target.mkdir()
    (target / "notes.txt").write_text("keep me")
    with pytest.raises(DstrainError, match="not a dstrain token cache") as info:
        prepare_dataset(fasta_copies, target, DataSettings())
    assert str(target) in str(info.value)
    assert (target / "notes.txt").read_text() == "keep me"
    with pytest.raises(DstrainError, match="no dstrain token cache"):
        load_prepared(tmp_path / "absent")


def test_everything_in_validation_is_an_error(tmp_path):
    record_id = next(f"r{i}" for i in range(100) if is_validation_record(f"r{i}", 0.5, 0))
    path = tmp_path / "one.fasta"
    path.write_text(f">{record_id}\nATGAAACCCTAA\n")
    with pytest.raises(DstrainError, match="hashed into the validation split"):
        prepare_dataset([path], tmp_path / "cache", DataSettings(val_fraction=0.5))


# --------------------------------------------------------------------------------------
# CLI
# --------------------------------------------------------------------------------------


def test_cli_prepare_json_then_reused_summary(fasta_copies, tmp_path, capsys):
    cache = tmp_path / "cache"
    args = ["prepare", *map(str, fasta_copies), "-o", str(cache)]
    code, out, err = run_cli([*args, "--json"], capsys)
    assert code == 0, err
    report = json.loads(out)
    assert report["reused"] is False
    assert {k: report[k] for k in ("records", "codons", "unknown_codons", "partial_codons")} == {
        "records": 144,
        "codons": 78_625,
        "unknown_codons": 6,
        "partial_codons": 47,
    }
    assert report["skipped_records"] == 0
    assert [f["partial_codons"] for f in report["files"]] == [0, 0, 47]
    assert [f["unknown_codons"] for f in report["files"]] == [1, 2, 3]

    code, out, _ = run_cli(args, capsys)
    assert code == 0
    assert out.startswith(f"reused cache {cache}")
    assert "47 partial codons dropped" in out

    code, out, _ = run_cli([*args, "--frame", "orf", "--json"], capsys)
    assert json.loads(out)["codons"] == 2 * 48 * 567 + 48 * 470


@pytest.mark.parametrize(
    ("extra", "bad_name", "code", "expected"),
    [
        ([], "missing.fasta", 1, "no such file"),
        ([], "reads.fastq", 1, "looks like FASTQ"),
        (["--on-ambiguous", "error"], "edge_cases.fasta", 1, "record 3 ('with_n')"),
        (["--max-length", "4"], None, 2, "--max-length 4"),
        (["--max-length", "64", "--window-overlap", "64"], None, 2, "--window-overlap (64)"),
    ],
)
def test_cli_errors_are_one_paragraph(tmp_path, capsys, extra, bad_name, code, expected):
    path = tmp_path / (bad_name or "edge_cases.fasta")
    if bad_name != "missing.fasta":
        shutil.copy(ASSETS / (bad_name or "edge_cases.fasta"), path)
    got, out, err = run_cli(["prepare", str(path), "-o", str(tmp_path / "c"), *extra], capsys)
    assert got == code
    assert out == ""
    assert err.startswith("error: ") and err.count("\n") == 1
    assert expected in err
    if bad_name:
        assert str(path) in err
    assert not (tmp_path / "c").exists()


def test_cli_subprocess_no_traceback_and_light_import(tmp_path):
    bad = tmp_path / "protein.fasta"
    shutil.copy(ASSETS / "protein.fasta", bad)
    run = subprocess.run(
        [sys.executable, "-m", "dstrain", "prepare", str(bad), "-o", str(tmp_path / "c")],
        capture_output=True,
        text=True,
    )
    assert run.returncode == 1
    assert "Traceback" not in run.stderr
    assert f"{bad}: record 1" in run.stderr and "protein" in run.stderr

    code = "import sys, dstrain.cli; print(sorted(m for m in ('numpy', 'Bio') if m in sys.modules))"
    light = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert light.stdout.strip() == "[]", light.stderr


# --------------------------------------------------------------------------------------
# Parity switches: part of the cache key; caches from before them
# --------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "changed",
    [{"partial_codon": "unk"}, {"long_records": "truncate"}, {"on_invalid": "skip-record"}],
)
def test_each_parity_switch_rebuilds_the_cache(fasta_copies, tmp_path, changed):
    cache = tmp_path / "cache"
    base = DataSettings(max_length=500)
    prepare_dataset(fasta_copies, cache, base)
    other = DataSettings(max_length=500, **changed)
    rebuilt = prepare_dataset(fasta_copies, cache, other)
    assert not rebuilt.reused
    assert rebuilt.settings == other
    assert prepare_dataset(fasta_copies, cache, other).reused
    if "long_records" in changed:  # HA records (579 codons) are cut to 500
        assert rebuilt.report["truncated_records"] == 96
        assert rebuilt.train.num_tokens + rebuilt.val.num_tokens == 78_625 - 96 * 79
    if "partial_codon" in changed:
        assert rebuilt.report["codons"] == 78_625 + 47


def test_a_cache_from_before_the_switches_is_rebuilt_and_still_opens(fasta_copies, tmp_path):
    from dstrain.prepare import format_summary

    cache = tmp_path / "cache"
    built = prepare_dataset(fasta_copies, cache, DataSettings())
    manifest_path = cache / "manifest.json"
    manifest = json.loads(manifest_path.read_text())
    new_fields = ("partial_codon", "long_records", "on_invalid")
    new_counts = ("u_to_t", "invalid_codons", "truncated_records", "truncated_codons")
    for name in new_fields:
        del manifest["settings"][name]
    for counts in [manifest["report"], *manifest["report"]["files"]]:
        for name in new_counts:
            del counts[name]
    manifest_path.write_text(json.dumps(manifest))

    old = load_prepared(cache)  # an old cache still opens (training from a cache dir)
    assert old.settings == DataSettings()
    assert "0 U read as T" in format_summary(old)
    rebuilt = prepare_dataset(fasta_copies, cache, DataSettings())
    assert not rebuilt.reused
    assert _examples(rebuilt.train) == _examples(built.train)
    assert all(name in rebuilt.manifest["settings"] for name in new_fields)
    assert prepare_dataset(fasta_copies, cache, DataSettings()).reused


def test_summary_text_shows_gaps_u_and_the_switch_counts(tmp_path, capsys):
    path = tmp_path / "edge_cases.fasta"
    shutil.copy(ASSETS / "edge_cases.fasta", path)
    code, out, err = run_cli(["prepare", str(path), "-o", str(tmp_path / "c")], capsys)
    assert code == 0, err
    # edge_cases.fasta: 3 gap characters, 2 U in `augaaacccuaa`, GG dropped from `with_n`.
    assert "3 gaps removed, 2 U read as T" in out
    assert "1 partial codons dropped" in out
    assert "truncated" not in out and "invalid" not in out

    extra = ["--on-invalid", "unk", "--long-records", "truncate", "--max-length", "8"]
    code, out, err = run_cli(
        ["prepare", str(path), "-o", str(tmp_path / "c"), *extra, "--partial-codon", "unk"],
        capsys,
    )
    assert code == 0, err
    assert "1 partial codons as [UNK]" in out
    assert "0 codons with invalid letters ([UNK])" in out
    assert "0 records truncated (0 codons cut)" in out

    orf_unk = ["--frame", "orf", "--partial-codon", "unk"]
    code, _, err = run_cli(["prepare", str(path), "-o", str(tmp_path / "d"), *orf_unk], capsys)
    assert code == 2 and "--partial-codon unk applies to --frame 0 only" in err
