"""The token cache: FASTA files tokenized once, reused while inputs and settings match.

Layout of a cache directory (1 byte per codon: the 69-token vocabulary fits in uint8):

    manifest.json          format, sources (path, size, sha256), DataSettings, report, counts
    train_tokens.bin       every train example's codon ids back to back (raw uint8)
    train_offsets.npy      int64, num_examples + 1: example i is tokens[off[i]:off[i+1]]
    val_tokens.bin, val_offsets.npy
    orfs.tsv               `--frame all-orfs` only: every ORF kept, one a line (ORFS_COLUMNS)

`prepare_dataset` reuses a cache whose manifest names the same format, vocabulary, input
file hashes (in the same order) and token-shaping settings (every DataSettings field, so
`partial_codon`, `long_records` and `on_invalid` too); `padding`, `loss_on_pad`,
`batching` and `tokens_per_micro_batch` act at batch time and do not invalidate it. A cache written before a settings field existed
lacks it in its manifest, so it no longer matches and is rebuilt once (its report also
lacks the newer counters); `load_prepared` still opens it. Otherwise it rebuilds into a temporary sibling
directory, writes `manifest.json` last, and publishes it with `dstrain.publish.publish_dir`
(fsync, then rename into place), so an interrupted prepare leaves either the old cache or
none, never a half one that looks valid (a killed run may leave a `.NAME.partial-*`
directory next to it; the next prepare of the same cache removes it). Call it from one
process (rank 0) and let the others wait, then `load_prepared`.
"""

from __future__ import annotations

import contextlib
import csv
import dataclasses
import hashlib
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from pydantic import ValidationError

from dstrain.codons import VOCAB, VOCAB_SIZE
from dstrain.errors import DstrainError
from dstrain.fasta import (
    FileReport,
    check_file_exists,
    is_validation_record,
    iter_codon_records,
    window_bounds,
)
from dstrain.publish import publish_dir
from dstrain.settings import DataSettings

CACHE_FORMAT = "dstrain-codon-cache"
CACHE_FORMAT_VERSION = 1
MANIFEST_NAME = "manifest.json"
SPLITS = ("train", "val")
BATCH_TIME_FIELDS = frozenset({"padding", "loss_on_pad", "batching", "tokens_per_micro_batch"})
"""DataSettings fields used only when batching: changing them keeps the cache."""
ORFS_NAME = "orfs.tsv"
ORFS_COLUMNS = ("file", "record_id", "start", "end", "strand", "codons", "split", "sequences")
"""`orfs.tsv`: the FASTA file (as in the report), the ORF (see `dstrain.fasta.Orf`), the
split its record hashed into, and the examples (windows) it became."""
_ORF_FIELDS = ("record_id", "start", "end", "strand", "codons")

_VOCAB_SHA256 = hashlib.sha256("\n".join(VOCAB).encode()).hexdigest()
_REPORT_TOTALS = tuple(f.name for f in dataclasses.fields(FileReport) if f.type == "int")
"""FileReport counters summed into the report's top-level totals."""


@dataclass(frozen=True)
class TokenSplit:
    """One split's examples: a flat memory-mapped uint8 token array and its offsets."""

    tokens: np.ndarray
    """All examples' codon ids back to back (uint8, memory-mapped, read-only)."""
    offsets: np.ndarray
    """int64, `len(self) + 1` entries: example i is `tokens[offsets[i]:offsets[i + 1]]`."""

    def __len__(self) -> int:
        return len(self.offsets) - 1

    def __getitem__(self, index: int) -> np.ndarray:
        """Example `index` as a uint8 view (no copy)."""
        if not -len(self) <= index < len(self):
            raise IndexError(f"example {index} out of range for {len(self)} examples")
        index %= len(self)
        return self.tokens[self.offsets[index] : self.offsets[index + 1]]

    @property
    def num_tokens(self) -> int:
        return int(self.offsets[-1])

    def lengths(self) -> np.ndarray:
        """Codon count of every example (int64)."""
        return np.diff(self.offsets)


