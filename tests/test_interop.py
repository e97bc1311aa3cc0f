"""Interop with upstream GenSLM: its generation call on a dstrain export, its DeepSpeed
checkpoint directories as input, and its `.pt` layout as output (`export --format upstream`).
"""

from __future__ import annotations

import pathlib

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from dstrain import codons
from dstrain.cli import main
from dstrain.errors import DstrainError
from dstrain.model import (
    UPSTREAM_PT_NAME,
    build_model,
    convert_checkpoint,
    load_init_checkpoint,
    read_upstream_state_dict,
)

SPECIAL_IDS = {codons.TOKEN_TO_ID[t] for t in codons.SPECIAL_TOKENS}


def random_ids(seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randint(5, 69, (2, 24), generator=g)


class Legacy421(torch.nn.Module):
    """A GPT-NeoX laid out as transformers 4.21's GPTNeoXForCausalLM (upstream GenSLM's):
    the head registered as `embed_out`, and per layer the persistent buffers 4.21 kept
    (`attention.bias`, `attention.masked_bias`, `attention.rotary_emb.inv_freq`), here
    zeros/placeholders that a strict load must overwrite. It computes with transformers 5's
    layers; the 4.21 buffers take no part in it."""

    def __init__(self, hf_model) -> None:
        super().__init__()
        self.gpt_neox = hf_model.gpt_neox
        self.embed_out = hf_model.lm_head
        positions = hf_model.config.max_position_embeddings
        rotary = len(hf_model.gpt_neox.rotary_emb.inv_freq)
        for layer in self.gpt_neox.layers:
            attention = layer.attention
            attention.register_buffer(
                "bias", torch.zeros(1, 1, positions, positions, dtype=torch.uint8)
            )
            attention.register_buffer("masked_bias", torch.tensor(0.0))
            attention.rotary_emb = torch.nn.Module()
            attention.rotary_emb.register_buffer("inv_freq", torch.zeros(rotary))

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        return self.embed_out(self.gpt_neox(input_ids=input_ids).last_hidden_state)


class LightningLike(torch.nn.Module):
    """What Lightning's DeepSpeedStrategy handed to `deepspeed.initialize` in upstream's
    training: its module wrapper (`_forward_module`) around upstream's DNATransformer,
    whose `model` attribute holds the transformers model."""

    def __init__(self, hf_like) -> None:
        super().__init__()
        self._forward_module = torch.nn.Module()
        self._forward_module.model = hf_like

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        return self._forward_module.model(input_ids)


# -- generation: upstream's README call on a dstrain export ------------------------------


def rigged_model():
    """genslm_tiny whose head makes every special token far likelier than any codon."""
    torch.manual_seed(0)
    model = build_model("genslm_tiny").eval()
    with torch.no_grad():
        norm = model.gpt_neox.final_layer_norm
        norm.weight.zero_()  # the final hidden state is norm.bias at every position
        hidden = torch.randn(norm.bias.shape)
        norm.bias.copy_(hidden)
        model.lm_head.weight.mul_(0.01)
        model.lm_head.weight[sorted(SPECIAL_IDS)] = 20 * hidden / hidden.dot(hidden)
    return model


def readme_generate(model, tokenizer, seed: int) -> torch.Tensor:
    """Upstream README's generation call, verbatim in its arguments."""
    torch.manual_seed(seed)
    return model.generate(
        tokenizer.encode("ATG", return_tensors="pt"),
        max_length=10,
        min_length=10,
        do_sample=True,
        top_k=50,
        top_p=0.95,
        num_return_sequences=2,
        remove_invalid_values=True,
        use_cache=True,
        pad_token_id=tokenizer.encode("[PAD]")[0],
        temperature=1.0,
    )


def test_upstreams_generation_call_on_an_export_gives_only_codons(
    make_upstream_checkpoint, tmp_path
):
    rigged = rigged_model()
    src = make_upstream_checkpoint(rigged, tmp_path / "rigged.pt")
    out = convert_checkpoint(src, "genslm_tiny", tmp_path / "hf", trust_checkpoint=True).out_dir
    model = AutoModelForCausalLM.from_pretrained(out).eval()
    tokenizer = AutoTokenizer.from_pretrained(out)
    assert (model.config.bos_token_id, model.config.eos_token_id) == (0, 0)  # upstream's
    assert set(model.generation_config.suppress_tokens) == SPECIAL_IDS

    tokens = readme_generate(model, tokenizer, seed=1)
    assert tokens.shape == (2, 10)
    assert not set(tokens[:, 1:].flatten().tolist()) & SPECIAL_IDS
    for sequence in tokenizer.batch_decode(tokens, skip_special_tokens=True):
        words = sequence.split()
        assert len(words) == 10 and words[0] == "ATG"
        assert all(w in codons.CODONS for w in words)

    # The same model without the exported settings: the rigged head wins.
    model.generation_config.suppress_tokens = None
    unguarded = readme_generate(model, tokenizer, seed=1)
    assert set(unguarded[:, 1:].flatten().tolist()) & SPECIAL_IDS


# -- input: upstream's DeepSpeed checkpoint directories ----------------------------------


@pytest.mark.slow
def test_upstream_deepspeed_directory_converts_with_the_source_logits(tmp_path, capsys):
    import deepspeed

    from dstrain.ds_config import build_ds_config
    from dstrain.ds_runtime import prepare_deepspeed, redirect_fds
    from dstrain.settings import make_deepspeed_settings

    prepare_deepspeed(timeout_s=120)
    torch.manual_seed(3)
    source = build_model("genslm_tiny").eval()
    wrapped = LightningLike(Legacy421(source))
    config = build_ds_config(
        make_deepspeed_settings(
            {
                "precision": "fp32",
                "zero_optimization": {"stage": 2},
                "batch": {"train_micro_batch_size_per_gpu": 1, "gradient_accumulation_steps": 1},
                "optimizer": {"lr": 1e-3, "torch_adam": True},  # as dstrain train on CPU
                "scheduler": {"type": "none"},
                "steps_per_print": 1000,
            }
        )
    )
    # Lightning's layout: NAME.ckpt/latest -> "checkpoint", its client state beside the
    # module (hyper-parameters with a Path: not loadable tensors-only).
    ckpt = tmp_path / "epoch=0-step=10.ckpt"
    with redirect_fds(tmp_path / "deepspeed.log"):
        engine, *_ = deepspeed.initialize(
            model=wrapped, model_parameters=wrapped.parameters(), config=config
        )
        engine.save_checkpoint(
            str(ckpt),
            tag="checkpoint",
            client_state={"epoch": 0, "hyper_parameters": {"data": pathlib.Path("/x")}},
        )
    assert (ckpt / "latest").read_text().strip() == "checkpoint"
    saved = torch.load(
        ckpt / "checkpoint" / "mp_rank_00_model_states.pt", map_location="cpu", weights_only=False
    )
    assert "_forward_module.model.embed_out.weight" in saved["module"]
    assert "_forward_module.model.gpt_neox.layers.0.attention.masked_bias" in saved["module"]
    assert list((ckpt / "checkpoint").glob("*optim_states.pt"))

    with pytest.raises(DstrainError, match="--trust-checkpoint") as info:
        convert_checkpoint(ckpt, "genslm_tiny", tmp_path / "refused")
    assert "zero_to_fp32" in str(info.value) and not (tmp_path / "refused").exists()

    out = tmp_path / "hf"
    args = ["convert-checkpoint", str(ckpt), "--model", "genslm_tiny", "-o", str(out)]
    main([*args, "--trust-checkpoint"])
    assert "108,928 parameters" in capsys.readouterr().out
    converted = AutoModelForCausalLM.from_pretrained(out).eval()
    ids = random_ids()
    with torch.no_grad():
        expected = source(input_ids=ids).logits
        torch.testing.assert_close(converted(input_ids=ids).logits, expected, atol=1e-6, rtol=0)
        # --init-checkpoint's loader, given the tag directory itself.
        again = load_init_checkpoint("genslm_tiny", ckpt / "checkpoint", trust_checkpoint=True)
        torch.testing.assert_close(again(input_ids=ids).logits, expected, atol=1e-6, rtol=0)


def test_a_dstrain_run_still_says_export(tmp_path):
    run = tmp_path / "run"
    (run / "checkpoints" / "step00000001").mkdir(parents=True)
    (run / "checkpoints" / "latest").write_text("step00000001")
    for path in (run, run / "checkpoints"):
        with pytest.raises(DstrainError, match="dstrain export"):
            load_init_checkpoint("genslm_tiny", path, trust_checkpoint=True)


# -- output: `dstrain export --format upstream` -------------------------------------------


@pytest.mark.slow
def test_export_format_upstream_loads_strictly_as_upstreams_genslm_does(
    tmp_path, capsys, make_upstream_checkpoint
):
    from dstrain.train import main as train_main

    run = tmp_path / "run"
    assert train_main(["--output-dir", str(run), "--max-steps", "1", "--eval-every", "0"]) == 0
    out = tmp_path / "export"
    main(["export", str(run), "-o", str(out), "--format", "upstream"])
    assert f"{out}/{UPSTREAM_PT_NAME}" in capsys.readouterr().out
    assert (out / "model.safetensors").is_file()  # beside the HF files, not instead
    hf = AutoModelForCausalLM.from_pretrained(out).eval()
    assert set(hf.generation_config.suppress_tokens) == SPECIAL_IDS  # train's exports too

    # What upstream's genslm.GenSLM.configure_model does: torch.load(...)["state_dict"]
    # into a transformers 4.21 GPTNeoXForCausalLM; here strictly, into that layout.
    state = torch.load(out / UPSTREAM_PT_NAME, map_location="cpu")["state_dict"]
    legacy = Legacy421(build_model("genslm_tiny")).eval()
    # The layout of an official file (tests/conftest.py), unprefixed as GenSLM loads it.
    official = make_upstream_checkpoint(build_model("genslm_tiny"), tmp_path / "o.pt", prefix="")
    official_keys = set(torch.load(official, weights_only=False)["state_dict"])
    assert set(legacy.state_dict()) == official_keys == set(state)
    legacy.load_state_dict(state, strict=True)

    ids = random_ids(1)
    with torch.no_grad():
        torch.testing.assert_close(legacy(ids), hf(input_ids=ids).logits, atol=1e-6, rtol=0)
    positions = hf.config.max_position_embeddings
    causal = torch.tril(torch.ones(positions, positions, dtype=torch.bool))
    for layer in legacy.gpt_neox.layers:
        attention = layer.attention
        assert torch.equal(attention.bias[0, 0].bool(), causal)
        assert attention.masked_bias.item() == -1e9
        # transformers 5 computes the same frequencies for the model-level rotary embedding.
        torch.testing.assert_close(
            attention.rotary_emb.inv_freq, hf.gpt_neox.rotary_emb.inv_freq, atol=0, rtol=0
        )

    # dstrain reads its own upstream file back, tensors only, without --trust-checkpoint.
    back = read_upstream_state_dict(out / UPSTREAM_PT_NAME)
    assert back.keys() == hf.state_dict().keys()
    for key, tensor in hf.state_dict().items():
        assert torch.equal(back[key], tensor), key
