"""Launch hygiene: nothing a user or a shared file supplies runs in pdsh's remote shell.

Table-driven checks of `preflight_launch` (and `dstrain launch --dry-run`) against the
values DeepSpeed 0.19.8 pastes into the remote command: `--master-addr`, `.deepspeed_env`
values, exported variables (MLFLOW*, PYTHON*, MV2*, UCX*, NCCL*) and launcher arguments.
No process is started: `shutil.which` is faked so pdsh looks installed (no cluster here).
"""

from __future__ import annotations

import json
import os

import pytest
from click.testing import CliRunner

import dstrain.launch as launch
from dstrain.cli import cli
from dstrain.errors import DstrainError
from dstrain.launch import (
    check_master_addr,
    lint_deepspeed_env,
    looks_secret,
    preflight_launch,
    remote_value_problem,
    secret_warnings,
)

TRAIN = ["--deepspeed_config", "ds.json"]
CLEAN_ENV = {"HOME": "/nonexistent-home", "PATH": "/usr/bin"}


@pytest.fixture
def cluster(tmp_path, monkeypatch):
    """A two-node hostfile, a one-node one, a DeepSpeed config for world size 2; pdsh
    "installed" (faked: no cluster here)."""
    (tmp_path / "two").write_text("node-a slots=1\nnode-b slots=1\n")
    (tmp_path / "local").write_text("localhost slots=2\n")
    config = {"train_micro_batch_size_per_gpu": 1, "gradient_accumulation_steps": 1}
    (tmp_path / "ds.json").write_text(json.dumps(config))
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(launch.shutil, "which", lambda name: f"/usr/bin/{name}")
    return tmp_path


def refusal(**kwargs) -> str:
    kwargs.setdefault("environ", CLEAN_ENV)
    with pytest.raises(DstrainError) as info:
        preflight_launch(train_args=TRAIN, **kwargs)
    return str(info.value)


# -- --master-addr -----------------------------------------------------------------------

GOOD_ADDRS = ["10.0.0.1", "node-a", "node_01.cluster.local", "fe80::1", "::1", "a.b.c."]
BAD_ADDRS = ["$(reboot)", "`id`", "a;b", "a b", "node-a:29500", "", "-oProxyCommand=x", "a..b"]


@pytest.mark.parametrize("addr", GOOD_ADDRS)
def test_master_addr_accepts_hosts_and_ips(addr):
    assert check_master_addr(addr) is None


@pytest.mark.parametrize("addr", BAD_ADDRS)
def test_master_addr_refuses_anything_else_on_every_path(cluster, addr):
    assert "not a host name or an IP address" in check_master_addr(addr)
    # Refused on the pdsh path and also without ssh (there it is only an argv word, but it
    # is still not an address).
    assert f"--master-addr `{addr}`" in refusal(hostfile="two", master_addr=addr)
    message = refusal(hostfile="two", no_ssh=True, node_rank=0, master_addr=addr)
    assert f"--master-addr `{addr}`" in message


# -- values pasted into `export K="V";` --------------------------------------------------

UNSAFE_VALUES = [
    "$(touch /tmp/x)",
    "`id`",
    "a;b",
    "a|b",
    "a&b",
    "a<b",
    "a>b",
    "it's",
    "back\\slash",
    "${A:-$(id)}",
    "(sub)",
    "a!b",
    "a\x0cb",
]
SAFE_VALUES = [
    "INFO",
    "eth0,ib0",
    "/opt/a:/opt/b",
    "two words",
    "^docker0,lo",
    "$HOME/x",
    "${HOME}",
]


@pytest.mark.parametrize("value", UNSAFE_VALUES)
def test_remote_value_problem_refuses_shell_syntax(value):
    assert "shell syntax" in remote_value_problem(value)


@pytest.mark.parametrize("value", SAFE_VALUES)
def test_remote_value_problem_accepts_plain_values(value):
    assert remote_value_problem(value) is None


@pytest.mark.parametrize("value", UNSAFE_VALUES[:-1])  # the form feed ends a line there
def test_deepspeed_env_value_with_shell_syntax_stops_a_pdsh_launch(cluster, value):
    (cluster / ".deepspeed_env").write_text(f"NCCL_DEBUG=INFO\nEVIL={value}\n")
    problems = lint_deepspeed_env(cluster / ".deepspeed_env")
    assert len(problems) == 1 and ".deepspeed_env:2: the value of `EVIL`" in problems[0]
    message = refusal(hostfile="two")
    assert ".deepspeed_env:2" in message and "remove those characters" in message


def test_deepspeed_env_is_read_line_by_line_like_deepspeed(cluster):
    # A carriage return ends a line for DeepSpeed's readlines(): the lint numbers lines the
    # same way (line 2 is `$(id)` with no `=`, which crashes DeepSpeed).
    (cluster / ".deepspeed_env").write_bytes(b"A=1\r$(id)\n")
    assert lint_deepspeed_env(cluster / ".deepspeed_env")[0].split(":")[1] == "2"


def test_single_node_launches_ignore_deepspeed_env(cluster):
    # DeepSpeed reads .deepspeed_env only on its multi-node path: nothing goes to a shell.
    (cluster / ".deepspeed_env").write_text("EVIL=$(id)\nHF_TOKEN=hf_x\n")
    check = preflight_launch(train_args=TRAIN, num_gpus=2, environ=CLEAN_ENV)
    assert check.warnings == []
    check = preflight_launch(train_args=TRAIN, hostfile="local", environ=CLEAN_ENV)
    assert check.warnings == [] and not check.multi_node


