"""`dstrain generate`: seeded sampling, codons only, stop-codon cut, novelty, translation.

Every test samples from real genslm_tiny exports (random weights, CPU, fp32) through the
console script's entry (`dstrain.cli.main`) under click's CliRunner, 24-codon records.
One export has its special-token logits forced far above every codon, so a record with
[UNK]/[CLS]/[SEP]/[PAD]/[MASK] in it would appear if suppression failed.
"""

from __future__ import annotations

import re
from pathlib import Path

import pytest
from click.testing import CliRunner
from subprocs import through_main

MAX_LENGTH = 24  # codons per record, prompt included


def run_generate(model_dir: Path, out: Path, *args: str, expect_ok: bool = True):
    argv = ["generate", str(model_dir), "-o", str(out), "--max-length", str(MAX_LENGTH)]
    result = CliRunner().invoke(through_main, [*argv, "--device", "cpu", *args])
    if expect_ok:
        assert result.exit_code == 0, result.output
    return result


def read_records(path: Path) -> list[tuple[str, str]]:
    """(header, sequence) pairs of a FASTA file this command wrote (one line per sequence)."""
    lines = path.read_text().splitlines()
    assert len(lines) % 2 == 0 and all(h.startswith(">") for h in lines[::2]), lines
    return list(zip(lines[::2], lines[1::2], strict=True))


def save_export(model, directory: Path) -> Path:
    from dstrain.codons import build_hf_tokenizer

    model.save_pretrained(directory)
    build_hf_tokenizer().save_pretrained(directory)
    return directory


@pytest.fixture(scope="module")
def export_dir(tmp_path_factory) -> Path:
    """A genslm_tiny export with seed-0 random weights."""
    import torch

    from dstrain.model import build_model

    torch.manual_seed(0)
    return save_export(build_model("genslm_tiny").eval(), tmp_path_factory.mktemp("export"))


@pytest.fixture(scope="module")
def special_export_dir(tmp_path_factory) -> Path:
    """A genslm_tiny export whose 5 special tokens out-score every codon at every position.

    The final layer norm outputs its bias (a constant 1 vector) whatever the input, and the
    head rows of ids 0-4 are 10 everywhere: those logits are 640, the codons' about 0.
    """
    import torch

    from dstrain.codons import VOCAB
    from dstrain.model import build_model

    torch.manual_seed(0)
    model = build_model("genslm_tiny").eval()
    with torch.no_grad():
        norm = model.gpt_neox.final_layer_norm
        norm.weight.zero_()
        norm.bias.fill_(1.0)
        model.get_output_embeddings().weight[:5] = 10.0
        logits = model(input_ids=torch.tensor([[VOCAB.index("ATG")] * 4])).logits
    # Unsuppressed, the model would only ever emit special tokens: the test below can fail.
    assert (logits.argmax(dim=-1) < 5).all()
    return save_export(model, tmp_path_factory.mktemp("special"))


def test_same_seed_same_bytes_other_seed_other_records(export_dir, tmp_path):
    paths = [tmp_path / name for name in ("a.fasta", "b.fasta", "c.fasta")]
    for path, seed in zip(paths, ("7", "7", "8"), strict=True):
        result = run_generate(export_dir, path, "-n", "5", "--seed", seed, "--batch-size", "2")
    assert paths[0].read_bytes() == paths[1].read_bytes()
    first, other = read_records(paths[0]), read_records(paths[2])
    assert [s for _, s in first] != [s for _, s in other]
    assert [h.split()[0] for h, _ in first] == [f">SyntheticSeq_{i}" for i in range(5)]
    assert all(f"seed=7 index={i}" in h for i, (h, _) in enumerate(first))
    assert "codons/s" in result.output.splitlines()[-1]


def test_records_are_codons_only_even_when_special_tokens_win(special_export_dir, tmp_path):
    out = tmp_path / "out.fasta"
    result = run_generate(special_export_dir, out, "-n", "6", "--seed", "1", "--batch-size", "4")
    records = read_records(out)
    assert len(records) == 6
    for header, seq in records:
        assert re.fullmatch(r"(?:[ACGT]{3})+", seq), (header, seq)
        assert len(seq) == 3 * MAX_LENGTH and seq.startswith("ATG")
    assert not re.search(r"\[(UNK|CLS|SEP|PAD|MASK)\]", out.read_text() + result.output)


