"""The GenSLM architectures, as numbers (pure: stdlib only, no torch).

Source of the numbers: upstream GenSLM's `genslm/architectures/neox/*.json`
(github.com/ramanathanlab/genslm). Every one is a GPT-NeoX causal LM over the
69-token codon vocabulary with `hidden_act` gelu_fast, `rotary_pct` 0.25,
`rotary_emb_base` 10000, 2048 positions, parallel residual, untied input and output
embeddings and LayerNorm eps 1e-5. Upstream names each file after a parameter count;
the real counts (formula below, checked against transformers' built models) are:

    name         hidden layers heads  inter       params   upstream file
    genslm_25M      512      8     8   2048    25,290,752   neox_25,290,752.json
    genslm_250M    1840     12    16   2048   253,429,376   neox_244,464,576.json
    genslm_2.5B    3840     28    32   4096 2,533,931,008   neox_2,533,931,008.json
    genslm_25B     8196     64    64   8000 25,595,734,832  neox_25,076,188,032.json

`genslm_25B` is estimate-only: 8196 is not a multiple of its 64 heads, which
transformers' GPT-NeoX refuses to build. `genslm_tiny` and `genslm_small` are dstrain's
own sizes for tests and benchmarks.

Upstream's JSON files also carry `attention_probs_dropout_prob` / `hidden_dropout_prob`
(BERT's names, which GPT-NeoX ignores) and bos = eos = 0 ([UNK]); dstrain trains
without dropout, as upstream effectively did, and keeps bos = eos = 0 so upstream's
generation calls behave the same (exports suppress ids 0-4 when sampling). A
config.json with GPT-NeoX's own `hidden_dropout` / `attention_dropout` trains with them.
"""

from __future__ import annotations

import dataclasses
import difflib
import json
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from dstrain.errors import DstrainError


