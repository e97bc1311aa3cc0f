"""The upstream parity switches reproduce upstream GenSLM's batches token for token.

The reference below is an independent re-implementation of upstream's data pipeline
(ramanathanlab/genslm a9c60be), written from its source, not from dstrain's:

- `genslm/dataset.py`, `group_by_kmer(s, n)`: `seq = str(s.seq).upper()`, then
  `" ".join(seq[i : i + n] for i in range(0, len(seq), n))` with n = 3: words of three
  letters from position 0, the last one shorter when the length is not a multiple of 3
  (`SequenceDataset.group_by_kmer` does the same on plain strings).
- `H5PreprocessMixin.preprocess` (and `_parallel_preprocess_helper`,
  `SequenceDataset.tokenize_sequences`): one tokenizer call per record,
  `tokenizer(group_by_kmer(seq_record, kmer_size), max_length=block_size,
  padding="max_length", truncation=True, ...)` with block_size 2048; records come from
  `SeqIO.parse(fasta_file, "fasta")`. The tokenizer is a WordLevel model over the 69-token
  codon vocabulary, `[UNK]` for any other word (here `dstrain.codons.build_hf_tokenizer`,
  the same vocabulary and ids).
- `genslm/model.py`, the training step: `labels=batch["input_ids"]`, so pads are in the
  loss.

dstrain's side is its real pipeline: `prepare_dataset` (token cache), `CodonDataset`,
`CodonCollator.from_settings` under `--frame 0 --partial-codon unk --padding max_length
--loss-on-pad` (the default `--on-ambiguous unk`).
"""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest

from dstrain.batching import CodonCollator, CodonDataset
from dstrain.cli import main
from dstrain.cli_options import data_specs, train_specs
from dstrain.codons import UNK_ID
from dstrain.fasta import bundled_fasta_paths
from dstrain.prepare import data_settings_from_options, prepare_dataset

UPSTREAM_BLOCK_SIZE = 2048


def _upstream_group_by_kmer(sequence: str, kmer: int = 3) -> str:
    sequence = sequence.upper()
    return " ".join(sequence[i : i + kmer] for i in range(0, len(sequence), kmer))


def _upstream_batch(paths: list[Path], block_size: int = UPSTREAM_BLOCK_SIZE) -> dict:
    """Upstream's (input_ids, attention_mask, labels) for every record, in file order."""
    import torch
    from Bio import SeqIO

    from dstrain.codons import build_hf_tokenizer

    tokenizer = build_hf_tokenizer()
    rows = []
    for path in paths:
        for record in SeqIO.parse(str(path), "fasta"):
            rows.append(
                tokenizer(
                    _upstream_group_by_kmer(str(record.seq)),
                    max_length=block_size,
                    padding="max_length",
                    truncation=True,
                    return_tensors="pt",
                )
            )
    input_ids = torch.cat([r["input_ids"] for r in rows])
    attention_mask = torch.cat([r["attention_mask"] for r in rows])
    return {"input_ids": input_ids, "attention_mask": attention_mask, "labels": input_ids}


def _dstrain_batch(paths: list[Path], cache_dir: Path, **options) -> dict:
    """dstrain's batch of every record (one split: val_fraction 0 keeps file order)."""
    settings = data_settings_from_options(
        frame="0", padding="max_length", loss_on_pad=True, val_fraction=0.0, **options
    )
    prepared = prepare_dataset(paths, cache_dir, settings)
    dataset = CodonDataset(prepared.train)
    return CodonCollator.from_settings(settings)([dataset[i] for i in range(len(dataset))])


def _record_lengths(paths: list[Path]) -> list[tuple[str, int]]:
    from Bio import SeqIO

    return [(p.name, len(r.seq)) for p in paths for r in SeqIO.parse(str(p), "fasta")]


@pytest.fixture(scope="module")
def upstream() -> dict:
    return _upstream_batch(bundled_fasta_paths())


def test_partial_codon_unk_reproduces_upstream_batches(upstream, tmp_path):
    import torch

    paths = bundled_fasta_paths()
    ours = _dstrain_batch(paths, tmp_path / "cache", partial_codon="unk")
    assert upstream["input_ids"].shape == (144, UPSTREAM_BLOCK_SIZE)
    for key in ("input_ids", "attention_mask", "labels"):
        assert ours[key].shape == upstream[key].shape, key
        differ = (ours[key] != upstream[key]).any(dim=1).nonzero().flatten().tolist()
        assert differ == [], f"{key}: records {differ[:10]} differ from upstream"
    # Not vacuous: the NA records' last real token is upstream's [UNK] word.
    partial = [i for i, (_, n) in enumerate(_record_lengths(paths)) if n % 3]
    real = upstream["attention_mask"].sum(dim=1)
    assert len(partial) == 47
    assert all(upstream["input_ids"][i, real[i] - 1] == UNK_ID for i in partial)
    assert torch.equal(ours["labels"], ours["input_ids"])  # pads in the loss, as upstream


