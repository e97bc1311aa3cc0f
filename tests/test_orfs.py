"""`--frame all-orfs`: every ATG...stop ORF of a record as its own example (genes from genomes)."""

from __future__ import annotations

import csv
import json
import random
from pathlib import Path

import pytest
from Bio import SeqIO
from Bio.Seq import Seq
from subprocs import run_cli

from dstrain import codons
from dstrain import fasta as fasta_module
from dstrain.errors import DstrainError
from dstrain.fasta import bundled_genomes_path, find_orfs, is_validation_record, read_fasta
from dstrain.prepare import ORFS_NAME, load_prepared, prepare_dataset, report_json
from dstrain.settings import DataSettings

FILLER = "C" * 9  # no ATG and no stop in any frame, nor across a join with ORF pieces

# NC_045512.2's annotated CDSs (GenBank, 1-based inclusive) with their protein length
# (stop not counted) and first residues: facts of the annotation, not of this code.
REFERENCE_GENES = {
    "ORF1a": (266, 13483, 4405, "MESLVPG"),
    "ORF3a": (25393, 26220, 275, "MDLFMRI"),
    "E": (26245, 26472, 75, "MYSFVSE"),
    "M": (26523, 27191, 222, "MADSNGT"),
    "ORF6": (27202, 27387, 61, "MFHLVDF"),
    "ORF7a": (27394, 27759, 121, "MKIILFL"),
    "ORF7b": (27756, 27887, 43, "MIELSLI"),
    "ORF8": (27894, 28259, 121, "MKFLVFL"),
    "N": (28274, 29533, 419, "MSDNGPQ"),
    "ORF10": (29558, 29674, 38, "MGYINVF"),
}
SPIKE_START, SPIKE_END, SPIKE_AA = 21563, 25384, 1273


def _orf(codon_body: str) -> str:
    return "ATG" + codon_body + "TAA"


def _revcomp(seq: str) -> str:
    return str(Seq(seq).reverse_complement())


def _naive_orfs(seq: str, min_codons: int, strands: str) -> list[tuple[int, int, str]]:
    """Reference ORF finder, codon by codon: an ORF opens at the first ATG after a stop."""
    n, found = len(seq), []
    for strand, text in (("+", seq), ("-", _revcomp(seq))):
        if strand == "-" and strands != "both":
            continue
        for frame in range(3):
            open_at = None
            for i in range(frame, n - 2, 3):
                codon = text[i : i + 3]
                if codon == "ATG" and open_at is None:
                    open_at = i
                elif codon in ("TAA", "TAG", "TGA"):
                    if open_at is not None and (i + 3 - open_at) // 3 >= min_codons:
                        start, end = open_at, i + 3
                        found.append(
                            (start, end, "+") if strand == "+" else (n - end, n - start, "-")
                        )
                    open_at = None
    return sorted(found)


def _write(path: Path, records: dict[str, str]) -> Path:
    path.write_text("".join(f">{rid}\n{seq}\n" for rid, seq in records.items()))
    return path


def _orf_rows(cache_dir: Path) -> list[dict[str, str]]:
    with open(cache_dir / ORFS_NAME, newline="", encoding="utf-8") as fh:
        return list(csv.DictReader(fh, delimiter="\t"))


# --------------------------------------------------------------------------------------
# The finder
# --------------------------------------------------------------------------------------


def test_orfs_in_every_frame_and_on_the_reverse_strand(tmp_path):
    frame0 = _orf("AAA" * 5)  # 7 codons
    frame1 = _orf("GGG" * 6)  # 8 codons, after one extra base
    reverse = _orf("CCA" * 9)  # 11 codons, written reverse-complemented
    seq = FILLER + frame0 + FILLER + "C" + frame1 + FILLER + _revcomp(reverse) + FILLER
    start0 = len(FILLER)
    start1 = seq.index(frame1)
    start_rev = seq.index(_revcomp(reverse))
    forward = [(start0, start0 + 21, "+"), (start1, start1 + 24, "+")]
    assert find_orfs(seq.encode()) == forward
    both = find_orfs(seq.encode(), strands="both")
    assert both == [*forward, (start_rev, start_rev + 33, "-")]
    assert both == _naive_orfs(seq, 1, "both")

    path = _write(tmp_path / "one.fasta", {"rec": seq})
    settings = DataSettings(frame="all-orfs", min_orf_codons=5, strands="both")
    _, report = read_fasta(path, settings)
    rev = report.orf_list[-1]
    # 1-based inclusive on the forward strand; the reverse ORF's ATG ends at `end`
    assert (rev.start, rev.end, rev.strand, rev.codons) == (start_rev + 1, start_rev + 33, "-", 11)
    assert _revcomp(seq[rev.start - 1 : rev.end]) == reverse


