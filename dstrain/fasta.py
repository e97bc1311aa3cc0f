"""Nucleotide FASTA -> codon token ids, with a report that tells what happened to the data.

Every record goes through the same steps (`read_fasta`):

1. Parse with biopython (`SeqIO.parse(handle, "fasta")`); plain or gzip-compressed files
   (recognised by their magic bytes, whatever the suffix). The record ID is the first word
   of the header, as biopython gives it.
2. Clean: uppercase; whitespace removed; gap characters `-` and `.` removed *before* the
   sequence is cut into codons (an aligned sequence read with its gaps would shift every
   following codon) and counted in `gap_characters`; RNA `U` read as `T` and counted in
   `u_to_t` (upstream GenSLM makes a codon holding `U` an `[UNK]`: dstrain deliberately
   reads RNA as its DNA codons). A letter outside the nucleotide IUPAC alphabet
   (A C G T U R Y S W K M B D H V N): `X`, `*`, a digit, another letter (`on_invalid`):
   - `error` (default) stops with an error naming the file, record and position;
   - `unk` keeps it in place as one base, so the codon holding it becomes `[UNK]`
     (counted in `invalid_codons`), as upstream's WordLevel tokenizer does with any word
     outside its vocabulary. One exception, kept on purpose: upstream's `Whitespace`
     pre-tokenizer also splits a word at punctuation, so a codon holding `*` (or another
     non-word character) is 2-3 `[UNK]` tokens there, shifting the positions after it;
     dstrain keeps one token per codon;
   - `skip-record` leaves the record out, listed with the first such letter.
   A record where many letters are amino-acid-only (E F I L P Q ..., over 10%) looks like
   protein: an error under `error` and `unk` (turning a protein into `[UNK]` codons would
   train on noise), skipped with reason "looks like protein" under `skip-record`.
3. Frame: `frame="0"` reads codons from the first base (upstream GenSLM). A trailing
   partial codon (1-2 bases, counted in `partial_codons`) is dropped (`partial_codon="drop"`)
   or kept as one `[UNK]` token at the record's end, whatever its letters
   (`partial_codon="unk"`): upstream's `group_by_kmer` leaves a 1-2 letter word that its
   WordLevel tokenizer maps to `[UNK]`, attended and in the loss. `frame="orf"` keeps the
   longest forward-strand open reading frame: an in-frame `ATG` up to and *including* the
   first in-frame stop codon (TAA, TAG, TGA); ties go to the earliest start. The stop is
   kept because a CDS ends with it (the bundled H3N2 HA records hold a 566-residue
   protein, so their ORF is 567 codons). Records without a complete ORF are skipped.
   `frame="all-orfs"` keeps every ORF of at least `min_orf_codons` codons (stop
   included) as its own example, in all three frames: an ORF runs from the first ATG
   after the previous in-frame stop (or the frame's first codon) to the next stop, so
   ATGs nested in it with the same stop are part of it, not ORFs of their own, while
   ORFs in different frames may overlap (SARS-CoV-2's ORF9b inside N). A run without a
   stop up to the record's end is no ORF. The stops are exactly TAA, TAG and TGA (a codon
   holding an ambiguity code is none). `strands="both"` (`orf` and `all-orfs`) also reads
   the reverse complement (A-T, C-G, R-Y, K-M, B-V, D-H swapped); `orf` then keeps the
   longer of the two strands' longest ORFs (the forward one on a tie). The examples of
   a record come in the order of their forward-strand start. Each kept ORF is listed in
   the report (`orf_list`) as `record_id`, `start`, `end`, `strand`, `codons`:
   1-based inclusive coordinates on the forward strand after gap removal, as GenBank
   writes them (`start..end`, `complement(start..end)` for strand `-`, whose ATG ends
   at `end`), and its codons stop included (`end - start + 1 == 3 * codons`). Records
   with no ORF that long are skipped. An ORF has no partial codon, so `orf` and
   `all-orfs` with `partial_codon="unk"` are refused.
4. Long records (`long_records`): `window` (default) cuts a record longer than
   `max_length` codons into several examples of at most `max_length` codons, consecutive
   ones sharing `window_overlap` codons, the last one maybe shorter; nothing is lost.
   `truncate` keeps its first `max_length` codons only (upstream's tokenizer call with
   `truncation=True`); the records cut and the codons dropped are counted in
   `truncated_records` and `truncated_codons`. Under `all-orfs` both apply to each ORF.
5. Ambiguity (`on_ambiguous`): a codon holding an IUPAC code (N, R, Y, ...) becomes
   `[UNK]` and is counted (`unk`, upstream's behaviour), drops its record (`skip-record`),
   or stops with an error naming the file, record and position (`error`). Only codons that
   are kept count (not those cut by `truncate`, nor the partial codon; under `all-orfs`,
   those of the kept ORFs, so an `N` between genes changes nothing, and one inside a gene
   drops the whole record under `skip-record`, all its ORFs with it).

With `frame="0"`, `partial_codon="unk"` and the other defaults, the codon ids of a record
are exactly upstream's `input_ids` before padding, for every bundled record (checked by
tests/test_parity.py); `--padding max_length --loss-on-pad` then gives upstream's batches.
Upstream keeps gap characters as letters (shifting the codons after them) and leaves
records of fewer than 3 bases as one `[UNK]`; dstrain removes gaps and skips such records.

Records with no sequence, with fewer than 3 bases, or dropped by the policies above are
listed in the report with a reason. Records whose ID repeats one seen earlier in the file
are kept and listed in `duplicate_ids`; they hash into the same split as the first one.

Train/validation split: a record goes to validation when
`sha256(f"{split_seed}:{record_id}")`, read as a fraction of 2**64, is below
`val_fraction`. It depends on the ID alone, so adding records never moves old ones, and
all windows of a record, and all ORFs of a record (a genome's genes), stay in one split.
"""

