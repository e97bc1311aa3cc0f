"""Strict checks for any DeepSpeed JSON config: ours, or one copied from elsewhere.

Pure layer (L0) up to `deepspeed_parser_problems`, which imports deepspeed on demand.
DeepSpeed 0.19.8 parses its config leniently: unknown keys at the top level and in
`flops_profiler`, `checkpoint`, `activation_checkpointing` pass silently, `"auto"` inside
checked blocks is dropped (so `fp16.enabled: "auto"` trains in fp32), `offload_param`
under stage 2 and NVMe offload without a path are accepted, and batch arithmetic is done
for world size 1 only. `check_ds_config` catches all of these and reports every problem
at once, each with its JSON path and a fix.

The known keys come from dstrain/ds_schema.json, measured from the installed DeepSpeed by
scripts/gen_ds_schema.py (a test keeps it in step with the installed version).
"""

from __future__ import annotations

import copy
import difflib
import json
import os
import sys
from dataclasses import asdict, dataclass
from functools import cache
from pathlib import Path
from typing import Any

from dstrain.ds_runtime import redirect_fds
from dstrain.errors import DstrainError

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


@dataclass(frozen=True)
class Problem:
    """One thing wrong with a config: where, what, and how to fix it."""

    file: str
    path: str
    message: str
    fix: str = ""
    severity: str = "error"  # "error" fails validation; "warning" is printed only
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
    """Decode and parse config bytes. Returns the dict (None if unusable) and problems."""
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
        text = data.decode("utf-8-sig")
    except UnicodeDecodeError as exc:
        return None, [
            Problem(
                source,
                "",
                f"not UTF-8 text (byte {exc.start} is invalid)",
                "save the file as UTF-8 JSON",
            )
        ]
    if not text.strip():
        return None, [Problem(source, "", "the file is empty", "write a JSON object ({...})")]
    try:
        config = json.loads(text, object_pairs_hook=_object_pairs)
    except json.JSONDecodeError as exc:
        return None, [
            Problem(
                source,
                "",
                f"malformed JSON at line {exc.lineno}, column {exc.colno}: {exc.msg}",
                "fix the syntax there (JSON allows no comments or trailing commas)",
            )
        ]
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
    """Read a config file (or stdin for `-`) and parse it."""
    if path == "-":
        stream = stdin if stdin is not None else sys.stdin.buffer
        return parse_ds_json(stream.read(), "<stdin>")
    try:
        data = Path(path).read_bytes()
    except FileNotFoundError:
        return None, [Problem(path, "", "does not exist", "check the path")]
    except IsADirectoryError:
        return None, [Problem(path, "", "is a directory", "pass a JSON file inside it")]
    except OSError as exc:
        return None, [Problem(path, "", f"cannot read: {exc.strerror}")]
    return parse_ds_json(data, path)


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


def _is_auto(value: Any) -> bool:
    return isinstance(value, str) and value.strip().lower() == "auto"


def _is_int(value: Any) -> bool:
    if isinstance(value, bool):
        return False
    return isinstance(value, int) or (isinstance(value, float) and value.is_integer())