@pytest.mark.parametrize(
    ("name", "value", "refused"),
    [
        ("NCCL_SOCKET_IFNAME", "eth0;touch /tmp/x", True),
        ("PYTHONPATH", "/opt/$(id)", True),
        ("MLFLOW_RUN_NAME", "run`id`", True),
        ("UCX_TLS", "tcp", False),
        ("OTHER_VAR", "$(id)", False),  # not exported by DeepSpeed
    ],
)
def test_exported_environment_is_checked_on_the_pdsh_path(cluster, name, value, refused):
    environ = {**CLEAN_ENV, name: value}
    if refused:
        message = refusal(hostfile="two", environ=environ)
        assert f"environment variable {name}=" in message and f"unset {name}" in message
        # mpirun gets `-x K=V` in an argv, no shell: not refused there.
        preflight_launch(train_args=TRAIN, hostfile="two", launcher="openmpi", environ=environ)
    else:
        preflight_launch(train_args=TRAIN, hostfile="two", environ=environ)


def test_an_exported_variable_name_with_shell_syntax_is_refused(cluster):
    """DeepSpeed writes `export KEY=VALUE;` with the key unquoted too."""
    name = "PYTHONX;touch /tmp/pwned;Y"
    message = refusal(hostfile="two", environ={**CLEAN_ENV, name: "1"})
    assert repr(name) in message and "not a shell variable name" in message


# -- secrets -----------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("name", "secret"),
    [
        ("HF_TOKEN", True),
        ("wandb_api_key", True),
        ("MLFLOW_TRACKING_PASSWORD", True),
        ("AWS_SECRET_ACCESS_KEY", True),
        ("NCCL_DEBUG", False),
        ("HOME", False),
    ],
)
def test_looks_secret(name, secret):
    assert looks_secret(name) is secret


def test_secrets_warn_on_multi_node_launches_only(cluster):
    (cluster / ".deepspeed_env").write_text("NCCL_DEBUG=INFO\nHF_TOKEN=hf_abc\nWANDB_API_KEY=k\n")
    assert [w.split(":")[1] for w in secret_warnings(cluster / ".deepspeed_env")] == ["2", "3"]
    environ = {**CLEAN_ENV, "MLFLOW_TRACKING_TOKEN": "t"}
    for launcher_name in ("pdsh", "openmpi"):  # both print the exports in their log
        check = preflight_launch(
            train_args=TRAIN, hostfile="two", launcher=launcher_name, environ=environ
        )
        text = "\n".join(check.warnings)
        assert "`HF_TOKEN` looks like a secret" in text and "`WANDB_API_KEY`" in text
        assert "MLFLOW_TRACKING_TOKEN looks like a secret" in text and "ps" in text
        assert "hf_abc" not in text  # the warning never repeats the secret
    assert preflight_launch(train_args=TRAIN, num_gpus=1, environ=environ).warnings == []


# -- launcher arguments ------------------------------------------------------------------


@pytest.mark.parametrize(
    "extra",
    [
        ["--venv_script=$(touch /tmp/x)"],
        ["--venv_script", "/opt/venv/bin/activate;id"],
        ["--venv=/opt/my venv/activate"],  # argparse accepts a prefix of the flag
        ["--enable_each_rank_log=logs;id"],
        ["--launcher_args=-l user touch;x"],
        ["--launcher_args", "-R ssh $(id)"],
        ["--launcher_args='unbalanced"],
    ],
)
def test_launcher_args_pasted_into_the_remote_command_are_refused(cluster, extra):
    message = refusal(hostfile="two", extra_launcher_args=extra)
    assert "launcher argument" in message


@pytest.mark.parametrize(
    "extra",
    [
        ["--venv_script=/opt/venv/bin/activate"],
        ["--launcher_args=-l user -R ssh"],
        ["--launcher_args", "-l user"],
        ["--ssh_port=2222"],
        ["--enable_each_rank_log=logs"],
    ],
)
def test_plain_launcher_args_pass(cluster, extra):
    preflight_launch(train_args=TRAIN, hostfile="two", extra_launcher_args=extra, environ=CLEAN_ENV)


# -- through the CLI ---------------------------------------------------------------------


@pytest.mark.parametrize(
    ("flags", "env_file", "expected"),
    [
        (["--master-addr", "$(id)"], None, "--master-addr `$(id)`"),
        (["--launcher-arg=--venv_script=$(id)"], None, "launcher argument `--venv_script=$(id)`"),
        ([], "A=`id`\n", ".deepspeed_env:1: the value of `A`"),
    ],
)
def test_cli_dry_run_refuses_remote_shell_values(cluster, monkeypatch, flags, env_file, expected):
    monkeypatch.setattr(os, "execv", lambda *a: pytest.fail("nothing may be executed"))
    monkeypatch.setenv("HOME", str(cluster / "home"))
    if env_file is not None:
        (cluster / ".deepspeed_env").write_text(env_file)
    result = CliRunner().invoke(
        cli, ["launch", "--hostfile", "two", *flags, "--dry-run", "--", *TRAIN]
    )
    assert result.exit_code != 0 and isinstance(result.exception, DstrainError)
    assert expected in str(result.exception)


def test_cli_dry_run_prints_secret_warnings(cluster, monkeypatch):
    monkeypatch.setenv("HOME", str(cluster / "home"))
    (cluster / ".deepspeed_env").write_text("HF_TOKEN=hf_abc\n")
    result = CliRunner().invoke(cli, ["launch", "--hostfile", "two", "--dry-run", "--", *TRAIN])
    assert result.exit_code == 0, result.output
    assert "warning: " in result.output and "`HF_TOKEN` looks like a secret" in result.output