from __future__ import annotations

import contextlib
import dataclasses
import gzip
import hashlib
import importlib.resources
import io
import operator
import zlib
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import NamedTuple, TextIO

import numpy as np

from dstrain.codons import (
    _BASE_CODE,
    _CODON_ID,
    START_CODON_ID,
    STOP_CODON_IDS,
    UNK_ID,
    encode_sequence,
)
from dstrain.errors import DstrainError
from dstrain.settings import DataSettings

NUCLEOTIDE_CODES = "ACGTU"
AMBIGUITY_CODES = "RYSWKMBDHVN"
GAP_CHARACTERS = "-."
PROTEIN_ONLY_LETTERS = "EFIJLOPQXZ*"
"""Letters (and the stop sign) that occur in protein FASTA but are no nucleotide code."""
AMINO_ACID_ONLY_LETTERS = "EFIJLOPQZ"
"""The protein-only letters without X and `*`, which nucleotide files use too (a masked
base, a stop): under `--on-invalid unk|skip-record` only these make a record protein."""
_AMINO_ACID_ONLY_BYTES = np.frombuffer(AMINO_ACID_ONLY_LETTERS.encode(), dtype=np.uint8)

MAX_LISTED = 100
"""Skipped records and duplicate IDs listed per file (the counts stay exact)."""
MAX_LISTED_ORFS = 500
"""ORFs listed per file in the report (`frame="all-orfs"`; `orfs` counts them all): a
bacterial genome has thousands. `dstrain.prepare` writes every one to `orfs.tsv`."""

_PROTEIN_SHARE = 0.1  # above this share of protein-only letters a record "looks like protein"
_SNIFF_BYTES = 64 * 1024
_GZIP_MAGIC = b"\x1f\x8b"
MAX_RECORD_BYTES = 128 * 1024 * 1024
"""Longest stretch between two '>' headers, in bytes of the (decompressed) file. Genes are
at most a few Mb and whole bacterial genomes ~15 Mb; biopython holds a record in memory
several times over, so a 1 GiB record (or a gzip bomb) would exhaust RAM before any check."""


class _RecordBound(io.RawIOBase):
    """Binary reader that refuses a record longer than `MAX_RECORD_BYTES` as it streams."""

    def __init__(self, inner: io.BufferedIOBase, path: Path) -> None:
        super().__init__()
        self._inner, self._path, self._since_header = inner, path, 0

    def readable(self) -> bool:
        return True

    def seekable(self) -> bool:
        return self._inner.seekable()

    def seek(self, offset: int, whence: int = io.SEEK_SET) -> int:
        self._since_header = 0  # only used at the file's start (leading blank lines)
        return self._inner.seek(offset, whence)

    def tell(self) -> int:
        return self._inner.tell()

    def readinto(self, buffer) -> int:
        data = self._inner.read(min(len(buffer), 1 << 20))
        count = len(data)
        buffer[:count] = data
        run, start = self._since_header, 0
        while (header := data.find(b">", start)) >= 0 and run + header - start <= MAX_RECORD_BYTES:
            run, start = 0, header + 1
        self._since_header = run + (header if header >= 0 else count) - start
        if self._since_header > MAX_RECORD_BYTES:
            raise DstrainError(
                f"{self._path}: a record runs over {MAX_RECORD_BYTES // 2**20} MiB without a "
                "'>' header (a whole genome, a concatenation or a decompression bomb?). dstrain "
                "tokenizes gene-level sequences: split it into one record per gene"
            )
        return count


# Byte classes of an uppercased sequence.
_BASE, _URACIL, _AMBIGUOUS, _GAP, _SPACE, _PROTEIN, _OTHER = range(7)


def _build_class_table() -> np.ndarray:
    table = np.full(256, _OTHER, dtype=np.uint8)
    for chars, cls in (
        ("ACGT", _BASE),
        ("U", _URACIL),
        (AMBIGUITY_CODES, _AMBIGUOUS),
        (GAP_CHARACTERS, _GAP),
        (" \t\r\n\v\f", _SPACE),
        (PROTEIN_ONLY_LETTERS, _PROTEIN),
    ):
        table[np.frombuffer(chars.encode(), dtype=np.uint8)] = cls
    return table


_CLASS = _build_class_table()
_NO_POSITIONS = np.zeros(0, dtype=np.intp)
_COMPLEMENT = bytes.maketrans(b"ACGTRYKMBVDH", b"TGCAYRMKVBHD")
"""IUPAC complement (S, W, N and letters outside IUPAC stay as they are)."""


@dataclass
class SkippedRecord:
    """A record left out of the data, and why."""

    record_id: str
    reason: str


