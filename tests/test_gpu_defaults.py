"""GPU-ready defaults, decided on CPU: which Adam `dstrain train` hands DeepSpeed per device,
the refusal of emulated bf16, SDPA attention. One JSON fits any machine: a generated config
leaves `torch_adam` out and the choice is made at train time.

This machine has no GPU. The choices are pure functions of the config and a device type,
so the CUDA cases pass the string "cuda" (nothing runs on a GPU), and the two tests of the
device probes in dstrain/train.py fake only what needs CUDA: `torch.cuda.is_available`,
`device_count` and `is_bf16_supported` are monkeypatched to describe a V100 (bf16 emulated
only) or an H100; nothing else is faked, and the model and the refusal are real.
"""

from __future__ import annotations

import pytest

from dstrain.ds_check import check_ds_config
from dstrain.ds_config import build_ds_config
from dstrain.ds_run import (
    FUSED_ADAM_JIT,
    CheckedConfig,
    check_device_precision,
    choose_optimizer,
    resolve_ds_run,
)
from dstrain.errors import DstrainError
from dstrain.settings import make_deepspeed_settings


def generated(**settings) -> dict:
    """A config as `dstrain gen-config` writes it for these settings."""
    return build_ds_config(make_deepspeed_settings(settings))


def params(config: dict) -> dict:
    return config["optimizer"]["params"]


# --------------------------------------------------------------------------------------
# The generated JSON: torch_adam only when asked for (or forced by the offload)
# --------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("optimizer", "offload", "written"),
    [
        ({}, "none", None),  # auto: no key
        ({"torch_adam": True}, "none", True),  # --torch-adam
        ({"torch_adam": False}, "none", False),  # --fused-adam
        ({}, "cpu", False),  # offload: DeepSpeed's CPU Adam, whatever was asked
        ({"torch_adam": True}, "cpu", False),
    ],
)
def test_generated_config_writes_torch_adam_only_when_decided(optimizer, offload, written):
    config = generated(
        optimizer=optimizer,
        zero_optimization={"stage": 2, "offload_optimizer": {"device": offload}},
    )
    assert params(config).get("torch_adam", "absent") == ("absent" if written is None else written)
    assert resolve_ds_run(config).optimizer.torch_adam is written
    assert [p for p in check_ds_config(config) if p.severity == "error"] == []


# --------------------------------------------------------------------------------------
# choose_optimizer: the config handed to DeepSpeed on each device, and the banner's words
# --------------------------------------------------------------------------------------


def test_cpu_turns_an_auto_adam_into_torch_adamw_without_touching_the_input():
    config = generated()
    before = repr(config)
    chosen, described = choose_optimizer(config, "cpu")
    assert described == "torch AdamW"
    assert params(chosen)["torch_adam"] is True
    assert {k: v for k, v in params(chosen).items() if k != "torch_adam"} == params(config)
    assert repr(config) == before  # the run directory's ds_config.json stays auto
    assert resolve_ds_run(chosen).optimizer.torch_adam is True


def test_cuda_keeps_fused_adam_and_says_it_is_built_once():
    # No GPU needed: the device is a string here.
    config = generated()
    chosen, described = choose_optimizer(config, "cuda")
    assert chosen == config and "torch_adam" not in params(chosen)
    assert described == f"FusedAdam ({FUSED_ADAM_JIT})"
    assert "JIT-built" in described and "torch_extensions" in described
    _, prebuilt = choose_optimizer(config, "cuda", fused_adam="prebuilt in the DeepSpeed wheel")
    assert prebuilt == "FusedAdam (prebuilt in the DeepSpeed wheel)"


def test_cuda_without_a_toolkit_falls_back_to_torch_adamw_and_says_why():
    chosen, described = choose_optimizer(generated(), "cuda", fused_adam_problem="no nvcc")
    assert params(chosen)["torch_adam"] is True
    assert described == "torch AdamW (FusedAdam unavailable: no nvcc)"


