"""`gen-config --wandb PROJECT` / `--comet PROJECT`: DeepSpeed's own W&B and Comet monitors,
written from the settings and checked like every other block."""

from __future__ import annotations

import json

import pytest
from click.testing import CliRunner

from dstrain.cli import cli
from dstrain.ds_check import check_ds_config, deepspeed_parser_problems
from dstrain.ds_config import build_ds_config
from dstrain.ds_run import (
    CheckedConfig,
    missing_monitor_packages,
    resolve_ds_run,
    with_monitor_dir,
)
from dstrain.errors import DstrainError
from dstrain.settings import DeepSpeedSettings, make_deepspeed_settings


def gen_config(*args: str) -> dict:
    result = CliRunner().invoke(cli, ["gen-config", *args])
    assert result.exit_code == 0, result.output
    return json.loads(result.stdout)


def test_flags_turn_on_deepspeeds_monitors_and_the_typed_run_sees_them():
    config = gen_config("--wandb", "genslm-ft", "--comet", "genslm-comet")
    assert config["wandb"] == {"enabled": True, "project": "genslm-ft"}
    assert config["comet"] == {
        "enabled": True,
        "project": "genslm-comet",
        "samples_log_interval": 100,
    }
    assert check_ds_config(config, "gen-config") == []
    run = resolve_ds_run(config)
    assert run.monitor("wandb").enabled
    assert run.monitor("comet").enabled
    assert not run.monitor("tensorboard").enabled


def test_every_key_from_a_settings_file_in_a_fixed_order(tmp_path):
    settings = {
        "wandb": {"enabled": True, "team": "lab", "group": "sweep-1", "project": "p"},
        "comet": {
            "enabled": True,
            "mode": "create",
            "online": False,
            "samples_log_interval": 64,
            "experiment_name": "zero2",
            "workspace": "lab",
            "project": "p",
        },
    }
    path = tmp_path / "run.json"
    path.write_text(json.dumps(settings))
    config = gen_config("--settings", str(path))
    assert list(config["wandb"]) == ["enabled", "project", "group", "team"]
    assert list(config["comet"]) == [
        "enabled",
        "project",
        "workspace",
        "experiment_name",
        "samples_log_interval",
        "online",
        "mode",
    ]
    assert config["comet"]["online"] is False
    assert check_ds_config(config, "run.json") == []


def test_generated_blocks_pass_deepspeeds_own_parser():
    pytest.importorskip("deepspeed")
    settings = make_deepspeed_settings(
        {
            "wandb": {"enabled": True, "project": "p", "group": "g", "team": "t"},
            "comet": {"enabled": True, "workspace": "w", "online": False, "mode": "get"},
        },
        "test",
    )
    config = build_ds_config(settings)
    assert deepspeed_parser_problems(config, "test") == []


def test_off_by_default_and_left_out_of_the_json():
    config = build_ds_config(DeepSpeedSettings())
    assert "wandb" not in config
    assert "comet" not in config


def test_a_key_of_a_monitor_that_is_off_is_refused_naming_the_fix():
    with pytest.raises(DstrainError) as exc:
        make_deepspeed_settings({"wandb": {"group": "g"}}, "run.json")
    assert "wandb.group" in str(exc.value)
    assert "--wandb PROJECT" in str(exc.value)


def test_bad_values_are_refused_by_the_settings():
    with pytest.raises(DstrainError) as exc:
        make_deepspeed_settings(
            {"comet": {"enabled": True, "mode": "bogus", "api_key": "secret"}}, "run.json"
        )
    text = str(exc.value)
    assert "comet.mode" in text
    assert "comet.api_key" in text  # not a setting: the key belongs in COMET_API_KEY


def test_the_run_directory_goes_to_file_monitors_only():
    """train.py points monitors without output_path at OUTPUT_DIR/monitor; DeepSpeed
    refuses an output_path key in a wandb or comet block."""
    config = gen_config("--wandb", "p", "--comet", "p", "--tensorboard", "")
    checked = with_monitor_dir(CheckedConfig(config, resolve_ds_run(config), "x"), "runs/x/monitor")
    assert checked.config["tensorboard"]["output_path"] == "runs/x/monitor"
    assert "output_path" not in checked.config["wandb"]
    assert "output_path" not in checked.config["comet"]
    assert check_ds_config(checked.config, "x") == []


def test_gen_config_help_shows_the_flags_with_the_settings_help():
    result = CliRunner().invoke(cli, ["gen-config", "--help"], terminal_width=200)
    lines = [line for line in result.output.splitlines() if "--wandb" in line]
    assert lines and "PROJECT" in lines[0]
    assert "Weights & Biases" in lines[0]
    assert "logs to that project" in result.output
    assert "--comet PROJECT" in result.output


def test_missing_monitor_packages_are_named_by_their_pip_names(monkeypatch):
    import importlib.util

    installed = {"tensorboard"}  # as if: only tensorboard can be found
    monkeypatch.setattr(
        importlib.util, "find_spec", lambda name, *a: object() if name in installed else None
    )
    config = gen_config("--wandb", "p", "--comet", "p", "--tensorboard", "tb", "--csv-monitor", "c")
    assert missing_monitor_packages(resolve_ds_run(config)) == ["wandb", "comet_ml"]
    assert missing_monitor_packages(resolve_ds_run(gen_config())) == []