def test_nested_atgs_share_one_orf_and_overlapping_frames_do_not():
    # ATG AAA ATG CCC TAA: the inner ATG has the same stop, so one ORF from the first ATG
    assert find_orfs(b"ATGAAAATGCCCTAA") == [(0, 15, "+")]
    # a stop between two ATGs makes two ORFs
    assert find_orfs(b"ATGTAAATGAAATGA") == [(0, 6, "+"), (6, 15, "+")]
    # an ATG without a stop before the end is no ORF
    assert find_orfs(b"ATGAAACCC") == []
    # frames 0 (ATG CAT GAA TAA) and 1 (ATG AAT AAG TGA) overlap: two ORFs
    seq = b"ATGCATGAATAAGTGA"
    assert find_orfs(seq) == _naive_orfs(seq.decode(), 1, "forward")
    assert find_orfs(seq) == [(0, 12, "+"), (4, 16, "+")]


@pytest.mark.parametrize("seed", range(4))
def test_finder_matches_a_codon_by_codon_reference(seed):
    rng = random.Random(seed)
    seq = "".join(rng.choice("ACGT") for _ in range(3000 + seed))
    for min_codons in (1, 5, 20):
        assert find_orfs(seq.encode(), min_codons, "both") == _naive_orfs(seq, min_codons, "both")


def test_min_orf_codons_boundary_counts_the_stop(tmp_path):
    orf = _orf("GCA" * 28)  # 30 codons with the stop
    path = _write(tmp_path / "b.fasta", {"exact": FILLER + orf + FILLER, "keep": _orf("GCA" * 40)})
    records, report = read_fasta(path, DataSettings(frame="all-orfs", min_orf_codons=30))
    assert [(r.record_id, len(r.ids)) for r in records] == [("exact", 30), ("keep", 42)]
    records, report = read_fasta(path, DataSettings(frame="all-orfs", min_orf_codons=31))
    assert [r.record_id for r in records] == ["keep"]
    assert report.skipped[0].record_id == "exact"
    assert "no ATG...stop open reading frame of 31+ codons" in report.skipped[0].reason
    with pytest.raises(DstrainError, match=r"lower --min-orf-codons \(50\)"):
        read_fasta(path, DataSettings(frame="all-orfs", min_orf_codons=50))


def test_each_orf_is_an_example_and_a_long_one_is_windowed(tmp_path):
    short, long = _orf("AAA" * 10), _orf("CAG" * 98)  # 12 and 100 codons
    genome = FILLER + short + FILLER + long + FILLER
    path = _write(tmp_path / "g.fasta", {"genome": genome})
    settings = DataSettings(frame="all-orfs", min_orf_codons=10, max_length=40, val_fraction=0.0)
    prepared = prepare_dataset([path], tmp_path / "cache", settings)
    lengths = prepared.train.lengths().tolist()
    assert lengths == [12, 40, 40, 20]
    expected = codons.encode_sequence(short).tolist() + codons.encode_sequence(long).tolist()
    assert prepared.train.tokens.tolist() == expected
    assert prepared.report["train"] == {"records": 1, "sequences": 4, "tokens": 112}
    rows = _orf_rows(tmp_path / "cache")
    assert [(r["codons"], r["sequences"]) for r in rows] == [("12", "1"), ("100", "3")]
    file_report = prepared.report["files"][0]
    assert file_report["orfs"] == 2 and file_report["windows"] == 4
    assert file_report["bases_outside_orf"] == len(genome) - 3 * 112


def test_split_keeps_the_orfs_of_a_record_together(tmp_path):
    rng = random.Random(1)
    records = {
        f"genome{i}": FILLER.join(
            _orf("".join(rng.choice(["GCA", "CCG", "AAG"]) for _ in range(12))) for _ in range(4)
        )
        for i in range(24)
    }
    path = _write(tmp_path / "many.fasta", records)
    settings = DataSettings(frame="all-orfs", min_orf_codons=10, val_fraction=0.5, split_seed=3)
    prepared = prepare_dataset([path], tmp_path / "cache", settings)
    rows = _orf_rows(tmp_path / "cache")
    split_of: dict[str, set[str]] = {}
    for row in rows:
        split_of.setdefault(row["record_id"], set()).add(row["split"])
    assert len(split_of) == 24 and len(rows) == 24 * 4
    for record_id, splits in split_of.items():
        expected = "val" if is_validation_record(record_id, 0.5, 3) else "train"
        assert splits == {expected}
    num_val = sum(is_validation_record(r, 0.5, 3) for r in records)
    assert 0 < num_val < 24
    assert prepared.report["val"]["records"] == num_val
    assert prepared.report["train"]["records"] == 24 - num_val
    assert prepared.report["val"]["sequences"] == 4 * num_val


