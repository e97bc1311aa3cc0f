"""Child processes for tests: a clean environment, an own session, a group kill on time-out.

A launcher (deepspeed, torchrun) killed alone orphans its ranks; starting it in its own
session lets a time-out kill the whole group. Imported by the test modules (pytest puts
tests/ on sys.path).
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest

RENDEZVOUS_VARS = ("RANK", "LOCAL_RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT")


def clean_env(**extra: str) -> dict[str, str]:
    """This environment for a child: one thread per rank, DeepSpeed's CPU accelerator, and
    no rendezvous variables left over from in-process engines."""
    env = dict(
        os.environ,
        OMP_NUM_THREADS="1",
        DS_ACCELERATOR="cpu",
        PYTHONUNBUFFERED="1",
        TOKENIZERS_PARALLELISM="false",
    )
    env.update(extra)
    for key in RENDEZVOUS_VARS:
        env.pop(key, None)
    return env


def deepspeed_launcher(num_ranks: int = 2) -> list[str]:
    """`deepspeed --num_gpus N --master_port P` from this venv, on a free port: the start of
    every multi-rank test command (the script and its arguments follow)."""
    from dstrain.ds_runtime import free_port

    deepspeed = str(Path(sys.executable).with_name("deepspeed"))
    return [deepspeed, "--num_gpus", str(num_ranks), "--master_port", str(free_port())]


def run_in_session(
    command: list[str], *, timeout: float, env: dict[str, str] | None = None, cwd=None
) -> subprocess.CompletedProcess:
    """Run `command` (stdout and stderr together, as text); fail the test on time-out."""
    proc = subprocess.Popen(
        command,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        env=env if env is not None else clean_env(),
        cwd=cwd,
        start_new_session=True,
    )
    try:
        output, _ = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        output, _ = proc.communicate()
        pytest.fail(f"timed out after {timeout} s: {' '.join(command)}\n{output[-4000:]}")
    return subprocess.CompletedProcess(command, proc.returncode, output, None)


def _through_main():
    """A click command that hands its raw arguments to `dstrain.cli.main` (the console
    script's entry), so CliRunner shows errors exactly as a user sees them."""
    import click

    from dstrain.cli import main

    @click.command(
        context_settings={
            "ignore_unknown_options": True,
            "allow_extra_args": True,
            "help_option_names": [],
        }
    )
    @click.argument("args", nargs=-1, type=click.UNPROCESSED)
    def through_main(args: tuple[str, ...]) -> None:
        main(list(args))

    return through_main


through_main = _through_main()


def run_cli(argv: list[str], capsys) -> tuple[int, str, str]:
    """`dstrain ARGV` in this process through the console entry: (exit code, stdout,
    stderr), as captured by pytest's `capsys`."""
    from dstrain.cli import main

    try:
        main(argv)
        code = 0
    except SystemExit as exc:
        code = exc.code
    out, err = capsys.readouterr()
    return code, out, err
