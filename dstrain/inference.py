"""Load a trained GenSLM model for inference (embedding, generation), from any source.

Heavy layer (L1): torch and transformers. `load_model(spec)` accepts

- an HF / dstrain export directory (`config.json` + `model.safetensors`, sharded
  safetensors or `pytorch_model.bin`), as `dstrain export` and `convert-checkpoint` write;
- a dstrain training checkpoint: a run directory, its `checkpoints/` directory or one step
  directory inside it. It is verified against its manifest (`trust_checkpoint` accepts one
  without) and consolidated to fp32 in memory the way `dstrain export` does, without
  writing anything;
- an upstream DeepSpeed checkpoint directory or an official upstream `.pt` file: these do
  not record their shape, so they need `model_name` (e.g. `genslm_25M`), and, since
  upstream's files need full unpickling, `trust_checkpoint` (see `dstrain.model`).

The model comes back in eval mode on the requested device and dtype. `pick_device()`
chooses CUDA when there is one (bf16 where the GPU supports it) and the CPU (fp32) otherwise.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

import torch
from transformers import GPTNeoXForCausalLM

from dstrain.architectures import GenSLMArchitecture
from dstrain.errors import DstrainError


@dataclass(frozen=True)
class LoadedModel:
    model: GPTNeoXForCausalLM
    architecture: GenSLMArchitecture
    source: str
    step: int | None


def pick_device(device: str | torch.device | None = None) -> tuple[torch.device, torch.dtype]:
    """(device, dtype) for inference: `device` if given (else CUDA when available, else the
    CPU); bf16 on a GPU that supports it, fp32 otherwise (CPU bf16 is slow, not smaller)."""
    if device is None or str(device) == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    dev = torch.device(device)
    if dev.type == "cuda":
        if not torch.cuda.is_available():
            raise DstrainError(
                f"device {device} was asked for but torch sees no CUDA GPU here; "
                "use --device cpu (or leave --device out to pick automatically)."
            )
        if torch.cuda.is_bf16_supported():
            return dev, torch.bfloat16
    return dev, torch.float32


_DTYPES = {
    "fp32": torch.float32,
    "float32": torch.float32,
    "bf16": torch.bfloat16,
    "bfloat16": torch.bfloat16,
    "fp16": torch.float16,
    "float16": torch.float16,
}


def parse_dtype(dtype: str | torch.dtype | None) -> torch.dtype | None:
    if dtype is None or isinstance(dtype, torch.dtype):
        return dtype
    try:
        return _DTYPES[str(dtype).lower()]
    except KeyError:
        raise DstrainError(f"unknown dtype {dtype!r}; choose one of fp32, bf16, fp16.") from None


def _from_export_dir(path: Path, *, trust_checkpoint: bool) -> tuple[GPTNeoXForCausalLM, str]:
    from dstrain.architectures import architecture_from_hf_config
    from dstrain.model import build_model, load_state_dict_strictly, read_hf_state_dict

    arch = architecture_from_hf_config(path)
    state = read_hf_state_dict(path, trust_checkpoint=trust_checkpoint)
    model = build_model(arch)
    load_state_dict_strictly(model, state, source=f"model directory {path}")
    return model, f"model directory {path}"


def _from_dstrain_checkpoint(
    path: Path, *, trust_checkpoint: bool
) -> tuple[GPTNeoXForCausalLM, str, int | None]:
    from dstrain.export import load_checkpoint_model

    loaded = load_checkpoint_model(path, trust_checkpoint=trust_checkpoint)
    return loaded.model, f"checkpoint {loaded.ckpt_dir / loaded.tag}", loaded.step


def load_model(
    spec: str | os.PathLike[str],
    *,
    model_name: str | None = None,
    trust_checkpoint: bool = False,
    device: str | torch.device = "cpu",
    dtype: str | torch.dtype | None = None,
) -> LoadedModel:
    """Load `spec` (see the module docstring) as an eval-mode GPT-NeoX model.

    `dtype` None keeps fp32 on the CPU and picks bf16 on a GPU that supports it.
    `model_name` is needed for upstream files (they do not record their shape); for an
    export directory or a dstrain checkpoint it must agree with what they record.
    """
    from dstrain.architectures import resolve_architecture
    from dstrain.model import architecture_of, find_deepspeed_checkpoint, load_init_checkpoint

    path = Path(spec)
    if not path.exists():
        raise DstrainError(
            f"model {path} does not exist. Pass an export directory (dstrain export / "
            "convert-checkpoint output, holding config.json), a dstrain run or checkpoint "
            "directory, or an official GenSLM .pt file with --model NAME --trust-checkpoint."
        )
    step = None
    if path.is_dir() and (path / "config.json").is_file():
        model, source = _from_export_dir(path, trust_checkpoint=trust_checkpoint)
    elif path.is_dir():
        found = find_deepspeed_checkpoint(path)
        if found is None:
            raise DstrainError(
                f"{path} is neither a model directory (no config.json) nor a DeepSpeed "
                "checkpoint (no `latest`, checkpoints/ or *model_states.pt). Pass an export "
                "directory, a dstrain run directory or one of its step directories."
            )
        if found[2]:
            model, source, step = _from_dstrain_checkpoint(path, trust_checkpoint=trust_checkpoint)
        else:
            if model_name is None:
                raise DstrainError(
                    f"{path} is a DeepSpeed checkpoint dstrain did not write (upstream "
                    "GenSLM's?), which does not record its shape: pass --model NAME (e.g. "
                    "genslm_25M) and, if you trust the file, --trust-checkpoint."
                )
            model = load_init_checkpoint(
                resolve_architecture(model_name), path, trust_checkpoint=trust_checkpoint
            )
            source = f"DeepSpeed checkpoint {path}"
    else:
        if model_name is None:
            raise DstrainError(
                f"{path} is a single checkpoint file, which does not record the model's "
                "shape: pass --model NAME (e.g. genslm_25M for an official GenSLM 25M .pt) "
                "and, if you trust the file, --trust-checkpoint (upstream .pt files need full "
                "unpickling, which can run code)."
            )
        model = load_init_checkpoint(
            resolve_architecture(model_name), path, trust_checkpoint=trust_checkpoint
        )
        source = f"checkpoint {path}"
    arch = architecture_of(model)
    if model_name is not None:
        wanted = resolve_architecture(model_name)
        diffs = wanted.differences(arch)
        if diffs:
            raise DstrainError(
                f"--model {model_name} does not match {source}: {'; '.join(diffs)}. "
                "Leave --model out for export directories and dstrain checkpoints."
            )
    dev, auto_dtype = pick_device(device)
    model = model.to(device=dev, dtype=parse_dtype(dtype) or auto_dtype)
    model.eval()
    model.requires_grad_(False)
    return LoadedModel(model=model, architecture=arch, source=source, step=step)
