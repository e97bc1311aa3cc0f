"""GenSLM models as transformers GPT-NeoX: build, load official checkpoints, convert.

Heavy layer (L1): torch and transformers. The shapes come from `dstrain.architectures`.

- `build_model("genslm_25M")` builds a `GPTNeoXForCausalLM` in fp32 on the CPU (or on the
  meta device for counting or for sizes that do not fit), with randomly initialised weights;
  `zero_init=ds_config` builds it ZeRO-3 partitioned under `deepspeed.zero.Init`, with the
  same weights.
- `load_init_checkpoint(model, path)` loads an official GenSLM `.pt` checkpoint or an HF
  model directory into it, strictly: every tensor present, nothing extra, same shapes (into
  a partitioned model one module at a time).
- `convert_checkpoint(src, "genslm_25M", out_dir)` writes an HF model directory
  (safetensors + config.json + the codon tokenizer) that
  `AutoModelForCausalLM.from_pretrained(out_dir)` loads.

Upstream checkpoints are PyTorch Lightning files, `{"state_dict": {...}, "hyper_parameters":
{...}, ...}`, whose keys carry the Lightning module's `model.` prefix
(`model.gpt_neox.layers.0.attention.query_key_value.weight`) and which were written by
transformers 4.2x: the LM head is `embed_out` (transformers 5 calls it `lm_head`), and the
causal-mask buffers `attention.bias` / `attention.masked_bias` and the rotary
`rotary_emb.inv_freq` were saved with the weights (transformers 5 rebuilds them).
Their hyper-parameters hold Python objects such as `pathlib.PosixPath`, so
`torch.load(weights_only=True)` refuses them and loading needs full unpickling, which can
run arbitrary code: dstrain does that only when told the file is trusted.
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import io
import json
import os
import pickle
import re
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

import torch
import transformers
from transformers import GPTNeoXConfig, GPTNeoXForCausalLM

from dstrain.architectures import (
    ARCHITECTURES,
    GenSLMArchitecture,
    architecture_from_hf_config,
    names_with_shape,
    resolve_architecture,
)
from dstrain.codons import PAD_ID, SPECIAL_TOKENS, TOKEN_TO_ID, UNK_ID
from dstrain.errors import DstrainError
from dstrain.publish import publish_dir

try:  # transformers 5 validates configs with huggingface_hub's strict dataclasses
    from huggingface_hub.errors import StrictDataclassError as _ConfigError
except ImportError:  # older huggingface_hub: transformers raises ValueError
    _ConfigError = ValueError

UPSTREAM_PREFIXES = ("module.", "_forward_module.", "model.")
"""Wrapper prefixes stripped from checkpoint keys: DeepSpeed's, Lightning's and GenSLM's
Lightning module (`self.model`)."""

UPSTREAM_DROPPED_SUFFIXES = ("attention.bias", "attention.masked_bias", "rotary_emb.inv_freq")
"""Buffers old transformers saved with the weights; transformers 5 recomputes them."""

UPSTREAM_BOS_EOS_ID = UNK_ID
"""bos and eos of upstream's GPT-NeoX configs: 0, the [UNK] token."""

_SHOWN = 8  # tensors listed per kind in a mismatch report


# --------------------------------------------------------------------------------------
# Building
# --------------------------------------------------------------------------------------


def gpt_neox_config(arch: GenSLMArchitecture) -> GPTNeoXConfig:
    """The transformers config for `arch`: GenSLM's settings, codon special ids, fp32.

    Dropout only as `arch` gives it: 0 for every registered architecture (upstream's
    `*_dropout_prob` keys never reached GPT-NeoX). bos/eos are 0 ([UNK]) as in upstream's
    configs, so `generate()` without a prompt starts where upstream's does; pad is [PAD]=3.
    The exported generation settings (`generation_config`) keep every special token,
    these included, out of sampled sequences.
    """
    try:
        return GPTNeoXConfig(
            architectures=["GPTNeoXForCausalLM"],
            vocab_size=arch.vocab_size,
            hidden_size=arch.hidden_size,
            num_hidden_layers=arch.num_layers,
            num_attention_heads=arch.num_heads,
            intermediate_size=arch.intermediate_size,
            hidden_act=arch.hidden_act,
            rotary_pct=arch.rotary_pct,
            rotary_emb_base=arch.rotary_emb_base,
            max_position_embeddings=arch.max_position_embeddings,
            layer_norm_eps=arch.layer_norm_eps,
            use_parallel_residual=True,
            tie_word_embeddings=False,
            attention_bias=True,
            attention_dropout=arch.attention_dropout,
            hidden_dropout=arch.hidden_dropout,
            bos_token_id=UPSTREAM_BOS_EOS_ID,
            eos_token_id=UPSTREAM_BOS_EOS_ID,
            pad_token_id=PAD_ID,
            dtype="float32",
        )
    except (ValueError, _ConfigError) as exc:
        message = (
            f"cannot build {arch.name}: transformers {transformers.__version__} refuses its "
            f"GPT-NeoX config ({' '.join(str(exc).split())})."
        )
        if arch.why_not_buildable:
            buildable = ", ".join(n for n, a in ARCHITECTURES.items() if a.buildable)
            message += (
                f" In numbers: {arch.why_not_buildable}. It still works with `dstrain "
                f"estimate`; to train, pick a buildable architecture: {buildable}."
            )
        else:
            message += " Check the architecture's numbers."
        raise DstrainError(message) from exc


