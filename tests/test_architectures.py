"""The GenSLM architecture registry: pure numbers, no torch."""

from __future__ import annotations

import dataclasses
import json
import subprocess
import sys

import pytest

from dstrain.architectures import (
    ARCHITECTURES,
    GenSLMArchitecture,
    architecture_from_hf_config,
    get_architecture,
    names_with_shape,
    resolve_architecture,
)
from dstrain.errors import DstrainError

# Upstream's neox_25,290,752.json as transformers 4.21 wrote it (bos/eos 0, BERT dropouts).
UPSTREAM_25M_CONFIG = {
    "architectures": ["GPTNeoXForCausalLM"],
    "hidden_size": 512,
    "num_attention_heads": 8,
    "num_hidden_layers": 8,
    "max_position_embeddings": 2048,
    "attention_probs_dropout_prob": 0.1,
    "bos_token_id": 0,
    "eos_token_id": 0,
    "hidden_act": "gelu_fast",
    "hidden_dropout_prob": 0.1,
    "initializer_range": 0.02,
    "intermediate_size": 2048,
    "layer_norm_eps": 1e-05,
    "model_type": "gpt_neox",
    "rotary_emb_base": 10000,
    "rotary_pct": 0.25,
    "tie_word_embeddings": False,
    "torch_dtype": "float16",
    "transformers_version": "4.21.1",
    "use_cache": True,
    "vocab_size": 69,
}


@pytest.mark.parametrize(
    ("name", "params"),
    [
        ("genslm_25M", 25_290_752),
        ("genslm_250M", 253_429_376),  # upstream's file says 244,464,576
        ("genslm_2.5B", 2_533_931_008),
        ("genslm_25B", 25_595_734_832),  # upstream's file says 25,076,188,032
        ("genslm_tiny", 108_928),
        ("genslm_small", 811_008),
    ],
)
def test_num_params_formula(name, params):
    assert get_architecture(name).num_params() == params


def test_num_params_by_hand_for_25m():
    # 69*512 embeddings + 8 layers + final LayerNorm + 69*512 head:
    # per layer 4*512 + (512*1536 + 1536) + (512*512 + 512) + (512*2048 + 2048) + (2048*512 + 512)
    per_layer = 2048 + 787_968 + 262_656 + 1_050_624 + 1_049_088
    assert get_architecture("genslm_25M").num_params() == 2 * 35_328 + 8 * per_layer + 1024


def test_shared_genslm_settings():
    for arch in ARCHITECTURES.values():
        assert (arch.vocab_size, arch.hidden_act, arch.rotary_pct) == (69, "gelu_fast", 0.25)
        assert (arch.rotary_emb_base, arch.max_position_embeddings) == (10000, 2048)
        assert arch.layer_norm_eps == 1e-5
        assert arch.description


def test_only_25b_is_estimate_only():
    assert [n for n, a in ARCHITECTURES.items() if not a.buildable] == ["genslm_25B"]
    reason = get_architecture("genslm_25B").why_not_buildable
    assert "8196" in reason and "64" in reason and "128.1" in reason
    assert get_architecture("genslm_25M").why_not_buildable is None
    assert get_architecture("genslm_25M").head_dim == 64
    assert get_architecture("genslm_2.5B").head_dim == 120


def test_architecture_is_frozen():
    with pytest.raises(dataclasses.FrozenInstanceError):
        get_architecture("genslm_25M").hidden_size = 1


def test_unknown_name_suggests_the_close_one():
    with pytest.raises(DstrainError) as info:
        get_architecture("genslm_25m")
    message = str(info.value)
    assert "Did you mean 'genslm_25M'?" in message
    assert "genslm_250M" in message and "genslm_tiny" in message


def test_unknown_name_without_a_close_one():
    with pytest.raises(DstrainError, match="unknown model architecture 'llama'") as info:
        get_architecture("llama")
    assert "Did you mean" not in str(info.value)


def test_upstream_config_file_reads_as_25m(tmp_path):
    path = tmp_path / "neox_25,290,752.json"
    path.write_text(json.dumps(UPSTREAM_25M_CONFIG, indent=4))
    arch = architecture_from_hf_config(path)
    assert arch.name == "neox_25,290,752"
    assert arch.differences(get_architecture("genslm_25M")) == []
    assert arch.num_params() == 25_290_752
    assert names_with_shape(arch) == ["genslm_25M"]


