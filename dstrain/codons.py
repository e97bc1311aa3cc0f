"""GenSLM's 69-token codon vocabulary and two encoders that agree on every id.

The vocabulary is upstream GenSLM's (ramanathanlab/genslm, `codon_wordlevel_69vocab.json`)
with its exact ids: five special tokens, then the 64 codons in upstream's order. Official
checkpoints depend on these ids, so they are written out literally below and pinned by a
test.

Two encoders:

- `encode_sequence` is the bulk path used by `dstrain prepare`: a numpy lookup over the
  sequence bytes (about 20 ns per codon on one CPU core). Each base maps to 0-3 (A, C, G,
  T; U reads as T) or 4 (anything else: N, R, Y and the other IUPAC codes), each codon to
  the base-5 number `25*b0 + 5*b1 + b2`, and a 125-entry table maps that number to a
  token id; every codon holding a 4 maps to `[UNK]`. A trailing partial codon is dropped
  (callers count it).
- `build_hf_tokenizer` builds the `transformers` tokenizer that exports ship with. It reads
  uppercase codons separated by spaces (`codons_to_text` writes that form) and adds no
  `[CLS]`/`[SEP]`, like upstream.

This module imports only numpy at top level; `transformers` and `tokenizers` are imported
inside `build_hf_tokenizer`, so the vocabulary is usable from the pure layer.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import numpy as np

if TYPE_CHECKING:
    from transformers import PreTrainedTokenizerFast

SPECIAL_TOKENS: tuple[str, ...] = ("[UNK]", "[CLS]", "[SEP]", "[PAD]", "[MASK]")
"""Upstream's special tokens, ids 0-4."""

CODONS: tuple[str, ...] = (
    "GGC", "GCC", "ATC", "GAC", "GAA", "ATG", "GTG", "CTG", "GTC", "GCG", "GAT", "AAA",
    "GGT", "AAG", "GAG", "ACC", "AAC", "GTT", "ATT", "GCA", "CTC", "CGC", "GCT", "CAG",
    "CCG", "TTC", "GTA", "TCG", "GGA", "AAT", "TAC", "CTT", "TTG", "ACG", "TCC", "GGG",
    "AGC", "CCC", "ACA", "ACT", "TCT", "TTA", "CGT", "TAT", "CAA", "CGG", "TTT", "CAC",
    "CCT", "CCA", "TGG", "ATA", "TCA", "TGC", "AGT", "AGA", "CAT", "TGT", "CTA", "AGG",
    "TAA", "CGA", "TGA", "TAG",
)  # fmt: skip
"""The 64 codons in upstream's id order (ids 5-68)."""

VOCAB: tuple[str, ...] = SPECIAL_TOKENS + CODONS
"""All 69 tokens; a token's id is its index."""

TOKEN_TO_ID: dict[str, int] = {token: i for i, token in enumerate(VOCAB)}
VOCAB_SIZE = len(VOCAB)  # 69: fits in uint8, so the token cache stores 1 byte per codon

UNK_ID = TOKEN_TO_ID["[UNK]"]  # 0
CLS_ID = TOKEN_TO_ID["[CLS]"]  # 1
SEP_ID = TOKEN_TO_ID["[SEP]"]  # 2
PAD_ID = TOKEN_TO_ID["[PAD]"]  # 3
MASK_ID = TOKEN_TO_ID["[MASK]"]  # 4
START_CODON_ID = TOKEN_TO_ID["ATG"]  # 10
STOP_CODON_IDS: tuple[int, ...] = tuple(TOKEN_TO_ID[c] for c in ("TAA", "TAG", "TGA"))

MODEL_MAX_LENGTH = 2048
"""GenSLM's context in codon tokens (25M to 2.5B models)."""

_BASES = "ACGT"
_OTHER = 4  # base code for anything that is not A, C, G, T or U


def _build_base_table() -> np.ndarray:
    """256-entry byte -> base code table: A C G T -> 0-3 (either case, U as T), else 4."""
    table = np.full(256, _OTHER, dtype=np.uint8)
    for code, base in enumerate(_BASES):
        table[ord(base)] = table[ord(base.lower())] = code
    table[ord("U")] = table[ord("u")] = _BASES.index("T")
    return table


def _build_codon_table() -> np.ndarray:
    """125-entry base-5 codon number -> token id; any codon with a code-4 base is [UNK]."""
    table = np.full(5**3, UNK_ID, dtype=np.uint8)
    for codon in CODONS:
        b0, b1, b2 = (_BASES.index(base) for base in codon)
        table[25 * b0 + 5 * b1 + b2] = TOKEN_TO_ID[codon]
    return table


_BASE_CODE = _build_base_table()
_CODON_ID = _build_codon_table()


def encode_sequence(seq: str | bytes) -> np.ndarray:
    """Codon token ids (uint8) of a nucleotide sequence read from its first base.

    Codons holding anything but A, C, G, T or U become `[UNK]`; a trailing partial codon
    (1 or 2 bases) is dropped. The input should already be cleaned (no whitespace or gaps:
    see `dstrain.fasta`), otherwise those characters shift the codons.
    """
    raw = seq.encode("ascii") if isinstance(seq, str) else seq
    num_codons = len(raw) // 3
    codes = _BASE_CODE[np.frombuffer(raw, dtype=np.uint8, count=3 * num_codons)]
    codes = codes.reshape(num_codons, 3).astype(np.intp)
    return _CODON_ID[25 * codes[:, 0] + 5 * codes[:, 1] + codes[:, 2]]


def decode_ids(ids: np.ndarray | list[int]) -> list[str]:
    """Tokens of a sequence of ids (for messages and debugging)."""
    return [VOCAB[int(i)] for i in ids]


def codons_to_text(seq: str) -> str:
    """The sequence as space-separated codons: the text form the HF tokenizer reads.

    A trailing partial codon is dropped, as in `encode_sequence`.
    """
    return " ".join(seq[i : i + 3] for i in range(0, len(seq) - len(seq) % 3, 3))


def build_hf_tokenizer() -> PreTrainedTokenizerFast:
    """The `transformers` tokenizer for the codon vocabulary, identical ids to upstream.

    A `tokenizers` WordLevel model over `VOCAB` with upstream's `Whitespace` pre-tokenizer,
    so it reads `codons_to_text` output; unknown words (codons with IUPAC codes, lowercase)
    become `[UNK]`. Pad is `[PAD]`, no BOS/EOS is added, and `model_max_length` is 2048.
    `save_pretrained(dir)` writes it and `AutoTokenizer.from_pretrained(dir)` reloads it.
    """
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    backend = Tokenizer(models.WordLevel(dict(TOKEN_TO_ID), unk_token="[UNK]"))
    backend.pre_tokenizer = pre_tokenizers.Whitespace()
    return PreTrainedTokenizerFast(
        tokenizer_object=backend,
        unk_token="[UNK]",
        cls_token="[CLS]",
        sep_token="[SEP]",
        pad_token="[PAD]",
        mask_token="[MASK]",
        model_max_length=MODEL_MAX_LENGTH,
    )