@dataclass(frozen=True)
class Orf:
    """One ORF kept under `frame="all-orfs"` (coordinates as in the module docstring)."""

    record_id: str
    start: int
    """First base, 1-based on the forward strand (after gap removal)."""
    end: int
    """Last base, inclusive, on the forward strand: `end - start + 1 == 3 * codons`."""
    strand: str
    """`+`, read from `start` up; `-`, the reverse complement, read from `end` down."""
    codons: int
    """Its codons, the stop included (before `long_records` truncate cuts any)."""


@dataclass
class FileReport:
    """What reading one FASTA file did; `to_dict()` is its JSON form.

    Codon counts are of codons kept for training (before windowing); skipped records
    contribute to `records`, `skipped_records` and the cleaning counts (`gap_characters`,
    `u_to_t`, `empty_records`) only.
    """

    path: str
    records: int = 0
    """Records in the file."""
    kept_records: int = 0
    """Records that became training examples."""
    codons: int = 0
    """Codon tokens kept, `[UNK]` included."""
    unknown_codons: int = 0
    """Kept codons holding an IUPAC ambiguity code, encoded as `[UNK]`."""
    invalid_codons: int = 0
    """Kept codons holding a letter outside IUPAC, encoded as `[UNK]` (`on_invalid` unk)."""
    partial_codons: int = 0
    """Kept records ending in a partial codon (1-2 bases, frame 0): dropped under
    `partial_codon` drop, one `[UNK]` under unk (unless `truncate` cut it off)."""
    empty_records: int = 0
    """Records with no sequence at all (also counted in `skipped_records`)."""
    skipped_records: int = 0
    """Records left out; `skipped` lists them with the reason."""
    skipped: list[SkippedRecord] = field(default_factory=list)
    """The first `MAX_LISTED` skipped records with their reason."""
    duplicate_records: int = 0
    """Records whose ID repeats an earlier one in this file (kept)."""
    duplicate_ids: list[str] = field(default_factory=list)
    """The first `MAX_LISTED` repeated IDs."""
    gap_characters: int = 0
    """`-` and `.` removed before codon splitting."""
    u_to_t: int = 0
    """RNA `U` bases read as `T`."""
    bases_outside_orf: int = 0
    """Bases of kept records outside the kept ORF (frame `orf`), or in no kept ORF on
    either strand (frame `all-orfs`)."""
    orfs: int = 0
    """ORFs kept as examples, before windowing (frame `all-orfs` only)."""
    orf_list: list[Orf] = field(default_factory=list)
    """The first `MAX_LISTED_ORFS` of them, in file order (`prepare --json` lists all)."""
    windows: int = 0
    """Training examples made from this file's records (1 per record up to `max_length`)."""
    truncated_records: int = 0
    """Records cut to `max_length` codons (`long_records` truncate)."""
    truncated_codons: int = 0
    """Codons those cuts dropped (not in `codons`)."""

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


@dataclass(frozen=True)
class CodonRecord:
    """One kept example: its record's ID and codon token ids (uint8), before windowing.

    One per record, or under `frame="all-orfs"` one per ORF, with `orf` set."""

    record_id: str
    ids: np.ndarray
    orf: Orf | None = None
    first_of_record: bool = True
    """False for a record's second and later ORFs (so splits count records once)."""


# --------------------------------------------------------------------------------------
# Bundled data, split, windows
# --------------------------------------------------------------------------------------


def bundled_fasta_paths() -> list[Path]:
    """The H3N2 HA/NA FASTA files shipped in `dstrain/data/` (the demo default)."""
    data_dir = Path(str(importlib.resources.files("dstrain").joinpath("data")))
    return sorted(data_dir.glob("*.fasta"))


def bundled_genomes_path() -> Path:
    """The five SARS-CoV-2 genomes shipped in `dstrain/data/sars_cov_2/` (~29.8 kb each;
    genes through `frame="all-orfs"`, see `dstrain/data/README.md`)."""
    data_dir = Path(str(importlib.resources.files("dstrain").joinpath("data")))
    return data_dir / "sars_cov_2" / "example_genomes.fasta"


def is_validation_record(record_id: str, val_fraction: float, split_seed: int) -> bool:
    """Whether a record belongs to the validation split (stable per ID, see module doc)."""
    digest = hashlib.sha256(f"{split_seed}:{record_id}".encode()).digest()
    return int.from_bytes(digest[:8], "big") < val_fraction * 2**64


def window_bounds(num_codons: int, max_length: int, window_overlap: int) -> list[tuple[int, int]]:
    """`(start, end)` codon ranges covering a record with windows of at most `max_length`.

    Starts advance by `max_length - window_overlap`; the last window ends at the record's
    end and may be shorter. `window_bounds(10, 4, 1)` is `[(0, 4), (3, 7), (6, 10)]`.
    """
    stride = max_length - window_overlap
    assert stride > 0, (max_length, window_overlap)
    last_start = max(num_codons - window_overlap, 1)
    return [(s, min(s + max_length, num_codons)) for s in range(0, last_start, stride)]


# --------------------------------------------------------------------------------------
# Frames
# --------------------------------------------------------------------------------------