def test_to_stop_codon_cuts_after_the_first_stop(export_dir, tmp_path):
    stops = {"TAA", "TAG", "TGA"}
    full, cut = tmp_path / "full.fasta", tmp_path / "cut.fasta"
    run_generate(export_dir, full, "-n", "8", "--seed", "3", "--batch-size", "2")
    run_generate(export_dir, cut, "-n", "8", "--seed", "3", "--batch-size", "2", "--to-stop-codon")
    num_cut = 0
    for (_, whole), (_, part) in zip(read_records(full), read_records(cut), strict=True):
        codons = [whole[i : i + 3] for i in range(0, len(whole), 3)]
        first_stop = next((i for i, c in enumerate(codons) if c in stops), None)
        if first_stop is None:
            assert part == whole
        else:
            assert part == "".join(codons[: first_stop + 1])
            num_cut += len(part) < len(whole)
    assert num_cut > 0  # the seed gives at least one record cut short


def test_unique_against_never_returns_a_known_sequence(export_dir, tmp_path):
    known, out = tmp_path / "known.fasta", tmp_path / "new.fasta"
    # The same seed and flags sample the known records again first: collisions are certain.
    run_generate(export_dir, known, "-n", "4", "--seed", "5", "--batch-size", "4")
    known_seqs = {s for _, s in read_records(known)}
    known.write_text(known.read_text().lower())  # compared case-insensitively
    args = ["-n", "4", "--seed", "5", "--batch-size", "4", "--unique-against", str(known)]
    result = run_generate(export_dir, out, *args)
    records = read_records(out)
    assert len(records) == 4 and len({s for _, s in records}) == 4
    assert not {s for _, s in records} & known_seqs
    # Round 1 (indices 0-3) was the known file again, all dropped.
    assert all(int(h.split("index=")[1]) >= 4 for h, _ in records)
    assert "round 1: 0/4 novel (4 known" in result.output
    assert result.output.count(" yes") == 4


@pytest.mark.parametrize(
    ("extra", "expected"),
    [
        # --top-k 1 samples the same record every time: one novel, then only repeats.
        (["--top-k", "1", "-n", "2", "--max-rounds", "3"], "--max-rounds 3 reached with 1 of 2"),
        # The known file is this seed's first batch; one round can find nothing new.
        (["--seed", "5", "-n", "4", "--max-rounds", "1"], "--max-rounds 1 reached with 0 of 4"),
    ],
)
def test_unique_against_cap_is_a_clear_error(export_dir, tmp_path, extra, expected):
    known, out = tmp_path / "known.fasta", tmp_path / "new.fasta"
    run_generate(export_dir, known, "-n", "4", "--seed", "5", "--batch-size", "4")
    args = ["--batch-size", "4", "--unique-against", str(known), *extra]
    result = run_generate(export_dir, out, *args, expect_ok=False)
    assert result.exit_code == 1, result.output
    assert expected in result.output and "Traceback" not in result.output
    assert not out.exists()


def test_translate_writes_biopython_proteins(export_dir, tmp_path):
    from Bio.Seq import Seq

    out = tmp_path / "gen.fasta"
    result = run_generate(export_dir, out, "-n", "3", "--seed", "2", "--translate")
    proteins = read_records(tmp_path / "gen.faa")
    dna = read_records(out)
    assert [h for h, _ in proteins] == [h for h, _ in dna]
    assert [p for _, p in proteins] == [str(Seq(s).translate()) for _, s in dna]
    assert all(len(p) == MAX_LENGTH for _, p in proteins)
    assert "gen.faa" in result.output


