"""Strict checks for any DeepSpeed JSON config: ours, or one copied from elsewhere.

Pure layer (L0) up to `deepspeed_parser_problems`, which imports deepspeed on demand.
DeepSpeed 0.19.8 parses its config leniently: unknown keys at the top level and in the
blocks it reads with `dict.get` (`flops_profiler`, `checkpoint`, `activation_checkpointing`,
...) pass silently, `"auto"` inside checked blocks is dropped (so `fp16.enabled: "auto"`
trains in fp32), `offload_param` under stage 2 and NVMe offload without a path are
accepted, and batch arithmetic is done for world size 1 only. `check_ds_config` catches
all of these and reports every problem at once, each with its JSON path, what DeepSpeed
does with it, and a fix. DeepSpeed's own complaint is reported beside them.

The known keys come from dstrain/ds_schema.json, measured from the installed DeepSpeed by
scripts/gen_ds_schema.py (a test keeps it in step with the installed version). So do the
types of the values in every block a DeepSpeed pydantic model parses: `value_types`
rebuilds a pydantic validator from each measured description, so a value is coerced
("true" -> true, 5e8 -> 500000000) or refused (0.5 for an int, 0 where gt=0) exactly as
DeepSpeed's lax models do, without importing DeepSpeed. To add a
rule: one method on `_Checker` (or a line in one), a case in tests/test_ds_check.py, and a
config in tests/assets/ds_corpus/ with the verdict DeepSpeed gives it.
"""

from __future__ import annotations

import copy
import difflib
import enum
import json
import math
import os
import re
import sys
from dataclasses import asdict, dataclass
from functools import cache
from pathlib import Path
from typing import Annotated, Any, Literal, Optional, Union

import annotated_types
from pydantic import BeforeValidator, PlainValidator, TypeAdapter, ValidationError

from dstrain.ds_runtime import redirect_fds

LOSS_SCALE_KEYS = (
    "loss_scale",
    "initial_scale_power",
    "loss_scale_window",
    "hysteresis",
    "consecutive_hysteresis",
    "min_loss_scale",
)
BATCH_KEYS = ("train_batch_size", "train_micro_batch_size_per_gpu", "gradient_accumulation_steps")
DEEPSPEED_AUTO_KEYS = frozenset({"pipeline.stages", "data_types.keep_in_fp32_modules"})
"""Keys where `"auto"` is DeepSpeed's own value (its defaults), not an HF placeholder."""
OFFLOAD_DEVICES = ("none", "cpu", "nvme")
SEVERITIES = ("error", "warning", "note")
"""`error` fails validation; `warning` and `note` are printed only."""

# What replaced each block DeepSpeed 0.19.8 refuses (the key list itself is measured into
# ds_schema.json["removed"]; these hints are ours).
REMOVED_HINTS = {
    "nebula": "remove the block: checkpoints are written with torch.save",
    "compression_training": "remove the block: there is no compression library any more",
    "amp": "use `bf16`, `fp16` or `torch_autocast` instead of Apex AMP",
    "quantize_training": "remove the block: there is no quantization-aware training (MoQ)",
    "sparse_gradients": "remove it: an nn.Embedding built with sparse=True is still reduced "
    "sparsely without a flag",
    "eigenvalue": "remove the block (it only served MoQ, also removed)",
    "sparse_attention": "remove the block and use the model's own attention",
    "elasticity": "remove the block and set train_batch_size, train_micro_batch_size_per_gpu "
    "and gradient_accumulation_steps yourself",
    "graph_harvesting": "remove the key",
    "curriculum_learning": "move it to data_efficiency.data_sampling.curriculum_learning",
    "progressive_layer_drop": "remove the block",
    "mics_shard_size": "remove it: plain ZeRO-3 (zero_hpz_partition_size for hierarchical "
    "partitioning) replaces MiCS",
    "mics_hierarchical_params_gather": "remove it: plain ZeRO-3 replaces MiCS",
    "zeropp_loco_param": "remove it: ZeRO++ quantized gradients work without LoCo",
}
# 1-bit optimizers left DeepSpeed before 0.19.8; the engine then looks them up in torch.optim.
ONE_BIT_OPTIMIZERS = {"onebitadam": "AdamW", "zerooneadam": "AdamW", "onebitlamb": "Lamb"}


@dataclass(frozen=True)
class Problem:
    """One thing wrong with a config: where, what, and how to fix it."""

    file: str
    path: str
    message: str
    fix: str = ""
    severity: str = "error"  # one of SEVERITIES; only "error" fails validation
    origin: str = "dstrain"  # "dstrain" or "deepspeed" (its own parser's complaint)

    def format(self) -> str:
        where = f"{self.file}: {self.path}" if self.path else self.file
        text = f"{where}: {self.severity}: {self.message}"
        return f"{text}. Fix: {self.fix}" if self.fix else text

    def to_dict(self) -> dict[str, str]:
        return asdict(self)


@cache
def load_schema() -> dict[str, Any]:
    """The measured table of DeepSpeed's keys (dstrain/ds_schema.json)."""
    return json.loads((Path(__file__).parent / "ds_schema.json").read_text(encoding="utf-8"))


# --------------------------------------------------------------------------------------
# Reading: bytes -> dict, with line/column errors, duplicate keys and binary input caught
# --------------------------------------------------------------------------------------


class _Object(dict):
    """A JSON object that remembers keys it saw more than once."""

    duplicates: tuple[str, ...] = ()


def _object_pairs(pairs: list[tuple[str, Any]]) -> _Object:
    obj = _Object()
    seen = []
    for key, value in pairs:
        if key in obj:
            seen.append(key)
        obj[key] = value
    obj.duplicates = tuple(seen)
    return obj


def _duplicate_problems(node: Any, source: str, path: str = "") -> list[Problem]:
    problems = []
    if isinstance(node, dict):
        for key in getattr(node, "duplicates", ()):
            problems.append(
                Problem(
                    source,
                    _join(path, key),
                    f"key `{key}` appears more than once (JSON keeps only the last, "
                    "DeepSpeed refuses the file)",
                    "keep one copy of the key",
                )
            )
        for key, value in node.items():
            problems.extend(_duplicate_problems(value, source, _join(path, key)))
    elif isinstance(node, list):
        for index, value in enumerate(node):
            problems.extend(_duplicate_problems(value, source, f"{path}[{index}]"))
    return problems


