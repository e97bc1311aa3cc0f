"""The codon vocabulary, the bulk encoder and the HF tokenizer agree with upstream GenSLM."""

from __future__ import annotations

import subprocess
import sys

import numpy as np

from dstrain import codons
from dstrain.fasta import bundled_fasta_paths

# Upstream GenSLM's codon_wordlevel_69vocab.json, id order, written out independently.
# fmt: off
UPSTREAM_VOCAB = [
    "[UNK]", "[CLS]", "[SEP]", "[PAD]", "[MASK]",
    "GGC", "GCC", "ATC", "GAC", "GAA", "ATG", "GTG", "CTG", "GTC", "GCG", "GAT", "AAA", "GGT",
    "AAG", "GAG", "ACC", "AAC", "GTT", "ATT", "GCA", "CTC", "CGC", "GCT", "CAG", "CCG", "TTC",
    "GTA", "TCG", "GGA", "AAT", "TAC", "CTT", "TTG", "ACG", "TCC", "GGG", "AGC", "CCC", "ACA",
    "ACT", "TCT", "TTA", "CGT", "TAT", "CAA", "CGG", "TTT", "CAC", "CCT", "CCA", "TGG", "ATA",
    "TCA", "TGC", "AGT", "AGA", "CAT", "TGT", "CTA", "AGG", "TAA", "CGA", "TGA", "TAG",
]
# fmt: on


def _bundled_sequences() -> list[str]:
    """Every bundled record's sequence, read without dstrain's own parser."""
    sequences = []
    for path in bundled_fasta_paths():
        for block in path.read_text().split(">")[1:]:
            sequences.append("".join(block.splitlines()[1:]))
    return sequences


def test_vocabulary_ids_equal_upstream():
    assert len(UPSTREAM_VOCAB) == 69
    assert list(codons.VOCAB) == UPSTREAM_VOCAB
    assert dict(codons.TOKEN_TO_ID) == {token: i for i, token in enumerate(UPSTREAM_VOCAB)}
    assert (codons.UNK_ID, codons.CLS_ID, codons.SEP_ID, codons.PAD_ID, codons.MASK_ID) == (
        0,
        1,
        2,
        3,
        4,
    )
    assert codons.VOCAB_SIZE == 69
    assert sorted(codons.CODONS) == sorted(
        a + b + c for a in "ACGT" for b in "ACGT" for c in "ACGT"
    )


def test_encode_sequence_maps_each_codon_and_ambiguity():
    ids = codons.encode_sequence("ATGGGCTAGNNNATRaugTG")
    assert ids.dtype == np.uint8
    assert codons.decode_ids(ids) == ["ATG", "GGC", "TAG", "[UNK]", "[UNK]", "ATG"]
    assert len(codons.encode_sequence("")) == 0
    assert len(codons.encode_sequence(b"AT")) == 0


def test_every_codon_encodes_to_its_upstream_id():
    text = "".join(codons.CODONS)
    assert codons.encode_sequence(text).tolist() == list(range(5, 69))


def test_hf_tokenizer_and_bulk_encoder_agree_on_real_records():
    tokenizer = codons.build_hf_tokenizer()
    sequences = _bundled_sequences()
    ambiguous = [s for s in sequences if set(s) - set("ACGT")]
    assert {c for s in ambiguous for c in s} - set("ACGT") == {"R", "Y"}
    assert len(ambiguous) == 6
    encoded = tokenizer([codons.codons_to_text(s) for s in sequences])["input_ids"]
    for seq, hf_ids in zip(sequences, encoded, strict=True):
        assert hf_ids == codons.encode_sequence(seq).tolist()
    assert sum(ids.count(codons.UNK_ID) for ids in encoded) == 6


def test_hf_tokenizer_settings_and_save_reload(tmp_path):
    from transformers import AutoTokenizer

    tokenizer = codons.build_hf_tokenizer()
    assert tokenizer.get_vocab() == codons.TOKEN_TO_ID
    assert tokenizer.pad_token_id == codons.PAD_ID
    assert tokenizer.unk_token_id == codons.UNK_ID
    assert tokenizer.model_max_length == 2048
    assert tokenizer("ATG GGC")["input_ids"] == [10, 5]  # no [CLS]/[SEP] added

    tokenizer.save_pretrained(tmp_path)
    reloaded = AutoTokenizer.from_pretrained(tmp_path)
    sequence = _bundled_sequences()[0]
    text = codons.codons_to_text(sequence)
    assert reloaded(text)["input_ids"] == codons.encode_sequence(sequence).tolist()
    assert reloaded.get_vocab() == codons.TOKEN_TO_ID
    assert reloaded.pad_token == "[PAD]"
    assert reloaded.model_max_length == 2048
    batch = reloaded(["ATG GGC TAA", "ATG"], padding=True)
    assert batch["input_ids"][1] == [10, 3, 3]
    assert batch["attention_mask"][1] == [1, 0, 0]


def test_data_modules_import_without_torch():
    """The vocabulary, FASTA reader and cache stay usable from the pure layer."""
    code = (
        "import sys, dstrain.codons, dstrain.fasta, dstrain.prepare; "
        "print(sorted(m for m in ('torch', 'transformers', 'tokenizers', 'deepspeed', 'Bio') "
        "if m in sys.modules))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"
