#!/usr/bin/env python
"""Regenerate dstrain/ds_schema.json: every key the installed DeepSpeed reads, per block.

`dstrain validate` is pure (no deepspeed import), so it checks key names against this
committed table. The table is *measured* from the installed DeepSpeed, not typed by hand:

- `blocks`: for each top-level key `DeepSpeedConfig` reads, one probe tells how it is
  parsed. A block handed to one of DeepSpeed's pydantic models (which refuse unknown keys)
  gives that model's field names and aliases, nested models included; a block read with
  plain `dict.get` (where typos pass silently) gives the keys a recording dict sees, one
  level deeper wherever DeepSpeed reads a sub-block (probes carry `enabled: true`, because
  DeepSpeed often reads deeper only when a feature is on);
- `strict_blocks`: the blocks a pydantic model parses (an unknown key there is refused);
- `open_blocks`: blocks DeepSpeed copies whole (iterates or deep-copies) instead of reading
  key by key: any key passes there;
- `removed`: keys DeepSpeed looks for only in order to refuse the config
  (`_reject_removed_config_keys`), told apart from reads by recording that call separately;
- `engine_keys`: top-level keys read outside `DeepSpeedConfig`, by a real
  `deepspeed.initialize` of a one-layer model on CPU with a recording config;
- `boolean_zero_keys`: top-level keys read only for the deprecated boolean
  `"zero_optimization": true`;
- `model_blocks`: the JSON block each pydantic model parses, so that DeepSpeed's
  validation errors (which name the model and a path inside it) get the full JSON path;
- `value_types`: for each block a pydantic model parses, the type of every field in a
  small vocabulary (bool, int, float, str, path, list, dict, tuple, object = a nested
  model, enum/literal choices, union, any, instance of a Python class) with `nullable`
  for Optional and the Field bounds (gt, ge, lt, le). `dstrain validate` rebuilds a
  pydantic validator from each and so coerces exactly as DeepSpeed's lax models do.
  Field validators that run before the type are not copied: probing each field with
  bools and non-finite floats records what they add (`no_bool`, `finite`), and every
  field is then probed with a fixed set of JSON values through both DeepSpeed's model
  and the rebuilt validator; where the rebuilt one would refuse a value DeepSpeed
  accepts (a validator that widens the type), the field is marked `unchecked` and left
  to DeepSpeed's parser. Model validators that compare fields (ZeRO stage against
  offload ratio, fp16's dynamic-scaling floors) are left to the parser as well;
- `checkpoint_tag_validation_modes`: the values DeepSpeed accepts (any case) for
  `checkpoint.tag_validation`;
- optimizer and scheduler types and params: the names DeepSpeed's engine can build (its own
  names, then `torch.optim` / its `lr_schedules`, then `torch.optim.lr_scheduler`) and the
  constructor signatures it passes `params` to (`required`: parameters with no default).

Run it after a DeepSpeed upgrade; tests/test_presets.py fails while the file is stale.
Usage: python scripts/gen_ds_schema.py [--check]
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import inspect
import json
import os
import re
import sys
from collections import defaultdict
from pathlib import Path

SCHEMA_PATH = Path(__file__).resolve().parent.parent / "dstrain" / "ds_schema.json"
PROBE_KEY = "__dstrain_probe__"
BASE = {"train_micro_batch_size_per_gpu": 1}
MAX_DEPTH = 4


class _Log:
    """What DeepSpeed asked the recording dicts, per JSON block path."""

    def __init__(self) -> None:
        self.refusing = False
        self.reads: dict[str, set[str]] = defaultdict(set)
        self.refusals: dict[str, set[str]] = defaultdict(set)
        self.opened: set[str] = set()  # read as a whole: its items, or a deep copy
        self.touched: set[str] = set()  # used as a dict at all

    def note(self, path: str, key: str) -> None:
        self.touched.add(path)
        (self.refusals if self.refusing else self.reads)[path].add(key)

    def open(self, path: str) -> None:
        self.touched.add(path)
        if not self.refusing:
            self.opened.add(path)


class _Keys:
    """`rec.keys()`: `key in rec.keys()` is a read, iterating it reads everything."""

    def __init__(self, rec: _Recorder):
        self.rec = rec

    def __contains__(self, key) -> bool:
        return key in self.rec

    def __iter__(self):
        self.rec.log.open(self.rec.path)
        return iter(dict.keys(self.rec))

    def __len__(self) -> int:
        return dict.__len__(self.rec)


class _Recorder(dict):
    """A dict that notes every key DeepSpeed asks it for."""

    def __init__(self, log: _Log, path: str, data=()):
        super().__init__(data)
        self.log = log
        self.path = path

    def get(self, key, default=None):
        self.log.note(self.path, key)
        return super().get(key, default)

    def __getitem__(self, key):
        self.log.note(self.path, key)
        return super().__getitem__(key)

    def __contains__(self, key):
        self.log.note(self.path, key)
        return super().__contains__(key)

    def pop(self, key, *default):
        self.log.note(self.path, key)
        return super().pop(key, *default)

    def keys(self):
        return _Keys(self)

    def items(self):
        self.log.open(self.path)
        return super().items()

    def values(self):
        self.log.open(self.path)
        return super().values()

    def __iter__(self):
        self.log.touched.add(self.path)  # `for x in value` works on a list as well
        return super().__iter__()

    def __copy__(self):
        # DeepSpeed copies some blocks before reading them: keep recording on the copy.
        return _Recorder(self.log, self.path, dict.items(self))

    def __deepcopy__(self, memo):
        self.log.open(self.path)  # a deep copy keeps every key for later use
        return copy.deepcopy(dict(dict.items(self)), memo)


def _join(path: str, key: str) -> str:
    return f"{path}.{key}" if path else key


@contextlib.contextmanager
def _refusal_phase_recorded(log: _Log):
    """Record `_reject_removed_config_keys` apart: its lookups refuse, they do not read."""
    import deepspeed.runtime.config as ds_config

    original = ds_config._reject_removed_config_keys

    def recorded(param_dict):
        log.refusing = True
        try:
            return original(param_dict)
        finally:
            log.refusing = False

    ds_config._reject_removed_config_keys = recorded
    try:
        yield
    finally:
        ds_config._reject_removed_config_keys = original


def _parse(config) -> Exception | None:
    from deepspeed.runtime.config import DeepSpeedConfig

    try:
        DeepSpeedConfig(config)
    except Exception as exc:  # any refusal is an answer here
        return exc
    return None


def _all_models() -> dict[str, type]:
    from deepspeed.runtime.config_utils import DeepSpeedConfigModel

    found: dict[str, type] = {}
    todo = [DeepSpeedConfigModel]
    while todo:
        cls = todo.pop()
        for sub in cls.__subclasses__():
            found.setdefault(sub.__name__, sub)
            todo.append(sub)
    return found


def _model_of(annotation) -> type | None:
    """The pydantic model inside a field annotation (`Optional[Model]`, `Model`), if any."""
    from pydantic import BaseModel

    if isinstance(annotation, type) and issubclass(annotation, BaseModel):
        return annotation
    for arg in getattr(annotation, "__args__", ()) or ():
        model = _model_of(arg)
        if model is not None:
            return model
    return None


def _model_blocks(
    model: type, path: str, blocks: dict[str, list[str]], types: dict[str, dict] | None = None
) -> None:
    """Field names and aliases of `model` at `path`, and of every nested model below it.

    With `types`, also the measured value type of each field (see `describe_field`).
    """
    keys = set()
    fields = {}
    for name, field in model.model_fields.items():
        keys.add(name)
        if field.alias:
            keys.add(field.alias)
        if types is not None:
            described = describe_field(model, name)
            for key in {name, field.alias} - {None}:
                fields[key] = described
        nested = _model_of(field.annotation)
        if nested is not None:
            for key in {name, field.alias} - {None}:
                _model_blocks(nested, _join(path, key), blocks, types)
    blocks[path] = sorted(keys)
    if types is not None:
        types[path] = dict(sorted(fields.items()))


# --------------------------------------------------------------------------------------
# Value types: each model field reduced to a small JSON description
# --------------------------------------------------------------------------------------

BOUNDS = ("gt", "ge", "lt", "le")
# JSON values (as json.loads gives them: it reads Infinity and NaN too) sent through both
# DeepSpeed's field and the validator rebuilt from its description. No "auto": the custom
# DeepSpeedConfigModel.__init__ drops it before validation, in nested models too (pydantic
# calls a model's own __init__ for nested blocks), and dstrain reports it apart.
PROBES = (
    True, False, 0, 1, 2, 3, -1, 0.5, 1.0, 1.5, 5e8, float("inf"), float("-inf"), float("nan"),
    "1", "0.5", "true", "no", "x", "", "none", "cpu", "nvme", "torch",
    None, [], ["x"], [1], ["z1"], {}, {"x": 1}, {"enabled": True},
)  # fmt: skip


def describe_type(annotation) -> dict:
    """An annotation in the vocabulary of `dstrain.ds_check.value_type`."""
    import enum
    import types
    import typing

    from pydantic import BaseModel

    origin, args = typing.get_origin(annotation), typing.get_args(annotation)
    if origin in (typing.Union, types.UnionType):
        rest = [a for a in args if a is not type(None)]
        if len(rest) == 1:
            inner = describe_type(rest[0])
        else:
            inner = {"type": "union", "of": [describe_type(a) for a in rest]}
        return {**inner, "nullable": True} if len(rest) < len(args) else inner
    if origin is typing.Literal:
        return {"type": "literal", "choices": list(args)}
    if annotation is list or origin is list:
        return {"type": "list", "items": describe_type(args[0])} if args else {"type": "list"}
    if annotation in (dict, typing.Dict) or origin is dict:  # noqa: UP006 (DeepSpeed's own)
        return {"type": "dict"}
    if annotation in (tuple, typing.Tuple) or origin is tuple:  # noqa: UP006
        return {"type": "tuple"}
    if annotation in (typing.Any, object):
        return {"type": "any"}
    if annotation in (bool, int, float, str):
        return {"type": annotation.__name__}
    if annotation is Path or (isinstance(annotation, type) and issubclass(annotation, Path)):
        return {"type": "path"}
    if isinstance(annotation, type) and issubclass(annotation, enum.Enum):
        return {"type": "enum", "choices": [member.value for member in annotation]}
    if isinstance(annotation, type) and issubclass(annotation, BaseModel):
        return {"type": "object"}  # its own fields are described at its own block path
    if isinstance(annotation, type):  # arbitrary_types_allowed: an isinstance check
        return {"type": "instance", "of": f"{annotation.__module__}.{annotation.__qualname__}"}
    raise ValueError(f"no description for annotation {annotation!r}")


def _field_refuses(model: type, name: str, value) -> bool | None:
    """Whether DeepSpeed's `model` refuses `value` for field `name` (None: cannot tell).

    `model_validate` skips DeepSpeedConfigModel.__init__, which drops "auto" values and
    runs deprecations; errors of other fields or of model validators (loc ()) are not the
    field's.
    """
    from pydantic import ValidationError

    field = model.model_fields[name]
    try:
        model.model_validate({name: value})
    except ValidationError as exc:
        return any(e["loc"][:1] in ((name,), (field.alias,)) for e in exc.errors())
    except Exception:  # a model validator raising a plain error
        return None
    return False


def _rebuilt_refuses(description: dict, value) -> bool:
    from pydantic import ValidationError

    from dstrain.ds_check import value_type_adapter

    try:
        value_type_adapter(json.dumps(description, sort_keys=True)).validate_python(value)
    except ValidationError:
        return True
    return False


def describe_field(model: type, name: str) -> dict:
    """The measured description of one field: type, bounds, probed extras."""
    import annotated_types

    field = model.model_fields[name]
    try:
        described = describe_type(field.annotation)
    except ValueError:
        described = {"type": "any"}
    for item in field.metadata:
        bounds = {b: getattr(item, b) for b in BOUNDS if getattr(item, b, None) is not None}
        if isinstance(item, annotated_types.BaseMetadata) and bounds:
            described.update(bounds)
        else:
            described["unchecked"] = f"Field metadata {item!r} has no description"
    # What a validator running before the type adds (fp16's scale fields refuse bools and
    # inf/nan, which pydantic's lax int/float would accept): measured, not copied.
    plain = dict(described)
    if all(
        _field_refuses(model, name, v) and not _rebuilt_refuses(plain, v) for v in (True, False)
    ):
        described["no_bool"] = True
    non_finite = (float("inf"), float("-inf"), float("nan"))
    if all(_field_refuses(model, name, v) and not _rebuilt_refuses(plain, v) for v in non_finite):
        described["finite"] = True
    choices = described.get("choices", []) + described.get("items", {}).get("choices", [])
    for value in (*PROBES, *choices):
        if "unchecked" in described:
            break
        if _rebuilt_refuses(described, value) and _field_refuses(model, name, value) is False:
            described["unchecked"] = (
                f"a validator of {model.__name__} accepts {value!r}, which the type refuses"
            )
    return json.loads(json.dumps(described, sort_keys=True))  # sorted at every level


def _model_at(model: type, loc: tuple) -> type:
    for part in loc:
        for name, field in model.model_fields.items():
            if part in (name, field.alias):
                model = _model_of(field.annotation)
                break
    return model


def _nest(path: str, value):
    """A top-level config with `value` placed at dotted `path`."""
    config = dict(BASE)
    node = config
    parts = path.split(".")
    for part in parts[:-1]:
        node[part] = {"enabled": True}
        node = node[part]
    node[parts[-1]] = value
    return config


def _probe_model(path: str) -> tuple[str, tuple] | None:
    """(model name, location of `path` inside it) when a pydantic model parses `path`."""
    exc = _parse(_nest(path, {PROBE_KEY: True}))
    items = getattr(exc, "errors", None)
    if not callable(items):
        return None
    for item in items():
        loc = tuple(item["loc"])
        if loc and loc[-1] == PROBE_KEY:
            return exc.title, loc[:-1]
    return None


def _probe_dict_block(path: str, extra: dict) -> _Log:
    """Parse with a recording dict (`enabled: true` and `extra`) at dotted `path`."""
    log = _Log()
    parts = path.split(".")
    config = dict(BASE)
    node = config
    for depth, part in enumerate(parts):
        sub_path = ".".join(parts[: depth + 1])
        node[part] = _Recorder(log, sub_path, {"enabled": True})
        node = node[part]
    node.update(extra)
    with _refusal_phase_recorded(log):
        _parse(config)
    return log


def measure_blocks(top_keys: set[str]) -> dict:
    """Classify every top-level key; measure the keys of each block."""
    models = _all_models()
    blocks: dict[str, list[str]] = {}
    strict: set[str] = set()
    opened: set[str] = set()
    model_blocks: dict[str, list[str]] = defaultdict(list)
    value_types: dict[str, dict] = {}

    def visit(path: str, depth: int) -> None:
        found = _probe_model(path)
        if found is not None:
            title, loc = found
            parts = path.split(".")
            root = ".".join(parts[: len(parts) - len(loc)])
            if root not in model_blocks[title]:
                model_blocks[title].append(root)
            sub = {}
            _model_blocks(_model_at(models[title], loc), path, sub, value_types)
            blocks.update(sub)
            strict.update(sub)
            return
        log = _probe_dict_block(path, {})
        keys = set(log.reads[path])
        if path not in log.touched or (not keys and path not in log.opened):
            return  # a scalar, or a list DeepSpeed iterates: not a block
        if "type" in keys:
            # A typed block (optimizer, scheduler) reads its `params` once a type is named.
            keys |= _probe_dict_block(path, {"type": PROBE_KEY}).reads[path]
        if path in log.opened:
            opened.add(path)
        blocks[path] = sorted(keys)
        if depth >= MAX_DEPTH:
            return
        for key in sorted(keys - {"enabled"}):
            visit(_join(path, key), depth + 1)

    for key in sorted(top_keys):
        visit(key, 1)
    return {
        "blocks": blocks,
        "strict": strict,
        "open": opened,
        "model_blocks": {k: sorted(v) for k, v in model_blocks.items()},
        "value_types": value_types,
    }


def measure_top_level() -> dict[str, set[str]]:
    """Top-level reads and refusals of `DeepSpeedConfig`, and reads under boolean ZeRO."""
    log = _Log()
    probe = _Recorder(log, "", BASE)
    probe["zero_optimization"] = _Recorder(log, "zero_optimization")
    log.reads.clear()
    with _refusal_phase_recorded(log):
        _parse(probe)
    reads = set(log.reads[""])
    bool_log = _Log()
    bool_probe = _Recorder(bool_log, "", {**BASE, "zero_optimization": True})
    with _refusal_phase_recorded(bool_log):
        _parse(bool_probe)
    return {
        "reads": reads,
        "removed_top": log.refusals[""] - reads,
        "removed_zero": log.refusals["zero_optimization"],
        "boolean_zero": bool_log.reads[""] - reads,
    }


def measure_engine_keys(dstrain_reads: set[str]) -> set[str]:
    """Top-level keys `deepspeed.initialize` reads outside `DeepSpeedConfig`.

    A one-layer model, one rank, gloo on CPU. `sequence_parallel_size` is pre-set because
    DeepSpeed looks for `data_parallel_size` only once that key is present (one `and`).
    """
    import deepspeed
    import deepspeed.ops
    import torch

    deepspeed.ops.__compatible_ops__["deepspeed_shm_comm"] = False  # no JIT build
    # Our own one-rank group on a fresh port, whatever the calling environment holds (a
    # parent test process may own its MASTER_PORT already).
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    os.environ.update(
        RANK="0", LOCAL_RANK="0", WORLD_SIZE="1", MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port)
    )
    log = _Log()
    config = _Recorder(log, "", {**BASE, "sequence_parallel_size": 1})
    model = torch.nn.Linear(4, 4)
    with _refusal_phase_recorded(log):
        deepspeed.initialize(model=model, model_parameters=model.parameters(), config=config)
    return log.reads[""] - dstrain_reads


def _signature(fn, drop=("self", "optimizer", "params", "model_params")) -> dict:
    # the engine passes the optimizer (or the parameters) positionally: drop those names
    params = [p for p in inspect.signature(fn).parameters.values() if p.name not in drop]
    named = [p for p in params if p.kind not in (p.VAR_POSITIONAL, p.VAR_KEYWORD)]
    entry = {
        "keys": sorted(p.name for p in named),
        "required": sorted(p.name for p in named if p.default is p.empty),
    }
    if any(p.kind == p.VAR_KEYWORD for p in params):
        entry["any_key"] = True
    return entry


def _merge(*entries: dict) -> dict:
    keys = set().union(*(e["keys"] for e in entries))
    required = set.intersection(*(set(e["required"]) for e in entries))
    return {"keys": sorted(keys), "required": sorted(required)}


def measure_optimizers() -> dict:
    """Which optimizer names the engine builds, and the params each constructor takes.

    DeepSpeed's engine lower-cases a name found in `DEEPSPEED_OPTIMIZERS` and builds its own
    class; any other name is `getattr(torch.optim, name)`, case as written.
    """
    import torch
    from deepspeed.ops.adagrad import DeepSpeedCPUAdagrad
    from deepspeed.ops.adam import DeepSpeedCPUAdam, FusedAdam
    from deepspeed.ops.lamb import FusedLamb
    from deepspeed.ops.lion import DeepSpeedCPULion, FusedLion
    from deepspeed.runtime.config import ADAM_W_MODE, DEEPSPEED_OPTIMIZERS, TORCH_ADAM_PARAM

    # The engine pops these two from Adam's params before building it (engine.py's
    # `get_optimizer_configuration`): DeepSpeed's own names for them, imported above.
    popped = {"keys": [ADAM_W_MODE, TORCH_ADAM_PARAM], "required": []}
    adam = _merge(
        _signature(torch.optim.AdamW),
        _signature(torch.optim.Adam),
        _signature(FusedAdam),
        _signature(DeepSpeedCPUAdam),
        popped,
    )
    params = {
        "adam": adam,
        "adamw": adam,
        "adagrad": _merge(_signature(torch.optim.Adagrad), _signature(DeepSpeedCPUAdagrad)),
        "lamb": _signature(FusedLamb),
        "lion": _merge(_signature(FusedLion), _signature(DeepSpeedCPULion)),
    }
    torch_names = []
    for name in dir(torch.optim):
        cls = getattr(torch.optim, name)
        builds = isinstance(cls, type) and issubclass(cls, torch.optim.Optimizer)
        # the abstract base `Optimizer` is no optimizer to build
        if builds and cls is not torch.optim.Optimizer and name.lower() not in DEEPSPEED_OPTIMIZERS:
            torch_names.append(name)
            params[name] = _signature(cls)
    return {
        "deepspeed": sorted(DEEPSPEED_OPTIMIZERS),
        "torch": sorted(torch_names),
        "params": dict(sorted(params.items())),
    }


def measure_schedulers() -> dict:
    """Scheduler names the engine builds: `lr_schedules.NAME`, else torch's; their params."""
    import torch.optim.lr_scheduler as torch_sched
    from deepspeed.runtime import lr_schedules

    ds_names = sorted(lr_schedules.VALID_LR_SCHEDULES)
    params = {name: _signature(getattr(lr_schedules, name)) for name in ds_names}
    torch_names = []
    for name in dir(torch_sched):
        cls = getattr(torch_sched, name)
        if name.startswith("_") or not isinstance(cls, type) or hasattr(lr_schedules, name):
            continue
        builds = issubclass(cls, torch_sched.LRScheduler) or name == "ReduceLROnPlateau"
        if builds and cls is not torch_sched.LRScheduler:  # the abstract base
            torch_names.append(name)
            params[name] = _signature(cls)
    return {"deepspeed": ds_names, "torch": sorted(torch_names), "params": params}