@dataclass(frozen=True)
class PreparedData:
    """A loaded token cache: the splits, its manifest, and whether it was reused."""

    cache_dir: Path
    train: TokenSplit
    val: TokenSplit
    manifest: dict[str, Any]
    reused: bool

    @property
    def report(self) -> dict[str, Any]:
        """Totals, per-split counts and per-file reports (the `prepare --json` body)."""
        return self.manifest["report"]

    @property
    def settings(self) -> DataSettings:
        return DataSettings.model_validate(self.manifest["settings"])


# --------------------------------------------------------------------------------------
# Public entry points
# --------------------------------------------------------------------------------------


def prepare_dataset(
    fasta_paths: list[Path], cache_dir: Path, settings: DataSettings
) -> PreparedData:
    """Tokenize `fasta_paths` into `cache_dir`, or reuse the cache there if it matches.

    Raises `DstrainError` for bad input files (see `dstrain.fasta`), for a `cache_dir`
    that holds something other than a dstrain cache, and when no example lands in train.
    """
    if not fasta_paths:
        raise DstrainError("no FASTA files given: name at least one nucleotide FASTA file.")
    paths = [Path(p) for p in fasta_paths]
    for path in paths:
        check_file_exists(path)
    sources = [_describe_source(p) for p in paths]
    cache_dir = Path(cache_dir)
    key = _cache_key(sources, settings)

    manifest = _read_own_manifest(cache_dir)
    if manifest is not None and _cache_key_of(manifest) == key:
        try:
            return _load(cache_dir, manifest, reused=True)
        except _DamagedCache:
            pass  # rebuild below
    return _build(paths, sources, cache_dir, settings)


def load_prepared(cache_dir: Path) -> PreparedData:
    """Open an existing cache (memory-mapped) without checking it against any input."""
    cache_dir = Path(cache_dir)
    manifest = _read_own_manifest(cache_dir)
    if manifest is None:
        raise DstrainError(
            f"{cache_dir}: no dstrain token cache here (no {MANIFEST_NAME}). Build it first "
            f"with `dstrain prepare FASTA... -o {cache_dir}`."
        )
    if manifest.get("format_version") != CACHE_FORMAT_VERSION:
        raise DstrainError(
            f"{cache_dir}: token cache format version {manifest.get('format_version')} but "
            f"this dstrain reads version {CACHE_FORMAT_VERSION}. Run `dstrain prepare` again "
            f"to rebuild it."
        )
    try:
        return _load(cache_dir, manifest, reused=True)
    except _DamagedCache as exc:
        raise DstrainError(
            f"{cache_dir}: token cache is damaged ({exc}). Run `dstrain prepare` again to "
            f"rebuild it."
        ) from exc


def data_settings_from_options(**options: Any) -> DataSettings:
    """DataSettings from CLI options (None means default), errors named as flags."""
    given = {name: value for name, value in options.items() if value is not None}
    try:
        return DataSettings(**given)
    except ValidationError as exc:
        problems = []
        for err in exc.errors():
            message = err["msg"].removeprefix("Value error, ")
            if err["loc"]:  # one option; otherwise a rule across options names them itself
                name = str(err["loc"][0])
                message = f"--{name.replace('_', '-')} {given.get(name, '')!r}: {message}"
            problems.append(message)
        raise DstrainError(
            "invalid data options: " + "; ".join(problems) + ".", exit_code=2
        ) from None


