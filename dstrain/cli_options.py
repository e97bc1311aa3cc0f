"""Command-line flags generated from the settings fields: one default and one help per knob.

Pure layer (L0): pydantic and the standard library (click and argparse are imported by
the renderers that need them). Each table below names the settings fields a command
exposes and, where the flag a user types is not the field's own name, the flag. Type,
choices, default and help all come from the field itself (pydantic turns the docstring
under each field into its description), so `--help` shows the default the code uses.

    Literal field          -> a choice (`--scheduler WarmupLR`), or one switch per value
                              (`--bf16 / --fp16 / --fp32`)
    bool field             -> an on/off pair (`--overlap-comm / --no-overlap-comm`)
    int, float, str field  -> a typed value; `X | None` means "unset" until given
    list[str] field        -> one or more values (`--fasta a.fasta b.fasta`)

Every generated flag defaults to None (not given) whatever the field's default: a flag
only overrides what a settings file or preset already says. The field's default is shown
as `[default: X]` at the end of the help; tests read it back from `--help`.

To expose another setting: add a row to the command's table. To rename a flag, give the
row a `name`; keep the old spelling as an alias if scripts use it.
"""

from __future__ import annotations

import functools
import math
import types
import typing
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Literal

from pydantic import BaseModel

from dstrain.errors import DstrainError
from dstrain.settings import DataSettings, DeepSpeedSettings, TrainSettings


@dataclass(frozen=True)
class FlagSpec:
    """One command-line option and the settings field(s) it sets."""

    path: str
    """Settings field, dotted from the command's root model (`zero_optimization.stage`)."""
    names: tuple[str, ...]
    """What the user types: the flag and its aliases (`--deepspeed_config`,
    `--deepspeed-config`); for a per-value switch, one flag per value."""
    kind: Literal["value", "choice", "bool", "switch", "list", "enable"]
    dest: str
    """Python identifier the parsed value is stored under."""
    help: str
    """The field's docstring, whitespace collapsed, then `[default: X]`."""
    default: Any
    """The field's default (what the code uses when the flag is not given)."""
    type: type | None = None
    """int, float or str for `value` and `list` kinds."""
    choices: tuple[str, ...] = ()
    """`choice`: the accepted values; `switch`: the value each of `names` stores."""
    off_names: tuple[str, ...] = ()
    """`bool`: the flag(s) that store False (`--no-overlap-comm`, `--fused-adam`)."""
    also_sets: tuple[str, ...] = ()
    """More settings fields that get the same value (`--nvme-path` sets both offloads)."""
    const: Any = None
    """Value when the flag is given without one (`--resume` alone means `auto`)."""
    metavar: str | None = None

    @property
    def flag(self) -> str:
        """The flag as errors name it: the first spelling (both, for a switch or bool)."""
        if self.kind == "switch":
            return "/".join(self.names)
        return self.names[0]

    def flag_for(self, value: Any) -> str:
        """The flag a user types to get `value` (`--fp16` for precision fp16)."""
        if self.kind == "switch" and value in self.choices:
            return self.names[self.choices.index(value)]
        if self.kind == "bool":
            return self.names[0] if value else self.off_names[0]
        return self.names[0]


@dataclass(frozen=True)
class Row:
    """A table row: which field, and how its flag differs from the default rendering."""

    path: str
    name: str | None = None
    """The flag; default `--` + the field name with dashes."""
    aliases: tuple[str, ...] = ()
    off: str | None = None
    """bool: the flag that stores False; default `--no-NAME`."""
    switch: bool = False
    """Literal: one flag per value (`--bf16`) instead of `--precision bf16`."""
    enable: str | None = None
    """A monitor: the flag takes DIR (or the row's metavar, e.g. PROJECT), sets this field
    to it and `enabled` to True."""
    also_sets: tuple[str, ...] = ()
    help_from: tuple[str, ...] = ()
    """Fields whose docstrings go first (the parent block of a shared node like Offload)."""
    const: Any = None
    default_text: str | None = None
    """Shown instead of the field's default where the code decides it at run time."""
    metavar: str | None = None


# --------------------------------------------------------------------------------------
# Reading the settings models
# --------------------------------------------------------------------------------------


