"""`dstrain embed`: per-sequence (or per-token) embeddings of a GenSLM model.

Heavy layer (L1): torch, transformers, numpy; h5py for `.h5` output.

Records are read with `dstrain.fasta` (frame 0, default data settings, ambiguous codons
as `[UNK]`) and embedded in batches of similar length (sorted longest first, so little
padding), in bf16 on a GPU that supports it and fp32 on the CPU. Pooling:

- `mean` (default): the average of the chosen hidden state over the record's real tokens,
  as upstream GenSLM's `run_inference.py` (`emb[:seq_len].mean(0)`);
- `mean-padded`: every record padded to the model's context (2048 codons for GenSLM) and
  the average taken over all positions, pads included, as upstream's README recipe, but
  with the 2-D (B, T) attention mask transformers 5 needs.

Layers count as upstream's `hidden_states`: 0 is the embedding output, -1 (default) the
last hidden state after the final layer norm. A record longer than the context is cut
into consecutive windows of at most the context (`long_records="window"`, default) whose
pooled embeddings are averaged weighted by their length (per-token output concatenates
them), or cut to its first context-length codons (`"truncate"`, upstream's behaviour).

Output `.h5` (upstream's layout plus record IDs): `embeddings` (N, H) or (N, L, H) for
several layers; with per-token output a group `embeddings/<fasta index>` of (T, H) or
(T, L, H) arrays (upstream's FullEmbeddingsCallback layout), and `logits/<fasta index>`
(T, vocab) with logits; `fasta-indices` (the record's 0-based position among all records
of the input files, in order, skipped records counted), `file-indices`, `na-hashes` (md5
of each raw sequence as upstream), `ids`, `num-codons`, `num-tokens`, `num-windows`; the
attributes say pooling, layers, long_records, model, context, dtype and the FASTA files.
`.npy`: the pooled array, with `OUT.npy.json` beside it (ids, fasta indices, hashes and
the same settings). Written atomically, records in input order.

Several ranks (torchrun, or DeepSpeed's launcher with `--module dstrain.embed`): the
length-sorted batches are dealt round-robin, so every record is computed in the same
batch as on one rank, and rank 0 gathers (gloo) and writes one output identical to a
one-rank run.
"""

from __future__ import annotations

import hashlib
import io
import json
import os
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from dstrain.errors import DstrainError

POOLINGS = ("mean", "mean-padded")
LONG_RECORDS = ("window", "truncate")
OUTPUT_SUFFIXES = (".h5", ".hdf5", ".npy")
DEFAULT_BATCH_SIZE = 32
DEFAULT_BATCH_TOKENS = 65536
"""Padded tokens per batch at most (32 records of 2048 codons)."""


@dataclass(frozen=True)
class EmbedRecord:
    """One record to embed: where it came from and its codon ids (the whole record)."""

    record_id: str
    fasta_index: int
    file_index: int
    md5: str
    num_codons: int
    ids: np.ndarray


@dataclass
class EmbedResult:
    """Per record, in the order given: pooled `(N, L, H)` fp32 or per-token `(T, L, H)`
    arrays; per-token logits `(T, vocab)` when asked for; windows per record."""

    embeddings: np.ndarray | list[np.ndarray]
    logits: list[np.ndarray] | None
    num_windows: list[int]
    num_tokens: list[int]


# --------------------------------------------------------------------------------------
# Reading
# --------------------------------------------------------------------------------------