def parse_ds_json(data: bytes, source: str) -> tuple[dict[str, Any] | None, list[Problem]]:
    """Decode and parse config bytes. Returns the dict (None if unusable) and problems.

    Bounded by `dstrain.inputs`: strict UTF-8, nesting depth, NaN/Infinity, integers
    outside int64 and lone surrogates are problems with a line/column, never exceptions.
    """
    from dstrain.inputs import InputError, decode_utf8, parse_json

    if b"\x00" in data[:8192]:
        return None, [
            Problem(
                source,
                "",
                "this is a binary file, not JSON text",
                "pass the path of a DeepSpeed JSON config",
            )
        ]
    try:
        text = decode_utf8(data, source)
        if not text.strip():
            return None, [Problem(source, "", "the file is empty", "write a JSON object ({...})")]
        config = parse_json(text, source, object_pairs_hook=_object_pairs)
    except InputError as exc:
        return None, [Problem(source, "", str(exc).removeprefix(f"{source}: "))]
    if not isinstance(config, dict):
        return None, [
            Problem(
                source,
                "",
                f"the top level is a JSON {type(config).__name__}, not an object",
                "wrap the settings in {...}",
            )
        ]
    return config, _duplicate_problems(config, source)


def read_ds_json(path: str, stdin: Any = None) -> tuple[dict[str, Any] | None, list[Problem]]:
    """Read a config file (or stdin for `-`) and parse it; a FIFO, device or directory
    is refused unopened, and a file over 16 MiB unread (`dstrain.inputs`)."""
    from dstrain.inputs import MAX_CONFIG_BYTES, InputError, read_regular_bytes

    if path == "-":
        stream = stdin if stdin is not None else sys.stdin.buffer
        data = stream.read(MAX_CONFIG_BYTES + 1)
        if len(data) > MAX_CONFIG_BYTES:
            return None, [Problem("<stdin>", "", f"more than {MAX_CONFIG_BYTES:,} bytes")]
        return parse_ds_json(data, "<stdin>")
    try:
        data = read_regular_bytes(path, "DeepSpeed config")
    except InputError as exc:
        return None, [Problem(path, "", str(exc).replace(f"DeepSpeed config {path} ", "", 1))]
    return parse_ds_json(data, path)


# --------------------------------------------------------------------------------------
# Value types: DeepSpeed's field types rebuilt from ds_schema.json["value_types"]
# --------------------------------------------------------------------------------------

_SCALARS: dict[str, type] = {"bool": bool, "int": int, "float": float, "str": str, "path": Path}
_OPEN = {"any": Any, "dict": dict, "tuple": tuple, "object": dict}  # "object": a nested model


def _refuse_bool(value: Any) -> Any:
    if isinstance(value, bool):
        raise ValueError("a bool is refused here")
    return value


def _refuse_non_finite(value: Any) -> Any:
    if isinstance(value, float) and not math.isfinite(value):
        raise ValueError("must be a finite number (not inf/-inf/nan)")
    return value


def value_type(description: dict[str, Any]) -> Any:
    """The annotation a measured description stands for (see scripts/gen_ds_schema.py).

    Validated with a non-strict `TypeAdapter` it coerces exactly as DeepSpeed's lax
    models do: "true"/1 -> True, 5e8 -> 500000000, "2" -> stage 2; 0.5 is no int.
    """
    kind = description["type"]
    if kind in _SCALARS:
        annotation: Any = _SCALARS[kind]
    elif kind in _OPEN:
        annotation = _OPEN[kind]
    elif kind == "list":
        items = description.get("items")
        annotation = list[value_type(items)] if items else list
    elif kind == "literal":
        annotation = Literal[tuple(description["choices"])]
    elif kind == "enum":
        # An Enum, not a Literal: pydantic coerces into an int-valued Enum ("2" -> 2), as
        # it does for DeepSpeed's ZeroStageEnum.
        choices = description["choices"]
        base = int if all(isinstance(c, int) for c in choices) else str
        members = {f"choice_{i}": choice for i, choice in enumerate(choices)}
        annotation = enum.Enum("Choices", members, type=base)
    elif kind == "union":
        annotation = Union[tuple(value_type(d) for d in description["of"])]  # noqa: UP007
    elif kind == "instance":
        # arbitrary_types_allowed: an isinstance check no JSON value passes
        def refuse(value: Any, of: str = description["of"]) -> Any:
            raise ValueError(f"DeepSpeed wants a Python {of} object, which JSON cannot hold")

        annotation = Annotated[Any, PlainValidator(refuse)]
    else:
        raise ValueError(f"unknown value type {kind!r} in ds_schema.json")
    bounds = [
        getattr(annotated_types, name.capitalize())(description[name])
        for name in ("gt", "ge", "lt", "le")
        if name in description
    ]
    if bounds:
        annotation = Annotated[(annotation, *bounds)]
    if description.get("finite"):
        annotation = Annotated[annotation, BeforeValidator(_refuse_non_finite)]
    if description.get("no_bool"):
        annotation = Annotated[annotation, BeforeValidator(_refuse_bool)]
    if description.get("nullable"):
        annotation = Optional[annotation]  # noqa: UP045
    return annotation


@cache
def value_type_adapter(description_json: str) -> TypeAdapter:
    """A cached validator for one description (given as JSON text, to be hashable)."""
    return TypeAdapter(value_type(json.loads(description_json)))


def describe_value_type(description: dict[str, Any]) -> str:
    """What a description accepts, in words: "a whole number > 0", "true or false"."""
    kind = description["type"]
    words = {
        "bool": "true or false",
        "int": "a whole number",
        "float": "a number",
        "str": "a string",
        "path": "a path (a string)",
        "dict": "an object ({...})",
        "object": "an object ({...})",
        "tuple": "a list",
        "any": "any value",
    }
    if kind in words:
        text = words[kind]
    elif kind == "list":
        items = description.get("items")
        text = f"a list, each item {describe_value_type(items)}" if items else "a list"
    elif kind in ("enum", "literal"):
        text = "one of " + ", ".join(json.dumps(c) for c in description["choices"])
    elif kind == "union":
        text = " or ".join(describe_value_type(d) for d in description["of"])
    else:
        text = f"a Python {description.get('of', kind)} object (no JSON value is)"
    bounds = [
        f"{sign} {description[name]:g}"
        for name, sign in (("gt", ">"), ("ge", ">="), ("lt", "<"), ("le", "<="))
        if name in description
    ]
    if bounds:
        text += " " + " and ".join(bounds)
    if description.get("finite"):
        text += " (finite)"
    if description.get("nullable"):
        text += ", or null"
    return text


