"""FASTA ingestion tells the truth about real data and names the file for every bad input."""

from __future__ import annotations

import gzip
import itertools
import shutil
from pathlib import Path

import numpy as np
import pytest
from pydantic import ValidationError

from dstrain import codons
from dstrain.errors import DstrainError
from dstrain.fasta import (
    bundled_fasta_paths,
    find_longest_orf,
    is_validation_record,
    read_fasta,
    window_bounds,
)
from dstrain.settings import DataSettings

ASSETS = Path(__file__).parent / "assets" / "fasta"
SHARED_H3N2 = Path("/work/shared/data/h3n2")
BUNDLED = {p.name: p for p in bundled_fasta_paths()}
HA_FILES = ["ha_CY163680_sequences.fasta", "ha_EPI1857216_sequences.fasta"]
NA_FILE = "na_EPI1857215_sequences.fasta"


def _plain_records(path: Path) -> list[tuple[str, str]]:
    """(id, sequence) of each record, parsed by hand, independently of dstrain and biopython."""
    records = []
    for block in path.read_text().split(">")[1:]:
        lines = block.splitlines()
        records.append((lines[0].split()[0], "".join(lines[1:]).upper()))
    return records


def _count_truth(path: Path) -> dict[str, int]:
    """Frame-0 figures counted codon by codon in plain Python."""
    records = _plain_records(path)
    full = [[s[i : i + 3] for i in range(0, len(s) - 2, 3)] for _, s in records]
    return {
        "records": len(records),
        "codons": sum(len(c) for c in full),
        "unknown_codons": sum(1 for c in full for codon in c if set(codon) - set("ACGT")),
        "partial_codons": sum(1 for _, s in records if len(s) % 3),
    }


# --------------------------------------------------------------------------------------
# Real data: the report tells the truth
# --------------------------------------------------------------------------------------


def test_bundled_files_are_the_shared_files_byte_for_byte():
    assert sorted(BUNDLED) == sorted([*HA_FILES, NA_FILE])
    if not SHARED_H3N2.is_dir():
        pytest.skip("shared data directory not present")
    for name, path in BUNDLED.items():
        assert path.read_bytes() == (SHARED_H3N2 / name).read_bytes()


@pytest.mark.parametrize("name", [*HA_FILES, NA_FILE])
def test_frame0_report_matches_an_independent_count(name):
    path = BUNDLED[name]
    records, report = read_fasta(path, DataSettings())
    truth = _count_truth(path)
    assert {k: getattr(report, k) for k in truth} == truth
    assert report.kept_records == len(records) == 48
    assert report.skipped_records == report.empty_records == report.gap_characters == 0
    assert report.windows == 48  # every record is below 2048 codons
    assert sum(len(r.ids) for r in records) == report.codons
    assert sum(int((r.ids == codons.UNK_ID).sum()) for r in records) == report.unknown_codons


def test_real_data_figures():
    """The numbers quoted in the docs, pinned: NA ends in partial codons, R/Y become [UNK]."""
    figures = {name: read_fasta(BUNDLED[name], DataSettings())[1] for name in BUNDLED}
    na = figures[NA_FILE]
    lengths = [len(s) for _, s in _plain_records(BUNDLED[NA_FILE])]
    assert lengths.count(1441) == 35 and lengths.count(1442) == 12 and lengths.count(1443) == 1
    assert na.partial_codons == 47  # every NA record except the 1443-nt one
    assert na.codons == 47 * 480 + 481
    assert [figures[n].unknown_codons for n in [*HA_FILES, NA_FILE]] == [1, 2, 3]
    assert all(figures[n].codons == 48 * 579 for n in HA_FILES)


def test_orf_frame_gives_the_ha_and_na_coding_sequences():
    settings = DataSettings(frame="orf")
    for name in HA_FILES:
        records, report = read_fasta(BUNDLED[name], settings)
        assert {len(r.ids) for r in records} == {567}  # 566 residues + stop
        assert report.bases_outside_orf == 48 * (1737 - 567 * 3)
        assert report.partial_codons == 0
    records, report = read_fasta(BUNDLED[NA_FILE], settings)
    assert {len(r.ids) for r in records} == {470}  # 469 residues + stop
    for record in records:
        tokens = codons.decode_ids(record.ids)
        assert tokens[0] == "ATG" and tokens[-1] in {"TAA", "TAG", "TGA"}
        assert not {"TAA", "TAG", "TGA"} & set(tokens[:-1])
    assert report.unknown_codons == 3  # all three ambiguous bases lie inside the ORF