def generation_config(config: GPTNeoXConfig) -> transformers.GenerationConfig:
    """Generation settings saved with every export (`generation_config.json`).

    bos/eos/pad as in `config` (0/0/3, upstream's), and `suppress_tokens` = every special
    token ([UNK], [CLS], [SEP], [PAD], [MASK]): their logits are set to -inf before
    sampling, so upstream's README call (`model.generate(prompt, max_length=..., do_sample=
    True, top_k=50, top_p=0.95, ...)`) only ever samples codons. (`bad_words_ids` would not
    do: transformers drops the eos id, 0 here, from the bad words.) With eos suppressed,
    generation runs to `max_length`, which is what upstream's call asks for anyway
    (`min_length` = `max_length`).
    """
    return transformers.GenerationConfig(
        bos_token_id=config.bos_token_id,
        eos_token_id=config.eos_token_id,
        pad_token_id=config.pad_token_id,
        suppress_tokens=sorted(TOKEN_TO_ID[t] for t in SPECIAL_TOKENS),
    )


@contextlib.contextmanager
def _default_dtype(dtype: torch.dtype) -> Iterator[None]:
    previous = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        yield
    finally:
        torch.set_default_dtype(previous)


def build_model(
    arch_or_name: GenSLMArchitecture | str | os.PathLike[str],
    *,
    device: str | torch.device = "cpu",
    attn_implementation: str = "sdpa",
    zero_init: Mapping[str, Any] | None = None,
) -> GPTNeoXForCausalLM:
    """A randomly initialised GenSLM model in fp32 on `device` (`"meta"`: shapes only).

    `arch_or_name` is an architecture, a registered name or a config.json path. Built with
    the model class itself, not `from_config`, so the dtype is fp32 whatever the config
    or torch's default say, and transformers never starts DeepSpeed's `zero.Init` behind
    the caller's back (`from_config` does while an `HfDeepSpeedConfig` is alive). Seed
    with `torch.manual_seed` first for reproducible weights.

    Attention is torch's `scaled_dot_product_attention` ("sdpa": flash or memory-efficient
    kernels on a GPU, padding and packed rows through its mask) asked for by name, so a
    transformers whose default moves does not change training silently; "eager" (the
    explicit softmax) stays available for comparisons. Not saved in config.json.

    `zero_init`: a DeepSpeed config (ZeRO stage 3, process group up) to build the model
    inside `deepspeed.zero.Init` with, partitioned as it is built, in that config's dtype:
    no rank ever holds the whole model (see `_zero_init_build`). Same weights as the
    plain build for the same seed (rounded to bf16 under a bf16 config).
    """
    arch = resolve_architecture(arch_or_name)
    config = gpt_neox_config(arch)
    config._attn_implementation = attn_implementation  # checked by the model's __init__
    if zero_init is not None:
        model = _zero_init_build(config, zero_init)
    else:
        with torch.device(device), _default_dtype(torch.float32):
            model = GPTNeoXForCausalLM(config)
    model.generation_config = generation_config(config)  # written by save_pretrained
    check_param_count(model, arch)
    return model