def _show(value: Any) -> str:
    return json.dumps(value) if _is_jsonable(value) else repr(value)


def _is_jsonable(value: Any) -> bool:
    try:
        json.dumps(value, allow_nan=False)
    except (TypeError, ValueError):
        return False
    return True


def _coercion_note(value: Any, coerced: Any, kind: str) -> str | None:
    """How DeepSpeed reads a value of another JSON type, when that is worth a warning.

    A whole float for an int (5e8 for 500000000) and an int for a float are how DeepSpeed's
    own examples are written: no warning.
    """
    if kind in ("str", "path") or coerced is None:
        return None
    if type(coerced) is type(value) and coerced == value:
        return None  # read as written (a string enum's own value)
    if isinstance(value, str) or isinstance(value, bool) != isinstance(coerced, bool):
        return f"DeepSpeed's parser reads {_show(value)} as {_show(coerced)}"
    return None


# --------------------------------------------------------------------------------------
# Checking a parsed config
# --------------------------------------------------------------------------------------


def _join(path: str, key: str) -> str:
    return f"{path}.{key}" if path else key


def _suggest(key: str, known: list[str]) -> str:
    close = difflib.get_close_matches(key, known, n=1, cutoff=0.6)
    if close:
        return f"did you mean `{close[0]}`?"
    return "remove it (see DeepSpeed's config documentation for the valid keys)"


def _lookup(node: Any, dotted: str) -> Any:
    """The value at a dotted JSON path, or None where the path is missing."""
    for part in dotted.split(".") if dotted else []:
        if not isinstance(node, dict):
            return None
        node = node.get(part)
    return node


def _is_auto(value: Any) -> bool:
    return isinstance(value, str) and value.strip().lower() == "auto"


def _is_int(value: Any) -> bool:
    if isinstance(value, bool):
        return False
    return isinstance(value, int) or (isinstance(value, float) and value.is_integer())


def _is_number(value: Any) -> bool:
    """A finite JSON number (NaN and ±Infinity pass every comparison rule otherwise)."""
    if isinstance(value, float):
        return math.isfinite(value)
    return isinstance(value, int) and not isinstance(value, bool)


def _enabled(block: Any) -> bool:
    return isinstance(block, dict) and block.get("enabled") is True


