"""`dstrain gen-config` and `dstrain validate` as a user runs them (real subprocesses)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent


def dstrain(*args: str, stdin: str | bytes | None = None, cwd: Path | None = None):
    data = stdin.encode() if isinstance(stdin, str) else stdin
    return subprocess.run(
        [sys.executable, "-m", "dstrain", *args],
        input=data,
        capture_output=True,
        cwd=cwd,
        timeout=120,
        check=False,
    )


def out(result) -> str:
    return result.stdout.decode()


def test_gen_config_pipes_into_validate():
    gen = dstrain("gen-config", "--zero", "2", "--bf16")
    assert gen.returncode == 0, gen.stderr
    config = json.loads(gen.stdout)
    assert config["zero_optimization"]["stage"] == 2 and config["bf16"]["enabled"] is True
    check = dstrain("validate", "-", stdin=gen.stdout)
    assert check.returncode == 0, out(check)
    assert "<stdin>: OK" in out(check)


def test_gen_config_fp16_loss_scaling_flags():
    gen = dstrain(
        "gen-config",
        "--zero",
        "3",
        "--fp16",
        "--loss-scale-window",
        "500",
        "--initial-scale-power",
        "12",
        "--hysteresis",
        "2",
        "--min-loss-scale",
        "1",
        "--micro-batch",
        "4",
        "--grad-accum",
        "8",
        "--offload-optimizer",
        "cpu",
        "--clip",
        "1.0",
        "--lr",
        "5e-5",
        "--warmup-steps",
        "100",
    )
    assert gen.returncode == 0, gen.stderr
    config = json.loads(gen.stdout)
    assert config["fp16"]["loss_scale_window"] == 500
    assert config["fp16"]["initial_scale_power"] == 12
    assert config["gradient_accumulation_steps"] == 8
    assert config["zero_optimization"]["offload_optimizer"]["device"] == "cpu"
    assert config["scheduler"]["params"]["warmup_num_steps"] == 100
    assert "train_batch_size" not in config


def test_gen_config_refuses_contradictions_naming_flags():
    gen = dstrain(
        "gen-config", "--zero", "2", "--offload-param", "cpu", "--bf16", "--hysteresis", "3"
    )
    assert gen.returncode == 1
    err = gen.stderr.decode()
    assert "Traceback" not in err and gen.stdout == b""
    assert "(--offload-param): offload_param needs ZeRO stage 3" in err
    assert "(--hysteresis): fp16 loss scaling is set" in err


def test_gen_config_writes_atomically_and_keeps_old_file_on_error(tmp_path):
    target = tmp_path / "ds.json"
    assert dstrain("gen-config", "--fp32", "-o", str(target)).returncode == 0
    first = target.read_text()
    assert json.loads(first)["zero_optimization"]["stage"] == 2 and first.endswith("}\n")
    bad = dstrain("gen-config", "--zero", "1", "--offload-param", "cpu", "-o", str(target))
    assert bad.returncode == 1
    assert target.read_text() == first
    assert [p.name for p in tmp_path.iterdir()] == ["ds.json"]


def test_gen_config_from_settings_file(tmp_path):
    settings = tmp_path / "run.json"
    settings.write_text(
        json.dumps(
            {
                "precision": "fp16",
                "zero_optimization": {"stage": 1},
                "fp16": {"loss_scale_window": 250},
            }
        )
    )
    gen = dstrain("gen-config", "--settings", str(settings), "--grad-accum", "4")
    config = json.loads(gen.stdout)
    assert config["fp16"]["loss_scale_window"] == 250
    assert config["zero_optimization"]["stage"] == 1
    assert config["gradient_accumulation_steps"] == 4
    settings.write_text(json.dumps({"precison": "fp16"}))
    bad = dstrain("gen-config", "--settings", str(settings))
    assert bad.returncode == 1 and b"precison: unknown setting" in bad.stderr


def test_validate_reports_every_acceptance_problem_at_once(tmp_path):
    files = {
        "typo.json": {"train_micro_batch_size_per_gpu": 4, "gradient_clipp1ng": 1.0},
        "auto.json": {"train_micro_batch_size_per_gpu": 4, "fp16": {"enabled": "auto"}},
        "offload.json": {
            "train_micro_batch_size_per_gpu": 4,
            "zero_optimization": {"stage": 2, "offload_param": {"device": "cpu"}},
        },
        "nvme.json": {
            "train_micro_batch_size_per_gpu": 4,
            "zero_optimization": {"stage": 3, "offload_optimizer": {"device": "nvme"}},
        },
        "both.json": {
            "train_micro_batch_size_per_gpu": 4,
            "fp16": {"enabled": True},
            "bf16": {"enabled": True},
        },
        "batch.json": {
            "train_batch_size": 10,
            "train_micro_batch_size_per_gpu": 4,
            "gradient_accumulation_steps": 2,
        },
    }
    for name, config in files.items():
        (tmp_path / name).write_text(json.dumps(config))
    result = dstrain("validate", *files, "--world-size", "1", "--json", cwd=tmp_path)
    assert result.returncode == 1
    found = {(p["file"], p["path"]) for p in json.loads(result.stdout)}
    assert {
        ("typo.json", "gradient_clipp1ng"),
        ("auto.json", "fp16.enabled"),
        ("offload.json", "zero_optimization.offload_param.device"),
        ("nvme.json", "zero_optimization.offload_optimizer.nvme_path"),
        ("both.json", "bf16.enabled"),
        ("batch.json", "train_batch_size"),
    } <= found
    text = out(dstrain("validate", "batch.json", "--world-size", "1", cwd=tmp_path))
    assert "x world size (1) = 8" in text


def test_validate_world_size_from_hostfile(tmp_path):
    (tmp_path / "ds.json").write_text(
        json.dumps(
            {
                "train_batch_size": 16,
                "train_micro_batch_size_per_gpu": 2,
                "gradient_accumulation_steps": 2,
            }
        )
    )
    (tmp_path / "hosts").write_text("# two nodes\nnode-a slots=2\nnode-b slots=2\n")
    assert dstrain("validate", "ds.json", "--hostfile", "hosts", cwd=tmp_path).returncode == 0
    (tmp_path / "hosts").write_text("node-a slots=2\n")
    bad = dstrain("validate", "ds.json", "--hostfile", "hosts", cwd=tmp_path)
    assert bad.returncode == 1 and "world size (2) = 8" in out(bad)


@pytest.mark.parametrize(
    ("args", "words"),
    [
        (["--world-size", "2", "--hostfile", "h"], "not both"),
        (["--hostfile", "missing-hostfile"], "does not exist"),
        (["--world-size", "0"], "0"),
        ([], "Missing argument"),
    ],
)
def test_validate_usage_errors_exit_2(tmp_path, args, words):
    (tmp_path / "ds.json").write_text("{}")
    paths = [] if words == "Missing argument" else ["ds.json"]
    result = dstrain("validate", *paths, *args, cwd=tmp_path)
    assert result.returncode == 2
    assert words in result.stderr.decode() and b"Traceback" not in result.stderr


def test_validate_bad_files_without_traceback(tmp_path):
    (tmp_path / "broken.json").write_text('{"a": 1,\n')
    (tmp_path / "binary.json").write_bytes(bytes(range(256)))
    result = dstrain("validate", "broken.json", "binary.json", "missing.json", cwd=tmp_path)
    assert result.returncode == 1
    text = out(result)
    assert "broken.json: error: malformed JSON at line 2" in text
    assert "binary.json: error: this is a binary file" in text
    assert "missing.json: error: does not exist" in text
    assert b"Traceback" not in result.stderr


def test_json_output_is_clean_with_deepspeed_parser():
    pytest.importorskip("deepspeed")
    gen = dstrain("gen-config", "--zero", "3")
    result = dstrain("validate", "-", "--json", stdin=gen.stdout)
    assert result.returncode == 0
    assert json.loads(result.stdout) == []


LIGHT_PROBE = """
import sys
from dstrain.cli import main
try:
    main({argv!r})