def _zero_init_build(config: GPTNeoXConfig, ds_config: Mapping[str, Any]) -> GPTNeoXForCausalLM:
    """`GPTNeoXForCausalLM(config)` inside `deepspeed.zero.Init(ds_config)`, with the plain
    build's weights.

    zero.Init partitions each module's parameters as soon as that module's `__init__`
    returns. The constructors' own initialisation (torch's `reset_parameters`) still runs
    on whole tensors, one module at a time, drawing from the RNG exactly as in a plain
    build. transformers' `post_init`, however, runs at the end of `GPTNeoXModel.__init__`
    and again at the end of the LM's, when the modules it initialises are already
    partitioned: on a rank's empty stand-ins it would draw nothing and change nothing.
    So, during the build, GPT-NeoX's `initialize_weights` is replaced by one that walks
    the modules in the same order as transformers' (children first), gathering each
    module's parameters (and its direct children's) under `GatheredParameters(...,
    modifier_rank=0)` while it runs the model's own `_initialize_weights` on them. Every
    rank runs it, so every rank's RNG advances as in a plain build; rank 0's values are
    the ones kept. (transformers' own ZeRO-3 path, `from_config` under an
    `HfDeepSpeedConfig`, skips the constructors' initialisation and initialises on rank 0
    only, so its weights differ from a plain build's for the same seed.)

    zero.Init also creates every floating tensor in the config's dtype, `torch.arange`
    included, which would compute the rotary `inv_freq` buffers in bf16;
    transformers' `prevent_arange_dtype_change` keeps them fp32, as a plain build (and
    the engine, which leaves buffers alone under ZeRO-3) has them.
    """
    import deepspeed
    from transformers.initialization import guard_torch_init_functions
    from transformers.integrations.deepspeed import prevent_arange_dtype_change
    from transformers.models.gpt_neox.modeling_gpt_neox import GPTNeoXPreTrainedModel

    def initialize_weights_gathered(self: transformers.PreTrainedModel) -> None:
        custom_code = self.is_custom_code()

        def visit(module: torch.nn.Module, init_fn) -> None:
            children = list(module.children())
            for child in children:
                own = isinstance(child, transformers.PreTrainedModel)
                visit(child, child._initialize_weights if own else init_fn)
            params = list(module.parameters(recurse=False))
            for child in children:  # an _init_weights may set a direct child's tensors
                if not isinstance(child, transformers.PreTrainedModel):
                    params.extend(child.parameters(recurse=False))
            with deepspeed.zero.GatheredParameters(params, modifier_rank=0):
                init_fn(module, custom_code)

        with torch.no_grad(), guard_torch_init_functions():
            visit(self, self._initialize_weights)

    cls = GPTNeoXPreTrainedModel
    previous = vars(cls).get("initialize_weights")  # None: inherited from PreTrainedModel
    cls.initialize_weights = initialize_weights_gathered
    try:
        with (
            prevent_arange_dtype_change(),  # must come before zero.Init
            deepspeed.zero.Init(config_dict_or_path=dict(ds_config)),
            _default_dtype(torch.float32),
        ):
            model = GPTNeoXForCausalLM(config)
    finally:
        if previous is None:
            del cls.initialize_weights
        else:
            cls.initialize_weights = previous
    return model


def is_partitioned(model: torch.nn.Module) -> bool:
    """Whether `model`'s parameters are ZeRO-3 partitions (built under zero.Init or
    wrapped by a stage 3 engine)."""
    return any(hasattr(p, "ds_id") for p in model.parameters())


def weight_decay_groups(model: torch.nn.Module) -> tuple[list[str], list[str]]:
    """Trainable parameter names split into (decayed, not decayed), in model order:
    matrices are decayed; biases and LayerNorm weights are not. The training loop builds
    its optimizer groups from this, and the export maps DeepSpeed's per-group fp32 masters
    back to names with it."""
    decay, no_decay = [], []
    for name, param in model.named_parameters():
        ndim = len(getattr(param, "ds_shape", param.shape))  # a ZeRO-3 partition is 1-D
        if param.requires_grad:
            (no_decay if ndim < 2 or "layernorm" in name.lower() else decay).append(name)
    return decay, no_decay


def count_params(model: torch.nn.Module) -> int:
    """Parameters in `model`, shared ones once; ZeRO-3 partitioned ones at full size."""
    return sum(getattr(p, "ds_numel", p.numel()) for p in model.parameters())


def check_param_count(model: torch.nn.Module, arch: GenSLMArchitecture) -> int:
    """`count_params(model)`, after checking it equals `arch.num_params()`."""
    built, expected = count_params(model), arch.num_params()
    if built != expected:
        raise DstrainError(
            f"{arch.name}: transformers {transformers.__version__} built {built:,} parameters "
            f"but the architecture has {expected:,} (difference {built - expected:+,}). This "
            "transformers version lays out GPT-NeoX differently from the one dstrain was "
            "tested with (5.23); install that version."
        )
    return built


# --------------------------------------------------------------------------------------
# Reading checkpoints
# --------------------------------------------------------------------------------------


def _weights_only_reason(exc: BaseException) -> str:
    """The useful line of torch's "Weights only load failed" message."""
    text = str(exc)
    match = re.search(r"GLOBAL ([\w.]+)", text)
    if match:
        return f"it holds a {match.group(1)} object"
    match = re.search(r"WeightsUnpickler error:\s*(.+)", text)
    return match.group(1).strip() if match else " ".join(text.split())[:200]


def _torch_load_mapped(path: Path, *, weights_only: bool) -> object:
    """`torch.load` with the file memory-mapped: tensors are read from the file when used,
    so a ZeRO-3 load (`load_state_dict_strictly`) never holds every tensor at once. Files
    in torch's old (pre-1.6, non-zip) format cannot be mapped and are read whole."""
    try:
        return torch.load(path, map_location="cpu", weights_only=weights_only, mmap=True)
    except RuntimeError as exc:
        if "mmap" not in str(exc):
            raise
    return torch.load(path, map_location="cpu", weights_only=weights_only)