def read_embed_records(
    paths: Sequence[str | os.PathLike[str]],
    *,
    partial_codon: str = "unk",
) -> list[EmbedRecord]:
    """The records of `paths` (frame 0, `[UNK]` for ambiguous codons), in file order.

    `fasta_index` counts every record of the input files in order, skipped ones included
    (as upstream's index into its concatenated sequence list). `partial_codon="unk"`
    (default) keeps a trailing 1-2 base remainder as one `[UNK]`, as upstream's inference
    tokenizes records; `"drop"` leaves it out, as dstrain trains by default. Records are
    whole: windows and truncation to the context happen in `embed_records`."""
    from Bio import SeqIO

    from dstrain.fasta import (
        FileReport,
        check_file_exists,
        encode_record,
        open_fasta,
        read_errors,
    )
    from dstrain.settings import DataSettings

    # max_length only sizes the report's window count: records are kept whole here.
    settings = DataSettings(max_length=2**20, on_ambiguous="unk", partial_codon=partial_codon)
    records: list[EmbedRecord] = []
    index = 0
    for file_index, raw_path in enumerate(paths):
        path = Path(raw_path)
        check_file_exists(path)
        report = FileReport(path=str(path))
        kept = 0
        with open_fasta(path) as handle, read_errors(path):
            for number, record in enumerate(SeqIO.parse(handle, "fasta"), start=1):
                raw = str(record.seq)
                ids = encode_record(
                    raw.encode(), path, f"record {number} ('{record.id}')", record.id,
                    settings, report,
                )  # fmt: skip
                if ids is not None:
                    kept += 1
                    records.append(
                        EmbedRecord(
                            record_id=record.id,
                            fasta_index=index,
                            file_index=file_index,
                            md5=hashlib.md5(raw.encode(), usedforsecurity=False).hexdigest(),
                            num_codons=len(ids),
                            ids=ids,
                        )
                    )
                index += 1
        if kept == 0:
            why = "; ".join(sorted({s.reason for s in report.skipped})[:3]) or "no records"
            raise DstrainError(f"{path}: no record to embed ({why}). Give nucleotide FASTA files.")
    return records


# --------------------------------------------------------------------------------------
# Embedding
# --------------------------------------------------------------------------------------


def check_layers(layers: Sequence[int], num_layers: int) -> list[int]:
    """`layers` as indices into hidden_states (0..num_layers), negative ones resolved."""
    if not layers:
        raise DstrainError("--layers needs at least one layer index.")
    resolved = []
    for layer in layers:
        if not -(num_layers + 1) <= layer <= num_layers:
            raise DstrainError(
                f"layer {layer} does not exist: this model has {num_layers} layers, so "
                f"--layers takes -{num_layers + 1}..{num_layers} (0: the embedding output, "
                "-1: the last hidden state after the final layer norm)."
            )
        resolved.append(layer % (num_layers + 1))
    return resolved


def _units(lengths: Sequence[int], context: int, long_records: str) -> list[tuple[int, int, int]]:
    """(record, start, end) codon ranges to run: one per record, or its windows."""
    units = []
    for record, n in enumerate(lengths):
        if n <= context:
            units.append((record, 0, n))
        elif long_records == "truncate":
            units.append((record, 0, context))
        else:
            units.extend((record, s, min(s + context, n)) for s in range(0, n, context))
    return units


def plan_batches(
    unit_lengths: Sequence[int], *, batch_size: int, batch_tokens: int, pad_to: int | None
) -> list[list[int]]:
    """Unit indices grouped into batches: longest first, at most `batch_size` units and
    `batch_tokens` padded tokens each (a unit alone may exceed the token budget)."""
    order = sorted(range(len(unit_lengths)), key=lambda i: (-unit_lengths[i], i))
    batches: list[list[int]] = []
    current: list[int] = []
    width = 0
    for i in order:
        w = pad_to or max(width, unit_lengths[i])
        if current and (len(current) >= batch_size or w * (len(current) + 1) > batch_tokens):
            batches.append(current)
            current, w = [], pad_to or unit_lengths[i]
        current.append(i)
        width = w
    if current:
        batches.append(current)
    return batches


def _forward(model, input_ids, mask, layers: list[int], want_logits: bool):
    out = model.gpt_neox(
        input_ids=input_ids, attention_mask=mask, output_hidden_states=True, use_cache=False
    )
    states = [out.hidden_states[layer] for layer in layers]
    logits = model.get_output_embeddings()(out.last_hidden_state) if want_logits else None
    return torch.stack(states, dim=2), logits  # (B, T, L, H)


