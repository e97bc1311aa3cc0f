"""Preflight checks before a launch: this machine, then every host of a hostfile.

Importable without torch: the local checks import torch and deepspeed inside their
bodies (a missing or broken package is a failed row, not a traceback), the host checks
need only ssh. Each check gives one `Check` row; `format_checks` prints the table.

Why per host: DeepSpeed 0.19.8's launcher ssh-es only to the first host of a hostfile
before it starts, and pdsh then runs the launching node's interpreter path in the
launching node's working directory on every node. A node that is unreachable, lacks that
directory or runs other package versions fails late, or trains with different code.
"""

from __future__ import annotations

import contextlib
import json
import os
import shlex
import shutil
import subprocess
import sys
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass
from importlib import metadata
from pathlib import Path

from dstrain.hostfile import HostEntry
from dstrain.launch import (
    deepspeed_env_files,
    is_local_only,
    lint_deepspeed_env,
    secret_warnings,
)

PACKAGES = ("torch", "deepspeed", "transformers", "dstrain")
MIN_PYTHON = (3, 10)
SHM_WARN_BYTES = 1 << 30  # NCCL and data loaders fail in a 64 MiB /dev/shm (Docker's default)
DISK_FAIL_BYTES = 1 << 30
DISK_WARN_BYTES = 10 << 30
# DeepSpeed ops dstrain can trigger, and when; each is JIT-compiled at first use unless the
# DeepSpeed wheel was built with it (DS_BUILD_OPS=1).
RELEVANT_OPS = {
    "fused_adam": "Adam without torch_adam on a GPU, dstrain's default there",
    "cpu_adam": "offload_optimizer",
    "deepspeed_shm_comm": "CPU process groups; dstrain turns it off",
}
# On CPU `dstrain train` gives an Adam block without torch_adam torch's AdamW
# (dstrain.ds_run.choose_optimizer): FusedAdam is built there only for torch_adam false.
CPU_FUSED_ADAM = "torch_adam false only; on CPU dstrain train uses torch's AdamW"
# Exit codes of the remote probe, before Python runs.
_NO_CWD, _NO_PYTHON = 101, 102


@dataclass(frozen=True)
class Check:
    """One row of the doctor's table."""

    name: str
    status: str  # "pass", "warn" or "fail"
    detail: str

    def to_dict(self) -> dict[str, str]:
        return asdict(self)