def field_info(model: type[BaseModel], path: str):
    """The pydantic FieldInfo at dotted `path` under `model`."""
    *parents, leaf = path.split(".")
    for part in parents:
        model = _model_of(model.model_fields[part].annotation)
    return model.model_fields[leaf]


def _model_of(annotation: Any) -> type[BaseModel]:
    if isinstance(annotation, type) and issubclass(annotation, BaseModel):
        return annotation
    raise TypeError(f"{annotation!r} is not a settings node")


def _strip_optional(annotation: Any) -> tuple[Any, bool]:
    """(`X`, True) for `X | None`, else (annotation, False)."""
    if typing.get_origin(annotation) in (typing.Union, types.UnionType):
        args = [a for a in typing.get_args(annotation) if a is not type(None)]
        if len(args) == 1 and len(typing.get_args(annotation)) == 2:
            return args[0], True
    return annotation, False


def describe(model: type[BaseModel], path: str) -> str:
    """The field's docstring as one line."""
    return " ".join((field_info(model, path).description or "").split())


def default_text(value: Any) -> str:
    """How `[default: X]` shows a field default; `parse_default_text` reads it back."""
    if value is None:
        return "unset"
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, list | tuple):
        return " ".join(map(str, value)) if value else "empty"
    return str(value)


def parse_default_text(text: str, like: Any) -> Any:
    """Inverse of `default_text` given the field default `like` (for the help tests)."""
    if text == "unset":
        return None
    if isinstance(like, bool):
        return {"true": True, "false": False}[text]
    if isinstance(like, list | tuple):
        return [] if text == "empty" else text.split()
    if isinstance(like, int):
        return int(text)
    if isinstance(like, float):
        return float(text)
    return text


def _flag_name(path: str) -> str:
    return "--" + path.rsplit(".", 1)[-1].replace("_", "-")


def make_spec(model: type[BaseModel], row: Row) -> FlagSpec:
    """Turn one table row into a flag: type, choices, default and help from the field."""
    info = field_info(model, row.path)
    annotation, _optional = _strip_optional(info.annotation)
    default = info.get_default(call_default_factory=True)
    name = row.name or _flag_name(row.path)
    dest = name.lstrip("-").replace("-", "_")
    doc = " ".join([*(describe(model, p) for p in row.help_from), describe(model, row.path)])
    common: dict[str, Any] = {"path": row.path, "dest": dest, "also_sets": row.also_sets}
    common["const"], common["metavar"] = row.const, row.metavar
    origin = typing.get_origin(annotation)
    if row.enable is not None:  # a monitor: given DIR (or PROJECT) it is enabled with it
        block, leaf = row.enable.rsplit(".", 1)
        enabled = field_info(model, f"{block}.enabled").get_default()
        shown = row.default_text or ("on" if enabled else "off")
        metavar = row.metavar or "DIR"
        where = "writes there" if leaf == "output_path" else f"logs to that {leaf}"
        return FlagSpec(
            **{**common, "path": row.enable, "metavar": metavar},
            names=(name, *row.aliases),
            kind="enable",
            help=f"{doc} Given {metavar}, it is enabled and {where}. [default: {shown}]",
            default=None,
            type=str,
        )
    shown = row.default_text or default_text(default)
    if origin is Literal and row.switch:
        values = tuple(str(v) for v in typing.get_args(annotation))
        default_first = (default, *(v for v in values if v != default))
        names = tuple(f"--{v}" for v in default_first)
        return FlagSpec(
            **{**common, "dest": row.path.rsplit(".", 1)[-1]},
            names=names,
            kind="switch",
            choices=default_first,
            help=f"{doc} [default: {shown}]",
            default=default,
        )
    if origin is Literal:
        return FlagSpec(
            **common,
            names=(name, *row.aliases),
            kind="choice",
            choices=tuple(str(v) for v in typing.get_args(annotation)),
            help=f"{doc} [default: {shown}]",
            default=default,
        )
    if annotation is bool:
        off = row.off or "--no-" + name.removeprefix("--")
        if isinstance(default, bool):
            shown = row.default_text or (name if default else off)
        return FlagSpec(
            **common,
            names=(name, *row.aliases),
            off_names=(off,),
            kind="bool",
            help=f"{doc} [default: {shown}]",
            default=default,
        )
    if origin is list:
        (item,) = typing.get_args(annotation)
        return FlagSpec(
            **common,
            names=(name, *row.aliases),
            kind="list",
            type=item,
            help=f"{doc} [default: {shown}]",
            default=default,
        )
    if annotation in (int, float, str):
        return FlagSpec(
            **common,
            names=(name, *row.aliases),
            kind="value",
            type=annotation,
            help=f"{doc} [default: {shown}]",
            default=default,
        )
    raise TypeError(f"no flag rendering for {row.path}: {info.annotation!r}")


