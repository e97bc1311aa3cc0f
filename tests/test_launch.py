"""`dstrain launch`: preflight checks, the launcher argv, `.deepspeed_env` lint. No processes."""

from __future__ import annotations

import json
import os
import shlex
import subprocess
import sys
from pathlib import Path

import pytest
from click.testing import CliRunner

import dstrain.launch as launch
from dstrain.cli import cli
from dstrain.errors import DstrainError
from dstrain.launch import (
    TRAIN_SCRIPT,
    build_launcher_argv,
    deepspeed_command,
    deepspeed_env_files,
    find_option,
    lint_deepspeed_env,
    preflight_launch,
)

REPO = Path(__file__).resolve().parent.parent


@pytest.fixture
def cluster(tmp_path, monkeypatch):
    """Hostfiles (two nodes of one slot; localhost), a DeepSpeed config for world size 2
    (global batch 8 = micro 2 x accum 2 x 2 ranks), a home without `.deepspeed_env`; the
    launcher backend looks installed."""
    (tmp_path / "two").write_text("node-a slots=1\nnode-b slots=1\n")
    (tmp_path / "local").write_text("# this machine\nlocalhost slots=2\n")
    config = {
        "train_batch_size": 8,
        "train_micro_batch_size_per_gpu": 2,
        "gradient_accumulation_steps": 2,
        "zero_optimization": {"stage": 2},
    }
    (tmp_path / "ds.json").write_text(json.dumps(config))
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    monkeypatch.delenv("DS_ENV_FILE", raising=False)
    monkeypatch.setattr(launch.shutil, "which", lambda name: f"/usr/bin/{name}")
    return tmp_path


TRAIN = ["--deepspeed_config", "ds.json", "--max-steps", "5"]


def problems_of(**kwargs) -> str:
    with pytest.raises(DstrainError) as info:
        preflight_launch(**kwargs)
    return str(info.value)


# -- argv --------------------------------------------------------------------------------


def test_deepspeed_next_to_the_interpreter_or_the_runner_module(tmp_path, monkeypatch):
    assert deepspeed_command() == [str(Path(sys.executable).parent / "deepspeed")]
    monkeypatch.setattr(sys, "executable", str(tmp_path / "python"))
    assert deepspeed_command() == [str(tmp_path / "python"), "-m", "deepspeed.launcher.runner"]


def test_argv_for_one_machine():
    argv = build_launcher_argv(train_args=TRAIN, num_gpus=2, master_port=29600)
    assert argv == [
        *deepspeed_command(),
        "--num_gpus",
        "2",
        "--master_port",
        "29600",
        str(TRAIN_SCRIPT),
        *TRAIN,
    ]
    assert TRAIN_SCRIPT.is_absolute() and TRAIN_SCRIPT == REPO / "dstrain" / "train.py"


def test_argv_for_a_local_hostfile_skips_ssh(cluster):
    argv = build_launcher_argv(train_args=TRAIN, hostfile="local")
    head = argv[len(deepspeed_command()) : argv.index(str(TRAIN_SCRIPT))]
    assert head == ["--hostfile", "local", "--no_ssh_check", "--master_addr", "127.0.0.1"]


def test_argv_for_one_node_of_two_without_ssh(cluster):
    argv = build_launcher_argv(
        train_args=TRAIN,
        hostfile="two",
        launcher="openmpi",
        no_ssh=True,
        node_rank=1,
        master_addr="10.0.0.1",
        master_port=29500,
        extra_launcher_args=["--bind_cores_to_rank"],
    )
    head = argv[len(deepspeed_command()) :]
    assert head == [
        "--hostfile",
        "two",
        "--launcher",
        "openmpi",
        "--no_ssh",
        "--node_rank",
        "1",
        "--master_addr",
        "10.0.0.1",
        "--master_port",
        "29500",
        "--bind_cores_to_rank",
        str(TRAIN_SCRIPT),
        *TRAIN,
    ]


def test_find_option():
    assert find_option(["--deepspeed_config", "a.json"], launch.DS_CONFIG_FLAGS) == "a.json"
    assert find_option(["--deepspeed-config=b.json"], launch.DS_CONFIG_FLAGS) == "b.json"
    assert find_option(["--deepspeed_config"], launch.DS_CONFIG_FLAGS) is None


# -- preflight ---------------------------------------------------------------------------