@dataclasses.dataclass(frozen=True)
class GenSLMArchitecture:
    """One GPT-NeoX shape. Only numbers: the model module turns it into a torch model."""

    name: str
    """Registry name (`genslm_25M`), or the config file's name for a custom one."""
    hidden_size: int
    """Width of the residual stream, h."""
    num_layers: int
    """Transformer blocks, L (`num_hidden_layers` in transformers)."""
    num_heads: int
    """Attention heads (`num_attention_heads`); must divide `hidden_size` to build."""
    intermediate_size: int
    """Width of the MLP, i (GenSLM's is not 4h)."""
    vocab_size: int = 69
    """Token ids, V: 64 codons + [UNK] [CLS] [SEP] [PAD] [MASK]."""
    max_position_embeddings: int = 2048
    """Longest sequence in tokens. Rotary: costs no parameters."""
    rotary_pct: float = 0.25
    """Share of each head's dimensions that get rotary embeddings."""
    rotary_emb_base: int = 10000
    """Rotary base (theta)."""
    layer_norm_eps: float = 1e-5
    """LayerNorm epsilon."""
    hidden_act: str = "gelu_fast"
    """MLP activation, a transformers ACT2FN name."""
    hidden_dropout: float = 0.0
    """Training dropout on the embeddings and each attention and MLP output (GPT-NeoX's
    `hidden_dropout`). GenSLM trains with 0; only a config.json can set it."""
    attention_dropout: float = 0.0
    """Training dropout on the attention probabilities (GPT-NeoX's `attention_dropout`)."""
    description: str = ""
    """One line for listings: where the numbers come from."""

    @property
    def head_dim(self) -> int:
        """Dimensions per head, `hidden_size // num_heads` (floored when not buildable)."""
        return self.hidden_size // self.num_heads

    @property
    def why_not_buildable(self) -> str | None:
        """Why transformers cannot build this shape, or None when it can."""
        if self.hidden_size % self.num_heads:
            return (
                f"hidden_size {self.hidden_size} is not divisible by num_heads "
                f"{self.num_heads} ({self.hidden_size} / {self.num_heads} = "
                f"{self.hidden_size / self.num_heads:.4g}); transformers' GPT-NeoX requires "
                "whole heads, so this architecture is estimate-only"
            )
        return None

    @property
    def buildable(self) -> bool:
        """Whether transformers can build this shape (see `why_not_buildable`)."""
        return self.why_not_buildable is None

    def num_params(self) -> int:
        """Exact parameter count of the GPT-NeoX causal LM, from the numbers alone.

        V*h input embedding + L layers + final LayerNorm (2h) + V*h lm_head (untied, no
        bias). Each layer: two LayerNorms (4h), QKV h*3h + 3h, attention output h*h + h,
        MLP h*i + i and i*h + h.
        """
        v, h, i = self.vocab_size, self.hidden_size, self.intermediate_size
        per_layer = 4 * h + (h * 3 * h + 3 * h) + (h * h + h) + (h * i + i) + (i * h + h)
        return v * h + self.num_layers * per_layer + 2 * h + h * v

    def to_dict(self) -> dict[str, object]:
        """The fields, for checkpoints and JSON (`GenSLMArchitecture(**d)` rebuilds it)."""
        return dataclasses.asdict(self)

    def shape_key(self) -> tuple[int, int, int, int]:
        """(vocab, hidden, layers, intermediate): what fixes every weight's shape."""
        return (self.vocab_size, self.hidden_size, self.num_layers, self.intermediate_size)

    def differences(self, other: GenSLMArchitecture) -> list[str]:
        """Model-defining fields that differ, as `field: self vs other` lines.

        Ignores `name`, `description` and `max_position_embeddings` (rotary positions
        hold no weights; upstream's 10240-position variants share the 2048 ones' weights).
        """
        skip = {"name", "description", "max_position_embeddings"}
        skip |= {"hidden_dropout", "attention_dropout"}  # training behaviour, no weights
        return [
            f"{f.name}: {getattr(self, f.name)} vs {getattr(other, f.name)}"
            for f in dataclasses.fields(self)
            if f.name not in skip and getattr(self, f.name) != getattr(other, f.name)
        ]


def _upstream(
    name: str, h: int, layers: int, heads: int, inter: int, file: str
) -> GenSLMArchitecture:
    return GenSLMArchitecture(
        name=name,
        hidden_size=h,
        num_layers=layers,
        num_heads=heads,
        intermediate_size=inter,
        description=f"GenSLM, upstream architectures/neox/{file}",
    )


ARCHITECTURES: dict[str, GenSLMArchitecture] = {
    a.name: a
    for a in (
        _upstream("genslm_25M", 512, 8, 8, 2048, "neox_25,290,752.json"),
        _upstream("genslm_250M", 1840, 12, 16, 2048, "neox_244,464,576.json"),
        _upstream("genslm_2.5B", 3840, 28, 32, 4096, "neox_2,533,931,008.json"),
        _upstream("genslm_25B", 8196, 64, 64, 8000, "neox_25,076,188,032.json (estimate-only)"),
        GenSLMArchitecture(
            name="genslm_tiny",
            hidden_size=64,
            num_layers=2,
            num_heads=4,
            intermediate_size=256,
            description="dstrain's 2-layer test model (108,928 params; seconds on a CPU)",
        ),
        GenSLMArchitecture(
            name="genslm_small",
            hidden_size=128,
            num_layers=4,
            num_heads=4,
            intermediate_size=512,
            description="dstrain's 4-layer benchmark model (811,008 params)",
        ),
    )
}
"""Registered architectures by name, smallest upstream first, then dstrain's own."""


def get_architecture(name: str) -> GenSLMArchitecture:
    """The registered architecture called `name`; a DstrainError lists the known ones."""
    try:
        return ARCHITECTURES[name]
    except KeyError:
        raise DstrainError(_unknown_architecture(name)) from None