@pytest.mark.parametrize("device", ["cpu", "cuda"])
def test_an_explicit_choice_or_the_offload_is_honoured_on_every_device(device):
    for settings, described in [
        ({"optimizer": {"torch_adam": True}}, "torch AdamW"),
        ({"optimizer": {"torch_adam": False}}, f"FusedAdam (torch_adam false; {FUSED_ADAM_JIT})"),
        (
            {"zero_optimization": {"stage": 2, "offload_optimizer": {"device": "cpu"}}},
            "DeepSpeed CPUAdam (optimizer offload; JIT-built on first use)",
        ),
    ]:
        config = generated(**settings)
        assert choose_optimizer(config, device) == (config, described), settings


def test_foreign_optimizers_and_plain_adam_are_named_as_built():
    sgd = {"train_micro_batch_size_per_gpu": 1, "optimizer": {"type": "SGD", "params": {}}}
    assert choose_optimizer(sgd, "cpu") == (sgd, "SGD (from the config)")
    adam = {"train_micro_batch_size_per_gpu": 1, "optimizer": {"type": "Adam"}}
    chosen, described = choose_optimizer(adam, "cpu")
    assert described == "torch AdamW"  # DeepSpeed's adam_w_mode defaults to true
    assert chosen["optimizer"] == {"type": "Adam", "params": {"torch_adam": True}}
    plain = {**adam, "optimizer": {"type": "adam", "params": {"adam_w_mode": False}}}
    assert choose_optimizer(plain, "cpu")[1] == "torch Adam"
    none = {"train_micro_batch_size_per_gpu": 1}
    assert choose_optimizer(none, "cuda")[0] == none


@pytest.mark.parametrize("value", ["false", None, 0])
def test_ds_check_refuses_a_torch_adam_that_is_not_a_bool(value):
    """DeepSpeed reads torch_adam by its truth: "false" would build torch's AdamW."""
    config = generated(optimizer={"torch_adam": True})
    params(config)["torch_adam"] = value
    errors = [p for p in check_ds_config(config) if p.severity == "error"]
    assert [p.path for p in errors] == ["optimizer.params.torch_adam"]
    assert "leave it out" in errors[0].fix


# --------------------------------------------------------------------------------------
# bf16 only where the GPU has it
# --------------------------------------------------------------------------------------


def checked(precision: str) -> CheckedConfig:
    config = generated(precision=precision)
    return CheckedConfig(config, resolve_ds_run(config), "ds.json")


def test_bf16_on_a_gpu_without_native_bf16_is_refused_naming_fp16():
    with pytest.raises(DstrainError, match="--fp16") as caught:
        check_device_precision(checked("bf16").run, "cuda", native_bf16=False, source="ds.json")
    assert "ds.json" in str(caught.value) and "compute capability 8.0" in str(caught.value)
    for precision, device, native in [
        ("bf16", "cuda", True),
        ("bf16", "cpu", False),  # CPU behaviour unchanged
        ("fp16", "cuda", False),
        ("fp32", "cuda", False),
    ]:
        check_device_precision(checked(precision).run, device, native_bf16=native, source="x")


def fake_gpu(monkeypatch, *, native_bf16: bool) -> None:
    """torch.cuda as a one-GPU machine sees it (faked: this machine has no GPU). A V100
    (native_bf16=False) emulates bf16: torch's is_bf16_supported() is True by default
    and False with including_emulation=False."""
    import torch

    monkeypatch.delenv("DS_ACCELERATOR", raising=False)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)
    monkeypatch.setattr(
        torch.cuda,
        "is_bf16_supported",
        lambda including_emulation=True: native_bf16 or including_emulation,
    )


def test_dstrain_train_refuses_emulated_bf16_before_building_anything(monkeypatch):
    """build_engine on a faked V100 (torch.cuda functions monkeypatched, see fake_gpu):
    the refusal comes before the model is built and before deepspeed.initialize."""
    import deepspeed

    import dstrain.model
    from dstrain.architectures import resolve_architecture
    from dstrain.settings import TrainSettings
    from dstrain.train import build_engine, train_ds_config

    fake_gpu(monkeypatch, native_bf16=False)

    def never(*_args, **_kwargs):
        raise AssertionError("built past the precision check")

    monkeypatch.setattr(dstrain.model, "build_model", never)
    monkeypatch.setattr(deepspeed, "initialize", never)
    with pytest.raises(DstrainError, match=r"no native bf16.*--fp16"):
        build_engine(resolve_architecture("genslm_tiny"), TrainSettings(), checked("bf16"))
    # Without --deepspeed_config the device picks: fp32 on this GPU, bf16 on an H100.
    assert train_ds_config({}, demo=False, world_size=1).run.precision == "fp32"
    fake_gpu(monkeypatch, native_bf16=True)
    assert train_ds_config({}, demo=False, world_size=1).run.precision == "bf16"


