"""Flags generated from the settings: `--help` shows each field's own default and docstring.

The help text is parsed as a user reads it (click's for gen-config and prepare, argparse's
for train), so a drift in rendering fails here, not only a drift in the tables.
"""

from __future__ import annotations

import re

import pytest
from click.testing import CliRunner

from dstrain.cli import SettingsCommand, _deepspeed_options, cli
from dstrain.cli_options import (
    TRAIN_PRECISION_DEFAULT,
    data_specs,
    deepspeed_specs,
    field_info,
    overrides_from_values,
    parse_default_text,
    train_specs,
)
from dstrain.errors import DstrainError
from dstrain.settings import DataSettings, DeepSpeedSettings, TrainSettings

GEN_CONFIG_FLAGS = [
    "--bf16",
    "--fp16",
    "--fp32",
    "--zero",
    "--offload-optimizer",
    "--offload-param",
    "--nvme-path",
    "--overlap-comm",
    "--no-overlap-comm",
    "--reduce-bucket-size",
    "--allgather-bucket-size",
    "--stage3-prefetch-bucket-size",
    "--stage3-max-live-parameters",
    "--stage3-param-persistence-threshold",
    "--gather-16bit-weights",
    "--no-gather-16bit-weights",
    "--loss-scale",
    "--initial-scale-power",
    "--loss-scale-window",
    "--hysteresis",
    "--consecutive-hysteresis",
    "--no-consecutive-hysteresis",
    "--min-loss-scale",
    "--micro-batch",
    "--grad-accum",
    "--global-batch",
    "--clip",
    "--lr",
    "--weight-decay",
    "--adam-eps",
    "--torch-adam",
    "--fused-adam",
    "--scheduler",
    "--warmup-steps",
    "--total-steps",
    "--activation-checkpointing",
    "--no-activation-checkpointing",
    "--steps-per-print",
    "--wall-clock-breakdown",
    "--no-wall-clock-breakdown",
    "--csv-monitor",
    "--tensorboard",
    "--settings",
    "-o",
    "--output",
]
"""Every gen-config flag before the flags were generated: scripts use these names."""

TRAIN_FLAGS = [
    "--local_rank",
    "--local-rank",
    "--deepspeed_config",
    "--deepspeed-config",
    "--deepspeed",
    "--model",
    "--fasta",
    "--cache-dir",
    "--output-dir",
    "--max-steps",
    "--epochs",
    "--eval-every",
    "--save-every",
    "--log-every",
    "--keep-best",
    "--resume",
    "--init-checkpoint",
    "--trust-checkpoint",
    "--seed",
    "--frame",
    "--on-ambiguous",
    "--max-length",
    "--window-overlap",
    "--val-fraction",
    "--split-seed",
    "--padding",
    "--loss-on-pad",
    "--max-eval-batches",
    "--skip-window",
    "--max-skipped-share",
    "--no-export",
    "--export-pt",
    "--no-progress",
    "--timeout-s",
    "--hang-timeout",
    "--dump-params",
    "--settings",
    "--num-gpus",
    "--hostfile",
]
PREPARE_FLAGS = [
    "-o",
    "--output",
    "--frame",
    "--on-ambiguous",
    "--max-length",
    "--window-overlap",
    "--val-fraction",
    "--split-seed",
    "--json",
]


def help_entries(text: str) -> dict[str, tuple[list[str], str]]:
    """Option entries of a --help text: first flag -> (every flag, help joined on one line)."""
    entries: dict[str, tuple[list[str], str]] = {}
    current: list[str] | None = None
    for line in text.splitlines():
        if re.match(r"^ {2}-", line):
            names_part, _, rest = line.strip().partition("  ")
            names = re.findall(r"(?:^|[\s,/])(--?[A-Za-z0-9][\w-]*)", names_part)
            current = [names, rest.strip()]
            entries[names[0]] = current  # type: ignore[assignment]
        elif current is not None and line.startswith("    ") and line.strip():
            current[1] = f"{current[1]} {line.strip()}".strip()
        else:
            current = None
    return {k: (v[0], v[1]) for k, v in entries.items()}