def find_longest_orf(seq: bytes) -> tuple[int, int] | None:
    """Base range `[start, end)` of the longest forward ATG...stop ORF, stop included.

    Searches all three forward frames; ties go to the earliest start. None when no ATG is
    followed by an in-frame stop.
    """
    best: tuple[int, int] | None = None
    for frame in range(3):
        ids = encode_sequence(seq[frame:])
        starts = np.flatnonzero(ids == START_CODON_ID)
        stops = np.flatnonzero(np.isin(ids, STOP_CODON_IDS))
        next_stop = np.searchsorted(stops, starts)  # index of the first stop after each ATG
        ends_in_stop = next_stop < len(stops)
        starts, next_stop = starts[ends_in_stop], next_stop[ends_in_stop]
        if len(starts) == 0:
            continue
        # The ATGs sharing a stop are sorted, so the first of each group is the longest ORF.
        group_stops, first = np.unique(next_stop, return_index=True)
        lengths = stops[group_stops] - starts[first] + 1
        k = int(np.argmax(lengths))
        start = frame + 3 * int(starts[first[k]])
        end = start + 3 * int(lengths[k])
        if best is None or (end - start, -start) > (best[1] - best[0], -best[0]):
            best = (start, end)
    return best


def reverse_complement(seq: bytes) -> bytes:
    """The reverse complement of a cleaned (uppercase) sequence, IUPAC codes included."""
    return seq.translate(_COMPLEMENT)[::-1]


_CODON_KIND = np.zeros(256, dtype=np.uint8)  # token id -> 1 for ATG, 2 for a stop, else 0
_CODON_KIND[START_CODON_ID] = 1
_CODON_KIND[list(STOP_CODON_IDS)] = 2


def _orf_codon_ranges(ids: np.ndarray, min_codons: int) -> tuple[np.ndarray, np.ndarray]:
    """Codon ranges `[first, last)` of every ATG...stop ORF in one frame's ids (stop included,
    at least `min_codons` long); the first ATG after each stop starts the ORF."""
    kind = _CODON_KIND[ids]
    starts = np.flatnonzero(kind == 1)
    stops = np.flatnonzero(kind == 2)
    next_stop = np.searchsorted(stops, starts)  # index of the first stop after each ATG
    ends_in_stop = next_stop < len(stops)
    starts, next_stop = starts[ends_in_stop], next_stop[ends_in_stop]
    first = np.ones(len(starts), dtype=bool)  # starts are sorted: the first of its stop
    first[1:] = next_stop[1:] != next_stop[:-1]
    starts, ends = starts[first], stops[next_stop[first]] + 1
    long_enough = ends - starts >= min_codons
    return starts[long_enough], ends[long_enough]


def _build_reverse_codon_table() -> np.ndarray:
    """Base-5 codon number (as `_codon_numbers` gives) -> token id of its reverse complement."""
    complement = (3, 2, 1, 0, 4)  # A C G T other -> T G C A other
    table = np.empty(5**3, dtype=np.uint8)
    for number in range(5**3):
        b0, b1, b2 = number // 25, number // 5 % 5, number % 5
        table[number] = _CODON_ID[25 * complement[b2] + 5 * complement[b1] + complement[b0]]
    return table


_REVERSE_CODON_ID = _build_reverse_codon_table()


def _codon_numbers(seq: bytes) -> np.ndarray:
    """Base-5 number (uint8, 0-124) of the codon at every offset: entry p reads seq[p:p+3]."""
    codes = _BASE_CODE[np.frombuffer(seq, dtype=np.uint8)]
    return codes[:-2] * 25 + codes[1:-1] * 5 + codes[2:]


class _Span(NamedTuple):
    """A stretch of a record read as codons: forward-strand bases `[start, end)`."""

    start: int
    end: int
    strand: str
    ids: np.ndarray
    """Codon ids, read on `strand` (for `-`, from `end` down, complemented)."""


def _strand_orf_spans(numbers: np.ndarray, strand: str, min_codons: int) -> list[_Span]:
    """Every ORF of one strand, as spans in forward-strand coordinates, from the codon
    numbers of the forward sequence (`_codon_numbers`): the reverse strand's frame g reads
    the forward codons starting at n-3-g, n-6-g, ... down, each reverse-complemented."""
    n = len(numbers) + 2
    spans = []
    for frame in range(3):
        if strand == "+":
            ids = _CODON_ID[numbers[frame::3]]
        else:
            last = n - 3 - frame
            ids = _REVERSE_CODON_ID[numbers[last::-3]] if last >= 0 else _CODON_ID[:0]
        first, stop = _orf_codon_ranges(ids, min_codons)
        for k0, k1 in zip(first.tolist(), stop.tolist(), strict=True):
            b0, b1 = frame + 3 * k0, frame + 3 * k1
            if strand == "-":
                b0, b1 = n - b1, n - b0
            spans.append(_Span(b0, b1, strand, ids[k0:k1]))
    return spans


def _all_orf_spans(seq: bytes, min_codons: int, both_strands: bool) -> list[_Span]:
    if len(seq) < 3:
        return []
    numbers = _codon_numbers(seq)
    spans = _strand_orf_spans(numbers, "+", min_codons)
    if both_strands:
        spans += _strand_orf_spans(numbers, "-", min_codons)
    spans.sort(key=operator.itemgetter(0, 1, 2))  # start, end, strand
    return spans