def format_summary(prepared: PreparedData, elapsed_s: float | None = None) -> str:
    """Human-readable summary of a prepare run (what `dstrain prepare` prints)."""
    report = prepared.report
    if prepared.reused:
        head = f"reused cache {prepared.cache_dir} (inputs and settings unchanged)"
    else:
        took = f" in {elapsed_s:.1f} s" if elapsed_s is not None else ""
        head = f"built cache {prepared.cache_dir}{took}"
    settings = prepared.manifest["settings"]
    lines = [head]
    for file_report in report["files"]:
        lines.append(f"  {Path(file_report['path']).name}: {_counts_line(file_report, settings)}")
        lines.extend(
            f"    skipped '{s['record_id']}': {s['reason']}" for s in file_report["skipped"][:5]
        )
        if file_report["skipped_records"] > 5:
            lines.append(f"    ... and {file_report['skipped_records'] - 5} more (see --json)")
        if settings.get("frame") == "all-orfs":
            lines.extend(
                f"    ORF {o['record_id']} {o['start']:,}-{o['end']:,} ({o['strand']}), "
                f"{o['codons']:,} codons"
                for o in file_report["orf_list"][:3]
            )
            if file_report["orfs"] > 3:
                lines.append(
                    f"    ... and {file_report['orfs'] - 3:,} more ORFs (all in --json and "
                    f"{prepared.cache_dir / ORFS_NAME})"
                )
    lines.append(f"  total: {_counts_line(report, settings)}")
    if report["ids_in_several_files"]:
        lines.append(
            f"  {len(report['ids_in_several_files'])} record ID(s) occur in several files "
            f"(kept; same split): {', '.join(report['ids_in_several_files'][:3])}"
        )
    for split in SPLITS:
        counts = report[split]
        lines.append(
            f"  {split}: {counts['records']:,} records -> {counts['sequences']:,} sequences, "
            f"{counts['tokens']:,} codon tokens"
        )
    if report["val"]["sequences"] == 0 and settings["val_fraction"] > 0:
        lines.append(
            f"  note: no record hashed into validation (--val-fraction "
            f"{settings['val_fraction']}); training will run without evaluation"
        )
    return "\n".join(lines)


def report_json(prepared: PreparedData) -> str:
    """The `prepare --json` document: cache dir, reused flag, totals, splits, per-file.

    Under `--frame all-orfs` each file's `orf_list` holds all its ORFs, read from
    `orfs.tsv` (the manifest keeps the first `MAX_LISTED_ORFS` per file), and `orfs_tsv`
    names that file."""
    body = {"cache_dir": str(prepared.cache_dir), "reused": prepared.reused, **prepared.report}
    if prepared.manifest["settings"].get("frame") == "all-orfs":
        orfs = read_orfs(prepared.cache_dir)
        body["orfs_tsv"] = str(prepared.cache_dir / ORFS_NAME)
        files, first = [], 0  # orfs.tsv lists the files' ORFs in the report's file order
        for file_report in body["files"]:
            last = first + file_report["orfs"]
            files.append({**file_report, "orf_list": orfs[first:last]})
            first = last
        body["files"] = files
    return json.dumps(body, indent=2) + "\n"


def read_orfs(cache_dir: Path) -> list[dict[str, Any]]:
    """Every ORF of an `all-orfs` cache in file order, as in the report's `orf_list`."""
    orfs = []
    with open(Path(cache_dir) / ORFS_NAME, newline="", encoding="utf-8") as fh:
        for row in csv.DictReader(fh, delimiter="\t"):
            orf: dict[str, Any] = {name: row[name] for name in _ORF_FIELDS}
            for name in ("start", "end", "codons"):
                orf[name] = int(orf[name])
            orfs.append(orf)
    return orfs


# --------------------------------------------------------------------------------------
# Building
# --------------------------------------------------------------------------------------


def _build(
    paths: list[Path], sources: list[dict], cache_dir: Path, settings: DataSettings
) -> PreparedData:
    # Built beside the old cache, swapped in whole: a failure leaves the old one as it was.
    with publish_dir(cache_dir) as tmp_dir:
        report = _write_splits(paths, tmp_dir, settings)
        manifest = {
            "format": CACHE_FORMAT,
            "format_version": CACHE_FORMAT_VERSION,
            "vocab_size": VOCAB_SIZE,
            "vocab_sha256": _VOCAB_SHA256,
            "token_dtype": "uint8",
            "sources": sources,
            "settings": settings.model_dump(mode="json"),
            "report": report,
        }
        (tmp_dir / MANIFEST_NAME).write_text(
            json.dumps(manifest, indent=2) + "\n", encoding="utf-8"
        )
    return _load(cache_dir, manifest, reused=False)


