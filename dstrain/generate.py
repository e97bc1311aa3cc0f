"""Sample codon sequences from a GenSLM model: `dstrain generate MODEL -n N -o OUT.fasta`.

Heavy layer (L1): torch (and biopython for `--translate`). The sampling follows upstream
GenSLM's `genslm.utils.generate_dna`, which calls transformers' `generate` with
`do_sample=True, top_k=50, top_p=0.95, temperature=1.0, min_length=max_length`, prompt "ATG",
and `remove_invalid_values=True`; `tokens_to_sequences` cuts a record after its first
in-frame stop codon (kept) and `non_redundant_generation` keeps sampling until it has N
sequences that are neither in the known FASTA files nor duplicates of each other. dstrain
runs its own decoding loop (KV cache, one forward per codon) instead of `generate` so that
it can

- draw every sample from an explicit `torch.Generator` (CPU or GPU), seeded from
  (`seed`, batch number): the same seed and flags give the same records, whatever else the
  process does with torch's global RNG;
- keep the five special tokens ([UNK] [CLS] [SEP] [PAD] [MASK], ids 0-4) out of every
  record: their logits are -inf before the sampling filters, and the decoder refuses an id
  below 5 if one ever came through;
- stop a batch early once every row has a stop codon when records are cut there anyway.

Per step, as transformers applies them: non-finite logits made finite (nan -> 0, +inf ->
the largest float, upstream's `remove_invalid_values`), special tokens suppressed,
logits / temperature, top-k (ties with the k-th kept; 0 turns it off), top-p (the smallest
set of most likely tokens whose probability reaches p; 1.0 turns it off), then one
multinomial draw per row. `max_length` counts codons per record, the prompt included, as
upstream's `max_length` counts the prompt tokens: every record has exactly that many
codons unless `to_stop_codon` cuts it. An empty prompt starts from the bos token (id 0,
upstream's unprompted start), which is not written; as upstream's `max_length` counts that
token too, the record then holds `max_length - 1` sampled codons.

Determinism: batch b of a run is sampled with a generator seeded from (seed, b), its rows
are records b*B .. b*B + rows - 1 (B the batch size), so a record's header (seed, index)
and the flags reproduce it. Changing the batch size changes the records; bf16 on a GPU may
differ from fp32 on a CPU.
"""

from __future__ import annotations

import dataclasses
import math
import time
from collections.abc import Callable, Iterable, Sequence
from pathlib import Path

import numpy as np
import torch

from dstrain.codons import CODONS, SPECIAL_TOKENS, STOP_CODON_IDS, TOKEN_TO_ID, UNK_ID, VOCAB
from dstrain.errors import DstrainError

UPSTREAM_PROMPT = "ATG"
"""`generate_dna`'s default `start_sequence`."""

UPSTREAM_TOP_K = 50
UPSTREAM_TOP_P = 0.95
DEFAULT_MAX_LENGTH = 512  # codons; `generate_dna`'s default max_length
DEFAULT_BATCH_SIZE = 8
DEFAULT_MAX_ROUNDS = 100
DEFAULT_NAME_PREFIX = "SyntheticSeq"  # upstream's `generate.py --name_prefix` default

NUM_SPECIAL = len(SPECIAL_TOKENS)  # ids 0-4; every codon id is >= 5
STOP_CODONS = frozenset(VOCAB[i] for i in STOP_CODON_IDS)  # TAA TAG TGA
_STOP_CHECK_EVERY = 8  # decode steps between early-stop checks (each check syncs a GPU)
_FASTA_SUFFIXES = (".fasta", ".fa", ".fna", ".fas", ".ffn")


