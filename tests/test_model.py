"""GenSLM models: building, official-checkpoint loading, conversion to HF directories."""

from __future__ import annotations

import json

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from dstrain import codons
from dstrain.architectures import get_architecture
from dstrain.cli import main
from dstrain.errors import DstrainError
from dstrain.model import (
    build_model,
    convert_checkpoint,
    count_params,
    gpt_neox_config,
    load_init_checkpoint,
    read_upstream_state_dict,
)


def random_batch(seed: int = 0) -> dict[str, torch.Tensor]:
    """Two codon records, the second right-padded, with the 2-D mask transformers 5 needs."""
    g = torch.Generator().manual_seed(seed)
    input_ids = torch.randint(5, 69, (2, 24), generator=g)
    input_ids[1, 17:] = codons.PAD_ID
    return {"input_ids": input_ids, "attention_mask": (input_ids != codons.PAD_ID).long()}


@torch.no_grad()
def logits_of(model, batch) -> torch.Tensor:
    return model.eval()(**batch).logits


# -- building ---------------------------------------------------------------------------


def test_25m_built_on_cpu_has_the_formula_count():
    model = build_model("genslm_25M")
    assert sum(p.numel() for p in model.parameters()) == 25_290_752
    assert count_params(model) == get_architecture("genslm_25M").num_params()


def test_250m_built_on_meta_has_the_formula_count():
    model = build_model("genslm_250M", device="meta")
    assert all(p.is_meta for p in model.parameters())
    assert sum(p.numel() for p in model.parameters()) == 253_429_376


def test_25b_cannot_be_built_and_says_why():
    with pytest.raises(DstrainError) as info:
        build_model("genslm_25B", device="meta")
    message = str(info.value)
    assert "cannot build genslm_25B" in message
    assert "not divisible by the number of attention heads" in message  # transformers' words
    assert "hidden_size 8196 is not divisible by num_heads 64" in message
    assert "dstrain estimate" in message and "genslm_2.5B" in message


def test_tiny_model_is_fp32_with_genslm_settings(tiny_model):
    assert count_params(tiny_model) == 108_928
    assert {p.dtype for p in tiny_model.parameters()} == {torch.float32}
    config = tiny_model.config
    assert config.hidden_act == "gelu_fast"
    assert config.rope_parameters["partial_rotary_factor"] == 0.25
    assert config.rope_parameters["rope_theta"] == 10000
    assert config.use_parallel_residual is True
    assert config.tie_word_embeddings is False
    assert config.layer_norm_eps == 1e-5
    assert config.max_position_embeddings == 2048
    assert (config.hidden_dropout, config.attention_dropout) == (0.0, 0.0)
    assert config.dtype == torch.float32
    # bos/eos 0 ([UNK]) as in upstream's configs; pad is [PAD].
    assert (config.bos_token_id, config.eos_token_id, config.pad_token_id) == (0, 0, 3)
    assert (codons.UNK_ID, codons.PAD_ID) == (0, 3)
    # Sampling never picks a special token (the ids of every one of them are suppressed).
    special = [codons.TOKEN_TO_ID[t] for t in codons.SPECIAL_TOKENS]
    assert sorted(tiny_model.generation_config.suppress_tokens) == sorted(special)
    assert tiny_model.generation_config.eos_token_id == 0
    # Untied: the head is its own tensor, not a view of the input embedding.
    assert tiny_model.lm_head.weight.data_ptr() != tiny_model.gpt_neox.embed_in.weight.data_ptr()
    # Rotary buffers are rebuilt, never saved.
    assert not any("inv_freq" in k for k in tiny_model.state_dict())


def test_fp32_even_when_torch_default_is_bf16():
    previous = torch.get_default_dtype()
    torch.set_default_dtype(torch.bfloat16)
    try:
        model = build_model("genslm_tiny")
    finally:
        torch.set_default_dtype(previous)
    assert {p.dtype for p in model.parameters()} == {torch.float32}


def test_gpt_neox_config_round_trips_through_json(tmp_path):
    gpt_neox_config(get_architecture("genslm_tiny")).save_pretrained(tmp_path)
    saved = json.loads((tmp_path / "config.json").read_text())
    assert saved["hidden_act"] == "gelu_fast"
    assert saved["dtype"] == "float32"
    assert saved["rope_parameters"]["partial_rotary_factor"] == 0.25


