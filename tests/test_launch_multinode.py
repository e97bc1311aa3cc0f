"""Real launches through DeepSpeed's launcher: two "nodes" on one machine, and a hostfile.

Each test starts DeepSpeed's launcher (`deepspeed`, through `dstrain launch`), which
starts `dstrain/train.py` ranks that train genslm_tiny with ZeRO-2 (bf16, gloo over TCP
on 127.0.0.1) for a few steps, and then checks that every rank ends with the same
parameters (`--dump-params` writes each rank's full fp32 copy).

- Two nodes: a two-host hostfile (`node-a slots=1`, `node-b slots=1`) and one launcher
  call per node with `--no_ssh --node_rank 0|1 --master_addr 127.0.0.1`. Without ssh
  DeepSpeed never resolves the host names: the hostfile only gives the world layout.
  The nodes share the output directory, as on a cluster file system (train.py's rank 0
  tokenizes into OUTPUT_DIR/cache and the other ranks read it there).
- A hostfile naming localhost: the command `dstrain launch --dry-run` prints (with
  `--no_ssh_check`, since DeepSpeed would ssh to localhost), run as printed by a shell.
- Stretch, where root may create network namespaces: the two nodes in two namespaces
  joined by a veth pair, so rank 1 reaches rank 0 over a real link, not loopback.

Processes run in their own session; on a timeout or a failed peer the whole group is
killed (SIGKILL to a launcher alone would orphan its ranks).
"""

from __future__ import annotations

import json
import os
import secrets
import shlex
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from dstrain.ds_runtime import free_port

pytestmark = [pytest.mark.slow, pytest.mark.multiproc]

REPO = Path(__file__).resolve().parent.parent
TIMEOUT_S = 240
STEPS = 3
# Tiny and quick: 3 steps of 2 sequences per rank, no eval, no export; a dead peer fails
# a collective after 60 s instead of gloo's 30 minutes.
TRAIN_ARGS = [
    "--model",
    "genslm_tiny",
    "--max-steps",
    str(STEPS),
    "--eval-every",
    "0",
    "--no-export",
    "--no-progress",
    "--dump-params",
    "--seed",
    "7",
    "--timeout-s",
    "60",
]


def write_ds_config(path: Path) -> Path:
    """ZeRO-2, bf16, global batch 4 = micro 2 x accum 1 x 2 ranks, a large enough lr."""
    config = {
        "train_micro_batch_size_per_gpu": 2,
        "gradient_accumulation_steps": 1,
        "gradient_clipping": 1.0,
        "steps_per_print": 1000000,
        "bf16": {"enabled": True},
        "zero_optimization": {"stage": 2},
        "optimizer": {"type": "AdamW", "params": {"lr": 0.01, "torch_adam": True}},
    }
    path.write_text(json.dumps(config, indent=2) + "\n")
    return path


def launch_env() -> dict[str, str]:
    env = dict(os.environ, OMP_NUM_THREADS="1", DS_ACCELERATOR="cpu", PYTHONUNBUFFERED="1")
    for key in ("RANK", "LOCAL_RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT", "DS_ENV_FILE"):
        env.pop(key, None)
    return env


def run_together(commands: list[list[str]], logs: list[Path], timeout_s: float = TIMEOUT_S):
    """Start every command at once; return their exit codes and log texts.

    When one fails, or the time is up, every process group is killed.
    """
    procs = []
    for command, log in zip(commands, logs, strict=True):
        with open(log, "wb") as out:
            procs.append(
                subprocess.Popen(
                    command,
                    stdout=out,
                    stderr=subprocess.STDOUT,
                    env=launch_env(),
                    cwd=REPO,
                    start_new_session=True,
                )
            )
    deadline = time.monotonic() + timeout_s
    try:
        while time.monotonic() < deadline:
            codes = [p.poll() for p in procs]
            if all(c is not None for c in codes) or any(c for c in codes):
                break
            time.sleep(0.2)
    finally:
        for proc in procs:
            if proc.poll() is None:
                os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
    texts = [log.read_text(errors="replace") for log in logs]
    return [p.returncode for p in procs], texts


def assert_ranks_agree(run_dir: Path, world_size: int) -> None:
    import torch

    params = [
        torch.load(run_dir / f"params_rank{rank}.pt", weights_only=True)
        for rank in range(world_size)
    ]
    assert len(params[0]) > 0
    for other in params[1:]:
        assert other.keys() == params[0].keys()
        for name, tensor in params[0].items():
            assert torch.equal(tensor, other[name]), name
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["steps"] == STEPS and summary["skipped_steps"] == 0


def node_command(
    hostfile: Path, node_rank: int, master_addr: str, port: int, config: Path, run_dir: Path
) -> list[str]:
    """One node's `dstrain launch --no-ssh` (it execs DeepSpeed's launcher for that node)."""
    return [
        *(sys.executable, "-m", "dstrain", "launch", "--hostfile", str(hostfile), "--no-ssh"),
        *("--node-rank", str(node_rank), "--master-addr", master_addr, "--master-port", str(port)),
        *("--", "--deepspeed_config", str(config), "--output-dir", str(run_dir), *TRAIN_ARGS),
    ]