def make_specs(model: type[BaseModel], rows: Sequence[Row]) -> tuple[FlagSpec, ...]:
    specs = tuple(make_spec(model, row) for row in rows)
    dests = [s.dest for s in specs]
    assert len(dests) == len(set(dests)), f"two flags store into one name: {dests}"
    return specs


# --------------------------------------------------------------------------------------
# The tables: which fields each command exposes, and under which flag
# --------------------------------------------------------------------------------------

_OFFLOAD_OPT = "zero_optimization.offload_optimizer"
_OFFLOAD_PARAM = "zero_optimization.offload_param"

DEEPSPEED_ROWS = (
    Row("precision", switch=True),
    Row("zero_optimization.stage", name="--zero"),
    Row(f"{_OFFLOAD_OPT}.device", name="--offload-optimizer", help_from=(_OFFLOAD_OPT,)),
    Row(f"{_OFFLOAD_PARAM}.device", name="--offload-param", help_from=(_OFFLOAD_PARAM,)),
    Row(f"{_OFFLOAD_OPT}.nvme_path", also_sets=(f"{_OFFLOAD_PARAM}.nvme_path",)),
    Row("zero_optimization.overlap_comm"),
    Row("zero_optimization.reduce_bucket_size"),
    Row("zero_optimization.allgather_bucket_size"),
    Row("zero_optimization.stage3_prefetch_bucket_size"),
    Row("zero_optimization.stage3_max_live_parameters"),
    Row("zero_optimization.stage3_param_persistence_threshold"),
    Row(
        "zero_optimization.stage3_gather_16bit_weights_on_model_save",
        name="--gather-16bit-weights",
    ),
    Row("fp16.loss_scale"),
    Row("fp16.initial_scale_power"),
    Row("fp16.loss_scale_window"),
    Row("fp16.hysteresis"),
    Row("fp16.consecutive_hysteresis"),
    Row("fp16.min_loss_scale"),
    Row("batch.train_micro_batch_size_per_gpu", name="--micro-batch"),
    Row("batch.gradient_accumulation_steps", name="--grad-accum"),
    Row("batch.train_batch_size", name="--global-batch"),
    Row("gradient_clipping", name="--clip"),
    Row("optimizer.lr"),
    Row("optimizer.weight_decay"),
    Row("optimizer.eps", name="--adam-eps"),
    Row("optimizer.torch_adam", off="--fused-adam"),
    Row("scheduler.type", name="--scheduler"),
    Row("scheduler.warmup_num_steps", name="--warmup-steps"),
    Row("scheduler.total_num_steps", name="--total-steps"),
    Row("activation_checkpointing.enabled", name="--activation-checkpointing"),
    Row("steps_per_print"),
    Row("wall_clock_breakdown"),
    Row("csv_monitor", name="--csv-monitor", enable="csv_monitor.output_path"),
    Row("tensorboard", name="--tensorboard", enable="tensorboard.output_path"),
    Row("wandb", name="--wandb", enable="wandb.project", metavar="PROJECT"),
    Row("comet", name="--comet", enable="comet.project", metavar="PROJECT"),
)
"""gen-config's flags (and train's, as the alternative to --deepspeed_config)."""

DATA_ROWS = (
    Row("frame"),
    Row("min_orf_codons"),
    Row("strands"),
    Row("on_ambiguous"),
    Row("on_invalid"),
    Row("partial_codon"),
    Row("max_length"),
    Row("long_records"),
    Row("window_overlap"),
    Row("val_fraction"),
    Row("split_seed"),
)
"""prepare's flags (DataSettings fields that shape the token cache)."""