UnitOutput = tuple  # (pooled (L, H) float64 | None, tokens (T, L, H) | None, logits (T, V) | None)


@torch.inference_mode()
def embed_units(
    model,
    records: Sequence[np.ndarray],
    *,
    pooling: str = "mean",
    layers: Sequence[int] = (-1,),
    batch_size: int = DEFAULT_BATCH_SIZE,
    batch_tokens: int = DEFAULT_BATCH_TOKENS,
    long_records: str = "window",
    per_token: bool = False,
    logits: bool = False,
    context: int | None = None,
    shard: tuple[int, int] = (0, 1),
    progress: Callable[[int], object] | None = None,
) -> dict[int, UnitOutput]:
    """The outputs of this rank's units (records or windows), keyed by unit index.

    The units are sorted by length and batched the same way whatever the number of ranks;
    rank `r` of `w` runs batches `r, r + w, ...`, so each unit is computed in the same
    batch, with the same padding, as on one rank (`finish_embeddings` joins them)."""
    if pooling not in POOLINGS:
        raise DstrainError(f"--pooling must be one of {', '.join(POOLINGS)}, not {pooling!r}.")
    if long_records not in LONG_RECORDS:
        raise DstrainError(f"--long-records must be one of {', '.join(LONG_RECORDS)}.")
    if batch_size < 1 or batch_tokens < 1:
        raise DstrainError("--batch-size and --batch-tokens must be at least 1.")
    from dstrain.codons import PAD_ID

    config = model.config
    context = context or config.max_position_embeddings
    layer_idx = check_layers(list(layers), config.num_hidden_layers)
    device = next(model.parameters()).device
    units = _units([len(r) for r in records], context, long_records)
    unit_lengths = [end - start for _, start, end in units]
    pad_to = context if pooling == "mean-padded" else None
    batches = plan_batches(
        unit_lengths, batch_size=batch_size, batch_tokens=batch_tokens, pad_to=pad_to
    )
    rank, world = shard
    outputs: dict[int, UnitOutput] = {}
    for number, batch in enumerate(batches):
        if number % world != rank:
            continue
        width = pad_to or max(unit_lengths[u] for u in batch)
        ids = torch.full((len(batch), width), PAD_ID, dtype=torch.long)
        mask = torch.zeros((len(batch), width), dtype=torch.long)
        for row, u in enumerate(batch):
            record, start, end = units[u]
            ids[row, : end - start] = torch.from_numpy(records[record][start:end].astype(np.int64))
            mask[row, : end - start] = 1
        states, batch_logits = _forward(model, ids.to(device), mask.to(device), layer_idx, logits)
        states = states.float()
        for row, u in enumerate(batch):
            length = unit_lengths[u]
            pooled = tokens = unit_logits = None
            if per_token:
                tokens = states[row, :length].cpu().numpy()
            else:
                span = states[row] if pooling == "mean-padded" else states[row, :length]
                pooled = span.mean(dim=0).double().cpu().numpy()
            if logits:
                unit_logits = batch_logits[row, :length].float().cpu().numpy()
            outputs[u] = (pooled, tokens, unit_logits)
        if progress is not None:
            progress(len(batch))
    return outputs


