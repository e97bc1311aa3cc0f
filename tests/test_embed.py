"""`dstrain embed` against an independent recomputation on the same weights.

The reference reads the FASTA with biopython, tokenizes with the exported HF tokenizer
(upstream's way: codons joined by spaces), loads the weights with
`AutoModelForCausalLM.from_pretrained` and runs one plain forward per record (or window).
"""

from __future__ import annotations

import dataclasses
import json
import sys

import numpy as np
import pytest
import torch

from dstrain.architectures import get_architecture
from dstrain.cli import main
from dstrain.fasta import bundled_fasta_paths

NUM_RECORDS = 8
SMALL_CONTEXT = 64


def _export(path, context: int | None = None):
    from dstrain.codons import build_hf_tokenizer
    from dstrain.model import build_model

    arch = get_architecture("genslm_tiny")
    if context is not None:
        arch = dataclasses.replace(arch, name="tiny_ctx", max_position_embeddings=context)
    torch.manual_seed(0)
    build_model(arch).save_pretrained(path)
    build_hf_tokenizer().save_pretrained(path)
    return path


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    from Bio import SeqIO

    root = tmp_path_factory.mktemp("embed")
    # HA records are whole codons; NA records end in a partial codon (upstream: one [UNK]).
    ha, *_, na = bundled_fasta_paths()
    half = NUM_RECORDS // 2
    records = [
        *list(SeqIO.parse(str(ha), "fasta"))[:half],
        *list(SeqIO.parse(str(na), "fasta"))[:half],
    ]
    assert any(len(r.seq) % 3 for r in records)
    fasta = root / "few.fasta"
    fasta.write_text("".join(f">{r.id}\n{r.seq}\n" for r in records))
    return {
        "root": root,
        "fasta": fasta,
        "seqs": [str(r.seq) for r in records],
        "ids": [r.id for r in records],
        "model": _export(root / "model"),
        "small": _export(root / "small", SMALL_CONTEXT),
    }


def _reference_ids(model_dir, seq: str) -> list[int]:
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    seq = seq.upper()
    # Upstream's k-mer grouping: the short last word (a partial codon) stays, as [UNK].
    codons = [seq[i : i + 3] for i in range(0, len(seq), 3)]
    return tokenizer(" ".join(codons), add_special_tokens=False)["input_ids"]


def _reference_states(model, ids: list[int], pad_to: int | None = None):
    """hidden_states of one record (optionally padded to `pad_to` with a 2-D mask)."""
    from dstrain.codons import PAD_ID

    n = len(ids)
    width = pad_to or n
    input_ids = torch.tensor([ids + [PAD_ID] * (width - n)])
    mask = torch.zeros(1, width, dtype=torch.long)
    mask[0, :n] = 1
    with torch.no_grad():
        out = model(input_ids=input_ids, attention_mask=mask, output_hidden_states=True)
    return [h[0] for h in out.hidden_states]


def _load_reference(model_dir):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()


def _embed(args, capsys) -> str:
    main(["embed", *map(str, args), "--no-progress"])
    return capsys.readouterr().err


def _read_h5(path):
    import h5py

    with h5py.File(path, "r") as h5:
        data = {k: h5[k][()] for k in h5 if isinstance(h5[k], h5py.Dataset)}
        groups = {k: {i: h5[k][i][()] for i in h5[k]} for k in h5 if isinstance(h5[k], h5py.Group)}
        attrs = {k: h5.attrs[k] for k in h5.attrs}
    return data, groups, attrs


@pytest.mark.parametrize("pooling", ["mean", "mean-padded"])
def test_poolings_equal_an_independent_reference(setup, tmp_path, capsys, pooling):
    out = tmp_path / "emb.h5"
    err = _embed(
        [setup["model"], setup["fasta"], "-o", out, "--pooling", pooling, "--layers", "-1,0"],
        capsys,
    )
    assert "embedded 8 records" in err and str(out) in err
    data, _, attrs = _read_h5(out)
    reference = _load_reference(setup["model"])
    hidden = reference.config.hidden_size
    assert data["embeddings"].shape == (NUM_RECORDS, 2, hidden)
    assert [i.decode() for i in data["ids"]] == setup["ids"]
    assert data["fasta-indices"].tolist() == list(range(NUM_RECORDS))
    import hashlib

    assert [h.decode() for h in data["na-hashes"]] == [
        hashlib.md5(s.encode()).hexdigest() for s in setup["seqs"]
    ]
    assert attrs["pooling"] == pooling and list(attrs["layers"]) == [-1, 0]
    for row, seq in enumerate(setup["seqs"]):
        ids = _reference_ids(setup["model"], seq)
        pad_to = 2048 if pooling == "mean-padded" else None
        states = _reference_states(reference, ids, pad_to)
        for slot, layer in enumerate([-1, 0]):
            want = states[layer].mean(dim=0).numpy()
            np.testing.assert_allclose(data["embeddings"][row, slot], want, atol=1e-5, rtol=0)
    # The two poolings really differ (pads change the average).
    if pooling == "mean-padded":
        ids = _reference_ids(setup["model"], setup["seqs"][0])
        real = _reference_states(reference, ids)[-1].mean(dim=0).numpy()
        assert np.abs(data["embeddings"][0, 0] - real).max() > 1e-3