def test_tiny_model_trains_a_step(tiny_model):
    batch = random_batch()
    labels = batch["input_ids"].masked_fill(batch["attention_mask"] == 0, -100)
    loss = tiny_model.train()(**batch, labels=labels).loss
    loss.backward()
    assert torch.isfinite(loss)
    assert tiny_model.lm_head.weight.grad.abs().sum() > 0


# -- official checkpoints ----------------------------------------------------------------


@pytest.mark.parametrize(
    ("prefix", "lightning"),
    [("model.", True), ("", True), ("model.", False), ("", False)],
    ids=["lightning-prefixed", "lightning-bare-keys", "state-dict-prefixed", "state-dict-bare"],
)
def test_upstream_checkpoint_converts_with_identical_logits(
    tiny_model, make_upstream_checkpoint, tmp_path, prefix, lightning
):
    src = make_upstream_checkpoint(
        tiny_model, tmp_path / "up.pt", prefix=prefix, lightning=lightning
    )
    out = tmp_path / "hf"
    result = convert_checkpoint(src, "genslm_tiny", out, trust_checkpoint=lightning)
    assert (result.out_dir, result.num_params) == (out, 108_928)
    assert (out / "model.safetensors").is_file() and (out / "config.json").is_file()

    loaded = AutoModelForCausalLM.from_pretrained(out)
    assert {p.dtype for p in loaded.parameters()} == {torch.float32}
    batch = random_batch()
    torch.testing.assert_close(logits_of(loaded, batch), logits_of(tiny_model, batch))

    tokenizer = AutoTokenizer.from_pretrained(out)
    assert tokenizer.get_vocab() == codons.TOKEN_TO_ID
    assert tokenizer.pad_token_id == codons.PAD_ID
    assert not [p.name for p in tmp_path.iterdir() if p.name.startswith(".")]  # no leftovers


def test_read_upstream_state_dict_normalizes_keys(tiny_model, make_upstream_checkpoint, tmp_path):
    src = make_upstream_checkpoint(tiny_model, tmp_path / "up.pt")
    state = read_upstream_state_dict(src, trust_checkpoint=True)
    assert set(state) == set(tiny_model.state_dict())
    assert "lm_head.weight" in state
    assert not [k for k in state if "masked_bias" in k or "inv_freq" in k or k.startswith("model.")]


def test_untrusted_pickle_is_refused_with_the_reason(
    tiny_model, make_upstream_checkpoint, tmp_path
):
    src = make_upstream_checkpoint(tiny_model, tmp_path / "up.pt")
    with pytest.raises(DstrainError) as info:
        convert_checkpoint(src, "genslm_tiny", tmp_path / "hf")
    message = str(info.value)
    assert "--trust-checkpoint" in message
    assert "pathlib.PosixPath" in message and "arbitrary code" in message
    assert not (tmp_path / "hf").exists()


def test_checkpoint_of_another_size_names_tensors_and_the_right_model(
    make_upstream_checkpoint, tmp_path
):
    small = build_model("genslm_small")
    src = make_upstream_checkpoint(small, tmp_path / "small.pt")
    out = tmp_path / "hf"
    with pytest.raises(DstrainError) as info:
        convert_checkpoint(src, "genslm_tiny", out, trust_checkpoint=True)
    message = str(info.value)
    assert "does not fit genslm_tiny (108,928 parameters)" in message
    assert (
        "gpt_neox.embed_in.weight is [69, 128] in the checkpoint but [69, 64] in the model"
        in message
    )
    assert "unexpected tensor(s): gpt_neox.layers.2." in message
    assert "pass --model genslm_small" in message
    assert not out.exists()
    assert list(tmp_path.iterdir()) == [src]  # no temporary directory left behind


def test_fp16_checkpoint_loads_into_fp32(tiny_model, tmp_path):
    # Upstream's configs say torch_dtype float16; weights saved in half precision load
    # into the fp32 model exactly (each fp16 value is representable in fp32).
    torch.save({k: v.half() for k, v in tiny_model.state_dict().items()}, tmp_path / "h.pt")
    model = load_init_checkpoint("genslm_tiny", tmp_path / "h.pt")
    assert {p.dtype for p in model.parameters()} == {torch.float32}
    torch.testing.assert_close(
        model.lm_head.weight, tiny_model.lm_head.weight.half().float(), rtol=0, atol=0
    )