@dataclasses.dataclass(frozen=True)
class GeneratedSequence:
    """One sampled record: `dna` is codons only (A/C/G/T), its length a multiple of 3."""

    index: int
    """Position in the run's sampling order (batch * batch_size + row), from 0."""
    seed: int
    dna: str
    stop_codon_index: int | None
    """0-based codon index of the first in-frame stop codon in `dna`, None if none."""
    novel: bool | None = None
    """With known sequences: not among them and not a repeat of an earlier record."""

    @property
    def num_codons(self) -> int:
        return len(self.dna) // 3

    @property
    def gc_fraction(self) -> float:
        return (self.dna.count("G") + self.dna.count("C")) / len(self.dna) if self.dna else 0.0

    def protein(self) -> str:
        """Biopython's translation (standard table, stops as `*`, not cut there)."""
        from Bio.Seq import Seq

        return str(Seq(self.dna).translate())


@dataclasses.dataclass(frozen=True)
class GenerationRun:
    """What `generate_sequences` returns: the records kept, in sampling order, and counts."""

    records: list[GeneratedSequence]
    num_sampled: int
    """Sequences sampled, kept or not."""
    num_sampled_codons: int
    """Codons the model sampled (tokens drawn; prompt not counted, early-stopped rows too)."""
    seconds: float
    """Wall time of the sampling (forward passes and draws), model loading not included."""
    rounds: int
    """Batches sampled."""
    num_known: int = 0
    """Sampled sequences found in the known sequences (dropped)."""
    num_duplicate: int = 0
    """Sampled sequences equal to an earlier kept one (dropped)."""

    @property
    def codons_per_s(self) -> float:
        return self.num_sampled_codons / self.seconds if self.seconds > 0 else float("inf")


# --------------------------------------------------------------------------------------
# Checking the options (all problems at once, before a model is loaded)
# --------------------------------------------------------------------------------------


def normalize_prompt(prompt: str) -> str:
    """The prompt in upper case, checked: A/C/G/T only, whole codons. Empty is allowed."""
    seq = prompt.strip().upper()
    bad = sorted({c for c in seq if c not in "ACGT"})
    problems = []
    if bad:
        shown = ", ".join(repr(c) for c in bad[:8])
        hint = " (RNA: write U as T)" if "U" in bad else ""
        problems.append(f"it holds {shown}, but only A, C, G, T can be sampled from{hint}")
    if len(seq) % 3:
        problems.append(
            f"its {len(seq)} bases are not whole codons ({len(seq)} % 3 = {len(seq) % 3}); "
            f"give a multiple of 3 bases, e.g. ATG"
        )
    if problems:
        raise DstrainError(f"--prompt {prompt!r}: {'; '.join(problems)}.", exit_code=2)
    return seq


def check_generation_options(
    *,
    n: int,
    max_length: int,
    prompt: str,
    top_k: int,
    top_p: float,
    temperature: float,
    batch_size: int,
    max_rounds: int,
    seed: int = 0,
) -> list[str]:
    """Every problem with the sampling options, as messages naming the flag."""
    problems = []
    try:
        prompt_codons = len(normalize_prompt(prompt)) // 3
    except DstrainError as exc:
        problems.append(str(exc))
        prompt_codons = 0
    if n < 1:
        problems.append(f"-n {n}: ask for at least 1 sequence.")
    if max_length <= prompt_codons:
        problems.append(
            f"--max-length {max_length}: counts codons per record with the prompt's "
            f"{prompt_codons} included, so nothing would be sampled; give more than "
            f"{prompt_codons}."
        )
    if top_k < 0:
        problems.append(f"--top-k {top_k}: give 0 (off) or a positive number (upstream: 50).")
    if not 0.0 < top_p <= 1.0:
        problems.append(f"--top-p {top_p}: give a number in (0, 1] (1 = off, upstream: 0.95).")
    if not (temperature > 0.0 and math.isfinite(temperature)):
        problems.append(
            f"--temperature {temperature}: give a positive number (1.0 samples the model's "
            f"distribution; lower is greedier; for the single most likely codon use --top-k 1)."
        )
    if batch_size < 1:
        problems.append(f"--batch-size {batch_size}: give at least 1.")
    if max_rounds < 1:
        problems.append(f"--max-rounds {max_rounds}: give at least 1.")
    if seed < 0:
        problems.append(f"--seed {seed}: give 0 or a positive integer.")
    return problems