def _torch_load(path: Path, *, trust_checkpoint: bool) -> object:
    """`torch.load` on the CPU: tensors-only first, full unpickling only when trusted."""
    from dstrain.inputs import check_regular_file

    check_regular_file(path, "checkpoint")  # a FIFO would block torch.load, /dev/zero never end
    try:
        return _torch_load_mapped(path, weights_only=True)
    except pickle.UnpicklingError as exc:
        reason = _weights_only_reason(exc)
    except Exception as exc:  # torch raises many types for a file it cannot parse
        raise DstrainError(
            f"cannot read checkpoint {path}: {type(exc).__name__}: {exc}. Is it a PyTorch "
            ".pt file, and was it copied completely?"
        ) from exc
    if not trust_checkpoint:
        raise DstrainError(
            f"checkpoint {path} is not tensors only ({reason}), so torch.load(weights_only=True) "
            "refuses it. Loading it means unpickling, which can run arbitrary code hidden in "
            "the file. Official GenSLM checkpoints are like this (Lightning saves its "
            "hyper-parameters with them). If the file comes from a source you trust, pass "
            "--trust-checkpoint (trust_checkpoint=True in Python); otherwise do not load it."
        )
    try:
        return _torch_load_mapped(path, weights_only=False)
    except Exception as exc:  # unpickling a foreign file can raise anything
        raise DstrainError(
            f"cannot read checkpoint {path} even with --trust-checkpoint: "
            f"{type(exc).__name__}: {exc}. Is it a PyTorch .pt file, copied completely?"
        ) from exc


def _find_tensors(obj: object, path: Path) -> dict[str, torch.Tensor]:
    """The state dict inside a Lightning / DeepSpeed / bare checkpoint object."""
    if isinstance(obj, torch.nn.Module):
        obj = obj.state_dict()
    if not isinstance(obj, Mapping):
        raise DstrainError(
            f"checkpoint {path} holds a {type(obj).__name__}, not a state dict or a "
            'Lightning checkpoint ({"state_dict": ...}).'
        )
    for key in ("state_dict", "module", "model_state_dict", "model"):
        inner = obj.get(key)
        if isinstance(inner, torch.nn.Module):
            inner = inner.state_dict()
        if isinstance(inner, Mapping):
            obj = inner
            break
    tensors = {k: v for k, v in obj.items() if isinstance(k, str) and isinstance(v, torch.Tensor)}
    if not tensors:
        keys = ", ".join(map(str, list(obj)[:10])) or "none"
        raise DstrainError(
            f"checkpoint {path} holds no model weights (no tensors; its keys: {keys}). Expected "
            'a state dict or a Lightning checkpoint ({"state_dict": ...}).'
        )
    return tensors


def normalize_state_dict_keys(
    state: Mapping[str, torch.Tensor], *, source: str = "checkpoint"
) -> dict[str, torch.Tensor]:
    """Upstream / old-transformers keys -> transformers 5 GPT-NeoX keys.

    Strips the `model.` (and DeepSpeed/Lightning wrapper) prefixes, drops the saved
    buffers in `UPSTREAM_DROPPED_SUFFIXES`, renames `embed_out` to `lm_head`.
    """
    out: dict[str, torch.Tensor] = {}
    for key, tensor in state.items():
        name = key
        while name.startswith(UPSTREAM_PREFIXES):
            name = name.split(".", 1)[1]
        if any(name == s or name.endswith("." + s) for s in UPSTREAM_DROPPED_SUFFIXES):
            continue
        if name.startswith("embed_out."):
            name = "lm_head." + name.removeprefix("embed_out.")
        if name in out:
            raise DstrainError(
                f"{source} holds two tensors for {name} (one is {key!r}); it mixes two "
                "models' weights. Export a single model's state dict."
            )
        out[name] = tensor
    return out


def read_upstream_state_dict(
    path: str | os.PathLike[str], *, trust_checkpoint: bool = False
) -> dict[str, torch.Tensor]:
    """The weights of an official GenSLM `.pt` file (or any GPT-NeoX state dict), with
    transformers 5 key names. See the module docstring for the layout and the trust rule."""
    path = Path(path)
    if not path.exists():
        raise DstrainError(f"checkpoint {path} does not exist. Check the path.")
    if path.is_dir():
        raise DstrainError(
            f"checkpoint {path} is a directory; this reads single .pt files. (HF model "
            "directories and upstream DeepSpeed checkpoint directories are read by "
            "--init-checkpoint and convert-checkpoint.)"
        )
    obj = _torch_load(path, trust_checkpoint=trust_checkpoint)
    return normalize_state_dict_keys(_find_tensors(obj, path), source=f"checkpoint {path}")