def test_world_size_from_hostfile_num_gpus_and_num_nodes(cluster):
    check = preflight_launch(train_args=TRAIN, hostfile="two")
    assert check.world_size == 2 and check.multi_node
    assert [h.host for h in check.hosts] == ["node-a", "node-b"]
    assert any("dstrain doctor" in note for note in check.notes)
    assert preflight_launch(train_args=TRAIN, num_gpus=2).world_size == 2
    no_config = preflight_launch(train_args=["--max-steps", "1"], hostfile="two", num_nodes=1)
    assert no_config.world_size == 1 and not no_config.multi_node


def test_batch_arithmetic_uses_the_real_world_size(cluster):
    message = problems_of(train_args=TRAIN, num_gpus=3)
    assert "train_batch_size (8) != train_micro_batch_size_per_gpu (2)" in message
    assert "world size (3) = 12" in message
    assert "(world size 3)" in message


def test_every_problem_at_once(cluster):
    (cluster / "bad").write_text("node-a:2\nnode-b slots=0\n")
    message = problems_of(
        train_args=[*TRAIN, "--local_rank=0"],
        hostfile="bad",
        node_rank=1,
        extra_launcher_args=["--include=node-a", "--master_port=1"],
    )
    assert "5 problem(s)" in message  # the hostfile's lines come as one
    assert "bad:1: `node-a:2`" in message and "bad:2:" in message
    assert "--node-rank only applies with --no-ssh" in message
    assert "launcher argument `--include=node-a`" in message
    assert "use --master-port instead" in message
    assert "adds --local_rank itself" in message


@pytest.mark.parametrize(
    ("kwargs", "expected"),
    [
        ({}, "give --hostfile H"),
        ({"num_gpus": 2, "num_nodes": 2}, "needs a hostfile"),
        ({"hostfile": "two", "num_nodes": 3}, "lists 2 host(s)"),
        ({"hostfile": "two", "num_gpus": 2}, "host `node-a` has slots=1 (line 1)"),
        ({"hostfile": "two", "no_ssh": True, "master_addr": "h"}, "give --node-rank"),
        ({"hostfile": "two", "no_ssh": True, "node_rank": 2, "master_addr": "h"}, "outside 0..1"),
        ({"hostfile": "two", "no_ssh": True, "node_rank": 0}, "needs --master-addr"),
        ({"hostfile": "two", "launcher": "torchrun"}, "not one of pdsh"),
    ],
)
def test_usage_problems(cluster, kwargs, expected):
    assert expected in problems_of(train_args=TRAIN, **kwargs)


def test_missing_backend_is_named(cluster, monkeypatch):
    monkeypatch.setattr(launch.shutil, "which", lambda name: None)
    message = problems_of(train_args=TRAIN, hostfile="two", launcher="slurm")
    assert "needs `sinfo` on PATH" in message
    # One node per call (--no-ssh) or one host: no backend needed.
    preflight_launch(train_args=TRAIN, hostfile="two", no_ssh=True, node_rank=0, master_addr="a")
    preflight_launch(train_args=TRAIN, hostfile="local")


def test_pdsh_refuses_arguments_its_remote_shell_would_run(cluster):
    message = problems_of(train_args=[*TRAIN, "--output-dir", "runs/$(reboot)"], hostfile="two")
    assert "training argument `runs/$(reboot)`" in message
    # Spaces are fine (DeepSpeed quotes them), and so is anything with mpirun or --no-ssh.
    preflight_launch(train_args=[*TRAIN, "--output-dir", "my runs/x"], hostfile="two")
    preflight_launch(train_args=[*TRAIN, "--output-dir", "a;b"], hostfile="two", launcher="openmpi")
    preflight_launch(
        train_args=[*TRAIN, "--output-dir", "a;b"],
        hostfile="two",
        no_ssh=True,
        node_rank=0,
        master_addr="a",
    )


# -- .deepspeed_env ----------------------------------------------------------------------


def test_lint_deepspeed_env(tmp_path):
    path = tmp_path / ".deepspeed_env"
    path.write_text(
        "NCCL_DEBUG=INFO\n"
        "\n"
        "# tuned for IB\n"
        "NCCL_IB_HCA\n"
        "export NCCL_SOCKET_IFNAME=eth0\n"
        "1BAD=x\n"
        'OPTS="-a -b"\n'
        "PATH_LIKE=/opt/a:/opt/b\n"
        "  SPACED = ok \n"
    )
    problems = lint_deepspeed_env(path)
    assert [p.split(":", 2)[1] for p in problems] == ["2", "3", "4", "5", "6", "7"]
    assert "blank line" in problems[0] and "crashes" in problems[0]
    assert "comment line" in problems[1]
    assert "no `=`" in problems[2]
    assert "`NCCL_SOCKET_IFNAME=eth0`" in problems[3]
    assert "`1BAD` is not an environment variable name" in problems[4]
    assert 'holds `"`' in problems[5]