def finish_embeddings(
    lengths: Sequence[int],
    outputs: dict[int, UnitOutput],
    *,
    context: int,
    long_records: str = "window",
    per_token: bool = False,
    logits: bool = False,
    pooling: str = "mean",
) -> EmbedResult:
    """Join the units of every record (all of `outputs`, from one rank or gathered): pooled
    windows averaged weighted by the positions each one averaged (its codons under `mean`;
    the whole context, so equal weights, under `mean-padded`), per-token windows
    concatenated; summed in unit order, so the result does not depend on which rank
    computed what."""
    units = _units(lengths, context, long_records)
    n = len(lengths)
    by_record: list[list[int]] = [[] for _ in range(n)]
    for u, (record, _, _) in enumerate(units):
        by_record[record].append(u)
    num_windows = [len(us) for us in by_record]
    num_tokens = [sum(units[u][2] - units[u][1] for u in us) for us in by_record]
    out_logits = None
    if logits:
        out_logits = [np.concatenate([outputs[u][2] for u in us]) for us in by_record]
    if per_token:
        tokens = [np.concatenate([outputs[u][1] for u in us]) for us in by_record]
        return EmbedResult(tokens, out_logits, num_windows, num_tokens)
    pooled = []
    for us in by_record:
        if len(us) == 1:
            pooled.append(outputs[us[0]][0])
            continue
        weights = [context if pooling == "mean-padded" else units[u][2] - units[u][1] for u in us]
        total = np.zeros_like(outputs[us[0]][0])
        for u, weight in zip(us, weights, strict=True):
            total += outputs[u][0] * weight
        pooled.append(total / sum(weights))
    embeddings = np.stack(pooled).astype(np.float32)
    return EmbedResult(embeddings, out_logits, num_windows, num_tokens)


def embed_records(
    model,
    records: Sequence[np.ndarray],
    *,
    pooling: str = "mean",
    layers: Sequence[int] = (-1,),
    batch_size: int = DEFAULT_BATCH_SIZE,
    batch_tokens: int = DEFAULT_BATCH_TOKENS,
    long_records: str = "window",
    per_token: bool = False,
    logits: bool = False,
    context: int | None = None,
    progress: Callable[[int], object] | None = None,
) -> EmbedResult:
    """Embed codon-id arrays (uint8, e.g. `EmbedRecord.ids`) with `model` (a
    GPTNeoXForCausalLM on its device and dtype), in one process.

    Returns `EmbedResult.embeddings`: pooled `(N, L, H)` fp32 (L = len(layers)), or with
    `per_token` a list of `(T, L, H)` arrays; `.logits` a list of `(T, vocab)` arrays when
    asked for. `context` (default: the model's max_position_embeddings) is the window and
    `mean-padded` padding length. `progress(k)` is called after each batch of k units."""
    context = context or model.config.max_position_embeddings
    outputs = embed_units(
        model,
        records,
        pooling=pooling,
        layers=layers,
        batch_size=batch_size,
        batch_tokens=batch_tokens,
        long_records=long_records,
        per_token=per_token,
        logits=logits,
        context=context,
        progress=progress,
    )
    return finish_embeddings(
        [len(r) for r in records],
        outputs,
        context=context,
        long_records=long_records,
        per_token=per_token,
        logits=logits,
        pooling=pooling,
    )


# --------------------------------------------------------------------------------------
# Output
# --------------------------------------------------------------------------------------


def check_output_path(out: str | os.PathLike[str], *, per_token: bool, logits: bool) -> Path:
    out = Path(out)
    suffix = out.suffix.lower()
    if suffix not in OUTPUT_SUFFIXES:
        raise DstrainError(
            f"output {out}: unknown suffix {out.suffix or '(none)'!r}; name it .h5 (HDF5, "
            "upstream GenSLM's layout) or .npy (a NumPy array with a .json of record IDs)."
        )
    if suffix == ".npy" and (per_token or logits):
        raise DstrainError(
            f"output {out}: --per-token and --logits give one array per record, which a "
            ".npy cannot hold; name the output .h5."
        )
    if suffix != ".npy":
        try:
            import h5py  # noqa: F401
        except ImportError:
            raise DstrainError(
                f"output {out}: writing HDF5 needs h5py, which is not installed. Install it "
                "(`pip install h5py` or `pip install 'dstrain[h5]'`) or name the output .npy."
            ) from None
    if out.is_dir():
        raise DstrainError(f"output {out} is a directory; give a file name ending in .h5/.npy.")
    if not out.parent.is_dir():
        raise DstrainError(f"output {out}: directory {out.parent} does not exist; create it.")
    return out


def _squeeze(array: np.ndarray, axis: int, single: bool) -> np.ndarray:
    return np.squeeze(array, axis=axis) if single else array