class _Checker:
    """Collects problems for one config; each method checks one concern."""

    def __init__(self, config: dict[str, Any], source: str):
        self.config = config
        self.source = source
        self.problems: list[Problem] = []

    def add(self, path: str, message: str, fix: str = "", severity: str = "error") -> None:
        self.problems.append(Problem(self.source, path, message, fix, severity))

    # a. unknown, removed and comment keys at every level --------------------------------

    def unknown_keys(self) -> None:
        schema = load_schema()
        strict = set(schema["strict_blocks"])
        open_blocks = set(schema["open_blocks"])
        for block_path, known in schema["blocks"].items():
            node = self._get(block_path)
            if not isinstance(node, dict) or block_path in open_blocks:
                continue
            removed = schema["removed"].get(block_path, [])
            for key in node:
                if key in known:
                    continue
                path = _join(block_path, key)
                if key in removed:
                    self.add(
                        path,
                        f"`{key}` was removed from DeepSpeed; 0.19.8 refuses any config that "
                        "still has it, at parse time (DeepSpeedConfigError)",
                        REMOVED_HINTS.get(key, "remove it"),
                    )
                elif block_path in ("bf16", "bfloat16") and key in LOSS_SCALE_KEYS:
                    self.add(
                        path,
                        "fp16 loss-scaling key under bf16: bf16 has fp32's range and "
                        "DeepSpeed does no loss scaling for it; its bf16 block refuses the key",
                        f"remove `{key}` (or switch to fp16 and move it under `fp16`)",
                    )
                elif key.startswith("_") and block_path not in strict:
                    self.add(path, "a comment key: DeepSpeed ignores it", severity="note")
                elif block_path in strict:
                    self.add(
                        path,
                        f"unknown key `{key}`: DeepSpeed's `{block_path}` block forbids unknown "
                        "keys (comments too) and refuses the config",
                        _suggest(key, known),
                    )
                else:
                    self.add(
                        path,
                        f"unknown key `{key}`: DeepSpeed never reads it and ignores it silently",
                        _suggest(key, known),
                    )
        self._typed_params("optimizer", schema["optimizers"])
        self._typed_params("scheduler", schema["schedulers"])

    def _typed_params(self, block: str, table: dict[str, Any]) -> None:
        """`params` of an optimizer or scheduler against its constructor's signature."""
        node = self.config.get(block)
        if not isinstance(node, dict) or not isinstance(node.get("type"), str):
            return
        kind = _resolve_type(block, node["type"])
        if kind is None:
            return
        signature = table["params"].get(kind)
        if signature is None:
            return  # a class DeepSpeed builds whose signature was not measured (mup)
        params = node.get("params")
        if block == "scheduler" and params is None:
            self.add(
                "scheduler.params",
                f"missing: DeepSpeed builds the scheduler as {node['type']}(optimizer, "
                "**params) and fails with a TypeError when there is no `params`",
                'add "params": {} (with the values the scheduler needs)',
            )
            return
        if not isinstance(params, dict):
            if params is not None:
                self.add(f"{block}.params", f"must be an object, not {params!r}")
            return
        for key in params:
            path = f"{block}.params.{key}"
            if key == "max_grad_norm" and block == "optimizer":
                self.add(
                    path,
                    "DeepSpeed refuses max_grad_norm here (ValueError in deepspeed.initialize)",
                    "use the top-level `gradient_clipping` instead",
                )
            elif key not in signature["keys"] and not signature.get("any_key"):
                self.add(
                    path,
                    f"{node['type']} takes no parameter `{key}`: deepspeed.initialize fails "
                    "with a TypeError when it builds it",
                    _suggest(key, signature["keys"]),
                )
        # null counts as missing: DeepSpeed passes None on and the schedule fails on it.
        missing = [key for key in signature["required"] if params.get(key) is None]
        if missing:
            self.add(
                f"{block}.params.{missing[0]}",
                f"{node['type']} needs {', '.join(missing)} (no default, and null is no "
                "value): deepspeed.initialize or the first step fails on it",
                f"set {', '.join(missing)}",
            )

    def _get(self, dotted: str) -> Any:
        return _lookup(self.config, dotted)

    # b. value types, as DeepSpeed's pydantic models coerce and refuse them ------------

    def value_types(self) -> dict[str, Any]:
        """Check every value in a block a DeepSpeed model parses against its measured type.

        Returns a copy of the config with the values DeepSpeed coerces replaced by what it
        reads ("true" -> true, "2" -> 2), for the value rules to see what DeepSpeed sees.
        "auto" values are skipped: DeepSpeed's models drop them (reported under b2). Rules
        a model validator applies across fields stay with DeepSpeed's parser.
        """
        schema = load_schema()
        coerced = copy.deepcopy(self.config)
        for block_path, fields in schema["value_types"].items():
            node = self._get(block_path)
            if node is None:
                continue
            if not isinstance(node, dict):
                # A model root (a nested model's non-object value is checked by its parent).
                parent = block_path.rpartition(".")[0]
                if parent not in schema["value_types"] and not (
                    block_path == "zero_optimization" and isinstance(node, bool)
                ):  # a boolean zero_optimization is the old form, read apart (zero_rules)
                    self.add(
                        block_path,
                        f"must be an object ({{...}}), not {_show(node)}: DeepSpeed's parser "
                        "refuses it (it unpacks the block into a config model)",
                        'write {"enabled": true, ...} or remove the block',
                    )
                continue
            target = _lookup(coerced, block_path)
            for key, value in node.items():
                description = fields.get(key)
                if description is None or "unchecked" in description or _is_auto(value):
                    continue  # unknown keys are reported apart; unchecked: DeepSpeed decides
                path = _join(block_path, key)
                try:
                    value_read = value_type_adapter(
                        json.dumps(description, sort_keys=True)
                    ).validate_python(value)
                except ValidationError as exc:
                    self._refused(path, value, description, exc)
                    continue
                if isinstance(value_read, enum.Enum):
                    value_read = value_read.value  # DeepSpeed's models keep enum values
                if description["type"] in ("bool", "int", "float", "enum") and value_read != value:
                    target[key] = value_read
                note = _coercion_note(value, value_read, description["type"])
                if note:
                    self.add(
                        path,
                        f"{note} (pydantic's lax coercion) and accepts it",
                        f"write {_show(value_read)}",
                        severity="warning",
                    )
        return coerced

    def _refused(self, path: str, value: Any, description: dict, exc: ValidationError) -> None:
        item = exc.errors(include_url=False)[0]  # one message per value
        index = [part for part in item["loc"] if isinstance(part, int)]
        if index and description.get("items"):  # one list item is wrong: name it alone
            path += "".join(f"[{i}]" for i in index)
            value, description = item["input"], description["items"]
        wanted = describe_value_type(description)
        fix = f"write {wanted}"
        if description["type"] == "instance":
            fix = "remove the key (only a config dict built in Python can set it)"
        self.add(
            path,
            f"{_show(value)} is not {wanted}; DeepSpeed's parser refuses it: {item['msg']}",
            fix,
        )

    # b2. leftover "auto" -------------------------------------------------------------

    def auto_values(self) -> None:
        self._auto_values(self.config, "")

    def _auto_values(self, node: Any, path: str) -> None:
        if isinstance(node, dict):
            for key, value in node.items():
                self._auto_values(value, _join(path, key))
        elif isinstance(node, list):
            for index, value in enumerate(node):
                self._auto_values(value, f"{path}[{index}]")
        elif _is_auto(node) and path not in DEEPSPEED_AUTO_KEYS:
            leaf = path.rsplit(".", 1)[-1]
            if path in ("fp16.enabled", "bf16.enabled"):
                why = (
                    "DeepSpeed drops it silently and trains in fp32; only HF Trainer and "
                    "accelerate fill `auto` in"
                )
                fix = "write true or false"
            elif leaf in BATCH_KEYS:
                why = "DeepSpeed fails on it with a TypeError at start-up"
                fix = "write a whole number (or leave the key out to have DeepSpeed derive it)"
            else:
                why = (
                    "only HF Trainer and accelerate fill `auto` in; plain DeepSpeed drops "
                    "it and uses its default, or fails on it"
                )
                fix = "write the value (or pass --allow-auto if an HF Trainer fills it in)"
            self.add(path, f'leftover "auto": {why}', fix)

    # c. rules DeepSpeed skips, or enforces with a bare assertion ------------------------

    def precision_rules(self) -> None:
        # Types (`enabled` a bool, the block an object, the scale keys numbers) are the
        # value-type check's; these are the ranges and the rules between keys.
        fp16, bf16 = self.config.get("fp16"), self.config.get("bf16", self.config.get("bfloat16"))
        if "bf16" in self.config and "bfloat16" in self.config:
            self.add(
                "bfloat16",
                "both `bf16` and its old name `bfloat16` are set: DeepSpeed reads `bf16` and "
                "ignores `bfloat16` silently",
                "keep only `bf16`",
            )
        if _enabled(fp16) and _enabled(bf16):
            self.add(
                "bf16.enabled",
                "fp16 and bf16 are both enabled: DeepSpeed refuses the config (assertion)",
                "enable one: bf16 on Ampere or newer GPUs, fp16 on older ones",
            )
        if not isinstance(fp16, dict):
            return
        scale = fp16.get("loss_scale", 0)
        if _is_number(scale) and scale < 0:
            self.add(
                "fp16.loss_scale",
                f"must be a number >= 0, not {scale!r}",
                "0 for dynamic scaling, or a fixed power of two",
            )
        if not _enabled(fp16):
            return  # DeepSpeed reads the scaling knobs only while fp16 is on
        window = fp16.get("loss_scale_window")
        if _is_int(window) and window < 1:
            self.add(
                "fp16.loss_scale_window",
                f"must be a whole number >= 1, not {window!r}",
                "the usual value is 1000",
            )
        for key, low in (("initial_scale_power", 0), ("hysteresis", 1)):
            value = fp16.get(key)
            if _is_int(value) and value < low:
                self.add(f"fp16.{key}", f"must be a whole number >= {low}, not {value!r}")
        min_scale = fp16.get("min_loss_scale")
        dynamic = _is_number(scale) and scale == 0
        if dynamic and _is_number(min_scale) and min_scale <= 0:
            self.add(
                "fp16.min_loss_scale",
                f"must be > 0 with dynamic loss scaling, not {min_scale!r}",
                "1 is the usual floor",
            )

    def clipping_rule(self) -> None:
        clip = self.config.get("gradient_clipping")
        if clip is not None and (not _is_number(clip) or clip < 0):
            self.add(
                "gradient_clipping",
                f"must be a number >= 0, not {clip!r}",
                "1.0 is common; 0 disables clipping",
            )

    def parallel_size_rules(self) -> None:
        # deepspeed.initialize reads data_parallel_size only when sequence_parallel_size is
        # there too (one `and` in deepspeed/__init__.py).
        if "data_parallel_size" in self.config and "sequence_parallel_size" not in self.config:
            self.add(
                "data_parallel_size",
                "DeepSpeed reads data_parallel_size only together with sequence_parallel_size; "
                "alone it is ignored silently",
                "add sequence_parallel_size or remove data_parallel_size",
            )

    def zero_rules(self) -> None:
        zero = self.config.get("zero_optimization")
        boolean_keys = load_schema()["boolean_zero_keys"]
        if zero is not True:
            for key in boolean_keys:
                if key in self.config:
                    self.add(
                        key,
                        f"DeepSpeed reads `{key}` only with the old boolean "
                        '`"zero_optimization": true`; here it is ignored silently',
                        "use zero_optimization.allgather_bucket_size",
                    )
        if zero is None:
            return
        if isinstance(zero, bool):
            if zero:
                message = (
                    "the old boolean form: DeepSpeed 0.19.8 reads `true` as ZeRO stage 1, "
                    "takes allgather_bucket_size from the top-level `allgather_size` "
                    "(default 5e8) and logs a deprecation warning"
                )
            else:
                message = (
                    "the old boolean form: DeepSpeed 0.19.8 reads `false` as stage 0 (no ZeRO)"
                )
            self.add(
                "zero_optimization", message, f'write {{"stage": {int(zero)}}}', severity="warning"
            )
            return
        stage = zero.get("stage", 0) if isinstance(zero, dict) else None
        if stage not in (0, 1, 2, 3):
            return  # not an object, or no stage: refused by the value-type check
        for name in ("offload_optimizer", "offload_param"):
            self._offload_rules(name, zero.get(name), stage)
        if stage != 3:
            stage3 = sorted(k for k in zero if k.startswith("stage3_"))
            if stage3:
                self.add(
                    "zero_optimization." + stage3[0],
                    f"{', '.join(stage3)} only apply to stage 3; DeepSpeed ignores them "
                    f"at stage {stage}",
                    "remove them or use stage 3",
                    severity="warning",
                )

    def _offload_rules(self, name: str, block: Any, stage: int) -> None:
        if block is None:
            return
        path = f"zero_optimization.{name}"
        device = block.get("device", "none") if isinstance(block, dict) else None
        if device not in OFFLOAD_DEVICES or device == "none":
            return  # none, or refused by the value-type check
        if name == "offload_param" and stage != 3:
            self.add(
                f"{path}.device",
                f"offload_param needs ZeRO stage 3 but stage is {stage}; DeepSpeed accepts it, "
                "ignores it silently and keeps the parameters on the accelerator",
                'set "stage": 3 or remove offload_param',
            )
        if name == "offload_optimizer" and stage == 0:
            self.add(
                f"{path}.device",
                "offload_optimizer needs ZeRO stage 1, 2 or 3; at stage 0 DeepSpeed accepts it "
                "and keeps the optimizer state on the accelerator",
                'set "stage": 2 (or 3)',
            )
        if device != "nvme":
            return
        if not block.get("nvme_path"):
            self.add(
                f"{path}.nvme_path",
                "device is nvme but nvme_path is not set; DeepSpeed's parser accepts this and "
                "the NVMe swapper fails later, once training starts",
                "set nvme_path to a directory on a local NVMe drive",
            )
        if stage != 3:
            what = (
                "treats an NVMe optimizer offload as a CPU offload (no swapping to disk)"
                if name == "offload_optimizer" and stage in (1, 2)
                else "ignores it"
            )
            self.add(
                f"{path}.device",
                f"NVMe offload needs ZeRO stage 3 (stage is {stage}); DeepSpeed {what}",
                'set "stage": 3 or offload to "cpu"',
            )

    def optimizer_rules(self) -> None:
        schema = load_schema()
        for block in ("optimizer", "scheduler"):
            node = self.config.get(block)
            table = schema[f"{block}s"]
            known = table["deepspeed"] + table["torch"]
            if node is None:
                continue
            if not isinstance(node, dict):
                self.add(block, f"must be an object, not {node!r}")
                continue
            kind = node.get("type")
            if not isinstance(kind, str):
                self.add(
                    f"{block}.type",
                    f"missing or not a name ({kind!r}): DeepSpeed then builds no {block} and "
                    "ignores the block silently",
                    f"one of {', '.join(known)}",
                )
                continue
            if _resolve_type(block, kind) is not None:
                continue
            if block == "optimizer" and kind.lower() in ONE_BIT_OPTIMIZERS:
                self.add(
                    "optimizer.type",
                    f"the 1-bit optimizer {kind} is gone from DeepSpeed 0.19.8: "
                    f"deepspeed.initialize looks for torch.optim.{kind} and fails",
                    f'use "{ONE_BIT_OPTIMIZERS[kind.lower()]}" (1-bit communication '
                    "compression has no successor)",
                )
                continue
            where = "torch.optim" if block == "optimizer" else "torch.optim.lr_scheduler"
            self.add(
                f"{block}.type",
                f"`{kind}` is neither a DeepSpeed {block} nor a class in {where} (names there "
                "are case-sensitive): deepspeed.initialize fails when it builds it",
                _suggest(kind, known),
            )
        self._optimizer_values()

    def _optimizer_values(self) -> None:
        """Types and ranges of the optimizer's and scheduler's params, as torch's optimizers
        and DeepSpeed 0.19.8's lr_schedules.py check them at deepspeed.initialize, or where
        nothing checks them (DeepSpeed's fused and CPU Adam, negative lr) and training
        goes wrong with exit 0."""
        params = self._get("optimizer.params")
        if isinstance(params, dict):
            self._optimizer_params(params)
        sched = self._get("scheduler.params")
        kind = self._get("scheduler.type")
        if isinstance(sched, dict) and isinstance(kind, str):
            self._scheduler_params(kind, sched)

    def _number_rule(
        self,
        params: dict[str, Any],
        block: str,
        key: str,
        low: float,
        *,
        low_open: bool = False,
        high: float | None = None,
        high_open: bool = True,
        whole: bool = False,
        per_group: bool = False,
        why: str = "",
    ) -> None:
        """`params[key]`, when present, must be a finite number (`whole`: an int) in range;
        `per_group`: a list of such numbers (one per param group) is accepted too."""
        if key not in params:
            return
        value = params[key]
        path = f"{block}.params.{key}"
        items = value if per_group and isinstance(value, list) and value else [value]
        for item in items:
            ok = _is_int(item) and not isinstance(item, float) if whole else _is_number(item)
            if ok:
                ok = item > low if low_open else item >= low
                if ok and high is not None:
                    ok = item < high if high_open else item <= high
            if not ok:
                kind = "a whole number" if whole else "a finite number"
                bound = f"{'>' if low_open else '>='} {low:g}"
                if high is not None:
                    bound += f" and {'<' if high_open else '<='} {high:g}"
                self.add(path, f"must be {kind} {bound}, not {_show(value)}{why}")
                return

    def _optimizer_params(self, params: dict[str, Any]) -> None:
        lr = params.get("lr")
        if "lr" in params and not (_is_number(lr) and lr > 0):
            self.add(
                "optimizer.params.lr",
                f"must be a finite number > 0, not {_show(lr)}: torch's optimizers refuse a "
                "negative or non-number lr at deepspeed.initialize; DeepSpeed's fused and CPU "
                "Adam train with it unchecked (a negative lr climbs the loss)",
                "5e-5 is dstrain's default",
            )
        betas = params.get("betas")
        if betas is not None and not (
            isinstance(betas, list)
            and len(betas) == 2
            and all(_is_number(b) and 0 <= b < 1 for b in betas)
        ):
            self.add(
                "optimizer.params.betas",
                f"must be two numbers in [0, 1), not {_show(betas)}: torch's Adam refuses "
                "them, DeepSpeed's fused and CPU Adam train with them unchecked",
                "[0.9, 0.999] is the usual choice",
            )
        why = (
            ": torch's optimizers refuse it at deepspeed.initialize, DeepSpeed's own train with it"
        )
        for key in ("eps", "weight_decay", "momentum", "dampening", "alpha", "lr_decay"):
            self._number_rule(params, "optimizer", key, 0, why=why)
        for key in ("amsgrad", "nesterov", "bias_correction", "adam_w_mode", "maximize"):
            if key in params and not isinstance(params[key], bool):
                self.add(
                    f"optimizer.params.{key}",
                    f"must be true or false, not {_show(params[key])}",
                )
        if "torch_adam" in params and not isinstance(params["torch_adam"], bool):
            # DeepSpeed tests it for truth: "false" builds torch's AdamW, null FusedAdam.
            self.add(
                "optimizer.params.torch_adam",
                f"must be true or false, not {_show(params['torch_adam'])}: DeepSpeed "
                "reads any other value by its truth",
                "true: torch's AdamW; false: DeepSpeed's FusedAdam; leave it out and "
                "`dstrain train` picks FusedAdam on a GPU, torch's AdamW on CPU",
            )

    def _scheduler_params(self, kind: str, sched: dict[str, Any]) -> None:
        block = "scheduler"
        fails = ": DeepSpeed's scheduler refuses it at deepspeed.initialize"
        wrong = ": DeepSpeed's scheduler takes it unchecked and trains with a wrong learning rate"
        if kind in ("WarmupLR", "WarmupDecayLR", "WarmupCosineLR"):
            self._number_rule(
                sched,
                block,
                "warmup_num_steps",
                0,
                low_open=True,
                whole=True,
                why=fails
                + " (it wants a positive int; DeepSpeed treats 1 as 2, the shortest warm-up)",
            )
            if sched.get("total_num_steps") is not None:  # null: the `required` rule says it
                self._number_rule(
                    sched,
                    block,
                    "total_num_steps",
                    0,
                    low_open=True,
                    # DeepSpeed only divides by it: 3e5 (a float, as Megatron-style configs
                    # write it) works, so any positive finite number passes.
                    why=": the schedule is measured in optimizer steps",
                )
            warmup_type = sched.get("warmup_type")
            if "warmup_type" in sched and warmup_type not in ("log", "linear"):
                self.add(
                    "scheduler.params.warmup_type",
                    f'must be "log" or "linear", not {_show(warmup_type)}: DeepSpeed only logs '
                    'a warning and uses "log"',
                    'write "linear" (dstrain\'s default) or "log"',
                )
        if kind in ("WarmupLR", "WarmupDecayLR"):
            for key in ("warmup_min_lr", "warmup_max_lr"):
                self._number_rule(sched, block, key, 0, per_group=True, why=wrong)
            low, high = sched.get("warmup_min_lr", 0), sched.get("warmup_max_lr")
            if _is_number(low) and _is_number(high) and 0 <= high < low:
                self.add(
                    "scheduler.params.warmup_max_lr",
                    f"warmup_max_lr ({high:g}) is below warmup_min_lr ({low:g}): the "
                    "warm-up would lower the learning rate",
                    "swap them",
                    severity="warning",
                )
        if kind == "WarmupCosineLR":
            for key in ("warmup_min_ratio", "cos_min_ratio"):
                self._number_rule(sched, block, key, 0, high=1, high_open=False, why=wrong)
        if kind == "OneCycle":
            for key in ("cycle_min_lr", "cycle_max_lr", "decay_lr_rate", "decay_mom_rate"):
                self._number_rule(sched, block, key, 0, per_group=key.endswith("_lr"), why=wrong)
            self._number_rule(sched, block, "cycle_first_step_size", 0, low_open=True, why=fails)
            if sched.get("cycle_second_step_size") is not None:
                self._number_rule(sched, block, "cycle_second_step_size", 0, why=fails)
            for key in ("cycle_first_stair_count", "decay_step_size"):
                self._number_rule(sched, block, key, 0, whole=True, why=wrong)
            if sched.get("cycle_second_stair_count") is not None:
                self._number_rule(
                    sched, block, "cycle_second_stair_count", 0, whole=True, why=wrong
                )
            for key in ("cycle_min_mom", "cycle_max_mom"):
                self._number_rule(sched, block, key, 0, high=1, per_group=True, why=wrong)
            if "cycle_momentum" in sched and not isinstance(sched["cycle_momentum"], bool):
                self.add(
                    "scheduler.params.cycle_momentum",
                    f"must be true or false, not {_show(sched['cycle_momentum'])}",
                )
        if kind == "LRRangeTest":
            self._number_rule(sched, block, "lr_range_test_min_lr", 0, per_group=True, why=wrong)
            self._number_rule(
                sched, block, "lr_range_test_step_size", 0, low_open=True, whole=True, why=fails
            )
            self._number_rule(sched, block, "lr_range_test_step_rate", 0, low_open=True, why=wrong)
        if "last_batch_iteration" in sched:
            self._number_rule(sched, block, "last_batch_iteration", -1, whole=True, why=wrong)
        warmup, total = sched.get("warmup_num_steps"), sched.get("total_num_steps")
        if _is_int(warmup) and _is_int(total) and 0 < total < warmup:
            self.add(
                "scheduler.params.warmup_num_steps",
                f"warm-up ({warmup} steps) is longer than the schedule ({total} steps); "
                "DeepSpeed only logs a warning and trains with it",
                "shorten the warm-up or lengthen total_num_steps",
            )

    def non_finite_values(self) -> None:
        """NaN and ±Infinity anywhere (a config built in Python can hold them; a file
        cannot, `dstrain.inputs` refuses them): they pass every `>= 0` rule."""
        stack: list[tuple[Any, str]] = [(self.config, "")]
        while stack:
            node, path = stack.pop()
            if isinstance(node, dict):
                stack.extend((v, _join(path, str(k))) for k, v in node.items())
            elif isinstance(node, list):
                stack.extend((v, f"{path}[{i}]") for i, v in enumerate(node))
            elif isinstance(node, float) and not math.isfinite(node):
                self.add(path, f"{node} is not a finite number", "write a finite number")

    def checkpoint_rules(self) -> None:
        mode = self._get("checkpoint.tag_validation")
        modes = load_schema()["checkpoint_tag_validation_modes"]
        if mode is not None and (not isinstance(mode, str) or mode.upper() not in modes):
            self.add(
                "checkpoint.tag_validation",
                f"must be one of {', '.join(m.capitalize() for m in modes)}, not {mode!r}; "
                "DeepSpeed refuses the config",
                '"Warn" is the default',
            )

    def activation_checkpointing_rules(self) -> None:
        ac = self.config.get("activation_checkpointing")
        # DeepSpeed 0.19.8 uses contiguous buffers only while partitioning activations;
        # cpu_checkpointing works alone (it copies the checkpointed inputs to the CPU).
        if (
            isinstance(ac, dict)
            and ac.get("contiguous_memory_optimization") is True
            and ac.get("partition_activations") is not True
        ):
            self.add(
                "activation_checkpointing.contiguous_memory_optimization",
                "contiguous_memory_optimization acts only with partition_activations; "
                "DeepSpeed ignores it silently",
                "set partition_activations to true or drop it",
            )

    # d. batch arithmetic ----------------------------------------------------------------

    def batch_rules(self, world_size: int | None) -> None:
        if any(_is_auto(self.config.get(key)) for key in BATCH_KEYS):
            return  # filled in by HF Trainer / accelerate: no arithmetic to do yet
        values = {}
        for key in BATCH_KEYS:
            value = self.config.get(key)
            if value is None:
                continue
            if not _is_int(value) or value < 1:
                self.add(key, f"must be a whole number >= 1, not {value!r}")
                return
            values[key] = int(value)
        problem = check_batch_arithmetic(
            values.get("train_batch_size"),
            values.get("train_micro_batch_size_per_gpu"),
            values.get("gradient_accumulation_steps"),
            world_size,
        )
        if problem is not None:
            path, message, fix = problem
            self.add(path, message, fix)