def _is_number(value: Any) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool)


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

    # a. unknown keys at every level -----------------------------------------------------

    def unknown_keys(self) -> None:
        schema = load_schema()
        blocks: dict[str, list[str]] = schema["blocks"]
        for block_path, known in blocks.items():
            node = self._get(block_path)
            if not isinstance(node, dict):
                continue
            for key in node:
                if key in known:
                    continue
                if block_path in ("bf16", "bfloat16") and key in LOSS_SCALE_KEYS:
                    self.add(
                        _join(block_path, key),
                        "fp16 loss-scaling key under bf16: bf16 has fp32's range and "
                        "DeepSpeed does no loss scaling for it",
                        f"remove `{key}` (or switch to fp16 and move it under `fp16`)",
                    )
                    continue
                self.add(_join(block_path, key), f"unknown key `{key}`", _suggest(key, known))
        self._unknown_params("optimizer", schema["optimizer_params"])
        self._unknown_params("scheduler", schema["scheduler_params"])

    def _unknown_params(self, block: str, known_by_type: dict[str, list[str]]) -> None:
        node = self.config.get(block)
        if not isinstance(node, dict) or not isinstance(node.get("params"), dict):
            return
        kind = node.get("type")
        if not isinstance(kind, str):
            return
        known = known_by_type.get(kind) or known_by_type.get(kind.lower())
        if known is None:
            return
        for key in node["params"]:
            if key == "max_grad_norm" and block == "optimizer":
                self.add(
                    f"{block}.params.{key}",
                    "DeepSpeed refuses max_grad_norm here",
                    "use the top-level `gradient_clipping` instead",
                )
            elif key not in known:
                self.add(
                    f"{block}.params.{key}",
                    f"{kind} takes no parameter `{key}`",
                    _suggest(key, known),
                )

    def _get(self, dotted: str) -> Any:
        node: Any = self.config
        for part in dotted.split(".") if dotted else []:
            if not isinstance(node, dict):
                return None
            node = node.get(part)
        return node

    # b. leftover "auto" --------------------------------------------------------------

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
                    "or rejects it"
                )
                fix = "write the value (or pass --allow-auto if an HF Trainer fills it in)"
            self.add(path, f'leftover "auto": {why}', fix)

    # c. rules DeepSpeed skips -----------------------------------------------------------

    def precision_rules(self) -> None:
        fp16, bf16 = self.config.get("fp16"), self.config.get("bf16", self.config.get("bfloat16"))
        for name, block in (("fp16", fp16), ("bf16", bf16)):
            if isinstance(block, dict) and "enabled" in block:
                value = block["enabled"]
                if not isinstance(value, bool) and not _is_auto(value):
                    self.add(
                        f"{name}.enabled",
                        f"must be true or false, not {value!r}",
                        "write true or false without quotes",
                    )
            elif block is not None and not isinstance(block, dict):
                self.add(name, f"must be an object, not {block!r}", 'write {"enabled": true}')
        if _enabled(fp16) and _enabled(bf16):
            self.add(
                "bf16.enabled",
                "fp16 and bf16 are both enabled",
                "enable one: bf16 on Ampere or newer GPUs, fp16 on older ones",
            )
        if not isinstance(fp16, dict):
            return
        scale = fp16.get("loss_scale", 0)
        if "loss_scale" in fp16 and (not _is_number(scale) or scale < 0):
            self.add(
                "fp16.loss_scale",
                f"must be a number >= 0, not {scale!r}",
                "0 for dynamic scaling, or a fixed power of two",
            )
        window = fp16.get("loss_scale_window")
        if window is not None and (not _is_int(window) or window < 1):
            self.add(
                "fp16.loss_scale_window",
                f"must be a whole number >= 1, not {window!r}",
                "the usual value is 1000",
            )
        for key, low in (("initial_scale_power", 0), ("hysteresis", 1)):
            value = fp16.get(key)
            if value is not None and (not _is_int(value) or value < low):
                self.add(f"fp16.{key}", f"must be a whole number >= {low}, not {value!r}")
        min_scale = fp16.get("min_loss_scale")
        dynamic = _is_number(scale) and scale == 0
        if min_scale is not None and dynamic and (not _is_number(min_scale) or min_scale <= 0):
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

    def zero_rules(self) -> None:
        zero = self.config.get("zero_optimization")
        if zero is None:
            return
        if isinstance(zero, bool):
            self.add(
                "zero_optimization",
                "the boolean form is deprecated",
                'write {"stage": N}',
                severity="warning",
            )
            return
        if not isinstance(zero, dict):
            self.add("zero_optimization", f"must be an object, not {zero!r}")
            return
        stage = zero.get("stage", 0)
        if not _is_int(stage) or not 0 <= stage <= 3:
            self.add("zero_optimization.stage", f"must be 0, 1, 2 or 3, not {stage!r}")
            return
        for name in ("offload_optimizer", "offload_param"):
            block = zero.get(name)
            if block is None:
                continue
            path = f"zero_optimization.{name}"
            if not isinstance(block, dict):
                self.add(path, f"must be an object, not {block!r}")
                continue
            device = block.get("device", "none")
            if device not in OFFLOAD_DEVICES:
                if not _is_auto(device):
                    self.add(f"{path}.device", f"must be one of none, cpu, nvme, not {device!r}")
                continue
            if device == "none":
                continue
            if name == "offload_param" and stage != 3:
                self.add(
                    f"{path}.device",
                    f"offload_param needs ZeRO stage 3 but stage is {stage}; DeepSpeed "
                    "ignores it silently and keeps parameters on the GPU",
                    'set "stage": 3 or remove offload_param',
                )
            if name == "offload_optimizer" and stage == 0:
                self.add(
                    f"{path}.device",
                    "offload_optimizer needs ZeRO stage 1, 2 or 3",
                    'set "stage": 2 (or 3)',
                )
            if device == "nvme":
                if not block.get("nvme_path"):
                    self.add(
                        f"{path}.nvme_path",
                        "device is nvme but nvme_path is not set; DeepSpeed accepts this "
                        "and fails later",
                        "set nvme_path to a directory on a local NVMe drive",
                    )
                if stage != 3:
                    self.add(
                        f"{path}.device",
                        f"NVMe offload needs ZeRO stage 3 (stage is {stage})",
                        'set "stage": 3 or offload to "cpu"',
                    )
        for key in (
            "reduce_bucket_size",
            "allgather_bucket_size",
            "stage3_prefetch_bucket_size",
            "stage3_max_live_parameters",
            "sub_group_size",
        ):
            value = zero.get(key)
            if value is not None and not _is_auto(value) and (not _is_int(value) or value < 0):
                self.add(
                    f"zero_optimization.{key}", f"must be a whole number of elements, not {value!r}"
                )
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

    def optimizer_rules(self) -> None:
        schema = load_schema()
        for block, known in (
            ("optimizer", schema["optimizer_types"]),
            ("scheduler", schema["scheduler_types"]),
        ):
            node = self.config.get(block)
            if node is None:
                continue
            if not isinstance(node, dict):
                self.add(block, f"must be an object, not {node!r}")
                continue
            kind = node.get("type")
            if not isinstance(kind, str):
                self.add(
                    f"{block}.type",
                    f"missing or not a name: {kind!r}",
                    f"one of {', '.join(known)}",
                )
                continue
            names = known if block == "scheduler" else [k.lower() for k in known]
            if (kind if block == "scheduler" else kind.lower()) not in names:
                self.add(
                    f"{block}.type",
                    f"`{kind}` is not a DeepSpeed {block}; DeepSpeed will look for it in torch",
                    _suggest(kind, known),
                    severity="warning",
                )
        params = self._get("optimizer.params")
        if isinstance(params, dict):
            lr = params.get("lr")
            if lr is not None and _is_number(lr) and lr <= 0:
                self.add("optimizer.params.lr", f"must be > 0, not {lr!r}")
            betas = params.get("betas")
            if betas is not None and not (
                isinstance(betas, list)
                and len(betas) == 2
                and all(_is_number(b) and 0 <= b < 1 for b in betas)
            ):
                self.add(
                    "optimizer.params.betas",
                    f"must be two numbers in [0, 1), not {betas!r}",
                    "[0.9, 0.999] is the usual choice",
                )
        sched = self._get("scheduler.params")
        if isinstance(sched, dict):
            warmup, total = sched.get("warmup_num_steps"), sched.get("total_num_steps")
            if _is_number(warmup) and _is_number(total) and warmup > total:
                self.add(
                    "scheduler.params.warmup_num_steps",
                    f"warm-up ({warmup} steps) is longer than the schedule ({total} steps)",
                    "shorten the warm-up or lengthen total_num_steps",
                )

    def activation_checkpointing_rules(self) -> None:
        ac = self.config.get("activation_checkpointing")
        if not isinstance(ac, dict):
            return
        for key in ("cpu_checkpointing", "contiguous_memory_optimization"):
            if ac.get(key) is True and ac.get("partition_activations") is not True:
                self.add(
                    f"activation_checkpointing.{key}",
                    f"{key} has no effect without partition_activations",
                    "set partition_activations to true or drop it",
                    severity="warning",
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


def precision_of(config: dict[str, Any]) -> str:
    """`fp16`, `bf16` or `fp32`: what DeepSpeed trains in for this config."""
    if (config.get("fp16") or {}).get("enabled") is True:
        return "fp16"
    if (config.get("bf16") or config.get("bfloat16") or {}).get("enabled") is True:
        return "bf16"
    return "fp32"


def check_batch_arithmetic(
    train_batch_size: int | None,
    micro_batch: int | None,
    accumulation: int | None,
    world_size: int | None,
) -> tuple[str, str, str] | None:
    """Mirror DeepSpeed's batch rule for a real world size.

    DeepSpeed needs train_batch_size = micro x accumulation x world size; given two of the
    three it derives the third by integer division (so a remainder is silently lost).
    Returns (json path, message, fix) for the first violation, or None.
    """
    tbs, micro, gas = train_batch_size, micro_batch, accumulation
    world = world_size if world_size is not None else None
    ws_text = f"world size ({world})" if world is not None else "world size"
    if tbs is None and micro is None:
        return (
            "train_micro_batch_size_per_gpu",
            "neither train_batch_size nor train_micro_batch_size_per_gpu is set",
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
                f"gradient_accumulation_steps ({gas}) x {ws_text} = {per_rank * world}",
                f"set train_batch_size to {per_rank * world}, or drop it and let DeepSpeed "
                "derive it (world size counts data-parallel ranks: with tensor or pipeline "
                "parallelism pass --world-size DP)",
            )
        if world is None and tbs % per_rank:
            return (
                "train_batch_size",
                f"train_batch_size ({tbs}) is not a multiple of train_micro_batch_size_per_gpu "
                f"({micro}) x gradient_accumulation_steps ({gas}) = {per_rank}, so no world "
                "size fits",
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
            f"{equation}; DeepSpeed would drop the remainder",
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
    """Every problem dstrain finds in a parsed DeepSpeed config (errors and warnings)."""
    checker = _Checker(config, source)
    checker.unknown_keys()
    if not allow_auto:
        checker.auto_values()
    checker.batch_rules(world_size)
    # The value rules see the config without its "auto" leaves (reported once, above).
    values = _Checker(_strip_auto(config), source)
    values.precision_rules()
    values.clipping_rule()
    values.zero_rules()
    values.optimizer_rules()
    values.activation_checkpointing_rules()
    return checker.problems + values.problems


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
        return _translate_deepspeed_error(exc, source)
    return []


# DeepSpeed's pydantic config models and the JSON block each one parses.
_MODEL_BLOCKS = {
    "DeepSpeedZeroConfig": "zero_optimization",
    "DeepSpeedZeroOffloadOptimizerConfig": "zero_optimization.offload_optimizer",
    "DeepSpeedZeroOffloadParamConfig": "zero_optimization.offload_param",
    "DeepSpeedFP16Config": "fp16",
    "DeepSpeedBF16Config": "bf16",
    "CommsLoggerConfig": "comms_logger",
    "DeepSpeedMonitorConfig": "",
}


def _translate_deepspeed_error(exc: Exception, source: str) -> list[Problem]:
    errors = getattr(exc, "errors", None)
    if callable(errors):  # a pydantic ValidationError from one of DeepSpeed's config models
        try:
            items = errors(include_url=False)
        except TypeError:
            items = errors()
        block = _MODEL_BLOCKS.get(getattr(exc, "title", ""), "")
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
            source, "", f"DeepSpeed's parser: {type(exc).__name__}: {message}", origin="deepspeed"
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
    """Read, check, and (optionally) run DeepSpeed's parser on one config file."""
    config, problems = read_ds_json(path, stdin=stdin)
    if config is None:
        return problems
    source = "<stdin>" if path == "-" else path
    problems += check_ds_config(config, source, world_size=world_size, allow_auto=allow_auto)
    if use_deepspeed:
        ours = {p.path for p in problems if p.severity == "error"}
        theirs = deepspeed_parser_problems(config, source) or []
        for problem in theirs:
            if problem.path and problem.path in ours:
                continue  # the same fault, already explained with a fix
            if not problem.path and ours:
                continue  # DeepSpeed stops at its first fault; ours are more specific
            problems.append(problem)
    return problems


def load_checked_ds_config(path: str, *, world_size: int | None = None) -> dict[str, Any]:
    """Read a DeepSpeed JSON for training: any error-level problem raises `DstrainError`."""
    config, problems = read_ds_json(path)
    if config is not None:
        problems += check_ds_config(config, path, world_size=world_size)
    errors = [p for p in problems if p.severity == "error"]
    if errors:
        lines = "\n  ".join(p.format() for p in errors)
        raise DstrainError(
            f"the DeepSpeed config {path} has {len(errors)} problem(s):\n  {lines}\n"
            f"Check it with `dstrain validate {path}`, or write a fresh one with "
            "`dstrain gen-config`."
        )
    assert config is not None
    return config