def test_transformers5_config_and_model_dir(tmp_path):
    cfg = {k: v for k, v in UPSTREAM_25M_CONFIG.items() if not k.startswith("rotary")}
    cfg["rope_parameters"] = {
        "rope_theta": 10000,
        "partial_rotary_factor": 0.5,
        "rope_type": "default",
    }
    (tmp_path / "my_export").mkdir()
    (tmp_path / "my_export" / "config.json").write_text(json.dumps(cfg))
    arch = architecture_from_hf_config(tmp_path / "my_export")
    assert arch.name == "my_export"
    assert arch.rotary_pct == 0.5
    assert arch.differences(get_architecture("genslm_25M")) == ["rotary_pct: 0.5 vs 0.25"]


def test_config_dict_positions_do_not_count_as_a_difference():
    arch = architecture_from_hf_config({**UPSTREAM_25M_CONFIG, "max_position_embeddings": 10240})
    assert arch.name == "custom"
    assert arch.max_position_embeddings == 10240
    assert arch.differences(get_architecture("genslm_25M")) == []


def test_config_problems_are_reported_together():
    cfg = {**UPSTREAM_25M_CONFIG, "tie_word_embeddings": True, "num_attention_heads": 0}
    cfg.update(layer_norm_eps=-1, hidden_act=3, rotary_pct=2)
    del cfg["hidden_size"]
    with pytest.raises(DstrainError) as info:
        architecture_from_hf_config(cfg)
    message = str(info.value)
    assert "hidden_size is missing" in message
    assert "num_attention_heads must be a positive integer, got 0" in message
    assert "tie_word_embeddings is True; GenSLM models use false" in message
    assert "layer_norm_eps must be a positive number, got -1" in message
    assert "hidden_act must be a string, got 3" in message
    assert "rotary_pct must be in (0, 1], got 2" in message


def test_upstream_25b_file_with_python_true_is_named(tmp_path):
    # Upstream's neox_25,076,188,032.json has `"use_deepspeed_checkpointing": True`.
    path = tmp_path / "neox_25,076,188,032.json"
    path.write_text('{\n  "hidden_size": 8196,\n  "use_deepspeed_checkpointing": True\n}\n')
    with pytest.raises(DstrainError, match=r"neox_25,076,188,032\.json:3:\d+ is not valid JSON"):
        architecture_from_hf_config(path)


def test_missing_config_file_is_named(tmp_path):
    with pytest.raises(DstrainError, match=r"nope\.json does not exist"):
        architecture_from_hf_config(tmp_path / "nope.json")


def test_resolve_architecture(tmp_path):
    arch = get_architecture("genslm_tiny")
    assert resolve_architecture(arch) is arch
    assert resolve_architecture("genslm_tiny") is arch
    path = tmp_path / "c.json"
    path.write_text(json.dumps(UPSTREAM_25M_CONFIG))
    assert resolve_architecture(str(path)).num_params() == 25_290_752
    with pytest.raises(DstrainError, match="Did you mean 'genslm_tiny'"):
        resolve_architecture("genslm_tin")


def test_one_message_for_an_unknown_model_value():
    """train, estimate and convert-checkpoint all resolve --model here: one message that
    names the value, the registered names and the case rule."""
    with pytest.raises(DstrainError) as info:
        resolve_architecture("genslm_2.5b")
    message = str(info.value)
    assert "--model genslm_2.5b" in message
    assert "Did you mean 'genslm_2.5B'? Names are case-sensitive" in message
    assert all(name in message for name in ARCHITECTURES)
    with pytest.raises(DstrainError) as again:
        get_architecture("genslm_2.5b")
    assert str(again.value) == message


def test_custom_architecture_counts_like_the_formula():
    arch = GenSLMArchitecture("x", hidden_size=8, num_layers=1, num_heads=2, intermediate_size=16)
    # 69*8 + (32 + 8*24+24 + 8*8+8 + 8*16+16 + 16*8+8) + 16 + 8*69
    assert arch.num_params() == 552 + 600 + 16 + 552


def test_import_stays_pure():
    code = "import sys, dstrain.architectures; print(sorted({'torch', 'transformers'} & set(sys.modules)))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"


def test_built_config_has_upstreams_bos_and_eos():
    from dstrain.model import gpt_neox_config

    config = gpt_neox_config(get_architecture("genslm_25M"))
    upstream = (UPSTREAM_25M_CONFIG["bos_token_id"], UPSTREAM_25M_CONFIG["eos_token_id"])
    assert (config.bos_token_id, config.eos_token_id) == upstream