def find_deepspeed_checkpoint(path: str | os.PathLike[str]) -> tuple[Path, str, bool] | None:
    """(checkpoint dir, tag, written by dstrain train) when `path` is a DeepSpeed checkpoint
    directory, else None.

    `path` is a directory holding `latest` and the tag it names (what DeepSpeed's
    `save_checkpoint(dir)` writes, and what upstream GenSLM's Lightning DeepSpeedStrategy
    wrote as `NAME.ckpt/` with the tag `checkpoint`), one tag directory (holding
    `mp_rank_00_model_states.pt`), or a dstrain run directory (`checkpoints/` inside).
    dstrain's own are told apart by their manifest, checkpoints.json, run layout or
    `stepNNNNNNNN` tag names (upstream's tag is `checkpoint`, DeepSpeed's `global_stepN`).
    """
    from dstrain.checkpoints import INDEX_NAME, MANIFEST_NAME, read_latest

    path = Path(path)
    if not path.is_dir():
        return None
    if (
        (path / "checkpoints").is_dir()
        or (path / INDEX_NAME).exists()
        or path.name == "checkpoints"
    ):
        return path, "", True  # a dstrain run or its checkpoints/ (tag not needed here)
    if (path / "latest").exists():
        tag, problem = read_latest(path)
        if problem or tag is None:
            raise DstrainError(
                f"{path} looks like a DeepSpeed checkpoint directory but its `latest` file is "
                f"unusable: {problem}. Pass the tag directory inside it (the one holding "
                "mp_rank_00_model_states.pt) instead."
            )
        ckpt_dir = path
    elif any(path.glob("*mp_rank_*_model_states.pt")):
        ckpt_dir, tag = path.parent, path.name
    else:
        return None
    dstrain_made = (
        (ckpt_dir / INDEX_NAME).exists()
        or (ckpt_dir / tag / MANIFEST_NAME).exists()
        or re.fullmatch(r"step\d+", tag) is not None  # dstrain's tag names, older runs too
    )
    return ckpt_dir, tag, dstrain_made


def read_deepspeed_state_dict(
    ckpt_dir: Path, tag: str, *, trust_checkpoint: bool = False
) -> dict[str, torch.Tensor]:
    """fp32 weights of a foreign DeepSpeed ZeRO 1-3 checkpoint (e.g. upstream GenSLM's
    Lightning + DeepSpeed runs), consolidated by DeepSpeed's own zero_to_fp32, keys
    normalized (`_forward_module.model.` / `module.model.` stripped, `embed_out` ->
    `lm_head`, old buffers dropped).

    zero_to_fp32 unpickles every file in full and such a directory has no dstrain
    manifest to check first, so it is read only with `trust_checkpoint`.
    """
    where = ckpt_dir / tag
    if not trust_checkpoint:
        raise DstrainError(
            f"{where} is a DeepSpeed checkpoint that dstrain did not write (no "
            "dstrain_manifest.json), such as upstream GenSLM's Lightning + DeepSpeed "
            "`NAME.ckpt/` directories. Consolidating it runs DeepSpeed's zero_to_fp32, which "
            "unpickles every file in full and can run code hidden in them. If it comes from "
            "a source you trust, pass --trust-checkpoint (trust_checkpoint=True in Python)."
        )
    if not any(where.glob("*optim_states.pt")):
        raise DstrainError(
            f"{where} holds no ZeRO optimizer states (*optim_states.pt): it is incomplete, "
            "or a ZeRO stage 0 checkpoint, whose fp32 weights DeepSpeed's zero_to_fp32 "
            "cannot consolidate. Copy the whole directory, or convert it with the tool that "
            "wrote it into a .pt file and pass that."
        )
    try:
        with contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(io.StringIO()):
            # Imported here too: DeepSpeed's import prints its accelerator choice on stdout.
            from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint

            state = get_fp32_state_dict_from_zero_checkpoint(str(ckpt_dir), tag=tag)
    except Exception as exc:  # zero_to_fp32 raises many types for a damaged directory
        raise DstrainError(
            f"DeepSpeed's zero_to_fp32 cannot consolidate {where}: {type(exc).__name__}: "
            f"{' '.join(str(exc).split())[:300]}. Is every rank's file there, copied "
            "completely?"
        ) from exc
    return normalize_state_dict_keys(state, source=f"DeepSpeed checkpoint {where}")