def write_output(
    out: Path,
    records: Sequence[EmbedRecord],
    result: EmbedResult,
    attrs: dict,
    fasta_files: Sequence[str],
) -> None:
    """Write `result` to `out` (.h5 or .npy + .npy.json) atomically."""
    from dstrain.publish import write_file_atomic

    single = len(attrs["layers"]) == 1
    meta = {
        "ids": [r.record_id for r in records],
        "fasta_indices": [r.fasta_index for r in records],
        "file_indices": [r.file_index for r in records],
        "na_hashes": [r.md5 for r in records],
        "num_codons": [r.num_codons for r in records],
        "num_tokens": list(result.num_tokens),
        "num_windows": list(result.num_windows),
        "fasta_files": list(fasta_files),
        **attrs,
    }
    if out.suffix.lower() == ".npy":
        assert isinstance(result.embeddings, np.ndarray)
        buffer = io.BytesIO()
        np.save(buffer, _squeeze(result.embeddings, 1, single))
        write_file_atomic(Path(f"{out}.json"), (json.dumps(meta, indent=1) + "\n").encode())
        write_file_atomic(out, buffer.getvalue())
        return
    import h5py

    buffer = io.BytesIO()
    with h5py.File(buffer, "w") as h5:
        if isinstance(result.embeddings, np.ndarray):
            h5.create_dataset("embeddings", data=_squeeze(result.embeddings, 1, single))
        else:
            group = h5.create_group("embeddings")
            for record, emb in zip(records, result.embeddings, strict=True):
                group.create_dataset(str(record.fasta_index), data=_squeeze(emb, 1, single))
        if result.logits is not None:
            group = h5.create_group("logits")
            for record, lg in zip(records, result.logits, strict=True):
                group.create_dataset(str(record.fasta_index), data=lg)
        indices = np.array(meta["fasta_indices"], dtype=np.int64)
        h5.create_dataset("fasta-indices", data=indices)  # upstream's per-token files
        h5.create_dataset("seq-indices", data=indices)  # upstream's averaged files
        h5.create_dataset("file-indices", data=np.array(meta["file_indices"], dtype=np.int64))
        h5.create_dataset("na-hashes", data=np.array(meta["na_hashes"], dtype="S32"))
        h5.create_dataset("ids", data=meta["ids"], dtype=h5py.string_dtype())
        for key in ("num_codons", "num_tokens", "num_windows"):
            h5.create_dataset(key.replace("_", "-"), data=np.array(meta[key], dtype=np.int64))
        for key, value in attrs.items():
            h5.attrs[key] = value
        h5.attrs["fasta_files"] = list(fasta_files)
    write_file_atomic(out, buffer.getvalue())


# --------------------------------------------------------------------------------------
# The command
# --------------------------------------------------------------------------------------