def _write_splits(paths: list[Path], out_dir: Path, settings: DataSettings) -> dict[str, Any]:
    """Write both splits' token and offset files; return the report."""
    offsets = {split: [0] for split in SPLITS}
    records = dict.fromkeys(SPLITS, 0)
    file_reports: list[FileReport] = []
    files_of_id: dict[str, set[str]] = {}
    with contextlib.ExitStack() as stack:
        handles = {
            split: stack.enter_context(open(out_dir / f"{split}_tokens.bin", "wb"))
            for split in SPLITS
        }
        orf_rows = None
        if settings.frame == "all-orfs":
            orfs_file = stack.enter_context(open(out_dir / ORFS_NAME, "w", encoding="utf-8"))
            orf_rows = csv.writer(orfs_file, delimiter="\t", lineterminator="\n")
            orf_rows.writerow(ORFS_COLUMNS)
        for path in paths:
            report = FileReport(path=str(path.resolve()))
            for record in iter_codon_records(path, settings, report):
                files_of_id.setdefault(record.record_id, set()).add(report.path)
                split = (
                    "val"
                    if is_validation_record(
                        record.record_id, settings.val_fraction, settings.split_seed
                    )
                    else "train"
                )
                records[split] += int(record.first_of_record)
                windows = window_bounds(
                    len(record.ids), settings.max_length, settings.window_overlap
                )
                for start, end in windows:
                    handles[split].write(record.ids[start:end].tobytes())
                    offsets[split].append(offsets[split][-1] + end - start)
                if orf_rows is not None and record.orf is not None:
                    orf, where = record.orf, (report.path, record.record_id)
                    orf_rows.writerow(
                        [*where, orf.start, orf.end, orf.strand, orf.codons, split, len(windows)]
                    )
            file_reports.append(report)
    for split in SPLITS:
        np.save(out_dir / f"{split}_offsets.npy", np.asarray(offsets[split], dtype=np.int64))

    if len(offsets["train"]) == 1:
        raise DstrainError(
            f"all {records['val']} usable records hashed into the validation split "
            f"(--val-fraction {settings.val_fraction}, --split-seed {settings.split_seed}), "
            f"leaving nothing to train on. Lower --val-fraction, try another --split-seed, "
            f"or add records."
        )
    totals = {name: sum(getattr(r, name) for r in file_reports) for name in _REPORT_TOTALS}
    return {
        **totals,
        "ids_in_several_files": sorted(i for i, files in files_of_id.items() if len(files) > 1),
        **{
            split: {
                "records": records[split],
                "sequences": len(offsets[split]) - 1,
                "tokens": offsets[split][-1],
            }
            for split in SPLITS
        },
        "files": [r.to_dict() for r in file_reports],
    }


def _describe_source(path: Path) -> dict[str, Any]:
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        for chunk in iter(lambda: fh.read(1 << 20), b""):
            digest.update(chunk)
    return {
        "path": str(path.resolve()),
        "size_bytes": path.stat().st_size,
        "sha256": digest.hexdigest(),
    }


# --------------------------------------------------------------------------------------
# Reading and matching
# --------------------------------------------------------------------------------------


class _DamagedCache(Exception):
    """A cache whose files disagree with its manifest."""


def _cache_key(sources: list[dict], settings: DataSettings) -> dict[str, Any]:
    return {
        "format": CACHE_FORMAT,
        "format_version": CACHE_FORMAT_VERSION,
        "vocab_sha256": _VOCAB_SHA256,
        "sha256": [s["sha256"] for s in sources],
        "settings": _token_settings(settings.model_dump(mode="json")),
    }


def _cache_key_of(manifest: dict[str, Any]) -> dict[str, Any]:
    return {
        "format": manifest.get("format"),
        "format_version": manifest.get("format_version"),
        "vocab_sha256": manifest.get("vocab_sha256"),
        "sha256": [s.get("sha256") for s in manifest.get("sources", [])],
        "settings": _token_settings(manifest.get("settings", {})),
    }