def test_ha_orf_starts_at_offset_17():
    _, sequence = _plain_records(BUNDLED[HA_FILES[0]])[0]
    assert find_longest_orf(sequence.encode()) == (17, 17 + 567 * 3)
    assert find_longest_orf(b"CCCGGGTTT") is None
    # The longer ORF wins across frames: frame 1 holds ATG AAA CCC TGA.
    assert find_longest_orf(b"ATGTAACATGAAACCCTGA") == (7, 19)


def test_ambiguity_policies_on_real_data():
    path = BUNDLED[NA_FILE]
    _, report = read_fasta(path, DataSettings(on_ambiguous="skip-record"))
    assert report.skipped_records == 3 and report.kept_records == 45
    assert report.unknown_codons == 0
    assert {s.record_id for s in report.skipped} == {
        "A/Idaho/40/2022",
        "A/Delaware/30/2022",
        "A/Florida/35/2022",
    }
    with pytest.raises(DstrainError) as info:
        read_fasta(path, DataSettings(on_ambiguous="error"))
    message = str(info.value)
    assert str(path) in message
    assert "record 27 ('A/Idaho/40/2022')" in message  # the first ambiguous one in the file
    assert "'Y' at position 1030" in message


def test_edge_cases_cleaning_and_counts():
    records, report = read_fasta(ASSETS / "edge_cases.fasta", DataSettings())
    assert [(r.record_id, codons.decode_ids(r.ids)) for r in records] == [
        ("gapped", ["ATG", "AAA", "CCC", "GGG", "TTT"]),  # gaps and spaces removed first
        ("lower_rna", ["ATG", "AAA", "CCC", "TAA"]),  # uppercased, U read as T
        ("with_n", ["ATG", "[UNK]", "AAA"]),  # trailing GG dropped
        ("gapped", ["ATG", "AAA"]),
    ]
    assert report.to_dict() == {
        "path": str(ASSETS / "edge_cases.fasta"),
        "records": 6,
        "kept_records": 4,
        "codons": 14,
        "unknown_codons": 1,
        "invalid_codons": 0,
        "partial_codons": 1,
        "empty_records": 1,
        "skipped_records": 2,
        "skipped": [
            {"record_id": "empty", "reason": "empty sequence"},
            {"record_id": "short", "reason": "shorter than one codon (2 bases)"},
        ],
        "duplicate_records": 1,
        "duplicate_ids": ["gapped"],
        "gap_characters": 3,
        "u_to_t": 2,  # augaaacccuaa
        "bases_outside_orf": 0,
        "orfs": 0,  # frame all-orfs only (tests/test_orfs.py)
        "orf_list": [],
        "windows": 4,
        "truncated_records": 0,
        "truncated_codons": 0,
    }


def test_orf_frame_skips_records_without_orf():
    records, report = read_fasta(ASSETS / "edge_cases.fasta", DataSettings(frame="orf"))
    assert [r.record_id for r in records] == ["lower_rna"]
    reasons = {s.record_id: s.reason for s in report.skipped}
    assert reasons["with_n"] == reasons["gapped"] == "no ATG...stop open reading frame"


def test_gzip_reads_the_same_records(tmp_path):
    source = BUNDLED[NA_FILE]
    packed = tmp_path / "na.fasta.gz"
    packed.write_bytes(gzip.compress(source.read_bytes()))
    plain_records, plain_report = read_fasta(source, DataSettings())
    gz_records, gz_report = read_fasta(packed, DataSettings())
    assert [r.record_id for r in gz_records] == [r.record_id for r in plain_records]
    assert all(np.array_equal(a.ids, b.ids) for a, b in zip(gz_records, plain_records, strict=True))
    assert gz_report.to_dict() | {"path": ""} == plain_report.to_dict() | {"path": ""}


def test_leading_blank_lines_and_crlf_are_accepted(tmp_path):
    path = tmp_path / "crlf.fasta"
    path.write_bytes(b"\r\n\r\n>one\r\nATGAAA\r\nCCC\r\n")
    records, _ = read_fasta(path, DataSettings())
    assert codons.decode_ids(records[0].ids) == ["ATG", "AAA", "CCC"]