# --------------------------------------------------------------------------------------
# Policies per ORF
# --------------------------------------------------------------------------------------


def test_ambiguity_policies_look_at_the_orfs_only(tmp_path):
    gene = _orf("GCA" * 10)
    with_n = gene[:9] + "N" + gene[10:]  # in codon 4 of the ORF
    clean_outside = _write(tmp_path / "a.fasta", {"g": "NNN" + FILLER + gene + FILLER + "N"})
    settings = DataSettings(frame="all-orfs", min_orf_codons=5, on_ambiguous="error")
    records, report = read_fasta(clean_outside, settings)  # N between genes: fine
    assert len(records) == 1 and report.unknown_codons == 0

    inside = _write(tmp_path / "b.fasta", {"g": FILLER + with_n + FILLER + gene, "ok": gene})
    with pytest.raises(DstrainError, match=r"'N' at position 19 \(codon NCA.*its ORF 10-45 \(\+\)"):
        read_fasta(inside, settings)
    records, report = read_fasta(
        inside, settings.model_copy(update={"on_ambiguous": "skip-record"})
    )
    assert [r.record_id for r in records] == ["ok"]
    assert report.skipped[0].reason == "ambiguous base 'N' at position 19 in ORF 10-45 (+)"
    records, report = read_fasta(inside, settings.model_copy(update={"on_ambiguous": "unk"}))
    assert report.unknown_codons == 1 and records[0].ids[3] == codons.UNK_ID

    # on the reverse strand: the position is still counted on the forward strand
    rev = _write(tmp_path / "c.fasta", {"r": FILLER + _revcomp(with_n) + FILLER})
    both = settings.model_copy(update={"strands": "both"})
    with pytest.raises(DstrainError, match=r"'N' at position 36 \(codon NCA.*its ORF 10-45 \(-\)"):
        read_fasta(rev, both)


def test_invalid_letter_in_a_reverse_orf_is_counted_as_invalid(tmp_path):
    gene = _orf("GCA" * 10)
    with_x = gene[:10] + "X" + gene[11:]
    path = _write(tmp_path / "x.fasta", {"r": FILLER + _revcomp(with_x) + FILLER})
    settings = DataSettings(frame="all-orfs", min_orf_codons=5, strands="both", on_invalid="unk")
    records, report = read_fasta(path, settings)
    assert len(records) == 1 and report.invalid_codons == 1 and report.unknown_codons == 0
    assert records[0].ids[3] == codons.UNK_ID


def test_frame_orf_with_both_strands_takes_the_longer_strand(tmp_path):
    fwd, rev = _orf("AAA" * 5), _orf("CCA" * 9)
    seq = FILLER + fwd + FILLER + _revcomp(rev) + FILLER
    path = _write(tmp_path / "o.fasta", {"r": seq})
    (forward,), _ = read_fasta(path, DataSettings(frame="orf"))
    (either,), report = read_fasta(path, DataSettings(frame="orf", strands="both"))
    assert forward.ids.tolist() == codons.encode_sequence(fwd).tolist()
    assert either.ids.tolist() == codons.encode_sequence(rev).tolist()
    assert report.bases_outside_orf == len(seq) - len(rev)


# --------------------------------------------------------------------------------------
# The bundled SARS-CoV-2 genomes through the CLI (the acceptance check)
# --------------------------------------------------------------------------------------