def resolve_architecture(spec: str | Path | GenSLMArchitecture) -> GenSLMArchitecture:
    """The one `--model` resolver (train, estimate, convert-checkpoint, build_model): a
    registered name, a GPT-NeoX config.json, or an HF model directory holding one.

    Anything with a `/`, a `.json` ending or naming an existing path is read as a config;
    any other value must be a registered name (case-sensitive).
    """
    if isinstance(spec, GenSLMArchitecture):
        return spec
    text = str(spec)
    if text in ARCHITECTURES:
        return ARCHITECTURES[text]
    if text.endswith(".json") or "/" in text or Path(text).exists():
        return architecture_from_hf_config(text)
    raise DstrainError(_unknown_architecture(text))


def _unknown_architecture(name: str) -> str:
    """The one message for a `--model` value that names no registered architecture."""
    close = difflib.get_close_matches(name, list(ARCHITECTURES), n=1, cutoff=0.5)
    same_but_case = [n for n in ARCHITECTURES if n.lower() == name.lower()]
    hint = ""
    if same_but_case:  # genslm_25m for genslm_25M: difflib alone may pick genslm_250M
        hint = (
            f" Did you mean {same_but_case[0]!r}? Names are case-sensitive "
            "(M = million, B = billion parameters)."
        )
    elif close:
        hint = f" Did you mean {close[0]!r}?"
    return (
        f"unknown model architecture {name!r} (--model {name}).{hint} Registered "
        f"architectures: {', '.join(ARCHITECTURES)}; or give a GPT-NeoX config.json or an "
        "HF model directory."
    )


def names_with_shape(arch: GenSLMArchitecture) -> list[str]:
    """Registered names whose weights have the same shapes as `arch`'s."""
    return [n for n, a in ARCHITECTURES.items() if a.shape_key() == arch.shape_key()]


# config.json key -> GenSLMArchitecture field.
_REQUIRED_KEYS = {
    "hidden_size": "hidden_size",
    "num_hidden_layers": "num_layers",
    "num_attention_heads": "num_heads",
    "intermediate_size": "intermediate_size",
    "vocab_size": "vocab_size",
}