def check_context(model: torch.nn.Module, max_length: int, prompt: str) -> None:
    """`max_length` positions (the bos token of an empty prompt included) must fit the
    model's context, and an empty prompt needs room for one sampled codon."""
    context = int(getattr(model.config, "max_position_embeddings", 2048))
    if max_length > context:
        raise DstrainError(
            f"--max-length {max_length}: the model's context is {context} codons; give at "
            f"most {context}.",
            exit_code=2,
        )
    if not prompt and max_length < 2:
        raise DstrainError(
            "--max-length 1 with an empty --prompt: the bos token takes that position (as "
            "upstream counts it), so nothing would be sampled; give at least 2.",
            exit_code=2,
        )


def protein_path_for(out: str | Path) -> Path:
    """Where `--translate` writes protein: OUT.fasta -> OUT.faa (other names: OUT + .faa)."""
    out = Path(out)
    if out.suffix.lower() in _FASTA_SUFFIXES:
        return out.with_suffix(".faa")
    if out.suffix.lower() == ".faa":
        raise DstrainError(
            f"-o {out}: with --translate the protein goes to OUT.faa beside the DNA, which "
            f"would be this same file; name the DNA output OUT.fasta.",
            exit_code=2,
        )
    return out.with_name(out.name + ".faa")


# --------------------------------------------------------------------------------------
# Known sequences (--unique-against)
# --------------------------------------------------------------------------------------


def normalize_dna(seq: str) -> str:
    """A sequence as compared for novelty: upper case, U as T, no whitespace or gaps."""
    return "".join(seq.split()).upper().replace("U", "T").replace("-", "").replace(".", "")


def read_known_sequences(paths: Iterable[str | Path]) -> set[str]:
    """Every record of the FASTA files (plain or gzip), normalised by `normalize_dna`."""
    from Bio.SeqIO.FastaIO import SimpleFastaParser

    from dstrain.fasta import open_fasta, read_errors

    known: set[str] = set()
    for path in paths:
        with open_fasta(Path(path)) as handle, read_errors(Path(path)):
            known.update(normalize_dna(seq) for _, seq in SimpleFastaParser(handle))
    known.discard("")
    return known


# --------------------------------------------------------------------------------------
# Sampling
# --------------------------------------------------------------------------------------


def _filter_logits(logits: torch.Tensor, top_k: int, top_p: float, temperature: float):
    """Sampling scores (fp32) from one step's logits, in transformers' order (module doc)."""
    scores = torch.nan_to_num(logits.float(), nan=0.0, posinf=torch.finfo(torch.float32).max)
    scores[:, :NUM_SPECIAL] = -math.inf  # never sample [UNK] [CLS] [SEP] [PAD] [MASK]
    # A tiny temperature overflows the finite scores to inf (softmax would give NaN).
    scores = torch.nan_to_num(
        scores / temperature, posinf=torch.finfo(torch.float32).max, neginf=-math.inf
    )
    if 0 < top_k < scores.shape[-1]:
        kth = torch.topk(scores, top_k, dim=-1).values[:, -1:]
        scores = scores.masked_fill(scores < kth, -math.inf)
    if top_p < 1.0:
        ordered, order = torch.sort(scores, dim=-1, descending=True)
        probs = ordered.softmax(dim=-1)
        mass_before = probs.cumsum(dim=-1) - probs  # probability of the tokens ranked above
        drop = mass_before >= top_p  # the top token has 0 before it: always kept
        scores = scores.masked_fill(drop.scatter(1, order, drop), -math.inf)
    return scores


def _batch_generator(seed: int, batch: int, device: torch.device) -> torch.Generator:
    """An explicit generator for batch `batch` of a run with `seed` (independent streams)."""
    state = np.random.SeedSequence([seed, batch]).generate_state(1, dtype=np.uint64)[0]
    generator = torch.Generator(device=device)
    generator.manual_seed(int(state) & ((1 << 63) - 1))
    return generator