def test_prepare_json_lists_each_genomes_genes(tmp_path, capsys):
    genomes = {r.id: r.seq for r in SeqIO.parse(bundled_genomes_path(), "fasta")}
    assert len(genomes) == 5
    args = ["prepare", str(bundled_genomes_path()), "-o", str(tmp_path / "cache")]
    code, out, err = run_cli(
        [*args, "--frame", "all-orfs", "--min-orf-codons", "30", "--json"], capsys
    )
    assert code == 0, err
    report = json.loads(out)
    (file_report,) = report["files"]
    assert len(file_report["orf_list"]) == file_report["orfs"] == report["orfs"] > 5 * 10
    orfs_of: dict[str, list[dict]] = {}
    for orf in file_report["orf_list"]:
        orfs_of.setdefault(orf["record_id"], []).append(orf)
        assert orf["end"] - orf["start"] + 1 == 3 * orf["codons"] and orf["codons"] >= 30
        protein = str(genomes[orf["record_id"]][orf["start"] - 1 : orf["end"]].translate())
        assert protein[0] == "M" and protein[-1] == "*" and "*" not in protein[:-1]
    assert set(orfs_of) == set(genomes)

    reference = {(o["start"], o["end"], o["strand"]): o for o in orfs_of["NC_045512.2"]}
    for name, (start, end, protein_length, first) in REFERENCE_GENES.items():
        orf = reference.get((start, end, "+"))
        assert orf is not None, name
        assert orf["codons"] == protein_length + 1, name
        assert str(genomes["NC_045512.2"][start - 1 : end].translate()).startswith(first), name
    # S: an in-frame ATG 27 bases upstream of the annotated start, with no stop between,
    # opens its ORF earlier; the annotated S (1,273 aa + stop) lies inside it.
    (spike,) = [o for o in reference.values() if o["end"] == SPIKE_END]
    assert spike["start"] <= SPIKE_START and (SPIKE_START - spike["start"]) % 3 == 0
    assert (SPIKE_END - SPIKE_START + 1) // 3 == SPIKE_AA + 1
    # Every isolate carries N (419 aa), M (222), E (75) and ORF3a (275) whole.
    for record_id, orfs in orfs_of.items():
        lengths = {o["codons"] for o in orfs}
        assert {420, 223, 76, 276} <= lengths, record_id

    code, out, err = run_cli([*args, "--frame", "all-orfs", "--min-orf-codons", "30"], capsys)
    assert code == 0, err
    assert "reused cache" in out and f"{report['orfs']:,} ORFs of 30+ codons kept" in out
    assert "ORF NC_045512.2 266-13,483 (+), 4,406 codons" in out
    assert len(out.splitlines()) < 15  # the summary stays short; --json has them all


def test_reverse_complemented_genome_gives_n_on_the_minus_strand(tmp_path):
    record = next(SeqIO.parse(bundled_genomes_path(), "fasta"))
    n = len(record.seq)
    path = _write(tmp_path / "rc.fasta", {"rc": str(record.seq.reverse_complement())})
    settings = DataSettings(frame="all-orfs", strands="both", val_fraction=0.0)
    _, report = read_fasta(path, settings)
    start, end, protein_length, _ = REFERENCE_GENES["N"]
    expected = (n - end + 1, n - start + 1, "-", protein_length + 1)
    assert expected in {(o.start, o.end, o.strand, o.codons) for o in report.orf_list}
    _, forward_only = read_fasta(path, settings.model_copy(update={"strands": "forward"}))
    assert {o.strand for o in forward_only.orf_list} == {"+"}
    assert forward_only.orfs < report.orfs


def test_manifest_caps_the_orf_list_and_json_lists_all(tmp_path, monkeypatch):
    monkeypatch.setattr(fasta_module, "MAX_LISTED_ORFS", 3)
    settings = DataSettings(frame="all-orfs", min_orf_codons=30)
    first_three = {r.id: r for r in list(SeqIO.parse(bundled_genomes_path(), "fasta"))[:3]}
    fewer = _write(tmp_path / "fewer.fasta", {k: str(r.seq) for k, r in first_three.items()})
    paths = [bundled_genomes_path(), fewer]
    prepare_dataset(paths, tmp_path / "cache", settings)
    prepared = load_prepared(tmp_path / "cache")
    body = json.loads(report_json(prepared))
    assert Path(body["orfs_tsv"]).is_file()
    for file_report, listed in zip(prepared.report["files"], body["files"], strict=True):
        assert len(file_report["orf_list"]) == 3 < file_report["orfs"]
        assert len(listed["orf_list"]) == file_report["orfs"]
        assert listed["orf_list"][:3] == file_report["orf_list"]
    whole, part = (f["orf_list"] for f in body["files"])
    assert part == [o for o in whole if o["record_id"] in first_three]
    # a cache that lost its orfs.tsv is rebuilt, not trusted
    (tmp_path / "cache" / ORFS_NAME).unlink()
    assert not prepare_dataset(paths, tmp_path / "cache", settings).reused


@pytest.mark.parametrize(
    ("flags", "named"),
    [
        (["--strands", "both"], "--strands both applies to --frame orf and --frame all-orfs"),
        (["--frame", "all-orfs", "--partial-codon", "unk"], "--partial-codon unk applies"),
        (["--frame", "all-orfs", "--min-orf-codons", "0"], "--min-orf-codons"),
        (["--frame", "all-orfs", "--strands", "up"], "--strands"),
    ],
)
def test_contradictory_options_are_refused_by_flag(tmp_path, capsys, flags, named):
    path = _write(tmp_path / "g.fasta", {"g": _orf("GCA" * 40)})
    code, _, err = run_cli(["prepare", str(path), "-o", str(tmp_path / "c"), *flags], capsys)
    assert code == 2 and named in err, err
    assert "Traceback" not in err and not (tmp_path / "c").exists()