def test_default_drop_differs_exactly_on_records_with_a_partial_codon(upstream, tmp_path):
    paths = bundled_fasta_paths()
    ours = _dstrain_batch(paths, tmp_path / "cache")  # --partial-codon drop (default)
    differ = (
        ((ours["input_ids"] != upstream["input_ids"]) | (ours["labels"] != upstream["labels"]))
        .any(dim=1)
        .nonzero()
        .flatten()
        .tolist()
    )
    lengths = _record_lengths(paths)
    expected = [i for i, (_, n) in enumerate(lengths) if n % 3]
    assert differ == expected
    assert {lengths[i][0] for i in differ} == {"na_EPI1857215_sequences.fasta"}
    assert len(differ) == 47  # 47 of the 48 NA records; HA records are 1737 = 3 x 579 nt
    # Each differs by that one trailing token, attended upstream.
    real = upstream["attention_mask"].sum(dim=1)
    assert (ours["attention_mask"].sum(dim=1)[differ] == real[differ] - 1).all()


def test_truncate_and_invalid_letters_match_upstream_on_odd_records(tmp_path):
    """Records over the context, with letters outside IUPAC (X, J, a digit) and a trailing
    partial codon: upstream truncates and maps each odd word to [UNK]; so do the switches."""
    fasta = tmp_path / "odd.fasta"
    fasta.write_text(
        ">long\n" + "ATGAAACCC" * 5 + "GG\n"  # 15 codons + partial, over max_length 8
        ">stray\nATGXAACCCGJGTTTAAACCCGGGTTTA\n"  # X and J in codons (2 of 28 letters)
        ">digit\nATGCC9GGGTTTAA\n"
        ">amb\nATGNNNAAAC\n"
    )
    options = {"partial_codon": "unk", "long_records": "truncate", "on_invalid": "unk"}
    ours = _dstrain_batch([fasta], tmp_path / "cache", max_length=8, **options)
    reference = _upstream_batch([fasta], block_size=8)
    for key in ("input_ids", "attention_mask", "labels"):
        assert ours[key].tolist() == reference[key].tolist(), key
    # [UNK]: XAA, GJG, CC9, NNN and the partial codons of digit and amb (long's is cut).
    assert (reference["input_ids"] == UNK_ID).sum() == 6


def test_a_codon_with_punctuation_is_one_unk_where_upstream_splits_it(tmp_path):
    """The documented exception: upstream's Whitespace pre-tokenizer cuts `*GG` into `*`
    and `GG` (two [UNK]); dstrain keeps one [UNK] for the codon."""
    fasta = tmp_path / "star.fasta"
    fasta.write_text(">star\nATG*GG" + "AAACCCGGGTTT" * 3 + "\n")
    ours = _dstrain_batch([fasta], tmp_path / "cache", on_invalid="unk", max_length=16)
    reference = _upstream_batch([fasta], block_size=16)
    real = int(ours["attention_mask"].sum())
    assert ours["input_ids"][0, :real].tolist() == [10, UNK_ID, *reference["input_ids"][0, 3:15]]
    assert reference["input_ids"][0, :3].tolist() == [10, UNK_ID, UNK_ID]
    assert int(reference["attention_mask"].sum()) == real + 1


def test_parity_flags_exist_on_prepare_and_train():
    for flag in ("--partial-codon", "--long-records", "--on-invalid"):
        assert any(flag in spec.names for spec in data_specs()), flag
        assert any(flag in spec.names for spec in train_specs()), flag


def test_prepare_cli_summary_names_the_parity_switches(tmp_path, capsys):
    paths = [Path(shutil.copy(p, tmp_path / p.name)) for p in bundled_fasta_paths()]
    args = ["prepare", *map(str, paths), "-o", str(tmp_path / "cache")]
    try:
        main([*args, "--partial-codon", "unk", "--long-records", "truncate", "--max-length", "500"])
    except SystemExit as exc:
        assert exc.code == 0, capsys.readouterr()
    out = capsys.readouterr().out
    total = next(line for line in out.splitlines() if line.startswith("  total:"))
    # HA: 579 codons -> 79 cut each (96 records); NA: 480 + [UNK] fits in 500.
    assert "47 partial codons as [UNK]" in total
    assert f"96 records truncated ({96 * 79:,} codons cut)" in total
    assert "0 gaps removed, 0 U read as T" in total