def _distributed() -> tuple[int, int, int]:
    """(rank, world size, local rank) from the launcher's environment; starts gloo."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world <= 1:
        return 0, 1, 0
    import torch.distributed as dist

    for key in ("RANK", "MASTER_ADDR", "MASTER_PORT"):
        if key not in os.environ:
            raise DstrainError(
                f"WORLD_SIZE is {world} but {key} is not set: start several ranks with "
                "torchrun or `deepspeed --module dstrain.embed`, or unset WORLD_SIZE."
            )
    if not dist.is_initialized():
        dist.init_process_group("gloo")
    return dist.get_rank(), dist.get_world_size(), int(os.environ.get("LOCAL_RANK", "0"))


def run_embed(
    model_spec: str,
    fasta: Sequence[str],
    output: str,
    *,
    pooling: str = "mean",
    layers: Sequence[int] = (-1,),
    per_token: bool = False,
    logits: bool = False,
    batch_size: int = DEFAULT_BATCH_SIZE,
    batch_tokens: int = DEFAULT_BATCH_TOKENS,
    long_records: str = "window",
    partial_codon: str = "unk",
    model_name: str | None = None,
    trust_checkpoint: bool = False,
    device: str | None = None,
    dtype: str | None = None,
    progress: bool = True,
) -> str | None:
    """The whole command on this rank; returns the summary line on rank 0."""
    from dstrain.inference import load_model, pick_device

    out = check_output_path(output, per_token=per_token, logits=logits)
    if not fasta:
        raise DstrainError("give at least one FASTA file to embed.")
    # The FASTA is read (and refused) before a possibly large model is loaded.
    records = read_embed_records(fasta, partial_codon=partial_codon)
    rank, world, local_rank = _distributed()
    if device is None and world > 1 and torch.cuda.is_available():
        device = f"cuda:{local_rank}"
    dev, _ = pick_device(device)
    loaded = load_model(
        model_spec,
        model_name=model_name,
        trust_checkpoint=trust_checkpoint,
        device=dev,
        dtype=dtype,
    )
    model = loaded.model
    context = model.config.max_position_embeddings
    check_layers(list(layers), model.config.num_hidden_layers)
    started = time.perf_counter()
    bar = None
    if progress and rank == 0:
        from tqdm import tqdm

        units = _units([len(r.ids) for r in records], context, long_records)
        bar = tqdm(total=len(units), desc="embed", unit="seq", file=sys.stderr, mininterval=1)
    outputs = embed_units(
        model,
        [r.ids for r in records],
        pooling=pooling,
        layers=layers,
        batch_size=batch_size,
        batch_tokens=batch_tokens,
        long_records=long_records,
        per_token=per_token,
        logits=logits,
        context=context,
        shard=(rank, world),
        progress=bar.update if bar is not None else None,
    )
    if world > 1:
        outputs = _gather(outputs, rank, world)
    if bar is not None:
        bar.update(bar.total - bar.n)  # the other ranks' units
        bar.close()
    if rank != 0:
        return None
    result = finish_embeddings(
        [len(r.ids) for r in records],
        outputs,
        context=context,
        long_records=long_records,
        per_token=per_token,
        logits=logits,
        pooling=pooling,
    )
    seconds = time.perf_counter() - started
    dtype_name = str(next(model.parameters()).dtype).removeprefix("torch.")
    attrs = {
        "pooling": "per-token" if per_token else pooling,
        "layers": [int(x) for x in layers],
        "long_records": long_records,
        "partial_codon": partial_codon,
        "model": loaded.source,
        "architecture": loaded.architecture.name,
        "context": int(context),
        "dtype": dtype_name,
    }
    write_output(out, records, result, attrs, [str(p) for p in fasta])
    rate = len(records) / seconds if seconds > 0 else float("inf")
    return (
        f"embedded {len(records)} records in {seconds:.1f} s ({rate:.1f} sequences/s, "
        f"{world} rank(s), {dev.type} {dtype_name}) -> {out}"
    )


def _gather(outputs: dict[int, UnitOutput], rank: int, world: int) -> dict[int, UnitOutput]:
    """Every rank's unit outputs onto rank 0 (gloo object gather); ends the group."""
    import torch.distributed as dist

    gathered: list | None = [None] * world if rank == 0 else None
    try:
        dist.gather_object(outputs, gathered, dst=0)
    finally:
        dist.destroy_process_group()
    if rank != 0:
        return outputs
    merged: dict[int, UnitOutput] = {}
    for part in gathered:
        merged.update(part)
    return merged


def main(argv: list[str] | None = None) -> None:
    """`python -m dstrain.embed ARGS` = `dstrain embed ARGS` (for torchrun / deepspeed)."""
    from dstrain.cli import main as cli_main

    args = list(sys.argv[1:] if argv is None else argv)
    cleaned: list[str] = []
    skip = False
    for arg in args:  # DeepSpeed's launcher adds --local_rank=N (LOCAL_RANK is set too)
        if skip:
            skip = False
        elif arg.startswith("--local_rank=") or arg.startswith("--local-rank="):
            continue
        elif arg in ("--local_rank", "--local-rank"):
            skip = True
        else:
            cleaned.append(arg)
    cli_main(["embed", *cleaned])


if __name__ == "__main__":
    main()