def _resolve_type(block: str, kind: str) -> str | None:
    """The name an optimizer or scheduler `type` is built under, or None if DeepSpeed cannot.

    DeepSpeed's engine lower-cases an optimizer name of its own, else takes
    `torch.optim.<type>` as written; a scheduler is `lr_schedules.<type>`, else
    `torch.optim.lr_scheduler.<type>` (both lists measured into ds_schema.json).
    """
    table = load_schema()[f"{block}s"]
    if block == "optimizer" and kind.lower() in table["deepspeed"]:
        return kind.lower()
    if kind in table["deepspeed"] or kind in table["torch"]:
        return kind
    return None


def check_batch_arithmetic(
    train_batch_size: int | None,
    micro_batch: int | None,
    accumulation: int | None,
    world_size: int | None,
) -> tuple[str, str, str] | None:
    """Mirror DeepSpeed's batch rule for a real world size.

    DeepSpeed needs train_batch_size = micro x accumulation x world size. Given two of the
    three it derives the third by integer division, then asserts the equation, so a
    remainder makes it refuse the config (`_batch_assertion` in deepspeed/runtime/config.py).
    Returns (json path, message, fix) for the first violation, or None.
    """
    tbs, micro, gas = train_batch_size, micro_batch, accumulation
    world = world_size if world_size is not None else None
    ws_text = f"world size ({world})" if world is not None else "world size"
    if tbs is None and micro is None:
        return (
            "train_micro_batch_size_per_gpu",
            "neither train_batch_size nor train_micro_batch_size_per_gpu is set; DeepSpeed "
            "refuses the config",
            "set train_micro_batch_size_per_gpu (and gradient_accumulation_steps)",
        )
    if tbs is None:
        return None
    if micro is not None and gas is not None:
        per_rank = micro * gas
        if world is not None and tbs != per_rank * world:
            return (
                "train_batch_size",
                f"train_batch_size ({tbs}) != train_micro_batch_size_per_gpu ({micro}) x "
                f"gradient_accumulation_steps ({gas}) x {ws_text} = {per_rank * world}; "
                "DeepSpeed refuses the config",
                f"set train_batch_size to {per_rank * world}, or drop it and let DeepSpeed "
                "derive it (world size counts data-parallel ranks: with tensor or pipeline "
                "parallelism pass --world-size DP)",
            )
        if world is None and tbs % per_rank:
            return (
                "train_batch_size",
                f"train_batch_size ({tbs}) is not a multiple of train_micro_batch_size_per_gpu "
                f"({micro}) x gradient_accumulation_steps ({gas}) = {per_rank}, so DeepSpeed "
                "refuses it at every world size",
                "drop train_batch_size (DeepSpeed derives it) or fix the numbers",
            )
        return None
    if world is None:
        return None
    known = micro if micro is not None else gas
    name = "train_micro_batch_size_per_gpu" if micro is not None else "gradient_accumulation_steps"
    divisor = (known or 1) * world
    if tbs % divisor:
        if known is None:
            equation = f"train_batch_size ({tbs}) is not divisible by {ws_text}"
        else:
            equation = (
                f"train_batch_size ({tbs}) is not divisible by {name} ({known}) x "
                f"{ws_text} = {divisor}"
            )
        return (
            "train_batch_size",
            f"{equation}; DeepSpeed derives the missing factor by integer division, then its "
            "batch check fails and it refuses the config",
            f"use a multiple of {divisor}",
        )
    return None