def _token_settings(dumped: dict[str, Any]) -> dict[str, Any]:
    return {k: v for k, v in dumped.items() if k not in BATCH_TIME_FIELDS}


def _read_own_manifest(cache_dir: Path) -> dict[str, Any] | None:
    """The manifest of a dstrain cache at `cache_dir`; None when there is no cache.

    Raises when `cache_dir` holds something else, so a rebuild never deletes user files.
    """
    if not cache_dir.exists():
        return None
    if not cache_dir.is_dir():
        raise DstrainError(
            f"{cache_dir}: is a file, not a cache directory. Choose another -o/--output."
        )
    manifest_path = cache_dir / MANIFEST_NAME
    try:
        manifest = json.loads(manifest_path.read_text())
    except (OSError, ValueError):
        manifest = None
    if isinstance(manifest, dict) and manifest.get("format") == CACHE_FORMAT:
        return manifest
    if not any(cache_dir.iterdir()):
        return None  # an empty directory: fine to build into
    raise DstrainError(
        f"{cache_dir}: directory is not empty and is not a dstrain token cache (no valid "
        f"{MANIFEST_NAME}). prepare replaces the whole directory, so it refuses to touch "
        f"this one; choose a new or empty -o/--output directory."
    )


def _load(cache_dir: Path, manifest: dict[str, Any], *, reused: bool) -> PreparedData:
    splits = {}
    for split in SPLITS:
        try:
            offsets = np.load(cache_dir / f"{split}_offsets.npy")
            tokens_path = cache_dir / f"{split}_tokens.bin"
            size = tokens_path.stat().st_size
        except (OSError, ValueError) as exc:
            raise _DamagedCache(str(exc)) from exc
        expected = manifest.get("report", {}).get(split, {})
        found = {"sequences": len(offsets) - 1, "tokens": size}
        if not len(offsets) or offsets[-1] != size or found != {k: expected.get(k) for k in found}:
            raise _DamagedCache(f"{split} files do not match {MANIFEST_NAME}")
        tokens = (
            np.memmap(tokens_path, dtype=np.uint8, mode="r")
            if size
            else np.zeros(0, dtype=np.uint8)
        )
        splits[split] = TokenSplit(tokens=tokens, offsets=offsets)
    all_orfs = manifest.get("settings", {}).get("frame") == "all-orfs"
    if all_orfs and not (cache_dir / ORFS_NAME).is_file():
        raise _DamagedCache(f"{ORFS_NAME} is missing")
    return PreparedData(
        cache_dir=cache_dir,
        train=splits["train"],
        val=splits["val"],
        manifest=manifest,
        reused=reused,
    )


def _counts_line(counts: dict[str, Any], settings: dict[str, Any]) -> str:
    """One line of counts; caches from before a counter existed show it as 0."""
    partial = "as [UNK]" if settings.get("partial_codon") == "unk" else "dropped"
    line = (
        f"{counts['records']:,} records, {counts['codons']:,} codons, "
        f"{counts['unknown_codons']:,} unknown ([UNK]), "
        f"{counts['partial_codons']:,} partial codons {partial}, "
        f"{counts['skipped_records']:,} skipped, "
        f"{counts['gap_characters']:,} gaps removed, {counts.get('u_to_t', 0):,} U read as T"
    )
    if settings.get("on_invalid") == "unk":
        line += f", {counts.get('invalid_codons', 0):,} codons with invalid letters ([UNK])"
    if settings.get("frame") == "all-orfs":
        strands = " on both strands" if settings.get("strands") == "both" else ""
        line += f", {counts['orfs']:,} ORFs of {settings['min_orf_codons']}+ codons kept{strands}"
    if settings.get("long_records") == "truncate":
        line += (
            f", {counts.get('truncated_records', 0):,} records truncated "
            f"({counts.get('truncated_codons', 0):,} codons cut)"
        )
    return line