def test_a_record_over_the_bound_is_refused_while_streaming(tmp_path, monkeypatch):
    # A 2 GiB one-record gzip (a bomb) ran prepare out of memory (SIGKILL, no message)
    # inside biopython, which holds a record whole. The bound is lowered to keep this fast.
    import dstrain.fasta

    monkeypatch.setattr(dstrain.fasta, "MAX_RECORD_BYTES", 4000)
    fine = b">a\n" + b"ATG" * 1300 + b"\n>b\n" + b"ATG" * 1300 + b"\n"
    (tmp_path / "fine.fasta.gz").write_bytes(gzip.compress(fine))
    records, _ = read_fasta(tmp_path / "fine.fasta.gz", DataSettings())
    assert [len(r.ids) for r in records] == [1300, 1300]
    for name, data in (
        ("one_line.fasta.gz", gzip.compress(b">a\n" + b"A" * 3_000_000)),
        ("lines.fasta", b">a\n" + b"ATGAAACCC\n" * 500 + b">b\nATG\n"),
    ):
        (tmp_path / name).write_bytes(data)
        with pytest.raises(DstrainError, match=f"{name}: a record runs over"):
            read_fasta(tmp_path / name, DataSettings())


# --------------------------------------------------------------------------------------
# Windows and split
# --------------------------------------------------------------------------------------


def test_window_bounds_cover_every_codon_once_plus_overlap():
    assert window_bounds(10, 4, 1) == [(0, 4), (3, 7), (6, 10)]
    assert window_bounds(4, 4, 1) == [(0, 4)]
    assert window_bounds(5, 4, 0) == [(0, 4), (4, 5)]
    assert window_bounds(1, 8, 7) == [(0, 1)]
    for n in range(1, 60):
        for max_length, overlap in [(8, 0), (8, 3), (8, 7), (16, 5)]:
            bounds = window_bounds(n, max_length, overlap)
            assert bounds[0][0] == 0 and bounds[-1][1] == n
            assert all(0 < end - start <= max_length for start, end in bounds)
            assert all(b[0] == a[1] - overlap for a, b in itertools.pairwise(bounds))


def test_long_records_become_windows_not_truncated():
    settings = DataSettings(max_length=100, window_overlap=10)
    _, report = read_fasta(BUNDLED[HA_FILES[0]], settings)
    assert report.windows == 48 * 7  # 579 codons: starts 0, 90, ..., 540
    assert report.codons == 48 * 579


def test_overlap_not_below_max_length_is_an_error():
    with pytest.raises(ValidationError, match=r"--window-overlap \(8\) must be smaller"):
        DataSettings(max_length=8, window_overlap=8)


def test_split_is_stable_per_record_id():
    ids = [record_id for record_id, _ in _plain_records(BUNDLED[NA_FILE])]
    val = {i for i in ids if is_validation_record(i, 0.2, split_seed=0)}
    assert 0 < len(val) < len(ids)
    assert val == {i for i in ids if is_validation_record(i, 0.2, split_seed=0)}
    assert val != {i for i in ids if is_validation_record(i, 0.2, split_seed=1)}
    assert not any(is_validation_record(i, 0.0, split_seed=0) for i in ids)


# --------------------------------------------------------------------------------------
# Bad inputs: one DstrainError each, naming the file
# --------------------------------------------------------------------------------------


def _binary(tmp_path: Path) -> Path:
    path = tmp_path / "model.fasta"
    path.write_bytes(b"\x89PNG\r\n\x1a\n\x00\x00\x00\rIHDR" + bytes(range(256)))
    return path