@torch.inference_mode()
def sample_codon_ids(
    model: torch.nn.Module,
    prompt_ids: Sequence[int],
    *,
    num_rows: int,
    num_new: int,
    generator: torch.Generator,
    top_k: int,
    top_p: float,
    temperature: float,
    stop_early: bool = False,
) -> torch.Tensor:
    """(num_rows, steps) sampled token ids on the CPU; steps = num_new unless every row had
    a stop codon and `stop_early` ended the batch sooner (whole steps of 8)."""
    device = next(model.parameters()).device
    input_ids = torch.tensor([list(prompt_ids)] * num_rows, dtype=torch.long, device=device)
    stop_ids = torch.tensor(STOP_CODON_IDS, device=device)
    has_stop = torch.zeros(num_rows, dtype=torch.bool, device=device)
    out = model(input_ids=input_ids, use_cache=True)
    sampled = []
    for step in range(num_new):
        scores = _filter_logits(out.logits[:, -1, :], top_k, top_p, temperature)
        next_ids = torch.multinomial(scores.softmax(dim=-1), 1, generator=generator)
        sampled.append(next_ids)
        if step + 1 == num_new:
            break
        if stop_early:
            has_stop |= torch.isin(next_ids[:, 0], stop_ids)
            if (step + 1) % _STOP_CHECK_EVERY == 0 and bool(has_stop.all()):
                break
        out = model(input_ids=next_ids, past_key_values=out.past_key_values, use_cache=True)
    return torch.cat(sampled, dim=1).cpu()


def decode_record(
    prompt: str, ids: Sequence[int], *, to_stop_codon: bool
) -> tuple[str, int | None]:
    """The record's DNA (prompt + sampled codons) and its first in-frame stop's codon index.

    With `to_stop_codon` the DNA ends with that stop (upstream's `tokens_to_sequences`
    searches the prompt's codons too). A special token here is a bug, not bad input.
    """
    codons = [prompt[i : i + 3] for i in range(0, len(prompt), 3)]
    for token_id in ids:
        if token_id < NUM_SPECIAL:
            raise RuntimeError(f"special token {VOCAB[token_id]} sampled despite suppression")
        codons.append(VOCAB[token_id])
    stop = next((i for i, codon in enumerate(codons) if codon in STOP_CODONS), None)
    if to_stop_codon and stop is not None:
        codons = codons[: stop + 1]
    return "".join(codons), stop