def read_hf_state_dict(
    model_dir: str | os.PathLike[str], *, trust_checkpoint: bool = False
) -> dict[str, torch.Tensor]:
    """The weights of an HF model directory (`model.safetensors`, sharded safetensors, or
    `pytorch_model.bin` under the same trust rule as `.pt` files), normalized keys."""
    from safetensors.torch import load_file

    def load(file: Path) -> dict[str, torch.Tensor]:
        from dstrain.inputs import check_regular_file

        check_regular_file(file, "weights file")
        try:
            return load_file(file, device="cpu")
        except Exception as exc:  # safetensors' own error types vary by version
            raise DstrainError(f"cannot read weights file {file}: {exc}") from exc

    model_dir = Path(model_dir)
    single, index = model_dir / "model.safetensors", model_dir / "model.safetensors.index.json"
    if single.is_file():
        state = load(single)
    elif index.is_file():
        try:
            shards = sorted(set(json.loads(index.read_text())["weight_map"].values()))
        except (ValueError, KeyError, TypeError, AttributeError) as exc:
            raise DstrainError(f"cannot read shard index {index}: {exc!r}") from exc
        state = {}
        for shard in shards:
            state.update(load(model_dir / shard))
    elif (model_dir / "pytorch_model.bin").is_file():
        obj = _torch_load(model_dir / "pytorch_model.bin", trust_checkpoint=trust_checkpoint)
        state = _find_tensors(obj, model_dir / "pytorch_model.bin")
    else:
        raise DstrainError(
            f"model directory {model_dir} has no weights (model.safetensors, "
            "model.safetensors.index.json or pytorch_model.bin)."
        )
    return normalize_state_dict_keys(state, source=f"model directory {model_dir}")


# --------------------------------------------------------------------------------------
# Loading into a model
# --------------------------------------------------------------------------------------


def architecture_of(model: GPTNeoXForCausalLM) -> GenSLMArchitecture:
    """The architecture of a built model: the registered one it equals, else `model`."""
    arch = architecture_from_hf_config(model.config.to_dict(), name="model")
    for registered in ARCHITECTURES.values():
        if not registered.differences(arch):
            return registered
    return arch


def _checkpoint_shape(state: Mapping[str, torch.Tensor]) -> GenSLMArchitecture | None:
    """What the weights' shapes say about the architecture (heads are not visible)."""
    try:
        vocab, hidden = state["gpt_neox.embed_in.weight"].shape
        inter = state["gpt_neox.layers.0.mlp.dense_h_to_4h.weight"].shape[0]
    except (KeyError, ValueError):
        return None
    indices = [int(m.group(1)) for k in state if (m := re.match(r"gpt_neox\.layers\.(\d+)\.", k))]
    layers = 1 + max(indices)
    # Heads do not change any shape; 1 keeps the placeholder valid.
    return GenSLMArchitecture("checkpoint", hidden, layers, 1, inter, vocab_size=vocab)


def _listed(items: list[str]) -> str:
    shown = "; ".join(items[:_SHOWN])
    return shown + (f"; ... and {len(items) - _SHOWN} more" if len(items) > _SHOWN else "")


def load_state_dict_strictly(
    model: GPTNeoXForCausalLM, state: Mapping[str, torch.Tensor], *, source: str
) -> None:
    """Copy `state` into `model` (cast to the model's dtypes), or explain every mismatch.

    On a mismatch the DstrainError names each missing and unexpected tensor and each
    shape difference (checkpoint vs model), and, when the checkpoint's shapes are those of
    another registered architecture, the `--model` to use instead.

    A ZeRO-3 partitioned model (built under zero.Init) is filled module by module: each
    module's parameters are gathered (`GatheredParameters(..., modifier_rank=0)`), rank 0
    copies the checkpoint's tensors in, and DeepSpeed hands every rank its partition
    back; so at most one module is ever whole. Every rank runs it (collectives).
    """
    partitioned = is_partitioned(model)
    if not partitioned and any(p.is_meta for p in model.parameters()):
        raise ValueError("load_state_dict_strictly needs a model on a real device, not meta")
    expected = {  # a partitioned parameter's own shape is empty; ds_shape is the model's
        k: torch.Size(getattr(t, "ds_shape", t.shape))
        for k, t in model.state_dict(keep_vars=True).items()
    }
    missing = [k for k in expected if k not in state]
    unexpected = [k for k in state if k not in expected]
    mismatched = [
        f"{k} is {list(state[k].shape)} in the checkpoint but {list(shape)} in the model"
        for k, shape in expected.items()
        if k in state and state[k].shape != shape
    ]
    if missing or unexpected or mismatched:
        arch = architecture_of(model)
        found = _checkpoint_shape(state)
        others = [n for n in names_with_shape(found) if n != arch.name] if found else []
        head = f"{source} does not fit {arch.name} ({arch.num_params():,} parameters)"
        if others:
            head += f": its shapes are those of {others[0]}, so pass --model {others[0]}"
        elif found and found.shape_key() != arch.shape_key():
            head += (
                f": its shapes say hidden {found.hidden_size}, {found.num_layers} layers, "
                f"intermediate {found.intermediate_size}, vocab {found.vocab_size}, which no "
                "registered architecture has; pass --model a config.json with those numbers"
            )
        parts = [head]
        if mismatched:
            parts.append(f"{len(mismatched)} shape mismatch(es): {_listed(mismatched)}")
        if missing:
            parts.append(f"{len(missing)} missing tensor(s): {_listed(missing)}")
        if unexpected:
            parts.append(f"{len(unexpected)} unexpected tensor(s): {_listed(unexpected)}")
        raise DstrainError(". ".join(parts) + ".")
    if partitioned:
        _load_into_partitions(model, state)
    else:
        model.load_state_dict(state, strict=True)  # copy_ casts (upstream fp16 -> fp32)


