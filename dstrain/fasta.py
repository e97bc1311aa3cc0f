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
   protein, so their ORF is 567 codons). Records without a complete ORF are skipped. An
   ORF has no partial codon, so `frame="orf"` with `partial_codon="unk"` is refused.
4. Long records (`long_records`): `window` (default) cuts a record longer than
   `max_length` codons into several examples of at most `max_length` codons, consecutive
   ones sharing `window_overlap` codons, the last one maybe shorter; nothing is lost.
   `truncate` keeps its first `max_length` codons only (upstream's tokenizer call with
   `truncation=True`); the records cut and the codons dropped are counted in
   `truncated_records` and `truncated_codons`.
5. Ambiguity (`on_ambiguous`): a codon holding an IUPAC code (N, R, Y, ...) becomes
   `[UNK]` and is counted (`unk`, upstream's behaviour), drops its record (`skip-record`),
   or stops with an error naming the file, record and position (`error`). Only codons that
   are kept count (not those cut by `truncate`, nor the partial codon).

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
all windows of a record stay in one split.
"""

from __future__ import annotations

import contextlib
import dataclasses
import gzip
import hashlib
import importlib.resources
import io
import zlib
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import TextIO

import numpy as np

from dstrain.codons import START_CODON_ID, STOP_CODON_IDS, UNK_ID, encode_sequence
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


@dataclass
class SkippedRecord:
    """A record left out of the data, and why."""

    record_id: str
    reason: str


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
    """Bases before and after the kept ORF (frame `orf` only)."""
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
    """One kept record: its ID and its codon token ids (uint8), before windowing."""

    record_id: str
    ids: np.ndarray


# --------------------------------------------------------------------------------------
# Bundled data, split, windows
# --------------------------------------------------------------------------------------


def bundled_fasta_paths() -> list[Path]:
    """The H3N2 HA/NA FASTA files shipped in `dstrain/data/` (the demo default)."""
    data_dir = Path(str(importlib.resources.files("dstrain").joinpath("data")))
    return sorted(data_dir.glob("*.fasta"))


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
                ids = encode_record(bytes(record.seq), path, label, record.id, settings, report)
                if ids is None:
                    continue
                report.kept_records += 1
                report.codons += len(ids)
                report.windows += len(
                    window_bounds(len(ids), settings.max_length, settings.window_overlap)
                )
                yield CodonRecord(record.id, ids)
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
    """Codon ids of one record after cleaning, frame and the policies; None if skipped."""
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

    if settings.frame == "orf":
        orf = find_longest_orf(seq)
        if orf is None:
            _skip(report, record_id, "no ATG...stop open reading frame")
            return None
        start, end = orf
    else:
        start, end = 0, len(seq) - len(seq) % 3
    ids = encode_sequence(seq[start:end])
    # [UNK] codons that hold no ambiguity code: a letter outside IUPAC, the partial codon.
    # (Positions in `ids`; both are rare, so the common record pays for neither.)
    invalid_at = _NO_POSITIONS
    if len(invalid):
        inside = invalid[(invalid >= start) & (invalid < end)]
        invalid_at = np.unique((inside - start) // 3)
    partial_at: int | None = None
    has_partial = settings.frame == "0" and end < len(seq)
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

    unknown = np.flatnonzero(ids == UNK_ID)
    if len(invalid_at) or partial_at is not None:
        not_ambiguous = invalid_at if partial_at is None else np.append(invalid_at, partial_at)
        unknown = np.setdiff1d(unknown, not_ambiguous, assume_unique=True)
    if len(unknown) and settings.on_ambiguous != "unk":
        codon_start = start + 3 * int(unknown[0])
        codon = seq[codon_start : codon_start + 3].decode()
        offset = next(i for i, base in enumerate(codon) if base not in "ACGT")
        where = f"ambiguous base '{codon[offset]}' at position {codon_start + offset + 1}"
        if settings.on_ambiguous == "skip-record":
            _skip(report, record_id, where)
            return None
        raise DstrainError(
            f"{path}: {label} has an {where} (codon {codon}, {len(unknown)} ambiguous "
            f"codon(s) in the record; positions count bases after gap removal). "
            f"--on-ambiguous is 'error'; use --on-ambiguous unk to encode such codons as "
            f"[UNK] or --on-ambiguous skip-record to leave these records out."
        )
    report.unknown_codons += len(unknown)
    report.invalid_codons += len(invalid_at)
    # Under unk a partial codon that truncation cut off is counted with the cut codons.
    report.partial_codons += int(
        has_partial and (settings.partial_codon == "drop" or partial_at is not None)
    )
    if settings.frame == "orf":
        report.bases_outside_orf += len(seq) - (end - start)
    report.truncated_records += int(cut > 0)
    report.truncated_codons += cut
    return ids


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
