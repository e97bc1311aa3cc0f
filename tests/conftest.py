"""Shared pytest fixtures.

One section per area, each marked by a comment rule; add fixtures to your own section
(or a new one) and leave the others' as they are. Import torch, transformers and
deepspeed inside fixtures, never at module level: the pure (L0) tests must not pay for
them.
"""

from __future__ import annotations

import pathlib

import pytest

# -- GenSLM models (dstrain.model) -----------------------------------------------------


@pytest.fixture
def tiny_model():
    """A fresh `genslm_tiny` GPTNeoXForCausalLM: fp32, CPU, eval mode, seed-0 weights."""
    import torch

    from dstrain.model import build_model

    torch.manual_seed(0)
    return build_model("genslm_tiny").eval()


@pytest.fixture
def make_upstream_checkpoint():
    """Write a model as an official GenSLM checkpoint would be laid out; returns the path.

    `make_upstream_checkpoint(model, path, prefix="model.", lightning=True)`: keys get
    `prefix`, the head is named `embed_out`, and each layer carries the buffers
    transformers 4.2x saved (`attention.bias`, `attention.masked_bias`,
    `attention.rotary_emb.inv_freq`). With `lightning`, the state dict sits in a
    Lightning dict whose hyper-parameters hold a `pathlib.Path`, so
    `torch.load(weights_only=True)` refuses the file, as it does upstream's.
    """
    import torch

    def write(model, path, *, prefix: str = "model.", lightning: bool = True) -> pathlib.Path:
        state = {}
        for key, tensor in model.state_dict().items():
            name = (
                "embed_out." + key.removeprefix("lm_head.") if key.startswith("lm_head.") else key
            )
            state[prefix + name] = tensor.detach().clone()
        rotary_dims = int(model.config.hidden_size // model.config.num_attention_heads * 0.25)
        for i in range(model.config.num_hidden_layers):
            layer = f"{prefix}gpt_neox.layers.{i}.attention."
            state[layer + "bias"] = torch.tril(torch.ones(8, 8, dtype=torch.bool)).view(1, 1, 8, 8)
            state[layer + "masked_bias"] = torch.tensor(-1e9)
            state[layer + "rotary_emb.inv_freq"] = torch.rand(rotary_dims // 2)
        obj = state
        if lightning:
            obj = {
                "epoch": 3,
                "global_step": 1000,
                "pytorch-lightning_version": "1.6.5",
                "state_dict": state,
                "hyper_parameters": {"checkpoint_dir": pathlib.Path("/upstream/runs/x")},
            }
        path = pathlib.Path(path)
        torch.save(obj, path)
        return path

    return write


# -- end of GenSLM models ---------------------------------------------------------------


# -- fp16 loss scaling on CPU (tests/test_train.py, tests/test_report.py) ---------------
# DeepSpeed refuses fp16 on CPU ("Type fp16 is not supported on your device"); these
# fixtures patch only that accelerator check, and inject inf gradients with a hook on one
# weight (the only way to force an overflow on demand).


@pytest.fixture
def fp16_on_cpu(monkeypatch):
    """DeepSpeed's CPU accelerator reports fp16 support: the only thing patched."""
    from deepspeed.accelerator import get_accelerator

    monkeypatch.setattr(type(get_accelerator()), "is_fp16_supported", lambda self: True)


@pytest.fixture
def inject_inf(monkeypatch):
    """Make `build_model` return a model whose gradient is inf on chosen backward passes."""
    import torch

    import dstrain.model

    real_build = dstrain.model.build_model
    calls = {"backward": 0, "poison": set()}

    def build(*args, **kwargs):
        model = real_build(*args, **kwargs)
        weight = model.gpt_neox.embed_in.weight

        def hook(grad):
            calls["backward"] += 1
            if calls["backward"] in calls["poison"] or "all" in calls["poison"]:
                return torch.full_like(grad, float("inf"))
            return grad

        weight.register_hook(hook)
        return model

    monkeypatch.setattr(dstrain.model, "build_model", build)
    return calls


# -- end of fp16 loss scaling -----------------------------------------------------------