def test_fused_adam_needs_a_cuda_toolkit_to_be_built(monkeypatch):
    import torch.utils.cpp_extension
    from deepspeed.git_version_info import installed_ops

    from dstrain.train import fused_adam_status

    monkeypatch.setitem(installed_ops, "fused_adam", False)
    monkeypatch.setattr(torch.utils.cpp_extension, "CUDA_HOME", None)
    how, problem = fused_adam_status()
    assert "JIT-built" in how and "nvcc" in problem
    monkeypatch.setitem(installed_ops, "fused_adam", True)
    assert fused_adam_status() == ("prebuilt in the DeepSpeed wheel", None)


def test_a_fused_adam_that_fails_to_build_falls_back_to_torch_adamw(monkeypatch):
    """On a faked H100 (fake_gpu) with a toolkit present, the build is announced, probed
    before the model exists, and a failure (e.g. an nvcc that does not match torch's CUDA)
    gives torch AdamW with the reason instead of a crash inside deepspeed.initialize."""
    import dstrain.train as train

    fake_gpu(monkeypatch, native_bf16=True)
    monkeypatch.setattr(train, "fused_adam_status", lambda: (FUSED_ADAM_JIT, None))
    said: list[str] = []
    monkeypatch.setattr(train, "probe_fused_adam", lambda: "its build failed: nvcc 12.2 != 13.0")
    config, text = train.device_config(checked("bf16"), said.append)
    assert params(config)["torch_adam"] is True
    assert text == "torch AdamW (FusedAdam unavailable: its build failed: nvcc 12.2 != 13.0)"
    assert said and "FusedAdam" in said[0]
    monkeypatch.setattr(train, "probe_fused_adam", lambda: None)
    config, text = train.device_config(checked("bf16"), said.append)
    assert "torch_adam" not in params(config) and text.startswith("FusedAdam")


@pytest.mark.slow
def test_the_engine_builds_the_optimizer_the_banner_names():
    """Through the real deepspeed.initialize on CPU: an auto block gives torch's AdamW
    (not a JIT-built FusedAdam), and build_engine says so."""
    import torch

    from dstrain.architectures import resolve_architecture
    from dstrain.ds_runtime import prepare_deepspeed
    from dstrain.settings import TrainSettings
    from dstrain.train import build_engine

    prepare_deepspeed(timeout_s=120)
    engine, text = build_engine(
        resolve_architecture("genslm_tiny"), TrainSettings(), checked("bf16")
    )
    assert type(engine.basic_optimizer) is torch.optim.AdamW and text == "torch AdamW"


# --------------------------------------------------------------------------------------
# SDPA attention
# --------------------------------------------------------------------------------------


def test_models_use_sdpa_by_name_and_match_eager_on_a_padded_batch():
    import torch

    from dstrain.model import build_model

    torch.manual_seed(0)
    sdpa = build_model("genslm_tiny").eval()
    assert sdpa.config._attn_implementation == "sdpa"
    eager = build_model("genslm_tiny", attn_implementation="eager").eval()
    assert eager.config._attn_implementation == "eager"
    eager.load_state_dict(sdpa.state_dict())
    ids = torch.randint(5, 69, (2, 10))
    mask = torch.ones_like(ids)
    mask[1, 6:] = 0  # a padded row
    with torch.no_grad():
        a = sdpa(input_ids=ids, attention_mask=mask).logits
        b = eager(input_ids=ids, attention_mask=mask).logits
    real = mask.bool()
    torch.testing.assert_close(a[real], b[real], atol=1e-5, rtol=1e-5)