def _load_into_partitions(model: torch.nn.Module, state: Mapping[str, torch.Tensor]) -> None:
    """`state` (checked complete) into a ZeRO-3 partitioned `model`, one module at a time."""
    import deepspeed

    rank = torch.distributed.get_rank() if torch.distributed.is_initialized() else 0
    with torch.no_grad():
        for prefix, module in model.named_modules():
            dot = f"{prefix}." if prefix else ""
            own = [(dot + name, p) for name, p in module.named_parameters(recurse=False)]
            if own:
                with deepspeed.zero.GatheredParameters([p for _, p in own], modifier_rank=0):
                    if rank == 0:
                        for name, param in own:
                            param.copy_(state[name])  # casts (upstream fp16 -> bf16 / fp32)
            for name, buffer in module.named_buffers(recurse=False):
                if dot + name in state:  # buffers are whole on every rank
                    buffer.copy_(state[dot + name])


def load_init_checkpoint(
    model_or_arch: GPTNeoXForCausalLM | GenSLMArchitecture | str,
    path: str | os.PathLike[str],
    *,
    trust_checkpoint: bool = False,
) -> GPTNeoXForCausalLM:
    """Load starting weights from an upstream `.pt` file, an HF model directory, or a
    DeepSpeed checkpoint directory dstrain did not write (upstream GenSLM's; needs
    `trust_checkpoint`, see `read_deepspeed_state_dict`).

    Given an architecture (or name) instead of a model, builds the model on the CPU after
    the checkpoint has been read (so a bad file fails before a slow build). An HF
    directory's config.json must describe the same architecture (positions aside).
    Returns the model, fp32, with every weight replaced.
    """
    is_model = isinstance(model_or_arch, torch.nn.Module)
    arch = architecture_of(model_or_arch) if is_model else resolve_architecture(model_or_arch)
    path = Path(path)
    if not path.exists():
        raise DstrainError(f"initial checkpoint {path} does not exist. Check the path.")
    deepspeed_dir = None
    if path.is_dir() and not (path / "config.json").exists():
        deepspeed_dir = find_deepspeed_checkpoint(path)
        if deepspeed_dir is not None and deepspeed_dir[2]:
            raise DstrainError(
                f"{path} is a dstrain training checkpoint, not a model directory (no "
                f"config.json). Export it first (`dstrain export {path} -o DIR`) and pass "
                "DIR, or continue that run with `dstrain train --resume`."
            )
    if deepspeed_dir is not None:
        ckpt_dir, tag, _ = deepspeed_dir
        state = read_deepspeed_state_dict(ckpt_dir, tag, trust_checkpoint=trust_checkpoint)
        source = f"DeepSpeed checkpoint {ckpt_dir / tag}"
    elif path.is_dir():
        found = architecture_from_hf_config(path)
        diffs = arch.differences(found)
        if diffs:
            same = [n for n, a in ARCHITECTURES.items() if not a.differences(found)]
            hint = f" It is {same[0]}: pass --model {same[0]}." if same else ""
            raise DstrainError(
                f"model directory {path} holds a different architecture than {arch.name} "
                f"(model vs directory): {'; '.join(diffs)}.{hint}"
            )
        state = read_hf_state_dict(path, trust_checkpoint=trust_checkpoint)
        source = f"model directory {path}"
    else:
        state = read_upstream_state_dict(path, trust_checkpoint=trust_checkpoint)
        source = f"checkpoint {path}"
    model = model_or_arch if is_model else build_model(arch)
    load_state_dict_strictly(model, state, source=source)
    return model


# --------------------------------------------------------------------------------------
# Writing upstream's layout
# --------------------------------------------------------------------------------------

UPSTREAM_PT_NAME = "genslm_upstream.pt"
"""File name of the upstream-layout weights `dstrain export --format upstream` adds."""