def check_ds_config(
    config: dict[str, Any],
    source: str = "<config>",
    *,
    world_size: int | None = None,
    allow_auto: bool = False,
) -> list[Problem]:
    """Every problem dstrain finds in a parsed DeepSpeed config (errors, warnings, notes)."""
    checker = _Checker(config, source)
    checker.non_finite_values()
    checker.unknown_keys()
    if not allow_auto:
        checker.auto_values()
    checker.batch_rules(world_size)
    types = _Checker(config, source)
    read = types.value_types()
    # The value rules see the config as DeepSpeed reads it: coerced, without its "auto"
    # leaves (reported once, above).
    values = _Checker(_strip_auto(read), source)
    values.precision_rules()
    values.clipping_rule()
    values.parallel_size_rules()
    values.zero_rules()
    values.optimizer_rules()
    values.checkpoint_rules()
    values.activation_checkpointing_rules()
    # One message per fault: where the type check refused a value, a rule about the same
    # value adds nothing.
    refused = {p.path for p in types.problems if p.severity == "error"}
    rest = [p for p in values.problems if p.severity != "error" or p.path not in refused]
    return checker.problems + types.problems + rest


# --------------------------------------------------------------------------------------
# f. DeepSpeed's own parser, last
# --------------------------------------------------------------------------------------