def find_orfs(
    seq: bytes, min_codons: int = 1, strands: str = "forward"
) -> list[tuple[int, int, str]]:
    """Every ATG...stop ORF of a cleaned sequence as `(start, end, strand)`, stop included.

    `[start, end)` are 0-based forward-strand base positions (the report's 1-based
    inclusive coordinates are `start + 1` to `end`); `strand` is `+` or `-` (`-` only
    with `strands="both"`). ORFs shorter than `min_codons` codons are left out. Nested
    ATGs with the same stop make one ORF (see the module docstring). Sorted by start.
    """
    return [(s.start, s.end, s.strand) for s in _all_orf_spans(seq, min_codons, strands == "both")]


def _frame_spans(seq: bytes, settings: DataSettings) -> list[_Span]:
    """What of a cleaned record becomes examples under `settings.frame` (none: skip it)."""
    n = len(seq)
    if settings.frame == "0":
        end = n - n % 3
        return [_Span(0, end, "+", encode_sequence(seq[:end]))]
    both = settings.strands == "both"
    if settings.frame == "all-orfs":
        return _all_orf_spans(seq, settings.min_orf_codons, both)
    best, strand = find_longest_orf(seq), "+"
    rc = reverse_complement(seq) if both else b""
    orf = find_longest_orf(rc) if both else None
    if orf is not None and (best is None or orf[1] - orf[0] > best[1] - best[0]):
        best, strand = (n - orf[1], n - orf[0]), "-"
    if best is None:
        return []
    start, end = best
    return [
        _Span(
            start,
            end,
            strand,
            encode_sequence(seq[start:end] if strand == "+" else rc[n - end : n - start]),
        )
    ]


# --------------------------------------------------------------------------------------
# Reading
# --------------------------------------------------------------------------------------


def read_fasta(path: Path, settings: DataSettings) -> tuple[list[CodonRecord], FileReport]:
    """All kept records of a FASTA file as codon ids, and the file's report.

    Raises `DstrainError` naming the file (and record) when the file is missing, empty,
    not FASTA, holds protein, holds invalid characters under `on_invalid="error"`, holds
    an ambiguous codon under `on_ambiguous="error"`, or has no usable record.
    """
    report = FileReport(path=str(path))
    records = list(iter_codon_records(path, settings, report))
    return records, report


def iter_codon_records(
    path: Path, settings: DataSettings, report: FileReport
) -> Iterator[CodonRecord]:
    """Stream the kept records of one file, filling `report` as it goes (see `read_fasta`)."""
    from Bio import SeqIO

    seen_ids: set[str] = set()
    with open_fasta(path) as handle:
        try:
            for number, record in enumerate(SeqIO.parse(handle, "fasta"), start=1):
                report.records += 1
                if record.id in seen_ids:
                    report.duplicate_records += 1
                    if (
                        len(report.duplicate_ids) < MAX_LISTED
                        and record.id not in report.duplicate_ids
                    ):
                        report.duplicate_ids.append(record.id)
                seen_ids.add(record.id)
                label = f"record {number} ('{record.id}')"
                examples = encode_record_examples(
                    bytes(record.seq), path, label, record.id, settings, report
                )
                if examples is None:
                    continue
                report.kept_records += 1
                for index, (orf, ids) in enumerate(examples):
                    report.codons += len(ids)
                    report.windows += (
                        1
                        if len(ids) <= settings.max_length
                        else len(
                            window_bounds(len(ids), settings.max_length, settings.window_overlap)
                        )
                    )
                    if orf is not None:
                        report.orfs += 1
                        if len(report.orf_list) < MAX_LISTED_ORFS:
                            report.orf_list.append(orf)
                    yield CodonRecord(record.id, ids, orf, first_of_record=index == 0)
        except (OSError, EOFError, zlib.error) as exc:  # truncated or corrupt gzip
            raise DstrainError(
                f"{path}: could not be read past record {report.records} ({exc}). The file "
                f"looks truncated or corrupt; download or decompress it again."
            ) from exc
    if report.kept_records == 0:
        reasons = sorted({s.reason.split(" at ")[0].split(" (")[0] for s in report.skipped})
        raise DstrainError(
            f"{path}: no usable records: all {report.records} were skipped "
            f"({'; '.join(reasons)}). Check that the file holds nucleotide coding sequences"
            + (" or use --frame 0" if settings.frame == "orf" else "")
            + (
                f" or lower --min-orf-codons ({settings.min_orf_codons}) or use --frame 0"
                if settings.frame == "all-orfs"
                else ""
            )
            + (
                " or --on-ambiguous unk"
                if settings.on_ambiguous == "skip-record" and any("ambiguous" in r for r in reasons)
                else ""
            )
            + (
                " or --on-invalid unk"
                if settings.on_invalid == "skip-record" and any("invalid" in r for r in reasons)
                else ""
            )
            + "."
        )


def _skip(report: FileReport, record_id: str, reason: str) -> None:
    report.skipped_records += 1
    if len(report.skipped) < MAX_LISTED:
        report.skipped.append(SkippedRecord(record_id, reason))