def test_missing_tensor_is_named(tiny_model, tmp_path):
    state = {"model." + k: v for k, v in tiny_model.state_dict().items()}
    del state["model.gpt_neox.final_layer_norm.bias"]
    torch.save({"state_dict": state}, tmp_path / "cut.pt")
    with pytest.raises(
        DstrainError, match=r"1 missing tensor\(s\): gpt_neox\.final_layer_norm\.bias"
    ):
        load_init_checkpoint("genslm_tiny", tmp_path / "cut.pt")


def test_missing_file_is_named(tmp_path):
    with pytest.raises(DstrainError, match=r"checkpoint .*absent\.pt does not exist"):
        read_upstream_state_dict(tmp_path / "absent.pt")
    with pytest.raises(DstrainError, match=r"absent\.pt does not exist"):
        convert_checkpoint(tmp_path / "absent.pt", "genslm_tiny", tmp_path / "hf")


def test_garbage_file_is_refused(tmp_path):
    (tmp_path / "junk.pt").write_bytes(b"not a checkpoint")
    with pytest.raises(DstrainError, match=r"junk\.pt"):
        read_upstream_state_dict(tmp_path / "junk.pt", trust_checkpoint=True)


def test_hf_directory_is_an_init_checkpoint_for_the_same_architecture(
    tiny_model, make_upstream_checkpoint, tmp_path
):
    src = make_upstream_checkpoint(tiny_model, tmp_path / "up.pt", lightning=False)
    convert_checkpoint(src, "genslm_tiny", tmp_path / "hf")
    torch.manual_seed(1)
    model = load_init_checkpoint(build_model("genslm_tiny"), tmp_path / "hf")
    batch = random_batch()
    torch.testing.assert_close(logits_of(model, batch), logits_of(tiny_model, batch))

    with pytest.raises(DstrainError) as info:
        load_init_checkpoint("genslm_small", tmp_path / "hf")
    message = str(info.value)
    assert "holds a different architecture than genslm_small" in message
    assert "hidden_size: 128 vs 64" in message and "pass --model genslm_tiny" in message


def test_output_directory_is_replaced_only_when_asked(
    tiny_model, make_upstream_checkpoint, tmp_path
):
    src = make_upstream_checkpoint(tiny_model, tmp_path / "up.pt", lightning=False)
    out = tmp_path / "hf"
    convert_checkpoint(src, "genslm_tiny", out)
    (out / "marker").write_text("old export")
    with pytest.raises(DstrainError, match="pass --overwrite"):
        convert_checkpoint(src, "genslm_tiny", out)
    assert (out / "marker").exists()

    convert_checkpoint(src, "genslm_tiny", out, overwrite=True)
    assert not (out / "marker").exists() and (out / "model.safetensors").is_file()

    not_a_model = tmp_path / "home"
    not_a_model.mkdir()
    (not_a_model / "notes.txt").write_text("keep me")
    with pytest.raises(DstrainError, match="not a model directory"):
        convert_checkpoint(src, "genslm_tiny", not_a_model, overwrite=True)
    assert (not_a_model / "notes.txt").read_text() == "keep me"


# -- CLI ----------------------------------------------------------------------------------


def test_cli_convert_checkpoint(tiny_model, make_upstream_checkpoint, tmp_path, capsys):
    src = make_upstream_checkpoint(tiny_model, tmp_path / "up.pt")
    out = tmp_path / "hf"
    main(
        [
            "convert-checkpoint",
            str(src),
            "--model",
            "genslm_tiny",
            "-o",
            str(out),
            "--trust-checkpoint",
        ]
    )
    printed = capsys.readouterr().out
    assert str(out) in printed and "108,928 parameters" in printed
    assert (out / "model.safetensors").is_file()


def test_cli_convert_checkpoint_errors_without_traceback(
    tiny_model, make_upstream_checkpoint, tmp_path, capsys
):
    src = make_upstream_checkpoint(tiny_model, tmp_path / "up.pt")
    with pytest.raises(SystemExit) as info:
        main(["convert-checkpoint", str(src), "--model", "genslm_tiny", "-o", str(tmp_path / "hf")])
    assert info.value.code == 1
    err = capsys.readouterr().err
    assert err.startswith("error: checkpoint") and "--trust-checkpoint" in err
    assert "Traceback" not in err

    with pytest.raises(SystemExit) as info:
        main(["convert-checkpoint", str(src), "--model", "genslm_26M", "-o", str(tmp_path / "hf")])
    assert info.value.code == 1
    assert "Did you mean 'genslm_25M'?" in capsys.readouterr().err