def _strip_auto(node: Any) -> Any:
    if isinstance(node, dict):
        return {k: _strip_auto(v) for k, v in node.items() if not _is_auto(v)}
    if isinstance(node, list):
        return [_strip_auto(v) for v in node]
    return node


def deepspeed_parser_problems(config: dict[str, Any], source: str) -> list[Problem] | None:
    """Run `deepspeed.runtime.config.DeepSpeedConfig` on a copy of `config`.

    Returns its complaints as problems, or None when deepspeed is not importable. The copy
    drops "auto" values and train_batch_size when the micro batch is given (DeepSpeed's
    parser assumes world size 1; `check_batch_arithmetic` does the real arithmetic).
    """
    os.environ.setdefault("DS_ACCELERATOR", "cpu")
    try:
        with redirect_fds():
            from deepspeed.runtime.config import DeepSpeedConfig
    except Exception:  # ImportError, or a broken install raising anything else
        return None
    parsed = _strip_auto(copy.deepcopy(dict(config)))
    if any(_is_auto(config.get(key)) for key in BATCH_KEYS):
        parsed = {k: v for k, v in parsed.items() if k not in BATCH_KEYS}
        parsed["train_micro_batch_size_per_gpu"] = 1  # a stand-in for HF's filled-in value
    if "train_micro_batch_size_per_gpu" in parsed:
        parsed.pop("train_batch_size", None)
    try:
        with redirect_fds():
            DeepSpeedConfig(parsed)
    except Exception as exc:  # DeepSpeed raises many types; each becomes one problem
        return _translate_deepspeed_error(exc, config, source)
    return []