def package_versions() -> dict[str, str | None]:
    """Installed versions of the packages that must match across nodes (None: missing)."""
    versions: dict[str, str | None] = {"python": sys.version.split()[0]}
    for name in PACKAGES:
        try:
            versions[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            versions[name] = None
    return versions


# --------------------------------------------------------------------------------------
# This machine
# --------------------------------------------------------------------------------------


def _gib(num_bytes: float) -> str:
    return f"{num_bytes / (1 << 30):.1f} GiB"


def check_versions(versions: dict[str, str | None]) -> list[Check]:
    rows = []
    ok = sys.version_info[:2] >= MIN_PYTHON
    rows.append(
        Check(
            "python",
            "pass" if ok else "fail",
            f"{versions['python']} ({sys.executable})"
            + ("" if ok else f"; dstrain needs {'.'.join(map(str, MIN_PYTHON))}+"),
        )
    )
    for name in PACKAGES:
        version = versions.get(name)
        rows.append(
            Check(name, "pass", version)
            if version
            else Check(name, "fail", f"not installed (pip install -e . in {Path.cwd()})")
        )
    return rows


def check_accelerator() -> list[Check]:
    """DeepSpeed's accelerator and backend, and the ops it would JIT-compile."""
    try:
        # DeepSpeed prints its accelerator choice to stdout; keep stdout for our output.
        with contextlib.redirect_stdout(sys.stderr):
            import torch
            from deepspeed.accelerator import get_accelerator
            from deepspeed.git_version_info import installed_ops
            from deepspeed.ops import __compatible_ops__ as compatible_ops

            accelerator = get_accelerator()
            name = accelerator.device_name()
            backend = accelerator.communication_backend_name()
            count = accelerator.device_count()
    except Exception as exc:  # any import or probe failure is a failed row
        return [Check("accelerator", "fail", f"cannot ask DeepSpeed: {type(exc).__name__}: {exc}")]
    rows = []
    mismatch = torch.cuda.is_available() and name == "cpu"
    rows.append(
        Check(
            "accelerator",
            "warn" if mismatch else "pass",
            f"{name}, backend {backend}, {count} device(s)"
            + ("; torch sees CUDA but DeepSpeed picked cpu (DS_ACCELERATOR?)" if mismatch else ""),
        )
    )
    reasons = dict(RELEVANT_OPS, **({"fused_adam": CPU_FUSED_ADAM} if name == "cpu" else {}))
    jit = [op for op in reasons if compatible_ops.get(op) and not installed_ops.get(op)]
    if not jit:
        rows.append(Check("ops", "pass", "no op needs a JIT build"))
        return rows
    cached = _cached_extensions()
    parts = [f"{op} (for {reasons[op]}{'; built, cached' if op in cached else ''})" for op in jit]
    toolchain = [tool for tool in ("ninja", "c++") if shutil.which(tool) is None]
    # What a default run needs: on CPU FusedAdam only for an explicit torch_adam false.
    needed = {op for op in jit if not (name == "cpu" and op == "fused_adam")}
    if toolchain and not needed <= cached:
        rows.append(
            Check(
                "ops",
                "fail",
                "JIT-compiled at first use: " + ", ".join(parts) + f"; missing {toolchain}",
            )
        )
    else:
        rows.append(
            Check(
                "ops",
                "pass",
                "JIT-compiled at first use (tens of seconds each, then cached): "
                + ", ".join(parts),
            )
        )
    if name == "cuda" and "fused_adam" in jit:
        from dstrain.train import fused_adam_status

        _how, problem = fused_adam_status()
        if problem:
            rows.append(
                Check(
                    "fused_adam",
                    "warn",
                    f"FusedAdam cannot be built here ({problem}): dstrain train gives Adam "
                    "configs without torch_adam torch's AdamW; torch_adam false fails",
                )
            )
    return rows


def _cached_extensions() -> set[str]:
    """Names of torch extensions already built in the JIT cache."""
    root = Path(
        os.environ.get("TORCH_EXTENSIONS_DIR") or Path.home() / ".cache" / "torch_extensions"
    )
    if not root.is_dir():
        return set()
    return {so.stem for so in root.glob("*/*/*.so") if so.parent.name == so.stem}


def check_shm(path: str = "/dev/shm") -> Check:
    try:
        stat = os.statvfs(path)
    except OSError:
        return Check("/dev/shm", "warn", f"{path} is missing; NCCL and data loaders use it")
    size = stat.f_blocks * stat.f_frsize
    if size < SHM_WARN_BYTES:
        return Check(
            "/dev/shm",
            "warn",
            f"{_gib(size)}; NCCL needs more (Docker: --shm-size=8g or --ipc=host)",
        )
    return Check("/dev/shm", "pass", f"{_gib(size)} ({_gib(stat.f_bavail * stat.f_frsize)} free)")


def check_disk(output_dir: str | Path) -> Check:
    """Free space and write access where the run writes (its nearest existing folder)."""
    target = Path(output_dir).absolute()
    existing = target
    while not existing.exists():
        existing = existing.parent
    stat = os.statvfs(existing)
    free = stat.f_bavail * stat.f_frsize
    name = f"disk {output_dir}"
    if not os.access(existing, os.W_OK):
        return Check(name, "fail", f"{existing} is not writable")
    if free < DISK_FAIL_BYTES:
        return Check(name, "fail", f"{_gib(free)} free; checkpoints need more")
    status = "warn" if free < DISK_WARN_BYTES else "pass"
    return Check(name, status, f"{_gib(free)} free on {existing}")


def check_deepspeed_env(cwd: str | Path | None = None, environ=None) -> list[Check]:
    """A row per `.deepspeed_env` DeepSpeed would read on a multi-node launch."""
    rows = []
    for path in deepspeed_env_files(cwd=cwd, environ=environ):
        problems = lint_deepspeed_env(path)
        secrets = secret_warnings(path)
        if problems:
            rows.append(Check(str(path), "fail", "; ".join(problems)))
        elif secrets:
            rows.append(Check(str(path), "warn", "; ".join(secrets)))
        else:
            rows.append(Check(str(path), "pass", "every line is KEY=VALUE"))
    return rows


def check_local(output_dir: str | Path = "runs") -> list[Check]:
    """Every check of this machine."""
    return [
        *check_versions(package_versions()),
        *check_accelerator(),
        check_shm(),
        check_disk(output_dir),
        *check_deepspeed_env(),
    ]


# --------------------------------------------------------------------------------------
# Every host of a hostfile
# --------------------------------------------------------------------------------------

_PROBE = (
    "import json, os, sys\n"
    "from importlib import metadata\n"
    "v = {'python': sys.version.split()[0]}\n"
    "for n in NAMES:\n"
    "    try:\n"
    "        v[n] = metadata.version(n)\n"
    "    except metadata.PackageNotFoundError:\n"
    "        v[n] = None\n"
    "print(json.dumps(v))\n"
)


def remote_probe_command(python: str, cwd: str) -> str:
    """The command one host runs over ssh: cd into `cwd`, run `python`, print versions.

    Built from this process's own interpreter path and working directory (quoted), the
    ones pdsh would use; nothing from the hostfile goes into it.
    """
    probe = _PROBE.replace("NAMES", repr(PACKAGES))
    return (
        f"cd {shlex.quote(cwd)} || exit {_NO_CWD}; "
        f"test -x {shlex.quote(python)} || exit {_NO_PYTHON}; "
        f"exec {shlex.quote(python)} -c {shlex.quote(probe)}"
    )


def ssh_argv(host: str, command: str, *, timeout_s: int, port: int | None = None) -> list[str]:
    """`ssh` without password prompts; `--` so a host can never read as an option."""
    argv = ["ssh", "-o", "BatchMode=yes", "-o", f"ConnectTimeout={timeout_s}"]
    if port is not None:
        argv += ["-p", str(port)]
    return [*argv, "--", host, command]


def judge_host(
    host: str,
    returncode: int | None,
    stdout: str,
    stderr: str,
    local: dict[str, str | None],
    *,
    python: str,
    cwd: str,
) -> list[Check]:
    """Rows for one host from its probe's result (`returncode` None: timed out)."""
    last = (stderr.strip().splitlines() or [""])[-1]
    if returncode is None:
        return [Check(f"{host}: ssh", "fail", "timed out")]
    if returncode == 255:
        return [
            Check(
                f"{host}: ssh",
                "fail",
                f"not reachable without a password: {last or 'ssh exited 255'}",
            )
        ]
    rows = [Check(f"{host}: ssh", "pass", "reachable")]
    if returncode == _NO_CWD:
        return [*rows, Check(f"{host}: paths", "fail", f"no directory {cwd} (pdsh cd's into it)")]
    if returncode == _NO_PYTHON:
        return [*rows, Check(f"{host}: paths", "fail", f"no interpreter {python} (pdsh runs it)")]
    try:
        remote = json.loads(stdout.strip().splitlines()[-1])
    except (IndexError, ValueError):
        detail = f"probe failed (exit {returncode}): {last or stdout.strip()[-200:]}"
        return [*rows, Check(f"{host}: paths", "fail", detail)]
    rows.append(Check(f"{host}: paths", "pass", f"{python} in {cwd}"))
    differ = [
        f"{name} {remote.get(name)} (here {local.get(name)})"
        for name in ("python", *PACKAGES)
        if remote.get(name) != local.get(name)
    ]
    rows.append(
        Check(f"{host}: versions", "fail", "differ: " + ", ".join(differ))
        if differ
        else Check(f"{host}: versions", "pass", "same as here")
    )
    return rows


def check_hosts(
    hosts: Sequence[HostEntry],
    *,
    timeout_s: int = 10,
    ssh_port: int | None = None,
    python: str | None = None,
    cwd: str | None = None,
) -> list[Check]:
    """Probe every host of a hostfile over ssh, in parallel; rows in hostfile order.

    A hostfile naming only this machine needs no ssh (`dstrain launch` adds
    `--no_ssh_check`); with several hosts every one, this machine too, is reached the
    way pdsh reaches it.
    """
    if is_local_only(hosts):
        return [
            Check(
                f"{hosts[0].host}: ssh",
                "pass",
                "not needed: the hostfile names only this machine",
            )
        ]
    if shutil.which("ssh") is None:
        return [Check("ssh", "fail", "no ssh client on PATH; pdsh needs it to reach the nodes")]
    python = python or sys.executable
    cwd = cwd or os.getcwd()
    command = remote_probe_command(python, cwd)
    local = package_versions()

    def probe(entry: HostEntry) -> list[Check]:
        argv = ssh_argv(entry.host, command, timeout_s=timeout_s, port=ssh_port)
        try:
            done = subprocess.run(
                argv,
                capture_output=True,
                text=True,
                timeout=timeout_s * 3,
                stdin=subprocess.DEVNULL,
            )
        except subprocess.TimeoutExpired:
            return judge_host(entry.host, None, "", "", local, python=python, cwd=cwd)
        return judge_host(
            entry.host, done.returncode, done.stdout, done.stderr, local, python=python, cwd=cwd
        )

    with ThreadPoolExecutor(max_workers=min(32, len(hosts))) as pool:
        results = list(pool.map(probe, hosts))
    return [row for rows in results for row in rows]


# --------------------------------------------------------------------------------------
# Output
# --------------------------------------------------------------------------------------


def format_checks(checks: Sequence[Check]) -> str:
    """A fixed-width pass/fail table and a one-line summary."""
    width = max([len("check"), *(len(c.name) for c in checks)])
    lines = [f"{'check':<{width}}  status  detail"]
    lines += [f"{c.name:<{width}}  {c.status:<6}  {c.detail}" for c in checks]
    counts = {s: sum(c.status == s for c in checks) for s in ("pass", "warn", "fail")}
    lines.append(f"{counts['pass']} pass, {counts['warn']} warn, {counts['fail']} fail")
    return "\n".join(lines) + "\n"


def checks_json(checks: Sequence[Check]) -> str:
    ok = not any(c.status == "fail" for c in checks)
    return json.dumps({"ok": ok, "checks": [c.to_dict() for c in checks]}, indent=2) + "\n"