def _truncated_gzip(tmp_path: Path) -> Path:
    path = tmp_path / "cut.fasta.gz"
    packed = gzip.compress(BUNDLED[NA_FILE].read_bytes() * 4)
    path.write_bytes(packed[: len(packed) // 2])
    return path


def _corrupt_gzip(tmp_path: Path) -> Path:
    path = tmp_path / "bad.fasta.gz"
    path.write_bytes(b"\x1f\x8b\x08\x00" + b"not really deflate data" * 10)
    return path


def _directory(tmp_path: Path) -> Path:
    return tmp_path


def _missing(tmp_path: Path) -> Path:
    return tmp_path / "nope.fasta"


BAD_INPUTS = [
    ("missing", _missing, {}, "no such file"),
    ("directory", _directory, {}, "is a directory"),
    ("empty", "empty.fasta", {}, "empty"),
    ("blank", "blank.fasta", {}, "empty"),
    ("fastq", "reads.fastq", {}, "looks like FASTQ"),
    ("genbank", "genbank.gb", {}, "looks like GenBank"),
    ("binary", _binary, {}, "binary data"),
    ("protein", "protein.fasta", {}, "looks like a protein sequence"),
    ("numbered", "numbered.fasta", {}, "'1' at position 1"),
    ("header only", "header_only.fasta", {}, "no usable records"),
    ("no orf", "no_orf.fasta", {"frame": "orf"}, "no usable records"),
    ("truncated gzip", _truncated_gzip, {}, "truncated or corrupt"),
    ("corrupt gzip", _corrupt_gzip, {}, "could not be decompressed"),
]


@pytest.mark.parametrize(
    ("source", "options", "expected"),
    [case[1:] for case in BAD_INPUTS],
    ids=[case[0] for case in BAD_INPUTS],
)
def test_bad_input_names_the_file(tmp_path, source, options, expected):
    if callable(source):
        path = source(tmp_path)
    else:
        path = tmp_path / source
        shutil.copy(ASSETS / source, path)
    with pytest.raises(DstrainError) as info:
        read_fasta(path, DataSettings(**options))
    message = str(info.value)
    assert message.startswith(f"{path}:")
    assert expected in message
    assert "\n" not in message


@pytest.mark.parametrize("compressed", [False, True])
def test_a_utf8_byte_order_mark_is_skipped(tmp_path, compressed):
    """Windows editors start text files with a UTF-8 BOM: the file reads as without one
    (the first record's id included)."""
    text = ">r1 first\nATGAAACCCGGGTTT\n>r2\nATGCCCGGGAAATTT\n"
    data = b"\xef\xbb\xbf" + text.encode()
    path = tmp_path / ("bom.fa.gz" if compressed else "bom.fa")
    path.write_bytes(gzip.compress(data) if compressed else data)
    plain = tmp_path / "plain.fa"
    plain.write_text(text)
    with_bom, _ = read_fasta(path, DataSettings())
    without, _ = read_fasta(plain, DataSettings())
    assert [r.record_id for r in with_bom] == ["r1", "r2"]
    assert [r.ids.tolist() for r in with_bom] == [r.ids.tolist() for r in without]


# --------------------------------------------------------------------------------------
# Upstream parity switches: partial codon, long records, invalid letters, U
# --------------------------------------------------------------------------------------


def _write(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "in.fasta"
    path.write_text(text)
    return path


def test_partial_codon_unk_appends_one_unk_and_counts_it():
    settings = DataSettings(partial_codon="unk")
    records, report = read_fasta(ASSETS / "edge_cases.fasta", settings)
    by_id = {r.record_id: codons.decode_ids(r.ids) for r in records}
    assert by_id["with_n"] == ["ATG", "[UNK]", "AAA", "[UNK]"]  # NNN, then the trailing GG
    assert report.partial_codons == 1 and report.unknown_codons == 1  # GG is no ambiguity
    assert report.codons == 15
    # A partial codon is not checked for ambiguity: it is [UNK] whatever its letters.
    path = BUNDLED[NA_FILE]
    _, strict = read_fasta(path, DataSettings(partial_codon="unk", on_ambiguous="skip-record"))
    assert strict.skipped_records == 3 and strict.unknown_codons == 0
    na, na_report = read_fasta(path, DataSettings(partial_codon="unk"))
    assert sorted({len(r.ids) for r in na}) == [481]  # 47 x (480 + [UNK]) and 1 x 481 codons
    assert na_report.codons == 48 * 481 and na_report.partial_codons == 47


def test_long_records_truncate_keeps_the_first_codons_and_counts_the_cut(tmp_path):
    path = _write(tmp_path, ">long\n" + "ATGAAACCC" * 4 + "NNN" + "GG\n>short\nATGAAA\n")
    window, window_report = read_fasta(path, DataSettings(max_length=8))
    assert [len(r.ids) for r in window] == [13, 2] and window_report.windows == 3
    kept, report = read_fasta(
        path, DataSettings(max_length=8, long_records="truncate", on_ambiguous="error")
    )
    assert [r.ids.tolist() for r in kept] == [window[0].ids[:8].tolist(), window[1].ids.tolist()]
    assert (report.truncated_records, report.truncated_codons) == (1, 13 - 8)
    assert (report.codons, report.windows, report.unknown_codons) == (10, 2, 0)  # NNN was cut
    with_partial, report = read_fasta(
        path, DataSettings(max_length=8, long_records="truncate", partial_codon="unk")
    )
    assert report.truncated_codons == 14 - 8  # the [UNK] of GG is cut as well
    assert report.partial_codons == 0  # ... so it is no partial codon in the data
    assert [len(r.ids) for r in with_partial] == [8, 2]


def test_on_invalid_unk_makes_the_codon_unk_and_counts_it(tmp_path):
    fill = "CCCGGG" * 3  # under 10% odd letters: not protein-looking
    path = _write(tmp_path, f">x\nATGXAA{fill}\n>star\natgccc*ggAAA{fill}N\n")
    with pytest.raises(DstrainError, match=r"'X' at position 4.*--on-invalid unk"):
        read_fasta(path, DataSettings())
    records, report = read_fasta(path, DataSettings(on_invalid="unk"))
    fill_codons = ["CCC", "GGG"] * 3
    assert [codons.decode_ids(r.ids) for r in records] == [
        ["ATG", "[UNK]", *fill_codons],
        ["ATG", "CCC", "[UNK]", "AAA", *fill_codons],  # trailing N: a dropped partial codon
    ]
    assert (report.invalid_codons, report.unknown_codons, report.partial_codons) == (2, 0, 1)
    # Under --on-ambiguous error an invalid letter's [UNK] is not an ambiguity error.
    _, report = read_fasta(path, DataSettings(on_invalid="unk", on_ambiguous="error"))
    assert report.kept_records == 2
    # A non-ASCII letter is one position (as upstream reads text), not its UTF-8 bytes.
    accented = tmp_path / "accented.fasta"
    accented.write_text(f">e\nATG\u00e9AA{fill}\n", encoding="utf-8")
    records, _ = read_fasta(accented, DataSettings(on_invalid="unk"))
    assert codons.decode_ids(records[0].ids) == ["ATG", "[UNK]", *fill_codons]


def test_on_invalid_skip_record_lists_the_record_and_its_letter(tmp_path):
    path = _write(tmp_path, f">ok\nATGAAA\n>x\nATGAAAXCC{'A' * 30}\n>also_ok\nCCCGGG\n")
    records, report = read_fasta(path, DataSettings(on_invalid="skip-record"))
    assert [r.record_id for r in records] == ["ok", "also_ok"]
    assert report.to_dict()["skipped"] == [
        {"record_id": "x", "reason": "invalid character 'X' at position 7 (1 outside IUPAC)"}
    ]
    only_bad = _write(tmp_path, f">x\nATGAAAXCC{'A' * 30}\n")
    with pytest.raises(DstrainError, match=r"\(invalid character 'X'\).*--on-invalid unk"):
        read_fasta(only_bad, DataSettings(on_invalid="skip-record"))


def test_masked_runs_and_stops_are_no_protein_under_unk_or_skip_record(tmp_path):
    """X (a masked base) and * occur in nucleotide files: under --on-invalid unk their
    codons become [UNK] even when they are more than a tenth of the letters."""
    path = _write(tmp_path, ">masked\nATGAAA" + "X" * 12 + "CCCGGGTTTAAACCCGGGTTTAAACCCGGGTTT*\n")
    with pytest.raises(DstrainError, match="looks like a protein"):
        read_fasta(path, DataSettings())
    records, report = read_fasta(path, DataSettings(on_invalid="unk"))
    assert codons.decode_ids(records[0].ids[:7]) == ["ATG", "AAA", *["[UNK]"] * 4, "CCC"]
    assert report.invalid_codons == 4 and report.partial_codons == 1  # "*" is the partial
    path.write_text(path.read_text() + ">ok\nATGAAACCC\n")
    records, report = read_fasta(path, DataSettings(on_invalid="skip-record"))
    assert [r.record_id for r in records] == ["ok"]
    assert report.skipped[0].reason.startswith("invalid character 'X'")


def test_protein_records_are_never_encoded(tmp_path):
    protein = ASSETS / "protein.fasta"
    with pytest.raises(DstrainError, match=r"looks like a protein.*not proteins"):
        read_fasta(protein, DataSettings(on_invalid="unk"))
    mixed = _write(tmp_path, protein.read_text() + ">dna\nATGAAACCC\n")
    records, report = read_fasta(mixed, DataSettings(on_invalid="skip-record"))
    assert [r.record_id for r in records] == ["dna"]
    assert report.skipped_records == report.records - 1
    assert all(s.reason.startswith("looks like protein (") for s in report.skipped)


def test_u_is_read_as_t_and_counted(tmp_path):
    rna = _write(tmp_path, ">r\nAUGuuuCCCU\n")
    dna = tmp_path / "dna.fasta"
    dna.write_text(">r\nATGTTTCCCT\n")
    (rna_records, rna_report), (dna_records, dna_report) = (
        read_fasta(rna, DataSettings()),
        read_fasta(dna, DataSettings()),
    )
    assert rna_records[0].ids.tolist() == dna_records[0].ids.tolist()
    assert (rna_report.u_to_t, dna_report.u_to_t) == (5, 0)


def test_parity_switch_combinations_that_mean_nothing_are_refused():
    with pytest.raises(ValidationError, match="--partial-codon unk applies to --frame 0"):
        DataSettings(frame="orf", partial_codon="unk")
    with pytest.raises(ValidationError, match=r"--window-overlap \(4\) applies to"):
        DataSettings(long_records="truncate", window_overlap=4)
    DataSettings(frame="orf", long_records="truncate", on_invalid="unk")  # these combine