def architecture_from_hf_config(
    path_or_dict: str | Path | Mapping[str, Any], *, name: str | None = None
) -> GenSLMArchitecture:
    """Read a GPT-NeoX `config.json` (a file, a model directory holding one, or its dict).

    Accepts transformers 4's `rotary_pct` / `rotary_emb_base` and transformers 5's
    `rope_parameters` (`partial_rotary_factor`, `rope_theta`). The architecture is named
    after the file (`neox_25,290,752.json` -> `neox_25,290,752`; `DIR/config.json` ->
    `DIR`) unless `name` is given. Every problem is reported at once as a DstrainError.
    Settings dstrain cannot represent (tied embeddings, no attention bias, sequential
    residual, another model type) are refused rather than silently changed.
    """
    if isinstance(path_or_dict, Mapping):
        where, cfg = "config", dict(path_or_dict)
        default_name = "custom"
    else:
        path = Path(path_or_dict)
        if path.is_dir():
            path = path / "config.json"
        if path.exists() and not path.is_file():
            from dstrain.inputs import check_regular_file

            check_regular_file(path, "model config")  # a FIFO or device: say which
        if not path.is_file():
            raise DstrainError(
                f"model config {path} does not exist. Give a GPT-NeoX config.json, a "
                f"model directory holding one, or a registered name ({', '.join(ARCHITECTURES)})."
            )
        where = str(path)
        from dstrain.inputs import InputError, decode_utf8, parse_json, read_regular_bytes

        # Bounded like every input (dstrain.inputs): a regular file of at most 16 MiB,
        # strict UTF-8; nesting, NaN/Infinity and huge integers refused.
        text = decode_utf8(read_regular_bytes(path, "model config"), f"model config {path}")
        try:
            cfg = parse_json(text, f"model config {path}")
        except InputError as exc:
            if exc.syntax is None:
                raise
            raise DstrainError(
                f"model config {path}:{exc.syntax.lineno}:{exc.syntax.colno} is not valid JSON "
                f"({exc.syntax.msg}). Python literals such as True/None must be written true/null."
            ) from None
        if not isinstance(cfg, dict):
            raise DstrainError(
                f"model config {path} must hold a JSON object, not {type(cfg).__name__}."
            )
        default_name = path.parent.name if path.stem == "config" and path.parent.name else path.stem

    problems: list[str] = []
    fields: dict[str, Any] = {"name": name or default_name, "description": f"from {where}"}

    def positive(key: str, value: Any, kind: type | tuple[type, ...] = int) -> Any:
        if isinstance(value, bool) or not isinstance(value, kind) or value <= 0:
            what = "integer" if kind is int else "number"
            problems.append(f"{key} must be a positive {what}, got {value!r}")
        return value

    for key, field in _REQUIRED_KEYS.items():
        if key not in cfg:
            problems.append(f"{key} is missing")
        else:
            fields[field] = positive(key, cfg[key])
    if "max_position_embeddings" in cfg:
        fields["max_position_embeddings"] = positive(
            "max_position_embeddings", cfg["max_position_embeddings"]
        )
    if "layer_norm_eps" in cfg:
        fields["layer_norm_eps"] = positive("layer_norm_eps", cfg["layer_norm_eps"], (int, float))
    if "hidden_act" in cfg:
        fields["hidden_act"] = cfg["hidden_act"]
        if not isinstance(cfg["hidden_act"], str):
            problems.append(f"hidden_act must be a string, got {cfg['hidden_act']!r}")

    for key in ("hidden_dropout", "attention_dropout"):  # GPT-NeoX's names, not BERT's
        if key in cfg:
            value = cfg[key]
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0 <= value < 1:
                problems.append(f"{key} must be a number in [0, 1), got {value!r}")
            fields[key] = value

    rope = cfg.get("rope_parameters") or {}
    if not isinstance(rope, dict):
        problems.append(f"rope_parameters must be an object, got {rope!r}")
        rope = {}
    rotary_pct = cfg.get("rotary_pct", rope.get("partial_rotary_factor"))
    rotary_base = cfg.get("rotary_emb_base", rope.get("rope_theta"))
    if rotary_pct is not None:
        if isinstance(rotary_pct, bool) or not isinstance(rotary_pct, (int, float)):
            problems.append(f"rotary_pct must be a number in (0, 1], got {rotary_pct!r}")
        elif not 0 < rotary_pct <= 1:
            problems.append(f"rotary_pct must be in (0, 1], got {rotary_pct!r}")
        fields["rotary_pct"] = rotary_pct
    if rotary_base is not None:
        fields["rotary_emb_base"] = positive("rotary_emb_base", rotary_base, (int, float))
    if rope.get("rope_type", "default") != "default" or cfg.get("rope_scaling"):
        problems.append("rope scaling is not supported (GenSLM uses plain rotary embeddings)")

    model_type = cfg.get("model_type", "gpt_neox")
    if model_type != "gpt_neox":
        problems.append(f"model_type is {model_type!r}; dstrain trains GPT-NeoX ('gpt_neox') only")
    for key, wanted in (
        ("tie_word_embeddings", False),
        ("attention_bias", True),
        ("use_parallel_residual", True),
    ):
        if key in cfg and cfg[key] != wanted:
            problems.append(f"{key} is {cfg[key]!r}; GenSLM models use {json.dumps(wanted)}")

    if problems:
        raise DstrainError(
            f"model config {where} cannot be used: " + "; ".join(problems) + ". Fix the file "
            f"or use a registered architecture ({', '.join(ARCHITECTURES)})."
        )
    return GenSLMArchitecture(**fields)