def shown_default(help_text: str) -> str:
    match = re.search(r"\[default: ([^\]]*)\]\s*$", help_text)
    assert match, f"no [default: ...] at the end of {help_text!r}"
    return match.group(1)


def squash(text: str) -> str:
    return re.sub(r"\s+", "", text)


def check_entries(entries, model, specs, *, precision_text: str | None = None) -> None:
    """Each spec's help entry shows the field's default and docstring."""
    for spec in specs:
        names, help_text = entries[spec.names[0]]
        assert set(spec.names) <= set(names) | set(spec.names[1:]), (spec.names, names)
        shown = shown_default(help_text)
        if spec.kind == "enable":
            enabled = field_info(model, spec.path.rsplit(".", 1)[0] + ".enabled").default
            assert shown == ("on" if enabled else "off")
            continue
        default = field_info(model, spec.path).get_default(call_default_factory=True)
        doc = " ".join((field_info(model, spec.path).description or "").split())
        assert squash(doc) in squash(help_text), spec.flag
        if spec.kind == "switch" and precision_text is not None:
            assert shown == precision_text
        elif spec.kind == "switch":
            assert shown == default
        elif spec.kind == "bool" and default is not None:
            assert shown == (spec.names[0] if default else spec.off_names[0]), spec.flag
        else:
            assert parse_default_text(shown, default) == default, (spec.flag, shown, default)


def click_help(*args: str) -> str:
    result = CliRunner().invoke(cli, [*args, "--help"], terminal_width=100)
    assert result.exit_code == 0, result.output
    return result.output


def test_gen_config_help_shows_the_settings_defaults():
    text = click_help("gen-config")
    entries = help_entries(text)
    check_entries(entries, DeepSpeedSettings, deepspeed_specs())
    every = {name for names, _ in entries.values() for name in names}
    assert set(GEN_CONFIG_FLAGS) <= every
    # the knobs the issue found disagreeing: one default each, the settings'
    assert shown_default(entries["--warmup-steps"][1]) == "100"
    assert shown_default(entries["--micro-batch"][1]) == "4"


def test_prepare_help_shows_the_settings_defaults():
    entries = help_entries(click_help("prepare"))
    check_entries(entries, DataSettings, data_specs())
    every = {name for names, _ in entries.values() for name in names}
    assert set(PREPARE_FLAGS) <= every


def test_train_help_shows_the_settings_defaults(monkeypatch):
    from dstrain.train import DEMO_PRESET, build_arg_parser

    monkeypatch.setenv("COLUMNS", "400")  # one line per entry: argparse breaks on hyphens
    text = build_arg_parser().format_help()
    entries = help_entries(text)
    check_entries(entries, TrainSettings, train_specs())
    check_entries(
        entries,
        DeepSpeedSettings,
        deepspeed_specs(precision_default=TRAIN_PRECISION_DEFAULT),
        precision_text=TRAIN_PRECISION_DEFAULT,
    )
    every = {name for names, _ in entries.values() for name in names}
    assert set(TRAIN_FLAGS) <= every
    assert set(GEN_CONFIG_FLAGS) - {"--settings", "-o", "--output"} <= every
    # the demo preset is named, with its numbers, in the description
    demo = DEMO_PRESET["deepspeed"]
    flat = " ".join(text.split())
    assert f"epochs {DEMO_PRESET['epochs']}" in flat
    assert f"micro batch {demo['batch']['train_micro_batch_size_per_gpu']}" in flat
    assert f"warm-up {demo['scheduler']['warmup_num_steps']} steps" in flat