def test_lint_accepts_a_clean_file_and_deepspeed_parses_it_the_same_way(tmp_path):
    path = tmp_path / "env"
    path.write_text("NCCL_DEBUG=INFO\nA=b=c\nLAST=no-newline")
    assert lint_deepspeed_env(path) == []
    # DeepSpeed's loop (runner.main): every line split once on "=".
    pairs = [line.split("=", maxsplit=1) for line in path.read_text().splitlines(keepends=True)]
    assert [k for k, _ in pairs] == ["NCCL_DEBUG", "A", "LAST"]
    with pytest.raises(ValueError):
        _key, _value = ["\n"]  # what a blank line does to it


def test_env_files_home_then_cwd_and_ds_env_file(tmp_path):
    home, work = tmp_path / "home", tmp_path / "work"
    home.mkdir()
    work.mkdir()
    (home / ".deepspeed_env").write_text("A=1\n")
    (work / ".deepspeed_env").write_text("B=1\n")
    (work / "custom").write_text("C=1\n")
    env = {"HOME": str(home)}
    assert deepspeed_env_files(cwd=work, environ=env) == [
        home / ".deepspeed_env",
        work / ".deepspeed_env",
    ]
    assert deepspeed_env_files(cwd=work, environ={**env, "DS_ENV_FILE": "custom"}) == [
        work / "custom"
    ]
    assert deepspeed_env_files(cwd=home, environ=env) == [home / ".deepspeed_env"]


def test_a_broken_env_file_stops_a_multi_node_launch_only(cluster):
    (cluster / ".deepspeed_env").write_text("NCCL_DEBUG=INFO\n\n")
    assert ".deepspeed_env:2: blank line" in problems_of(train_args=TRAIN, hostfile="two")
    # Single-node launches never read it.
    preflight_launch(train_args=TRAIN, num_gpus=2)


# -- dstrain launch ----------------------------------------------------------------------


@pytest.fixture
def no_exec(monkeypatch):
    """Record instead of exec; any shell or subprocess call fails the test."""
    calls = []
    monkeypatch.setattr(os, "execv", lambda path, argv: calls.append(list(argv)))

    def refuse(*args, **kwargs):
        raise AssertionError(f"a process was started: {args}")

    monkeypatch.setattr(subprocess, "Popen", refuse)
    monkeypatch.setattr(os, "system", refuse)
    return calls


def test_cli_dry_run_prints_the_exact_command(cluster, no_exec):
    args = ["launch", "--hostfile", "local", "--master-port", "29700", "--dry-run", "--", *TRAIN]
    result = CliRunner().invoke(cli, args)
    assert result.exit_code == 0, result.output
    printed = result.stdout.strip().splitlines()[-1]
    expected = build_launcher_argv(train_args=TRAIN, hostfile="local", master_port=29700)
    assert shlex.split(printed) == expected
    assert "--hostfile local --no_ssh_check --master_addr 127.0.0.1" in printed
    assert no_exec == []


def test_cli_execs_the_launcher(cluster, no_exec):
    result = CliRunner().invoke(cli, ["launch", "--num-gpus", "2", "--", *TRAIN])
    assert result.exit_code == 0, result.output
    assert no_exec == [build_launcher_argv(train_args=TRAIN, num_gpus=2)]
    assert "world size 2" in result.stderr


BAD_HOSTFILES = {
    "bare": "node-a\n",
    "colon": "node-a:4\n",
    "spaces": "node-a slots = 4\n",
    "duplicate": "node-a slots=1\nnode-a slots=1\n",
    "injection": "a;rm -rf / slots=1\n",
    "zero": "node-a slots=0\n",
}


@pytest.mark.parametrize("name", sorted(BAD_HOSTFILES))
def test_cli_bad_hostfiles_fail_before_any_process(cluster, no_exec, name):
    (cluster / name).write_text(BAD_HOSTFILES[name])
    result = CliRunner().invoke(cli, ["launch", "--hostfile", name, "--", *TRAIN])
    assert result.exit_code == 1
    line = BAD_HOSTFILES[name].count("\n")  # the bad line is the last one
    assert f"{name}:{line}:" in str(result.exception)
    assert no_exec == []