def test_two_nodes_on_one_machine(tmp_path):
    hostfile = tmp_path / "hostfile"
    hostfile.write_text("node-a slots=1\nnode-b slots=1\n")
    config = write_ds_config(tmp_path / "ds.json")
    run_dir = tmp_path / "run"
    port = free_port()
    commands = [
        node_command(hostfile, node_rank, "127.0.0.1", port, config, run_dir)
        for node_rank in (0, 1)
    ]
    logs = [tmp_path / "node-a.log", tmp_path / "node-b.log"]
    codes, texts = run_together(commands, logs)
    assert codes == [0, 0], "\n\n".join(text[-3000:] for text in texts)
    for node_rank, text in enumerate(texts):
        assert f"nnodes=2, num_local_procs=1, node_rank={node_rank}" in text
    assert "world size 2" in texts[0]
    assert_ranks_agree(run_dir, world_size=2)


def test_localhost_hostfile_dry_run_command_trains(tmp_path):
    config = write_ds_config(tmp_path / "ds.json")
    run_dir = tmp_path / "run"
    dry_run = subprocess.run(
        [
            sys.executable,
            "-m",
            "dstrain",
            "launch",
            "--hostfile",
            "hostfiles/localhost",
            "--master-port",
            str(free_port()),
            "--dry-run",
            "--",
            "--deepspeed_config",
            str(config),
            "--output-dir",
            str(run_dir),
            *TRAIN_ARGS,
        ],
        capture_output=True,
        text=True,
        env=launch_env(),
        cwd=REPO,
        timeout=60,
    )
    assert dry_run.returncode == 0, dry_run.stderr
    command = dry_run.stdout.strip()
    assert len(command.splitlines()) == 1
    argv = shlex.split(command)
    assert argv[0] == str(Path(sys.executable).parent / "deepspeed")
    assert argv[1:5] == ["--hostfile", "hostfiles/localhost", "--no_ssh_check", "--master_addr"]
    assert not run_dir.exists()  # a dry run runs nothing

    codes, texts = run_together([["bash", "-c", command]], [tmp_path / "launch.log"])
    assert codes == [0], texts[0][-4000:]
    assert "world size 2" in texts[0]
    assert_ranks_agree(run_dir, world_size=2)


# -- stretch: two network namespaces joined by a veth pair --------------------------------


def _ip(*args: str) -> None:
    subprocess.run(["ip", *args], check=True, capture_output=True, timeout=30)


@pytest.fixture
def two_netns():
    """Two network namespaces, 10.231.0.1 and 10.231.0.2 on the ends of a veth pair.

    Needs root and iproute2 (`ip netns`); skipped where either is missing or creating a
    namespace is not allowed (most unprivileged containers). Removed afterwards.
    """
    if os.geteuid() != 0 or shutil.which("ip") is None:
        pytest.skip("needs root and `ip` (iproute2) for network namespaces")
    tag = f"{os.getpid() % 100000}{secrets.token_hex(2)}"
    names = [f"dstrain-a-{tag}", f"dstrain-b-{tag}"]
    links = [f"dsa{tag}", f"dsb{tag}"]  # interface names: at most 15 characters
    made = []
    try:
        for name in names:
            _ip("netns", "add", name)
            made.append(name)
        _ip("link", "add", links[0], "type", "veth", "peer", "name", links[1])
        for name, link, address in zip(names, links, ("10.231.0.1", "10.231.0.2"), strict=True):
            _ip("link", "set", link, "netns", name)
            _ip("-n", name, "addr", "add", f"{address}/24", "dev", link)
            _ip("-n", name, "link", "set", link, "up")
            _ip("-n", name, "link", "set", "lo", "up")
        _ip("netns", "exec", names[0], "true")  # exec remounts /sys: refused in some containers
    except (subprocess.CalledProcessError, OSError) as exc:
        for name in made:
            subprocess.run(["ip", "netns", "del", name], capture_output=True, timeout=30)
        stderr = getattr(exc, "stderr", b"") or b""
        pytest.skip(f"cannot set up network namespaces here: {stderr.decode().strip() or exc}")
    try:
        yield list(zip(names, links, strict=True))
    finally:
        for name in made:  # deleting a namespace deletes its end of the veth pair, and so both
            subprocess.run(["ip", "netns", "del", name], capture_output=True, timeout=30)


def test_two_nodes_in_two_network_namespaces(tmp_path, two_netns):
    hostfile = tmp_path / "hostfile"
    hostfile.write_text("node-a slots=1\nnode-b slots=1\n")
    config = write_ds_config(tmp_path / "ds.json")
    run_dir = tmp_path / "run"
    port = free_port()
    commands = [
        # gloo picks its interface from the host name, which resolves to nothing inside a
        # fresh namespace: name the veth end (on clusters: GLOO_SOCKET_IFNAME / NCCL_...).
        [
            *("ip", "netns", "exec", netns, "env", f"GLOO_SOCKET_IFNAME={link}"),
            *node_command(hostfile, node_rank, "10.231.0.1", port, config, run_dir),
        ]
        for node_rank, (netns, link) in enumerate(two_netns)
    ]
    logs = [tmp_path / "node-a.log", tmp_path / "node-b.log"]
    codes, texts = run_together(commands, logs)
    assert codes == [0, 0], "\n\n".join(text[-3000:] for text in texts)
    assert "world size 2" in texts[0]
    assert_ranks_agree(run_dir, world_size=2)