def encode_record(
    raw: bytes,
    path: Path,
    label: str,
    record_id: str,
    settings: DataSettings,
    report: FileReport,
) -> np.ndarray | None:
    """Codon ids of one record after cleaning, frame and the policies; None if skipped.

    For frames `0` and `orf` (one example per record); see `encode_record_examples`.
    """
    assert settings.frame != "all-orfs", "a record gives several examples: encode_record_examples"
    examples = encode_record_examples(raw, path, label, record_id, settings, report)
    return None if examples is None else examples[0][1]


def encode_record_examples(
    raw: bytes,
    path: Path,
    label: str,
    record_id: str,
    settings: DataSettings,
    report: FileReport,
) -> list[tuple[Orf | None, np.ndarray]] | None:
    """The examples of one record after cleaning, frame and the policies; None if skipped.

    One `(None, ids)` under frames `0` and `orf`; under `all-orfs` one `(Orf, ids)` per ORF.
    """
    if not raw:
        report.empty_records += 1
        _skip(report, record_id, "empty sequence")
        return None
    try:
        seq, invalid, num_gaps, num_u = _clean_sequence(raw, path, label, settings.on_invalid)
    except _SkipRecord as skip:
        _skip(report, record_id, str(skip))
        return None
    report.gap_characters += num_gaps
    report.u_to_t += num_u
    if len(seq) < 3:
        _skip(report, record_id, f"shorter than one codon ({len(seq)} bases)")
        return None

    spans = _frame_spans(seq, settings)
    if not spans:
        if settings.frame == "orf":
            reason = "no ATG...stop open reading frame"
        else:
            reason = f"no ATG...stop open reading frame of {settings.min_orf_codons}+ codons"
        _skip(
            report, record_id, reason + (" on either strand" if settings.strands == "both" else "")
        )
        return None
    only_acgt = not seq.translate(None, b"ACGT")  # then no span holds an [UNK]
    if only_acgt and settings.frame == "all-orfs" and settings.long_records == "window":
        # A clean genome: thousands of ORFs, none with anything to count or check.
        report.bases_outside_orf += len(seq) - _bases_covered(spans)
        return [(Orf(record_id, s.start + 1, s.end, s.strand, len(s.ids)), s.ids) for s in spans]
    examples: list[tuple[Orf | None, np.ndarray]] = []
    num_unknown = num_invalid = num_cut_records = num_cut_codons = 0
    partial_kept = False  # frame 0 (one span): its partial codon is an [UNK] in the example
    for span in spans:
        ids, invalid_at, partial_at, cut = _shape_span(span, len(seq), invalid, settings)
        unknown = _NO_POSITIONS if only_acgt else np.flatnonzero(ids == UNK_ID)
        if len(invalid_at) or partial_at is not None:
            not_ambiguous = invalid_at if partial_at is None else np.append(invalid_at, partial_at)
            unknown = np.setdiff1d(unknown, not_ambiguous, assume_unique=True)
        if len(unknown) and settings.on_ambiguous != "unk":
            where, codon = _ambiguous_base(seq, span, int(unknown[0]))
            orf_text = f" in ORF {span.start + 1}-{span.end} ({span.strand})"
            is_orfs = settings.frame == "all-orfs"
            if settings.on_ambiguous == "skip-record":
                _skip(report, record_id, where + (orf_text if is_orfs else ""))
                return None
            inside = (
                f"its ORF {span.start + 1}-{span.end} ({span.strand})" if is_orfs else "the record"
            )
            raise DstrainError(
                f"{path}: {label} has an {where} (codon {codon}, {len(unknown)} ambiguous "
                f"codon(s) in {inside}; positions count bases after gap removal). "
                f"--on-ambiguous is 'error'; use --on-ambiguous unk to encode such codons as "
                f"[UNK] or --on-ambiguous skip-record to leave these records out."
            )
        num_unknown += len(unknown)
        num_invalid += len(invalid_at)
        num_cut_records += int(cut > 0)
        num_cut_codons += cut
        partial_kept = partial_at is not None
        orf = None
        if settings.frame == "all-orfs":
            orf = Orf(record_id, span.start + 1, span.end, span.strand, len(span.ids))
        examples.append((orf, ids))

    report.unknown_codons += num_unknown
    report.invalid_codons += num_invalid
    # Under unk a partial codon that truncation cut off is counted with the cut codons.
    has_partial = settings.frame == "0" and spans[0].end < len(seq)
    report.partial_codons += int(has_partial and (settings.partial_codon == "drop" or partial_kept))
    if settings.frame != "0":
        report.bases_outside_orf += len(seq) - _bases_covered(spans)
    report.truncated_records += num_cut_records
    report.truncated_codons += num_cut_codons
    return examples