TRAIN_ROWS = (
    Row("deepspeed_config", name="--deepspeed_config", aliases=("--deepspeed-config",)),
    Row("model"),
    Row("fasta"),
    Row("cache_dir"),
    Row("output_dir"),
    Row("max_steps"),
    Row("epochs"),
    Row("eval_every"),
    Row("save_every"),
    Row("log_every"),
    Row("keep_best"),
    Row("resume", const="auto"),
    Row("init_checkpoint"),
    Row("trust_checkpoint"),
    Row("zero_init"),
    Row("seed"),
    *(Row(f"data.{row.path}") for row in DATA_ROWS),
    Row("data.padding"),
    Row("data.loss_on_pad"),
    Row("data.batching"),
    Row("data.tokens_per_micro_batch"),
    Row("max_eval_batches"),
    Row("skip_window"),
    Row("max_skipped_share"),
    Row("export"),
    Row("export_pt"),
    Row("report"),
    Row("progress"),
    Row("timeout_s"),
    Row("hang_timeout"),
    Row("dump_params"),
)
"""train's own flags (TrainSettings); its DeepSpeed flags are DEEPSPEED_ROWS."""

TRAIN_PRECISION_DEFAULT = "bf16 on a GPU that supports it, else fp32"
"""`dstrain train` without --deepspeed_config decides the precision on the device."""


def deepspeed_specs(*, precision_default: str | None = None) -> tuple[FlagSpec, ...]:
    rows = DEEPSPEED_ROWS
    if precision_default is not None:
        rows = (Row("precision", switch=True, default_text=precision_default), *rows[1:])
    return make_specs(DeepSpeedSettings, rows)


def data_specs() -> tuple[FlagSpec, ...]:
    return make_specs(DataSettings, DATA_ROWS)


def train_specs() -> tuple[FlagSpec, ...]:
    return make_specs(TrainSettings, TRAIN_ROWS)


# --------------------------------------------------------------------------------------
# Parsed values -> settings overrides; settings paths -> the flag that sets them
# --------------------------------------------------------------------------------------


def overrides_from_values(specs: Sequence[FlagSpec], values: Mapping[str, Any]) -> dict[str, Any]:
    """Dotted settings path -> value for every flag given (None or missing = not given)."""
    overrides: dict[str, Any] = {}
    for spec in specs:
        value = values.get(spec.dest)
        if value is None:
            continue
        if spec.kind == "list":
            value = list(value)
        overrides[spec.path] = value
        for other in spec.also_sets:
            overrides[other] = value
        if spec.kind == "enable":
            overrides[spec.path.rsplit(".", 1)[0] + ".enabled"] = True
    return overrides


def flag_of_path(specs: Sequence[FlagSpec], path: str, value: Any = None) -> str | None:
    """The flag that sets settings field `path` (or its block, for a monitor)."""
    for spec in specs:
        targets = (spec.path, *spec.also_sets)
        if spec.kind == "enable":
            targets += (spec.path.rsplit(".", 1)[0] + ".enabled",)
        if path in targets:
            return spec.flag_for(value) if value is not None else spec.flag
    return None


def given_paths(specs: Sequence[FlagSpec], values: Mapping[str, Any]) -> dict[str, str]:
    """Settings path -> the flag as given, for the flags the user gave."""
    given = {}
    for spec in specs:
        value = values.get(spec.dest)
        if value is None:
            continue
        for target in (spec.path, *spec.also_sets):
            given[target] = spec.flag_for(value)
    return given