def test_long_records_windowed_truncated_and_per_token(setup, tmp_path, capsys):
    reference = _load_reference(setup["small"])
    seqs = setup["seqs"][:3]
    out = tmp_path / "win.h5"
    _embed([setup["small"], setup["fasta"], "-o", out, "--batch-size", "3"], capsys)
    data, _, attrs = _read_h5(out)
    assert attrs["long_records"] == "window" and attrs["context"] == SMALL_CONTEXT
    for row, seq in enumerate(seqs):
        ids = _reference_ids(setup["small"], seq)
        assert len(ids) > SMALL_CONTEXT
        windows = [ids[s : s + SMALL_CONTEXT] for s in range(0, len(ids), SMALL_CONTEXT)]
        assert data["num-windows"][row] == len(windows)
        means = [_reference_states(reference, w)[-1].mean(dim=0).numpy() for w in windows]
        want = sum(m * len(w) for m, w in zip(means, windows, strict=True)) / len(ids)
        np.testing.assert_allclose(data["embeddings"][row], want, atol=1e-5, rtol=0)

    out = tmp_path / "trunc.h5"
    _embed([setup["small"], setup["fasta"], "-o", out, "--long-records", "truncate"], capsys)
    data, _, attrs = _read_h5(out)
    assert attrs["long_records"] == "truncate"
    assert (data["num-tokens"] == SMALL_CONTEXT).all()
    ids = _reference_ids(setup["small"], seqs[0])[:SMALL_CONTEXT]
    want = _reference_states(reference, ids)[-1].mean(dim=0).numpy()
    np.testing.assert_allclose(data["embeddings"][0], want, atol=1e-5, rtol=0)

    out = tmp_path / "tok.h5"
    _embed([setup["small"], setup["fasta"], "-o", out, "--per-token", "--logits"], capsys)
    _, groups, _ = _read_h5(out)
    ids = _reference_ids(setup["small"], seqs[1])
    windows = [ids[s : s + SMALL_CONTEXT] for s in range(0, len(ids), SMALL_CONTEXT)]
    want = np.concatenate([_reference_states(reference, w)[-1].numpy() for w in windows])
    np.testing.assert_allclose(groups["embeddings"]["1"], want, atol=1e-5, rtol=0)
    with torch.no_grad():
        first = reference(input_ids=torch.tensor([windows[0]])).logits[0].numpy()
    assert groups["logits"]["1"].shape == (len(ids), reference.config.vocab_size)
    np.testing.assert_allclose(groups["logits"]["1"][: len(windows[0])], first, atol=1e-4)


def test_npy_output_with_ids(setup, tmp_path, capsys):
    out = tmp_path / "emb.npy"
    _embed([setup["model"], setup["fasta"], "-o", out], capsys)
    array = np.load(out)
    meta = json.loads((tmp_path / "emb.npy.json").read_text())
    assert array.shape == (NUM_RECORDS, 64) and array.dtype == np.float32
    assert meta["ids"] == setup["ids"] and meta["pooling"] == "mean"


@pytest.mark.parametrize(
    ("args", "expected"),
    [
        (["{root}/nothing", "{fasta}", "-o", "{tmp}/e.h5"], "does not exist"),
        (["{model}", "{fasta}", "-o", "{tmp}/e.txt"], "unknown suffix"),
        (["{model}", "{fasta}", "-o", "{tmp}/e.npy", "--per-token"], "name the output .h5"),
        (["{model}", "{fasta}", "-o", "{tmp}/e.h5", "--layers", "3"], "layer 3 does not"),
        (["{model}", "{tmp}/none.fasta", "-o", "{tmp}/e.h5"], "none.fasta"),
    ],
)
def test_errors_exit_without_traceback(setup, tmp_path, capsys, args, expected):
    values = {"root": setup["root"], "fasta": setup["fasta"], "model": setup["model"]}
    args = [a.format(tmp=tmp_path, **values) for a in args]
    with pytest.raises(SystemExit) as exc:
        main(["embed", *args, "--no-progress"])
    assert exc.value.code != 0
    err = capsys.readouterr().err
    assert expected in err and "Traceback" not in err
    assert not list(tmp_path.iterdir())  # nothing written