def measure_pipeline_keys() -> list[str]:
    """`pipeline` is copied whole by DeepSpeedConfig; its keys are the defaults it fills in
    and the keys the pipeline engine then reads from that copy (found in its source)."""
    import deepspeed.runtime.pipe.engine as pipe_engine
    from deepspeed.runtime.config import get_pipeline_config

    keys = set(get_pipeline_config({}))
    source = Path(inspect.getsourcefile(pipe_engine)).read_text()
    keys |= set(re.findall(r"pipeline(?:\[|\.get\()'(\w+)'", source))
    return sorted(keys)


def build_schema() -> dict:
    os.environ.setdefault("DS_ACCELERATOR", "cpu")
    import deepspeed
    from deepspeed.runtime.constants import CHECKPOINT_TAG_VALIDATION_MODES

    top = measure_top_level()
    engine_keys = measure_engine_keys(top["reads"] | top["removed_top"])
    measured = measure_blocks(top["reads"])
    blocks = measured["blocks"]
    blocks[""] = sorted(top["reads"] | engine_keys | top["boolean_zero"])
    if "pipeline" in measured["open"]:
        blocks["pipeline"] = measure_pipeline_keys()
        measured["open"].discard("pipeline")
    return {
        "generated_by": "scripts/gen_ds_schema.py",
        "deepspeed_version": deepspeed.__version__,
        "blocks": dict(sorted(blocks.items())),
        "strict_blocks": sorted(measured["strict"]),
        "open_blocks": sorted(measured["open"]),
        "removed": {
            "": sorted(top["removed_top"]),
            "zero_optimization": sorted(top["removed_zero"]),
        },
        "engine_keys": sorted(engine_keys),
        "boolean_zero_keys": sorted(top["boolean_zero"]),
        "model_blocks": dict(sorted(measured["model_blocks"].items())),
        "value_types": dict(sorted(measured["value_types"].items())),
        "checkpoint_tag_validation_modes": sorted(CHECKPOINT_TAG_VALIDATION_MODES),
        "optimizers": measure_optimizers(),
        "schedulers": measure_schedulers(),
    }


def render(schema: dict) -> str:
    return json.dumps(schema, indent=2) + "\n"


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--check", action="store_true", help="exit 1 if the file is stale")
    args = parser.parse_args()
    # DeepSpeed logs to stdout while it parses and initializes: keep our output clean.
    with open(os.devnull, "w") as sink, contextlib.redirect_stdout(sink):
        text = render(build_schema())
    if args.check:
        if SCHEMA_PATH.read_text() != text:
            print(f"{SCHEMA_PATH} is stale: run python scripts/gen_ds_schema.py", file=sys.stderr)
            return 1
        return 0
    SCHEMA_PATH.write_text(text)
    print(f"wrote {SCHEMA_PATH}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