def ds_config_from_flags(
    specs: Sequence[FlagSpec],
    flags: Mapping[str, Any],
    base: dict,
    source: str,
    *,
    world_size: int | None = None,
) -> tuple[dict[str, Any], list[str]]:
    """Settings `base` + the DeepSpeed flags given -> a DeepSpeed JSON dict that passed
    `check_ds_config`, the checks any foreign file gets (`gen-config`, and `train` without
    --deepspeed_config). Refuses with every problem, each naming the flag that sets it;
    returns the config and the warnings (same form)."""
    from dstrain.ds_config import check_built_config
    from dstrain.settings import apply_overrides, make_deepspeed_settings

    data = apply_overrides(base, overrides_from_values(specs, flags))
    try:
        settings = make_deepspeed_settings(data, source, defer_rules=True)
    except DstrainError as exc:
        raise DstrainError(_name_flags(specs, str(exc))) from None
    config, problems = check_built_config(settings, source, world_size=world_size)
    given = given_paths(specs, flags)
    lines, warnings = [], []
    for problem in problems:
        flag = flag_of_path(specs, problem.path)
        label = f"{problem.path} ({flag})" if flag else problem.path
        if problem.path not in given:  # say which given flags wrote into the same block
            block = problem.path.rsplit(".", 1)[0]
            near = [g for p, g in given.items() if p.rsplit(".", 1)[0] == block and "." in p]
            if near:
                label += f", with {', '.join(near)}"
        fix = f" Fix: {problem.fix.rstrip('.')}." if problem.fix else ""
        line = f"{label}: {problem.message.rstrip('.')}.{fix}"
        if problem.severity == "error":
            lines.append(line)
        else:
            warnings.append(line)
    if lines:
        raise DstrainError(f"invalid DeepSpeed settings from {source}:\n  " + "\n  ".join(lines))
    return config, warnings


def _name_flags(specs: Sequence[FlagSpec], message: str) -> str:
    """Append the flag that sets each settings field named at a line start of `message`."""
    lines = message.split("\n  ")
    for index, line in enumerate(lines[1:], start=1):
        path, sep, rest = line.partition(": ")
        flag = flag_of_path(specs, path) if sep else None
        if flag:
            lines[index] = f"{path} ({flag}): {rest}"
    return "\n  ".join(lines)


# --------------------------------------------------------------------------------------
# Rendering: click options and argparse arguments
# --------------------------------------------------------------------------------------


def click_params(specs: Sequence[FlagSpec]) -> list:
    """click.Option objects for `specs`, in table order, each defaulting to None."""
    import click

    params = []
    for spec in specs:
        if spec.kind == "switch":
            # One is_flag option per value, each under its own name, so that two of them
            # given together (`--fp16 --bf16`) are seen and refused instead of the last
            # silently winning; the callback stores the value under the spec's dest.
            for index, (name, value) in enumerate(zip(spec.names, spec.choices, strict=True)):
                text = spec.help if index == 0 else f"{spec.path} {value} (see {spec.names[0]})."
                params.append(
                    click.Option(
                        [name, f"{spec.dest}__{index}"],
                        is_flag=True,
                        default=False,
                        expose_value=False,
                        callback=_switch_callback(spec.dest, name, value),
                        help=text,
                    )
                )
        elif spec.kind == "bool":
            decls = ["/".join(spec.names[:1] + spec.off_names[:1]), spec.dest]
            params.append(click.Option(decls, default=None, help=spec.help))
        elif spec.kind == "choice":
            params.append(
                click.Option(
                    [*spec.names, spec.dest], type=click.Choice(spec.choices), help=spec.help
                )
            )
        elif spec.kind in ("value", "enable"):
            params.append(
                click.Option(
                    [*spec.names, spec.dest],
                    type=_click_type(spec.type),
                    metavar=spec.metavar,
                    help=spec.help,
                )
            )
        else:
            raise TypeError(f"{spec.flag}: no click rendering for kind {spec.kind}")
    return params


def _switch_callback(dest: str, name: str, value: str):
    """A click callback for one switch flag: stores `value` under `dest`, refuses a second,
    different switch of the same setting (`--fp16 --bf16`) as a usage error."""
    import click

    def callback(ctx: click.Context, _param: click.Parameter, given: bool) -> None:
        ctx.params.setdefault(dest, None)
        if not given:
            return
        seen = ctx.meta.setdefault(f"dstrain.switch.{dest}", {})
        seen[name] = value
        if len(set(seen.values())) > 1:
            raise click.UsageError(
                f"{' and '.join(seen)} were both given; they choose the same setting "
                f"({dest}): give one of them"
            )
        ctx.params[dest] = value

    return callback