def test_a_truncated_gzip_fasta_is_a_clear_error(setup, tmp_path, capsys):
    import gzip

    # Long enough that the cut lies past the head dstrain sniffs before parsing.
    whole = gzip.compress(setup["fasta"].read_bytes() * 100)
    broken = setup["root"] / "broken.fasta.gz"
    broken.write_bytes(whole[: len(whole) // 2])
    out = tmp_path / "e.h5"
    with pytest.raises(SystemExit) as exc:
        main(["embed", str(setup["model"]), str(broken), "-o", str(out), "--no-progress"])
    err = capsys.readouterr().err
    assert exc.value.code == 1 and "truncated or corrupt" in err and "Traceback" not in err
    assert not out.exists()


@pytest.mark.slow
@pytest.mark.multiproc
def test_two_ranks_write_what_one_rank_writes(setup, tmp_path, capsys):
    from subprocs import clean_env, deepspeed_launcher, run_in_session

    # Pooled windows (summed across ranks) and per-token logits (concatenated across ranks).
    common = [str(setup["small"]), str(setup["fasta"]), "--batch-size", "2", "--logits"]
    one = tmp_path / "one.h5"
    _embed([*common, "-o", one], capsys)
    two = tmp_path / "two.h5"
    command = [*deepspeed_launcher(2), "--module", "dstrain.embed", *common, "-o", str(two)]
    result = run_in_session(command, timeout=240, env=clean_env())
    assert result.returncode == 0, result.stdout[-3000:]
    assert "embedded 8 records" in result.stdout
    (d1, g1, a1), (d2, g2, a2) = _read_h5(one), _read_h5(two)
    assert a1.keys() == a2.keys() and all(np.array_equal(a1[k], a2[k]) for k in a1)
    assert d1.keys() == d2.keys() and all(np.array_equal(d1[k], d2[k]) for k in d1)
    assert g1.keys() == g2.keys()
    for name in g1:
        assert g1[name].keys() == g2[name].keys()
        assert all(np.array_equal(g1[name][k], g2[name][k]) for k in g1[name])


def test_module_entry_point_drops_local_rank(monkeypatch):
    import dstrain.cli
    import dstrain.embed

    seen = []
    monkeypatch.setattr(dstrain.cli, "main", lambda argv: seen.append(argv))
    monkeypatch.setattr(sys, "argv", ["x", "--local_rank=1", "M", "F", "-o", "O.h5"])
    dstrain.embed.main()
    assert seen == [["embed", "M", "F", "-o", "O.h5"]]


@pytest.mark.slow
def test_a_training_run_embeds_like_its_export(setup, tmp_path, capsys):
    """A dstrain run directory is loaded in memory (verified, consolidated) to the same
    weights `dstrain export` writes."""
    from test_train import train

    from dstrain.export import export_checkpoint
    from dstrain.inference import load_model

    run_dir = tmp_path / "run"
    assert train("--output-dir", run_dir, "--max-steps", 2, "--save-every", 2, "--no-export") == 0
    capsys.readouterr()
    loaded = load_model(run_dir)
    assert loaded.step == 2 and loaded.architecture.name == "genslm_tiny"
    assert not loaded.model.training
    export_checkpoint(run_dir, tmp_path / "export")
    exported = load_model(tmp_path / "export").model.state_dict()
    assert all(torch.equal(t, exported[k]) for k, t in loaded.model.state_dict().items())
    out = tmp_path / "emb.npy"
    _embed([run_dir, setup["fasta"], "-o", out], capsys)
    assert np.load(out).shape == (NUM_RECORDS, loaded.architecture.hidden_size)


def test_h5_output_without_h5py_says_what_to_do(setup, tmp_path, capsys, monkeypatch):
    monkeypatch.setitem(sys.modules, "h5py", None)  # import h5py raises ImportError
    with pytest.raises(SystemExit) as exc:
        main(["embed", str(setup["model"]), str(setup["fasta"]), "-o", str(tmp_path / "e.h5")])
    err = capsys.readouterr().err
    assert exc.value.code != 0 and "pip install h5py" in err and ".npy" in err
    assert "Traceback" not in err and not list(tmp_path.iterdir())


def test_an_upstream_pt_needs_its_model_name(setup, tmp_path, capsys):
    from dstrain.inference import load_model
    from dstrain.model import save_upstream_pt

    reference = _load_reference(setup["model"])
    pt = save_upstream_pt(reference, tmp_path / "upstream.pt")
    with pytest.raises(SystemExit):
        main(["embed", str(pt), str(setup["fasta"]), "-o", str(tmp_path / "e.npy")])
    assert "--model NAME" in capsys.readouterr().err
    loaded = load_model(pt, model_name="genslm_tiny", trust_checkpoint=True)
    assert all(
        torch.equal(t, reference.state_dict()[k]) for k, t in loaded.model.state_dict().items()
    )
    out = tmp_path / "e.npy"
    _embed([pt, setup["fasta"], "-o", out, "--model", "genslm_tiny", "--trust-checkpoint"], capsys)
    direct = tmp_path / "d.npy"
    _embed([setup["model"], setup["fasta"], "-o", direct], capsys)
    assert np.array_equal(np.load(out), np.load(direct))
