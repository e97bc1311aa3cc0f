"""`dstrain doctor`: local rows, and every host of a hostfile probed over (a fake) ssh."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from dstrain.doctor import (
    Check,
    check_deepspeed_env,
    check_disk,
    check_hosts,
    check_shm,
    check_versions,
    checks_json,
    format_checks,
    judge_host,
    package_versions,
    remote_probe_command,
    ssh_argv,
)
from dstrain.hostfile import HostEntry

REPO = Path(__file__).resolve().parent.parent

# Stands in for ssh: logs its arguments, refuses hosts named down*, and runs the remote
# command locally for the others, as sshd would on a node sharing this file system.
FAKE_SSH = """#!/bin/bash
opts=()
while [ "$1" != "--" ]; do opts+=("$1"); shift; done
shift
host=$1
shift
echo "${opts[*]} -- $host" >> "$FAKE_SSH_LOG"
case "$host" in
  down*) echo "ssh: connect to host $host port 22: Connection refused" >&2; exit 255;;
esac
exec bash -c "$1"
"""


@pytest.fixture
def fake_ssh(tmp_path, monkeypatch):
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    ssh = bin_dir / "ssh"
    ssh.write_text(FAKE_SSH)
    ssh.chmod(0o755)
    log = tmp_path / "ssh.log"
    monkeypatch.setenv("PATH", f"{bin_dir}{os.pathsep}{os.environ['PATH']}")
    monkeypatch.setenv("FAKE_SSH_LOG", str(log))
    return log


def hosts(*names: str) -> list[HostEntry]:
    return [HostEntry(name, 1, i) for i, name in enumerate(names, start=1)]


def test_every_host_is_probed_not_only_the_first(fake_ssh):
    rows = check_hosts(hosts("node-a", "down-b", "node-c"), timeout_s=5)
    by_name = {row.name: row for row in rows}
    assert [r.name for r in rows] == [
        "node-a: ssh",
        "node-a: paths",
        "node-a: versions",
        "down-b: ssh",
        "node-c: ssh",
        "node-c: paths",
        "node-c: versions",
    ]
    assert by_name["down-b: ssh"].status == "fail"
    assert "Connection refused" in by_name["down-b: ssh"].detail
    assert all(r.status == "pass" for r in rows if not r.name.startswith("down-b"))
    assert by_name["node-c: versions"].detail == "same as here"
    calls = sorted(fake_ssh.read_text().splitlines())  # the probes run in parallel
    assert calls == [
        f"-o BatchMode=yes -o ConnectTimeout=5 -- {host}" for host in ("down-b", "node-a", "node-c")
    ]


def test_a_missing_working_directory_is_reported(fake_ssh, tmp_path):
    rows = check_hosts(hosts("node-a", "node-b"), cwd=str(tmp_path / "gone"))
    paths = [r for r in rows if r.name.endswith(": paths")]
    assert len(paths) == 2 and all(r.status == "fail" for r in paths)
    assert f"no directory {tmp_path / 'gone'}" in paths[0].detail


def test_a_missing_interpreter_is_reported(fake_ssh, tmp_path):
    rows = check_hosts(hosts("node-a", "node-b"), python=str(tmp_path / "python"))
    assert rows[1] == Check(
        "node-a: paths", "fail", f"no interpreter {tmp_path / 'python'} (pdsh runs it)"
    )


def test_a_local_only_hostfile_needs_no_ssh(monkeypatch):
    monkeypatch.setenv("PATH", "/nonexistent")
    assert check_hosts(hosts("localhost")) == [
        Check("localhost: ssh", "pass", "not needed: the hostfile names only this machine")
    ]
    assert check_hosts(hosts("localhost", "node-b"))[0].detail.startswith("no ssh client")


LOCAL = {
    "python": "3.11.9",
    "torch": "2.13.0",
    "deepspeed": "0.19.8",
    "transformers": "5.2",
    "dstrain": "0.1.0",
}


@pytest.mark.parametrize(
    ("returncode", "stdout", "stderr", "last"),
    [
        (None, "", "", Check("h: ssh", "fail", "timed out")),
        (
            255,
            "",
            "Permission denied (publickey).\n",
            Check(
                "h: ssh", "fail", "not reachable without a password: Permission denied (publickey)."
            ),
        ),
        (101, "", "", Check("h: paths", "fail", "no directory /w (pdsh cd's into it)")),
        (
            1,
            "",
            "Traceback...\nSyntaxError: x\n",
            Check("h: paths", "fail", "probe failed (exit 1): SyntaxError: x"),
        ),
        (0, json.dumps(LOCAL), "", Check("h: versions", "pass", "same as here")),
        (
            0,
            "motd banner\n" + json.dumps({**LOCAL, "deepspeed": "0.18.0", "torch": None}),
            "",
            Check(
                "h: versions",
                "fail",
                "differ: torch None (here 2.13.0), deepspeed 0.18.0 (here 0.19.8)",
            ),
        ),
    ],
)
def test_judge_host(returncode, stdout, stderr, last):
    rows = judge_host("h", returncode, stdout, stderr, LOCAL, python="/v/python", cwd="/w")
    assert rows[-1] == last


def test_probe_command_quotes_paths_and_ssh_ends_options():
    command = remote_probe_command("/opt/my env/python", "/work/it's")
    assert command.startswith("cd '/work/it'\"'\"'s' || exit 101; test -x '/opt/my env/python'")
    assert ssh_argv("-oProxyCommand=x", "true", timeout_s=3, port=2222)[-3:] == [
        "--",
        "-oProxyCommand=x",
        "true",
    ]


def test_probe_prints_the_local_versions():
    command = remote_probe_command(sys.executable, os.getcwd())
    done = subprocess.run(["bash", "-c", command], capture_output=True, text=True, check=True)
    assert json.loads(done.stdout) == package_versions()


def test_local_rows(tmp_path):
    rows = check_versions({**package_versions(), "transformers": None})
    assert [r.name for r in rows] == ["python", "torch", "deepspeed", "transformers", "dstrain"]
    assert rows[3].status == "fail" and "not installed" in rows[3].detail
    assert check_shm(str(tmp_path / "no-shm")).status == "warn"
    disk = check_disk(tmp_path / "runs" / "x")
    assert disk.name.startswith("disk ") and str(tmp_path) in disk.detail


def test_deepspeed_env_rows(tmp_path):
    (tmp_path / ".deepspeed_env").write_text("NCCL_DEBUG=INFO\n# note\n")
    environ = {"HOME": str(tmp_path / "nohome")}
    [row] = check_deepspeed_env(cwd=tmp_path, environ=environ)
    assert row.status == "fail" and ":2: comment line" in row.detail
    (tmp_path / ".deepspeed_env").write_text("NCCL_DEBUG=INFO\n")
    assert check_deepspeed_env(cwd=tmp_path, environ=environ)[0].status == "pass"
    assert check_deepspeed_env(cwd=tmp_path / "nohome", environ=environ) == []
    # DeepSpeed prints every value on the pdsh command line: a token there is a warning,
    # and the warning names the key, never the value.
    (tmp_path / ".deepspeed_env").write_text("NCCL_DEBUG=INFO\nHF_TOKEN=hf_s3cr3t\n")
    [row] = check_deepspeed_env(cwd=tmp_path, environ=environ)
    assert row.status == "warn" and ":2:" in row.detail and "HF_TOKEN" in row.detail
    assert "hf_s3cr3t" not in row.detail


def test_table_and_json():
    checks = [Check("python", "pass", "3.11"), Check("node-b: ssh", "fail", "timed out")]
    table = format_checks(checks)
    assert table.splitlines() == [
        "check        status  detail",
        "python       pass    3.11",
        "node-b: ssh  fail    timed out",
        "1 pass, 0 warn, 1 fail",
    ]
    assert json.loads(checks_json(checks))["ok"] is False


@pytest.mark.slow
def test_cli_doctor_json_with_a_bad_hostfile(tmp_path):
    bad = tmp_path / "hosts"
    bad.write_text("node-a:4\n")
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    done = subprocess.run(
        [
            sys.executable,
            "-m",
            "dstrain",
            "doctor",
            "--json",
            "--hostfile",
            str(bad),
            "--output-dir",
            str(tmp_path),
        ],
        capture_output=True,
        text=True,
        env=env,
        cwd=REPO,
        timeout=120,
    )
    report = json.loads(done.stdout)  # stdout holds the JSON only, DeepSpeed's chatter aside
    names = [c["name"] for c in report["checks"]]
    for name in (
        "python",
        "torch",
        "deepspeed",
        "transformers",
        "accelerator",
        "ops",
        "/dev/shm",
        "hostfile",
    ):
        assert name in names
    rows = {c["name"]: c for c in report["checks"]}
    assert rows["hostfile"]["status"] == "fail" and f"{bad}:1:" in rows["hostfile"]["detail"]
    assert rows["accelerator"]["status"] == "pass"
    assert done.returncode == 1 and report["ok"] is False