INT_BOUNDS = (-(2**63), 2**63 - 1)
"""Integer flags stay within int64, as in settings and config files (dstrain.inputs):
DeepSpeed and torch store counts as int64, so a larger one can only be a typo."""


def _click_type(kind: type) -> Any:
    if kind is float:
        return finite_float_type()
    if kind is int:
        return bounded_int_type()
    return kind


@functools.cache
def bounded_int_type() -> Any:
    """click's int type within int64 (no range in the help, unlike click.IntRange)."""
    import click

    class BoundedInt(click.ParamType):
        name = "integer"

        def convert(self, value, param, ctx):
            try:
                return parse_bounded_int(str(value))
            except ValueError as exc:
                self.fail(str(exc))

    return BoundedInt()


def parse_bounded_int(text: str) -> int:
    """An int flag's value, within int64."""
    try:
        value = int(text)
    except ValueError:
        raise ValueError(f"{text!r} is not an integer") from None
    if not INT_BOUNDS[0] <= value <= INT_BOUNDS[1]:
        raise ValueError(f"{text!r} is outside the 64-bit integer range")
    return value


def _argparse_bounded_int(text: str) -> int:
    import argparse

    try:
        return parse_bounded_int(text)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


def parse_finite_float(text: str) -> float:
    """A float flag's value: NaN and ±inf are refused (they pass every range check)."""
    value = float(text)
    if not math.isfinite(value):
        raise ValueError(f"{text!r} is not a finite number")
    return value


@functools.cache
def finite_float_type() -> Any:
    """click's float type without NaN and ±inf (click is imported on first use)."""
    import click

    class FiniteFloat(click.ParamType):
        name = "float"

        def convert(self, value, param, ctx):
            try:
                return parse_finite_float(str(value))
            except ValueError:
                self.fail(f"{value!r} is not a finite number (NaN and inf are refused)")

    return FiniteFloat()


def _argparse_finite_float(text: str) -> float:
    import argparse

    try:
        return parse_finite_float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"{text!r} is not a finite number (NaN and inf are refused)"
        ) from None


def _value_by_flag(values: Mapping[str, Any], *, exclusive: bool = False):
    """An argparse action class: the option string given decides the stored value.
    `exclusive`: a second option string storing another value is a usage error."""
    import argparse

    class ValueByFlag(argparse.Action):
        def __call__(self, parser, namespace, _values, option_string=None):
            if exclusive:
                seen = namespace.__dict__.setdefault(f"_given_{self.dest}", {})
                seen[option_string] = values[option_string]
                if len(set(seen.values())) > 1:
                    parser.error(
                        f"{' and '.join(seen)} were both given; they choose the same setting "
                        f"({self.dest}): give one of them"
                    )
            setattr(namespace, self.dest, values[option_string])

    return ValueByFlag


def add_argparse_arguments(parser, specs: Sequence[FlagSpec]) -> None:
    """Add `specs` to an argparse parser (or group), each defaulting to None."""
    for spec in specs:
        common = {"dest": spec.dest, "default": None, "help": spec.help.replace("%", "%%")}
        if spec.kind in ("switch", "bool"):
            if spec.kind == "switch":
                by_flag = dict(zip(spec.names, spec.choices, strict=True))
            else:
                by_flag = {n: True for n in spec.names} | {n: False for n in spec.off_names}
            action = _value_by_flag(by_flag, exclusive=spec.kind == "switch")
            parser.add_argument(*by_flag, action=action, nargs=0, **common)
        elif spec.kind == "choice":
            parser.add_argument(*spec.names, choices=spec.choices, **common)
        elif spec.kind == "list":
            parser.add_argument(*spec.names, nargs="+", type=spec.type, **common)
        elif spec.const is not None:
            parser.add_argument(*spec.names, nargs="?", const=spec.const, type=spec.type, **common)
        else:
            kind = {float: _argparse_finite_float, int: _argparse_bounded_int}.get(
                spec.type, spec.type
            )
            parser.add_argument(*spec.names, type=kind, metavar=spec.metavar, **common)