def generate_sequences(
    model: torch.nn.Module,
    *,
    n: int,
    max_length: int = DEFAULT_MAX_LENGTH,
    prompt: str = UPSTREAM_PROMPT,
    seed: int = 0,
    top_k: int = UPSTREAM_TOP_K,
    top_p: float = UPSTREAM_TOP_P,
    temperature: float = 1.0,
    batch_size: int = DEFAULT_BATCH_SIZE,
    to_stop_codon: bool = False,
    known: set[str] | None = None,
    max_rounds: int = DEFAULT_MAX_ROUNDS,
    on_round: Callable[[GenerationRun], None] | None = None,
) -> GenerationRun:
    """Sample `n` codon sequences of `max_length` codons (prompt included) from `model`.

    `model`: a GPT-NeoX causal LM over the 69-token codon vocabulary, on any device and
    dtype (its parameters' device is used). `known`: normalised DNA (`read_known_sequences`);
    when given, records found there or equal to an earlier record are dropped and batches
    are sampled until `n` remain, at most `max_rounds` batches (`DstrainError` past that).
    Without it, exactly `n` records in ceil(n / batch_size) batches, duplicates kept.
    `on_round` is called after each batch with the run so far.
    """
    problems = check_generation_options(
        n=n,
        max_length=max_length,
        prompt=prompt,
        top_k=top_k,
        top_p=top_p,
        temperature=temperature,
        batch_size=batch_size,
        max_rounds=max_rounds,
        seed=seed,
    )
    if problems:
        raise DstrainError(" ".join(problems), exit_code=2)
    prompt = normalize_prompt(prompt)
    check_context(model, max_length, prompt)
    prompt_ids = [TOKEN_TO_ID[prompt[i : i + 3]] for i in range(0, len(prompt), 3)] or [UNK_ID]
    num_new = max_length - (len(prompt) // 3 if prompt else 1)  # upstream counts the bos
    device = next(model.parameters()).device
    model.eval()

    records: list[GeneratedSequence] = []
    seen: set[str] = set()
    num_sampled = num_codons = num_known = num_duplicate = rounds = 0
    rows_per_round = min(batch_size, n)
    start = time.perf_counter()
    while len(records) < n:
        if known is not None and rounds >= max_rounds:
            raise _rounds_exhausted(n, len(records), rounds, num_known, num_duplicate)
        rows = rows_per_round if known is not None else min(batch_size, n - len(records))
        ids = sample_codon_ids(
            model,
            prompt_ids,
            num_rows=rows,
            num_new=num_new,
            generator=_batch_generator(seed, rounds, device),
            top_k=top_k,
            top_p=top_p,
            temperature=temperature,
            stop_early=to_stop_codon,
        )
        num_codons += ids.numel()
        for row, row_ids in enumerate(ids.tolist()):
            dna, stop = decode_record(prompt, row_ids, to_stop_codon=to_stop_codon)
            index = rounds * rows_per_round + row
            novel = None
            if known is not None:
                novel = dna not in known and dna not in seen
                num_known += dna in known
                num_duplicate += dna not in known and dna in seen
                seen.add(dna)
            if (novel or known is None) and len(records) < n:
                records.append(GeneratedSequence(index, seed, dna, stop, novel))
        num_sampled += rows
        rounds += 1
        if on_round is not None:
            elapsed = time.perf_counter() - start
            on_round(
                GenerationRun(
                    records, num_sampled, num_codons, elapsed, rounds, num_known, num_duplicate
                )
            )
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    seconds = time.perf_counter() - start
    return GenerationRun(
        records, num_sampled, num_codons, seconds, rounds, num_known, num_duplicate
    )


def _rounds_exhausted(n: int, found: int, rounds: int, known: int, duplicate: int) -> DstrainError:
    return DstrainError(
        f"--max-rounds {rounds} reached with {found} of {n} novel sequences: of those "
        f"sampled, {known} were in the --unique-against files and {duplicate} repeated an "
        f"earlier one. Nothing was written. Raise --max-rounds, sample more widely (a higher "
        f"--temperature, --top-k or --top-p, a longer --max-length), or ask for fewer with -n."
    )


# --------------------------------------------------------------------------------------
# Output
# --------------------------------------------------------------------------------------


def format_fasta(
    records: Sequence[GeneratedSequence],
    *,
    protein: bool = False,
    name_prefix: str = DEFAULT_NAME_PREFIX,
) -> bytes:
    """FASTA text, one line per sequence; headers `>PREFIX_INDEX seed=S index=I`."""
    lines = []
    for record in records:
        seq = record.protein() if protein else record.dna
        lines.append(
            f">{name_prefix}_{record.index} seed={record.seed} index={record.index}\n{seq}\n"
        )
    text = "".join(lines)
    if not protein:  # the promise of this module, checked on what is written
        assert all(t not in text for t in SPECIAL_TOKENS)
        assert all(set(r.dna) <= set("ACGT") and len(r.dna) % 3 == 0 for r in records)
    return text.encode("ascii")


def format_summary(records: Sequence[GeneratedSequence], *, with_novelty: bool) -> str:
    """The per-sequence table the CLI prints."""
    header = f"{'index':>7}  {'codons':>7}  {'stop codon':>10}  {'GC %':>6}"
    header += "  novel" if with_novelty else ""
    rows = [header]
    for r in records:
        stop = f"at {r.stop_codon_index + 1}" if r.stop_codon_index is not None else "none"
        row = f"{r.index:>7}  {r.num_codons:>7}  {stop:>10}  {100 * r.gc_fraction:>6.1f}"
        if with_novelty:
            row += "  yes" if r.novel else "  no"
        rows.append(row)
    return "\n".join(rows)


assert all(TOKEN_TO_ID[c] >= NUM_SPECIAL for c in CODONS)  # codon ids follow the specials