except SystemExit as exc:
    assert not exc.code, exc.code
heavy = sorted(m for m in ("torch", "deepspeed", "transformers", "matplotlib") if m in sys.modules)
print("HEAVY=" + ",".join(heavy), file=sys.stderr)
"""


@pytest.mark.parametrize(
    "argv",
    [
        ["--help"],
        ["gen-config", "--zero", "2", "--bf16"],
        ["validate", "--no-deepspeed", str(REPO / "ds_configs" / "zero3_bf16.json")],
        ["report", "--help"],
        ["estimate", "--model", "genslm_2.5B", "--gpus-per-node", "8", "--gpu-mem-gib", "40"],
    ],
)
def test_cli_stays_light(argv):
    code = LIGHT_PROBE.format(argv=argv)
    result = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, timeout=60, check=False
    )
    assert result.returncode == 0, result.stderr
    assert "HEAVY=\n" in result.stderr.decode()


def test_every_gen_config_flag_combination_validates():
    gen = dstrain(
        "gen-config",
        "--zero",
        "3",
        "--activation-checkpointing",
        "--csv-monitor",
        "logs",
        "--scheduler",
        "WarmupCosineLR",
        "--total-steps",
        "1000",
    )
    assert gen.returncode == 0, gen.stderr
    check = dstrain("validate", "-", stdin=gen.stdout)
    assert check.returncode == 0, out(check)