def _shape_span(
    span: _Span, seq_length: int, invalid: np.ndarray, settings: DataSettings
) -> tuple[np.ndarray, np.ndarray, int | None, int]:
    """A span's example ids (partial codon, truncation applied), the positions in them of
    `[UNK]` codons holding an invalid letter and of the partial codon, and the codons cut."""
    ids = span.ids
    has_partial = settings.frame == "0" and span.end < seq_length
    if not len(invalid) and not has_partial and len(ids) <= settings.max_length:
        return ids, _NO_POSITIONS, None, 0  # the common span (every ORF of a clean genome)
    # [UNK] codons that hold no ambiguity code: a letter outside IUPAC, the partial codon.
    # (Positions in `ids`; both are rare, so the common record pays for neither.)
    invalid_at = _NO_POSITIONS
    if len(invalid):
        inside = invalid[(invalid >= span.start) & (invalid < span.end)]
        offsets = inside - span.start if span.strand == "+" else span.end - 1 - inside
        invalid_at = np.unique(offsets // 3)
    partial_at: int | None = None
    if has_partial and settings.partial_codon == "unk":
        ids = np.append(ids, np.uint8(UNK_ID))
        partial_at = len(ids) - 1
    cut = 0
    if settings.long_records == "truncate" and len(ids) > settings.max_length:
        cut = len(ids) - settings.max_length
        ids = ids[: settings.max_length]
        invalid_at = invalid_at[invalid_at < settings.max_length]
        if partial_at is not None and partial_at >= settings.max_length:
            partial_at = None
    return ids, invalid_at, partial_at, cut


def _ambiguous_base(seq: bytes, span: _Span, codon_index: int) -> tuple[str, str]:
    """`ambiguous base 'R' at position P` (1-based, forward strand) and the codon text."""
    if span.strand == "+":
        codon_start = span.start + 3 * codon_index
        codon = seq[codon_start : codon_start + 3].decode()
        offset = next(i for i, base in enumerate(codon) if base not in "ACGT")
        position = codon_start + offset
    else:  # the codon read on the reverse strand, from its last forward base down
        codon_end = span.end - 3 * codon_index
        codon = reverse_complement(seq[codon_end - 3 : codon_end]).decode()
        offset = next(i for i, base in enumerate(codon) if base not in "ACGT")
        position = codon_end - 1 - offset
    return f"ambiguous base '{chr(seq[position])}' at position {position + 1}", codon


def _bases_covered(spans: list[_Span]) -> int:
    """Bases inside at least one span (spans sorted by start)."""
    if len(spans) == 1:
        return spans[0].end - spans[0].start
    starts = np.array([span.start for span in spans])
    ends = np.array([span.end for span in spans])
    furthest = np.maximum.accumulate(ends)  # each span adds what lies past all earlier ends
    reach = np.concatenate(([0], furthest[:-1]))
    return int(np.sum(np.maximum(ends - np.maximum(starts, reach), 0)))


class _SkipRecord(Exception):
    """A record left out under `on_invalid="skip-record"`; the message is the reason."""


def _clean_sequence(
    raw: bytes, path: Path, label: str, on_invalid: str
) -> tuple[bytes, np.ndarray, int, int]:
    """The cleaned sequence, the positions in it of letters outside IUPAC, gap and U counts.

    Cleaned: uppercased, whitespace and gaps removed, U as T. Letters outside IUPAC stay
    in place under `on_invalid="unk"`; otherwise they raise `DstrainError` (`error`) or
    `_SkipRecord` (`skip-record`). A protein-looking record raises under `error` and `unk`.
    """
    if on_invalid == "unk" and not raw.isascii():
        # One position per character, as upstream reads text: 'é' is one [UNK] letter, not
        # two bytes (each non-Latin-1 character becomes '?', also outside IUPAC).
        raw = raw.decode("utf-8", "replace").encode("latin-1", "replace")
    upper = raw.upper()
    data = np.frombuffer(upper, dtype=np.uint8)
    cls = _CLASS[data]
    counts = np.bincount(cls, minlength=_OTHER + 1)
    if not (counts[_GAP] or counts[_SPACE] or counts[_URACIL] or counts[_PROTEIN:].any()):
        return upper, _NO_POSITIONS, 0, 0  # the common record: nothing to remove or report
    bad = np.flatnonzero(cls >= _PROTEIN)
    if len(bad):
        first = int(bad[0])
        byte = int(data[first])
        char = repr(chr(byte)) if 32 <= byte < 127 else f"byte 0x{byte:02x}"
        num_letters = int(np.count_nonzero(cls != _SPACE))
        if on_invalid == "error":
            num_protein = int(np.count_nonzero(cls == _PROTEIN))
        else:  # a masked run (XXXX) or a trailing * is what these policies exist for
            num_protein = int(np.count_nonzero(np.isin(data, _AMINO_ACID_ONLY_BYTES)))
        if num_protein > _PROTEIN_SHARE * num_letters:
            if on_invalid == "skip-record":
                raise _SkipRecord(
                    f"looks like protein ({num_protein} of {num_letters} letters are "
                    f"amino-acid codes)"
                )
            raise DstrainError(
                f"{path}: {label} looks like a protein sequence, not nucleotides: "
                f"{num_protein} of its {num_letters} letters (first {char} at position "
                f"{first + 1}) are amino-acid codes outside the nucleotide IUPAC alphabet "
                f"(A C G T U R Y S W K M B D H V N). GenSLM reads codons, so it needs the "
                f"nucleotide (DNA/RNA) coding sequences; use the CDS/nucleotide FASTA instead"
                + (
                    " (--on-invalid unk is for stray letters, not proteins; --on-invalid "
                    "skip-record leaves protein records out)."
                    if on_invalid == "unk"
                    else "."
                )
            )
        where = f"{char} at position {first + 1}"
        if on_invalid == "skip-record":
            raise _SkipRecord(f"invalid character {where} ({len(bad)} outside IUPAC)")
        if on_invalid == "error":
            fix = (
                "Remove the position numbers from the sequence lines (GenBank ORIGIN style)."
                if chr(byte).isdigit()
                else "Fix or remove that record, or use --on-invalid unk (its codon becomes "
                "[UNK], as in upstream GenSLM) or --on-invalid skip-record (such records are "
                "left out)."
            )
            raise DstrainError(
                f"{path}: {label} has {where}, which is not a nucleotide IUPAC code "
                f"(A C G T U R Y S W K M B D H V N) or a gap (- .). {fix}"
            )
    kept = (cls != _SPACE) & (cls != _GAP)
    kept_cls = cls[kept]
    seq = data[kept].copy()
    seq[kept_cls == _URACIL] = ord("T")
    invalid = np.flatnonzero(kept_cls >= _PROTEIN)
    num_gaps = int(np.count_nonzero(cls == _GAP))
    return seq.tobytes(), invalid, num_gaps, int(np.count_nonzero(kept_cls == _URACIL))


# --------------------------------------------------------------------------------------
# Opening and sniffing
# --------------------------------------------------------------------------------------


@contextlib.contextmanager
def read_errors(path: Path) -> Iterator[None]:
    """A truncated or corrupt (gzip) file, met while parsing, as a DstrainError naming it."""
    try:
        yield
    except (OSError, EOFError, zlib.error) as exc:
        raise DstrainError(
            f"{path}: could not be read to its end ({exc}). The file looks truncated or "
            "corrupt; download or decompress it again."
        ) from exc


def check_file_exists(path: Path) -> None:
    """`DstrainError` naming the path when it is missing or not a regular file."""
    if not path.exists():
        raise DstrainError(
            f"{path}: no such file. Check the path (relative paths are read from the "
            f"current directory, {Path.cwd()})."
        )
    if path.is_dir():
        raise DstrainError(f"{path}: is a directory, not a FASTA file. Name the files in it.")
    if not path.is_file():  # a FIFO would block the open, a device never end: refused unopened
        from dstrain.inputs import check_regular_file

        check_regular_file(path, "FASTA file")


@contextlib.contextmanager
def open_fasta(path: Path) -> Iterator[TextIO]:
    """A text handle on the file (gzip or plain) positioned at its first header line.

    Checks first that the file exists and starts like FASTA.
    """
    check_file_exists(path)
    with open(path, "rb") as fh:
        is_gzip = fh.read(2) == _GZIP_MAGIC
    open_binary = gzip.open if is_gzip else open
    try:
        with open_binary(path, "rb") as fh:
            head = fh.read(_SNIFF_BYTES)
    except (OSError, EOFError, zlib.error) as exc:
        raise DstrainError(
            f"{path}: starts like gzip but could not be decompressed ({exc}). Download it "
            f"again, or decompress it yourself to check it."
        ) from exc
    _check_fasta_head(path, head, is_gzip)

    with (
        open_binary(path, "rb") as binary,
        io.TextIOWrapper(
            io.BufferedReader(_RecordBound(binary, path)), encoding="utf-8-sig", errors="replace"
        ) as handle,
    ):
        # biopython wants the first line to be a header: step over leading blank lines.
        while True:
            position = handle.tell()
            line = handle.readline()
            if line.strip() or not line:
                handle.seek(position)
                break
        yield handle


_UTF8_BOM = b"\xef\xbb\xbf"


def _check_fasta_head(path: Path, head: bytes, is_gzip: bool) -> None:
    """Errors for empty, binary, FASTQ and header-less files, from the first 64 KiB."""
    what = "decompresses to" if is_gzip else "is"
    head = head.removeprefix(_UTF8_BOM)  # Windows editors start files with one
    if not head.strip():
        raise DstrainError(
            f"{path}: {what} an empty file (no FASTA records). Point to a FASTA file with "
            f"'>' header lines followed by nucleotide sequence lines."
        )
    if b"\x00" in head:
        raise DstrainError(
            f"{path}: {what} binary data, not FASTA text. Give a FASTA file (plain or .gz) "
            f"with '>' header lines followed by nucleotide sequence lines."
        )
    stripped = head.lstrip()
    line_number = head[: len(head) - len(stripped)].count(b"\n") + 1
    first_line = stripped.split(b"\n", 1)[0].decode("utf-8", "replace").rstrip()
    if stripped.startswith(b">"):
        return
    if stripped.startswith(b"@"):
        raise DstrainError(
            f"{path}: looks like FASTQ (line {line_number} starts with '@'), not FASTA. "
            f"Convert it first, e.g. `seqtk seq -a reads.fastq > reads.fasta`; note GenSLM "
            f"expects coding sequences (genes, ORFs), not short reads."
        )
    hint = " It looks like GenBank; export FASTA instead." if first_line[:5] == "LOCUS" else ""
    raise DstrainError(
        f"{path}: not FASTA: line {line_number} should be a header starting with '>' but "
        f"reads {first_line[:60]!r}.{hint} A FASTA file has '>' header lines, each followed "
        f"by nucleotide sequence lines."
    )