def upstream_state_dict(model: GPTNeoXForCausalLM) -> dict[str, torch.Tensor]:
    """`model`'s weights keyed and laid out as transformers 4.21's GPTNeoXForCausalLM
    (upstream GenSLM's) state dict: head `embed_out`, and per layer the buffers it saved,
    with the values it computed: `attention.bias` (the causal mask, lower-triangular ones,
    uint8, (1, 1, P, P) for P positions; one tensor shared by every layer, so the file
    holds it once), `attention.masked_bias` (-1e9) and `attention.rotary_emb.inv_freq`
    (1 / base^(2i/d) over the d rotary dimensions). fp32, on the CPU, in 4.21's order.
    """
    config = model.config
    arch = architecture_of(model)
    positions = config.max_position_embeddings
    causal = torch.tril(torch.ones((positions, positions), dtype=torch.uint8))
    causal = causal.view(1, 1, positions, positions)
    head_size = arch.hidden_size // arch.num_heads
    rotary_dims = int(head_size * arch.rotary_pct)
    exponents = torch.arange(0, rotary_dims, 2, dtype=torch.int64).float() / rotary_dims
    inv_freq = 1.0 / (arch.rotary_emb_base**exponents)
    out: dict[str, torch.Tensor] = {}
    for key, tensor in model.state_dict().items():
        match = re.fullmatch(r"(gpt_neox\.layers\.\d+\.attention\.)query_key_value\.weight", key)
        if match:  # 4.21 registered these before the attention's linear layers
            out[match.group(1) + "bias"] = causal
            out[match.group(1) + "masked_bias"] = torch.tensor(-1e9)
            out[match.group(1) + "rotary_emb.inv_freq"] = inv_freq.clone()
        if key.startswith("lm_head."):
            key = "embed_out." + key.removeprefix("lm_head.")
        out[key] = tensor.detach().to("cpu", torch.float32).clone()
    return out


def save_upstream_pt(model: GPTNeoXForCausalLM, path: str | os.PathLike[str]) -> Path:
    """Write `{"state_dict": upstream_state_dict(model)}` to `path` (atomically): the file
    upstream's `genslm.GenSLM` class reads (`torch.load(path)["state_dict"]` loaded into a
    transformers GPTNeoXForCausalLM, so the keys carry no `model.` prefix; every key
    matches a 4.21 model's, none is missing). Tensors only: `torch.load(weights_only=True)`
    and dstrain's `read_upstream_state_dict` read it without --trust-checkpoint."""
    from dstrain.publish import write_file_atomic

    path = Path(path)
    buffer = io.BytesIO()
    torch.save({"state_dict": upstream_state_dict(model)}, buffer)
    write_file_atomic(path, buffer.getvalue())
    return path


# --------------------------------------------------------------------------------------
# Converting to an HF model directory
# --------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class ConvertedCheckpoint:
    """What `convert_checkpoint` wrote."""

    out_dir: Path
    architecture: GenSLMArchitecture
    num_params: int
    source: Path


def _check_output_dir(out_dir: Path, *, overwrite: bool) -> None:
    """Refuse to write over a file, over a directory unless asked, or over a non-model one."""
    if not out_dir.exists():
        return
    if not out_dir.is_dir():
        raise DstrainError(f"output {out_dir} exists and is not a directory; choose another -o.")
    if not any(out_dir.iterdir()):
        return
    if not overwrite:
        raise DstrainError(
            f"output directory {out_dir} already exists; pass --overwrite to replace it, or "
            "choose another -o."
        )
    if not (out_dir / "config.json").is_file():
        raise DstrainError(
            f"output directory {out_dir} exists and is not a model directory (no config.json); "
            "refusing to replace it even with --overwrite. Choose another -o."
        )


def convert_checkpoint(
    src: str | os.PathLike[str],
    arch_name: str | GenSLMArchitecture,
    out_dir: str | os.PathLike[str],
    *,
    trust_checkpoint: bool = False,
    overwrite: bool = False,
) -> ConvertedCheckpoint:
    """Write `src` (upstream `.pt`, upstream DeepSpeed checkpoint directory, or HF
    directory) as an HF model directory `out_dir`.

    The directory holds `model.safetensors` (fp32), `config.json`,
    `generation_config.json` and the codon tokenizer, and loads with
    `AutoModelForCausalLM.from_pretrained(out_dir)` / `AutoTokenizer.from_pretrained`.
    Written atomically: nothing half-written is ever left at `out_dir`, and an existing
    directory is replaced only with `overwrite` (and only if it holds a config.json).
    """
    from dstrain.codons import build_hf_tokenizer

    src, out_dir = Path(src), Path(out_dir)
    arch = resolve_architecture(arch_name)
    _check_output_dir(out_dir, overwrite=overwrite)  # fail before the slow part
    model = load_init_checkpoint(arch, src, trust_checkpoint=trust_checkpoint)
    # Checked again before the swap: another process may have written there meanwhile.
    recheck = functools.partial(_check_output_dir, out_dir, overwrite=overwrite)
    with publish_dir(out_dir, before_replace=recheck) as tmp:
        model.save_pretrained(tmp)
        build_hf_tokenizer().save_pretrained(tmp)
    return ConvertedCheckpoint(
        out_dir=out_dir, architecture=arch, num_params=count_params(model), source=src
    )