def test_cli_needs_the_double_dash_for_training_flags(cluster, no_exec):
    result = CliRunner().invoke(cli, ["launch", "--num-gpus", "2", "--max-steps", "5"])
    assert result.exit_code == 2 and "No such option" in result.output
    assert no_exec == []


def test_launch_modules_import_no_heavy_package():
    code = (
        "import sys, dstrain.cli, dstrain.launch, dstrain.doctor, dstrain.hostfile\n"
        "print(sorted(m for m in ('torch', 'deepspeed', 'transformers') if m in sys.modules))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"


# -- scripts/: the SLURM and PBS templates, run with DRY_RUN=1 -------------------------

FAKE_SRUN = """#!/bin/bash
# Drops srun's options, then runs the command once per node with its SLURM_NODEID.
while [[ "$1" == -* ]]; do shift; done
for id in $(seq 0 $((FAKE_NODES - 1))); do SLURM_NODEID=$id "$@" || exit $?; done
"""


@pytest.fixture
def job_dir(tmp_path):
    """A submit directory with a config for world size 4, and fake srun / pdsh on PATH
    ahead of the venv's `dstrain`."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    for name, text in (("srun", FAKE_SRUN), ("pdsh", "#!/bin/sh\nexit 99\n")):
        (bin_dir / name).write_text(text)
        (bin_dir / name).chmod(0o755)
    config = {"train_batch_size": 8, "train_micro_batch_size_per_gpu": 2}
    (tmp_path / "ds.json").write_text(json.dumps(config))
    path = os.pathsep.join([str(bin_dir), str(Path(sys.executable).parent), os.environ["PATH"]])
    env = {k: v for k, v in os.environ.items() if not k.startswith(("SLURM_", "PBS_"))}
    return tmp_path, {**env, "PATH": path, "HOME": str(tmp_path), "DRY_RUN": "1"}


def run_template(script: str, env: dict[str, str]) -> list[list[str]]:
    done = subprocess.run(
        ["bash", str(REPO / "scripts" / script), "--deepspeed_config", "ds.json", "--seed", "3"],
        capture_output=True,
        text=True,
        env=env,
        timeout=60,
    )
    assert done.returncode == 0, done.stderr
    return [shlex.split(line) for line in done.stdout.splitlines()]


@pytest.mark.parametrize("mode", ["srun", "pdsh"])
def test_slurm_template(job_dir, mode):
    tmp_path, env = job_dir
    env.update(
        SLURM_SUBMIT_DIR=str(tmp_path),
        SLURM_JOB_ID="4242",
        SLURM_JOB_NODELIST="gpu[07-08]",
        SLURM_GPUS_ON_NODE="2",
        FAKE_NODES="2",
        LAUNCH_MODE=mode,
    )
    commands = run_template("slurm_job.sbatch", env)
    assert (tmp_path / "hostfile.4242").read_text().endswith("gpu07 slots=2\ngpu08 slots=2\n")
    common = ["--hostfile", "hostfile.4242"]
    tail = ["--master_addr", "gpu07", "--master_port", "24242", str(TRAIN_SCRIPT)]
    tail += ["--deepspeed_config", "ds.json", "--seed", "3"]
    if mode == "srun":
        assert [c[1:] for c in commands] == [
            [*common, "--no_ssh", "--node_rank", str(rank), *tail] for rank in (0, 1)
        ]
    else:
        assert [c[1:] for c in commands] == [[*common, *tail]]


def test_pbs_template(job_dir):
    tmp_path, env = job_dir
    (tmp_path / "nodes").write_text("n1\n" * 2 + "n2\n" * 2)
    env.update(
        PBS_O_WORKDIR=str(tmp_path),
        PBS_JOBID="777.pbs-server",
        PBS_NODEFILE=str(tmp_path / "nodes"),
    )
    [command] = run_template("pbs_job.sh", env)
    assert (tmp_path / "hostfile.777").read_text().endswith("n1 slots=2\nn2 slots=2\n")
    assert command[1:] == [
        "--hostfile",
        "hostfile.777",
        "--master_addr",
        "n1",
        "--master_port",
        "20777",
        str(TRAIN_SCRIPT),
        "--deepspeed_config",
        "ds.json",
        "--seed",
        "3",
    ]