def _model_block(title: str, config: dict[str, Any]) -> str:
    """The JSON block a DeepSpeed pydantic model parsed (measured into ds_schema.json).

    A model that parses two spellings (`bf16`, `bfloat16`) maps to the one present.
    """
    candidates = load_schema()["model_blocks"].get(title, [""])
    checker = _Checker(config, "")
    present = [c for c in candidates if c == "" or checker._get(c) is not None]
    return (present or candidates)[0]


def _paths(node: Any, prefix: str = "") -> list[str]:
    out = []
    if isinstance(node, dict):
        for key, value in node.items():
            path = _join(prefix, str(key))
            out.append(path)
            out.extend(_paths(value, path))
    return out


def _path_named_in(message: str, config: dict[str, Any]) -> str:
    """The config path a plain DeepSpeed error message names, if any.

    DeepSpeed quotes the key (`'nebula'`, `'zero_optimization.mics_shard_size'`) or writes
    a snake_case name bare (`invalid tag_validation value`). A quoted name wins over a bare
    one (a message may go on to name the keys to use instead), then the deepest path.
    """
    quoted, bare = [], []
    for path in _paths(config):
        key = path.rsplit(".", 1)[-1]
        if any(f"{q}{name}{q}" in message for q in "'`\"" for name in (path, key)):
            quoted.append(path)
        elif "_" in key and re.search(rf"(?<![\w.]){re.escape(key)}(?!\w)", message):
            bare.append(path)
    return max(quoted or bare, key=lambda p: p.count("."), default="")


def _translate_deepspeed_error(
    exc: Exception, config: dict[str, Any], source: str
) -> list[Problem]:
    errors = getattr(exc, "errors", None)
    if callable(errors):  # a pydantic ValidationError from one of DeepSpeed's config models
        try:
            items = errors(include_url=False)
        except TypeError:
            items = errors()
        block = _model_block(getattr(exc, "title", ""), config)
        return [
            Problem(
                source,
                ".".join([block, *map(str, item["loc"])] if block else map(str, item["loc"])),
                f"DeepSpeed: {item['msg']}",
                origin="deepspeed",
            )
            for item in items
        ]
    message = str(exc).strip() or type(exc).__name__
    return [
        Problem(
            source,
            _path_named_in(message, config),
            f"DeepSpeed's parser: {type(exc).__name__}: {message}",
            origin="deepspeed",
        )
    ]


def validate_file(
    path: str,
    *,
    world_size: int | None = None,
    allow_auto: bool = False,
    use_deepspeed: bool = True,
    stdin: Any = None,
) -> list[Problem]:
    """Read, check, and (optionally) run DeepSpeed's parser on one config file.

    DeepSpeed's own complaint (it stops at its first) is reported beside dstrain's, unless
    dstrain's value-type check already said it in the same words at the same path.
    """
    config, problems = read_ds_json(path, stdin=stdin)
    if config is None:
        return problems
    source = "<stdin>" if path == "-" else path
    problems += check_ds_config(config, source, world_size=world_size, allow_auto=allow_auto)
    if use_deepspeed:
        ours = {(p.path, p.message) for p in problems if p.severity == "error"}
        for theirs in deepspeed_parser_problems(config, source) or []:
            # The value-type check quotes pydantic's own words: the same fault, said once.
            said = theirs.message.removeprefix("DeepSpeed: ")
            if not any(path == theirs.path and said in message for path, message in ours):
                problems.append(theirs)
    return problems