def test_click_and_argparse_read_the_same_flags_the_same_way():
    from dstrain.train import build_arg_parser

    argv = [
        "--fp16",
        "--zero",
        "3",
        "--no-overlap-comm",
        "--fused-adam",
        "--nvme-path",
        "/nvme",
        "--offload-param",
        "nvme",
        "--csv-monitor",
        "logs",
        "--lr",
        "3e-4",
    ]
    specs = deepspeed_specs()
    args = build_arg_parser().parse_args(["--local_rank=3", *argv])
    from_argparse = overrides_from_values(specs, vars(args))
    seen: dict = {}
    command = SettingsCommand("probe", callback=seen.update, generated=_deepspeed_options)
    result = CliRunner().invoke(command, argv)
    assert result.exit_code == 0, result.output
    assert overrides_from_values(specs, seen) == from_argparse
    assert from_argparse == {
        "precision": "fp16",
        "zero_optimization.stage": 3,
        "zero_optimization.overlap_comm": False,
        "optimizer.torch_adam": False,
        "zero_optimization.offload_optimizer.nvme_path": "/nvme",
        "zero_optimization.offload_param.nvme_path": "/nvme",
        "zero_optimization.offload_param.device": "nvme",
        "csv_monitor.output_path": "logs",
        "csv_monitor.enabled": True,
        "optimizer.lr": 3e-4,
    }
    assert args.local_rank == 3


def test_train_refuses_a_config_file_and_deepspeed_flags_together():
    from dstrain.train import build_arg_parser, deepspeed_flags

    args = build_arg_parser().parse_args(["--deepspeed_config", "ds.json", "--zero", "3", "--bf16"])
    with pytest.raises(DstrainError) as err:
        deepspeed_flags(args)
    assert err.value.exit_code == 2
    assert "--deepspeed_config" in str(err.value) and "--zero" in str(err.value)
    assert "--bf16" in str(err.value)
    plain = build_arg_parser().parse_args(["--zero", "3", "--micro-batch", "2"])
    assert deepspeed_flags(plain) == {"zero": 3, "micro_batch": 2}


def test_train_settings_errors_name_the_flag():
    from dstrain.train import build_arg_parser, settings_from_args

    args = build_arg_parser().parse_args(["--max-steps", "0", "--window-overlap", "-1"])
    with pytest.raises(DstrainError) as err:
        settings_from_args(args)
    assert "--max-steps:" in str(err.value) and "--window-overlap:" in str(err.value)


def test_train_config_without_a_file_is_the_settings_defaults_or_the_demo_preset():
    torch = pytest.importorskip("torch")
    from dstrain.settings import DeepSpeedSettings
    from dstrain.train import DEMO_PRESET, train_ds_config

    defaults = DeepSpeedSettings()
    plain = train_ds_config({}, demo=False, world_size=1).run
    assert plain.batch.train_micro_batch_size_per_gpu == (
        defaults.batch.train_micro_batch_size_per_gpu
    )
    assert plain.scheduler.params["warmup_num_steps"] == defaults.scheduler.warmup_num_steps
    assert plain.optimizer.lr == defaults.optimizer.lr
    assert plain.zero.stage == defaults.zero_optimization.stage
    # native bf16 only: a V100's is_bf16_supported() is True through emulation
    gpu_bf16 = torch.cuda.is_available() and torch.cuda.is_bf16_supported(False)
    assert plain.precision == ("bf16" if gpu_bf16 else "fp32")  # TRAIN_PRECISION_DEFAULT
    demo = train_ds_config({"micro_batch": 2}, demo=True, world_size=1).run
    preset = DEMO_PRESET["deepspeed"]
    assert demo.batch.train_micro_batch_size_per_gpu == 2  # a flag beats the preset
    assert demo.scheduler.params["warmup_num_steps"] == preset["scheduler"]["warmup_num_steps"]
    assert demo.optimizer.lr == preset["optimizer"]["lr"]
    with pytest.raises(DstrainError, match="--offload-param"):
        train_ds_config({"offload_param": "cpu"}, demo=False, world_size=1)


@pytest.mark.parametrize(
    ("value", "message"),
    [("99999999999999999999", "outside the 64-bit integer range"), ("1e3", "is not an integer")],
)
def test_integer_flags_stay_within_int64_in_click_and_argparse(value, message):
    """A count beyond int64 is a typo: gen-config (click) and train (argparse) refuse it
    instead of writing it into the DeepSpeed JSON."""
    from click.testing import CliRunner

    from dstrain.cli import cli
    from dstrain.train import build_arg_parser

    result = CliRunner().invoke(cli, ["gen-config", "--micro-batch", value])
    assert result.exit_code == 2 and message in result.output
    with pytest.raises(SystemExit) as stop:
        build_arg_parser().parse_args(["--micro-batch", value])
    assert stop.value.code == 2