@pytest.mark.parametrize(
    ("args", "expected"),
    [
        (["--prompt", "ATGX"], "--prompt 'ATGX': it holds 'X'"),
        (["--prompt", "ATGA"], "not whole codons"),
        (["--prompt", "AUG"], "write U as T"),
        (["--top-p", "1.5", "--temperature", "0"], "--top-p 1.5"),
        (["--max-length", "4000"], "the model's context is 2048"),
    ],
)
def test_bad_options_exit_nonzero_without_traceback(export_dir, tmp_path, args, expected):
    out = tmp_path / "out.fasta"
    result = run_generate(export_dir, out, "-n", "2", *args, expect_ok=False)
    assert result.exit_code == 2, result.output
    assert expected in result.output and "Traceback" not in result.output
    assert not out.exists()


def test_generate_sequences_api(tiny_model):
    """The in-process entry the benchmark times: seeded, counted, independent of globals."""
    import torch

    from dstrain.generate import generate_sequences

    first = generate_sequences(tiny_model, n=3, max_length=MAX_LENGTH, seed=11, batch_size=2)
    torch.manual_seed(123)  # the global RNG plays no part
    again = generate_sequences(tiny_model, n=3, max_length=MAX_LENGTH, seed=11, batch_size=2)
    assert [r.dna for r in first.records] == [r.dna for r in again.records]
    assert [r.index for r in first.records] == [0, 1, 2] and first.rounds == 2
    assert first.num_sampled_codons == 3 * (MAX_LENGTH - 1) and first.codons_per_s > 0
    empty = generate_sequences(tiny_model, n=1, max_length=MAX_LENGTH, prompt="", seed=1)
    assert len(empty.records[0].dna) == 3 * (MAX_LENGTH - 1)  # bos counted, not written


def test_top_k_1_matches_transformers_greedy_generate(tiny_model):
    """The KV-cache loop against transformers' own `generate` (an independent decoder)."""
    import torch

    from dstrain.codons import TOKEN_TO_ID, VOCAB
    from dstrain.generate import generate_sequences

    run = generate_sequences(tiny_model, n=2, max_length=MAX_LENGTH, prompt="ATGAAA", top_k=1)
    prompt = torch.tensor([[TOKEN_TO_ID["ATG"], TOKEN_TO_ID["AAA"]]])
    ids = tiny_model.generate(
        prompt, max_length=MAX_LENGTH, do_sample=False, suppress_tokens=list(range(5))
    )[0]
    assert all(r.dna == "".join(VOCAB[i] for i in ids.tolist()) for r in run.records)


@pytest.mark.parametrize(
    ("top_k", "top_p", "temperature"),
    [(50, 0.95, 1.0), (0, 0.5, 0.7), (5, 1.0, 1.3), (69, 0.9, 2.0), (3, 0.3, 1e-30)],
)
def test_sampling_filters_equal_transformers_processors(top_k, top_p, temperature):
    """Special ids suppressed, then temperature, top-k and top-p, against transformers' own
    processors (independent code) on random logits; the last case is a temperature that
    overflows every finite score (still a valid distribution)."""
    import torch
    from transformers.generation.logits_process import (
        SuppressTokensLogitsProcessor,
        TemperatureLogitsWarper,
        TopKLogitsWarper,
        TopPLogitsWarper,
    )

    from dstrain.generate import _filter_logits

    logits = torch.randn(64, 69, generator=torch.Generator().manual_seed(top_k)) * 3
    ours = _filter_logits(logits.clone(), top_k, top_p, temperature)
    theirs = SuppressTokensLogitsProcessor(list(range(5)))(None, logits.clone())
    if temperature >= 1e-3:  # transformers' warper divides plainly (inf/inf = nan below)
        theirs = TemperatureLogitsWarper(temperature)(None, theirs)
        if top_k:
            theirs = TopKLogitsWarper(top_k)(None, theirs)
        if top_p < 1:
            theirs = TopPLogitsWarper(top_p)(None, theirs)
        assert torch.equal(torch.isinf(ours), torch.isinf(theirs))
        kept = torch.isfinite(theirs)
        torch.testing.assert_close(ours[kept], theirs[kept])
    probs = ours.softmax(dim=-1)
    assert torch.isfinite(probs).all() and (probs[:, :5] == 0).all()
    torch.multinomial(probs, 1)  # raises on an invalid distribution
