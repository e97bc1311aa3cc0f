"""Hand a training run to DeepSpeed's own launcher, after checking what it would trip on.

Pure layer (L0): no torch, no deepspeed import. The launcher (`deepspeed`, DeepSpeed
0.19.8's `deepspeed.launcher.runner`) has sharp edges that this module files down:

- its hostfile regex is strict and its errors terse: hostfiles go through
  `dstrain.hostfile.parse_hostfile` first;
- with a hostfile it ssh-es to the first host twice (a reachability check, then
  `hostname -I` for the master address), even when that host is `localhost`: a hostfile
  that names only this machine gets `--no_ssh_check --master_addr 127.0.0.1`;
- on several hosts with pdsh it runs `export K=V; cd CWD; PYTHON -u -m
  deepspeed.launcher.launch ... SCRIPT ARGS` through a remote shell: the working
  directory, interpreter and script paths are pasted in unquoted and arguments are only
  quoted when they hold a space, so any shell character in them is refused here;
- it reads `~/.deepspeed_env` and `./.deepspeed_env` (name from `$DS_ENV_FILE`) on that
  same path and splits every line on `=`: a blank or comment line crashes it
  (`lint_deepspeed_env`);
- on that path it also pastes into the remote command: each `.deepspeed_env` value and
  each variable of this environment whose name starts with MLFLOW, PYTHON, MV2, UCX
  (its `EXPORT_ENVS`) or NCCL (the CUDA accelerator's `export_envs()`) as
  `export K=V;`, wrapped in double quotes when it holds a character outside letters,
  digits and `@%+=:,./_-` (so `$(...)`, backticks, `\\` and `"` still run or break
  there); the `--master_addr` value; and the launcher arguments `--venv_script` (`source X;`),
  `--enable_each_rank_log` and `--launcher_args` (split into pdsh's own argv, where a
  word that is not an option becomes the start of the remote command). All of these are
  checked here (`remote_value_problem`, `check_master_addr`); it prints the whole pdsh
  or mpirun command, exports included, in its log (`cmd = ...`), so variables named like
  secrets get a warning (`secret_warnings`);
- it does the batch arithmetic for world size 1 only: `preflight_launch` checks the
  DeepSpeed config for the world size the launch will really have.

dstrain builds an argument list and execs it; it never writes `.deepspeed_env` and never
builds a shell string from user input.

Typical use (what `dstrain launch` and `dstrain train --hostfile` do)::

    options = dict(train_args=[...], hostfile="hostfiles/two_nodes", launcher="pdsh")
    check = preflight_launch(**options)      # raises DstrainError listing every problem
    argv = build_launcher_argv(**options)    # ["/venv/bin/deepspeed", "--hostfile", ...]
    os.execv(argv[0], argv)
"""

from __future__ import annotations

import ipaddress
import os
import re
import shlex
import shutil
import socket
import sys
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

from dstrain.errors import DstrainError
from dstrain.hostfile import HostEntry, hostfile_world_size, parse_hostfile

# DeepSpeed's launcher backends (deepspeed/launcher/constants.py) and the program each one
# needs on PATH (its `backend_exists`).
LAUNCHER_PROGRAMS: dict[str, str] = {
    "pdsh": "pdsh",
    "openmpi": "ompi_info",
    "mpich": "mpirun",
    "impi": "mpirun",
    "mvapich": "mpiname",
    "slurm": "sinfo",
}
LAUNCHERS = tuple(LAUNCHER_PROGRAMS)

TRAIN_SCRIPT = Path(__file__).resolve().with_name("train.py")
DS_CONFIG_FLAGS = ("--deepspeed_config", "--deepspeed-config")

# Launcher flags dstrain sets itself (or cannot account for in the world size), in
# DeepSpeed's spelling, with dstrain's flag to use instead.
MANAGED_FLAGS: dict[str, str] = {
    "-H": "--hostfile",
    "--hostfile": "--hostfile",
    "--num_gpus": "--num-gpus",
    "--num_accelerators": "--num-gpus",
    "--num_nodes": "--num-nodes",
    "--master_addr": "--master-addr",
    "--master_port": "--master-port",
    "--node_rank": "--node-rank",
    "--no_ssh": "--no-ssh",
    "--no_ssh_check": "--no-ssh-check",
    "--launcher": "--launcher",
    "-i": "a hostfile listing only the hosts and slots to use",
    "--include": "a hostfile listing only the hosts and slots to use",
    "-e": "a hostfile listing only the hosts and slots to use",
    "--exclude": "a hostfile listing only the hosts and slots to use",
}

# What pdsh's remote shell takes literally: DeepSpeed wraps an argument in double quotes
# only when it holds a space, so `$`, backticks, `;`, quotes... would be interpreted.
_SHELL_SAFE = re.compile(r"[\w@%+=:,./ -]*")
_ENV_KEY = re.compile(r"[A-Za-z_][A-Za-z0-9_]*")
LOCAL_HOST_NAMES = ("localhost", "127.0.0.1")

# Variables of the launching environment DeepSpeed 0.19.8 copies onto every node's remote
# command line: runner.py's EXPORT_ENVS plus the CUDA accelerator's export_envs() (other
# accelerators add LD_LIBRARY*, PATH*, HCCL*...; dstrain targets CUDA and CPU).
EXPORTED_PREFIXES = ("MLFLOW", "PYTHON", "MV2", "UCX", "NCCL")
# Names that look like credentials (case-insensitive substrings).
SECRET_MARKERS = ("TOKEN", "PASSWORD", "PASSWD", "SECRET", "KEY", "CREDENTIAL")
# `$NAME` / `${NAME}`: a variable the remote shell expands, nothing it runs.
_VAR_REFERENCE = re.compile(r"\$(?:[A-Za-z_][A-Za-z0-9_]*|\{[A-Za-z_][A-Za-z0-9_]*\})")
# What a value may not hold even inside DeepSpeed's double quotes (`$`, backtick, `\`,
# `"` act there), nor, to keep the rule simple and quoting-proof, other shell syntax.
_SHELL_META = frozenset("$`\\\"';|&<>()!")
# A host name (RFC 1123 labels; `_` accepted as clusters use it) or an IP address.
_HOST_LABEL = re.compile(r"[A-Za-z0-9_](?:[A-Za-z0-9_-]{0,61}[A-Za-z0-9_])?")


@dataclass(frozen=True)
class LaunchCheck:
    """What `preflight_launch` found out about a launch that passed its checks."""

    world_size: int
    """Ranks the launch starts in all (data-parallel world size)."""
    hosts: list[HostEntry] = field(default_factory=list)
    """Hosts in use, slots as DeepSpeed will start them (empty without a hostfile)."""
    multi_node: bool = False
    """DeepSpeed goes through a multi-node backend (pdsh, mpirun, srun) from this process."""
    notes: list[str] = field(default_factory=list)
    """Things worth printing that do not stop the launch."""
    warnings: list[str] = field(default_factory=list)
    """Risks that do not stop the launch (variables named like secrets that DeepSpeed
    prints); print them as `warning: ...`."""


# --------------------------------------------------------------------------------------
# Values that reach a remote shell
# --------------------------------------------------------------------------------------


def remote_value_problem(value: str) -> str | None:
    """Why `value` is unsafe in DeepSpeed's `export K="V";` on pdsh's remote command line,
    or None. Refused: any of `$ ` \\ " ' ; | & < > ( ) !` and control characters; `$NAME`
    and `${NAME}` alone are accepted (the remote shell expands them; nothing runs)."""
    rest = _VAR_REFERENCE.sub("", value)
    bad = sorted(
        {c for c in rest if c in _SHELL_META or (ord(c) < 32 and c != "\t") or c == "\x7f"}
    )
    if not bad:
        return None
    shown = " ".join(repr(c)[1:-1] if c.isprintable() else repr(c) for c in bad)
    return f"it holds shell syntax ({shown}) that the remote shell would run or misread"


def check_master_addr(value: str) -> str | None:
    """Why `value` is not a host name or an IP address (what `--master-addr` takes), or
    None. It reaches every node's shell as `--master_addr=VALUE` on the pdsh path."""
    try:
        ipaddress.ip_address(value)
        return None
    except ValueError:
        pass
    labels = value.removesuffix(".").split(".")
    if value and len(value) <= 253 and all(_HOST_LABEL.fullmatch(label) for label in labels):
        return None
    return (
        f"--master-addr `{value}` is not a host name or an IP address (letters, digits, `-`, "
        "`_` and dots, or an IPv4/IPv6 address): give node 0's address, e.g. "
        "--master-addr 10.0.0.1"
    )


def looks_secret(name: str) -> bool:
    """True when an environment variable name looks like a credential (HF_TOKEN,
    WANDB_API_KEY, MLFLOW_TRACKING_PASSWORD, ...)."""
    upper = name.upper()
    return any(marker in upper for marker in SECRET_MARKERS)


_SECRET_ADVICE = (
    "on a multi-node launch DeepSpeed puts it on the pdsh/mpirun command line (visible to "
    "every user of this machine in `ps`) and prints that command in its log (`cmd = ...`); "
    "keep it in a file only you can read that the job loads on each node instead (e.g. "
    "~/.cache/huggingface/token, ~/.netrc, wandb login)"
)


def exported_environment(environ: Mapping[str, str] | None = None) -> dict[str, str]:
    """The variables of `environ` DeepSpeed copies to every node (`EXPORTED_PREFIXES`)."""
    environ = os.environ if environ is None else environ
    return {k: v for k, v in environ.items() if k.startswith(EXPORTED_PREFIXES)}


def _environment_problems(environ: Mapping[str, str] | None) -> tuple[list[str], list[str]]:
    problems, warnings = [], []
    for key, value in sorted(exported_environment(environ).items()):
        if not _ENV_KEY.fullmatch(key):  # DeepSpeed writes `export KEY=VALUE;` unquoted
            problems.append(
                f"environment variable name {key!r} is not a shell variable name, and "
                "DeepSpeed pastes it unquoted into every node's remote shell command "
                f"(`export {key}=...;`): unset it"
            )
            continue
        why = remote_value_problem(value.strip())
        if why:
            problems.append(
                f"environment variable {key}={value!r}: {why}; DeepSpeed copies variables "
                f"starting with {', '.join(EXPORTED_PREFIXES)} into every node's remote "
                f"shell command: unset it (`unset {key}`) or remove those characters"
            )
        if looks_secret(key):
            warnings.append(f"environment variable {key} looks like a secret: {_SECRET_ADVICE}")
    return problems, warnings


def _launcher_arg_problems(extra: Sequence[str]) -> list[str]:
    """Launcher arguments pdsh's remote shell (or pdsh's own argv) would reinterpret.

    DeepSpeed pastes `--venv_script` (`source X;`) and `--enable_each_rank_log` into the
    remote command unquoted, and splits `--launcher_args` into pdsh's argv, where a word
    that is not an option starts the remote command; its argparse also accepts any
    unambiguous prefix of a flag. So every word, and every word of a `--launcher_args`
    value, must be plain: letters, digits and `@%+=:,./_-`."""
    problems = []
    i = 0
    while i < len(extra):
        arg = extra[i]
        flag, eq, value = arg.partition("=")
        if flag.startswith("--launcher_") and "--launcher_args".startswith(flag):
            if not eq:  # `--launcher_args VALUE`: the value is the next word
                i += 1
                value = extra[i] if i < len(extra) else ""
                arg = f"{arg} {value}"
            try:
                words = shlex.split(value)
            except ValueError as exc:
                problems.append(f"launcher argument `{arg}`: cannot split it ({exc})")
                words = []
        else:
            words = [arg]
        for word in words:
            if not _SHELL_SAFE.fullmatch(word) or " " in word:
                problems.append(
                    f"launcher argument `{arg}`: `{word}` holds a space or shell character, "
                    "and DeepSpeed pastes launcher arguments (--venv_script, "
                    "--enable_each_rank_log, --launcher_args) into pdsh's remote command: "
                    "use a plain path or value (letters, digits and @%+=:,./_-)"
                )
        i += 1
    return problems


# --------------------------------------------------------------------------------------
# The command
# --------------------------------------------------------------------------------------


def deepspeed_command() -> list[str]:
    """How to run DeepSpeed's launcher with this interpreter.

    The `deepspeed` script next to `sys.executable` (a venv's `bin/`), as users type it;
    else `python -m deepspeed.launcher.runner`, the same entry point, never a `deepspeed`
    of another environment found on PATH.
    """
    script = Path(sys.executable).parent / "deepspeed"
    if script.is_file() and os.access(script, os.X_OK):
        return [str(script)]
    return [sys.executable, "-m", "deepspeed.launcher.runner"]


def is_local_only(hosts: Sequence[HostEntry]) -> bool:
    """True when a hostfile names only this machine (`localhost`, 127.0.0.1, its name)."""
    names = {*LOCAL_HOST_NAMES, socket.gethostname(), socket.gethostname().split(".")[0]}
    return len(hosts) == 1 and hosts[0].host in names


def build_launcher_argv(
    *,
    train_args: Sequence[str],
    num_gpus: int | None = None,
    hostfile: str | None = None,
    launcher: str = "pdsh",
    no_ssh_check: bool = False,
    master_addr: str | None = None,
    master_port: int | None = None,
    node_rank: int | None = None,
    no_ssh: bool = False,
    num_nodes: int | None = None,
    extra_launcher_args: Sequence[str] = (),
) -> list[str]:
    """The full argv that runs `dstrain/train.py` under DeepSpeed's launcher.

    `[deepspeed, --hostfile H | --num_gpus N, ..., /abs/dstrain/train.py, *train_args]`.
    A hostfile naming only this machine adds `--no_ssh_check` and `--master_addr
    127.0.0.1`: DeepSpeed would otherwise ssh to it, and a laptop or a container has no
    ssh server. Call `preflight_launch` with the same keywords first; this function
    checks nothing beyond reading the hostfile.
    """
    argv = deepspeed_command()
    if hostfile is not None:
        argv += ["--hostfile", hostfile]
        if not no_ssh and is_local_only(parse_hostfile(hostfile)):
            no_ssh_check = True
            master_addr = master_addr or "127.0.0.1"
    if num_nodes is not None:
        argv += ["--num_nodes", str(num_nodes)]
    if num_gpus is not None:
        argv += ["--num_gpus", str(num_gpus)]
    if launcher != "pdsh":
        argv += ["--launcher", launcher]
    if no_ssh:
        argv.append("--no_ssh")
    if node_rank is not None:
        argv += ["--node_rank", str(node_rank)]
    if no_ssh_check:
        argv.append("--no_ssh_check")
    if master_addr is not None:
        argv += ["--master_addr", master_addr]
    if master_port is not None:
        argv += ["--master_port", str(master_port)]
    argv += list(extra_launcher_args)
    return [*argv, str(TRAIN_SCRIPT), *train_args]


# --------------------------------------------------------------------------------------
# .deepspeed_env
# --------------------------------------------------------------------------------------


def deepspeed_env_files(
    *, cwd: str | Path | None = None, environ: Mapping[str, str] | None = None
) -> list[Path]:
    """The `.deepspeed_env` files DeepSpeed's launcher would read, home first, existing only.

    It looks for `$DS_ENV_FILE` (default `.deepspeed_env`) in `~` and in the directory it
    was started from.
    """
    environ = os.environ if environ is None else environ
    name = environ.get("DS_ENV_FILE", ".deepspeed_env")
    home = Path(environ.get("HOME", "~")).expanduser()
    found: list[Path] = []
    for folder in (home, Path(cwd) if cwd is not None else Path.cwd()):
        path = folder / name
        if path.is_file() and path.resolve() not in [p.resolve() for p in found]:
            found.append(path)
    return found


def lint_deepspeed_env(path: str | Path) -> list[str]:
    """Problems in a `.deepspeed_env` file that would crash or silently break a launch.

    DeepSpeed reads it line by line as `key, val = line.split("=", 1)` and sends each pair
    as `export KEY=VAL;` (pdsh) or `-x KEY=VAL` (mpirun) to every node. So a blank line or
    a line with no `=` crashes the launcher ("not enough values to unpack"), a comment
    line becomes a broken export (`export # note=...` comments out the rest of pdsh's
    remote command), and the key must be a shell variable name. The value lands in
    `export KEY="VALUE";` on pdsh's remote command line, so shell syntax in it (`$(...)`,
    backticks, `;`, quotes, ...) is refused (`remote_value_problem`). Returns
    `path:line: ...` messages; an empty list means the file is fine. Names that look like
    secrets are not problems: see `secret_warnings`.
    """
    path = Path(path)
    try:
        lines = _read_env_lines(path)
    except (OSError, UnicodeDecodeError) as exc:
        return [f"{path}: cannot read it: {exc}"]
    problems: list[str] = []
    for number, line in enumerate(lines, start=1):
        where = f"{path}:{number}"
        stripped = line.strip()
        if not stripped:
            problems.append(
                f"{where}: blank line: DeepSpeed's launcher crashes on it (it splits every "
                "line on `=`); delete it"
            )
            continue
        if stripped.startswith("#"):
            problems.append(
                f"{where}: comment line: DeepSpeed does not skip comments here (it crashes, "
                "or exports a key starting with `#`); delete it"
            )
            continue
        if "=" not in line:
            problems.append(
                f"{where}: `{stripped}` has no `=`: DeepSpeed's launcher crashes on it; "
                "write KEY=VALUE"
            )
            continue
        key, value = line.split("=", 1)
        key = key.strip()
        if key.startswith("export "):
            problems.append(
                f"{where}: drop `export`: DeepSpeed adds it itself; write "
                f"`{key.removeprefix('export ').strip()}={value.strip()}`"
            )
        elif not _ENV_KEY.fullmatch(key):
            problems.append(
                f"{where}: `{key}` is not an environment variable name "
                "(letters, digits and `_`, not starting with a digit)"
            )
        if '"' in value:
            problems.append(
                f'{where}: the value of `{key}` holds `"`: DeepSpeed wraps values in double '
                "quotes, so the remote shell would see broken quoting; remove the quotes"
            )
        elif why := remote_value_problem(value.strip()):
            problems.append(
                f"{where}: the value of `{key}` ({value.strip()!r}): {why}; DeepSpeed pastes "
                "it into every node's remote shell command: remove those characters (put "
                "a complex value in a script that the job sources on each node)"
            )
    return problems


def _read_env_lines(path: Path) -> list[str]:
    """The lines as DeepSpeed's `readlines()` sees them (universal newlines), ends cut."""
    if not path.is_file():
        raise OSError(f"not a regular file: {path}")
    with open(path, encoding="utf-8") as handle:
        return [line.removesuffix("\n") for line in handle.readlines()]


def secret_warnings(path: str | Path) -> list[str]:
    """`path:line: ...` warnings for `.deepspeed_env` keys that look like secrets
    (`looks_secret`): DeepSpeed copies every value onto the launch command line and its log."""
    path = Path(path)
    try:
        lines = _read_env_lines(path)
    except (OSError, UnicodeDecodeError):
        return []  # lint_deepspeed_env reports it
    warnings = []
    for number, line in enumerate(lines, start=1):
        key = line.split("=", 1)[0].strip().removeprefix("export ").strip()
        if "=" in line and looks_secret(key):
            warnings.append(f"{path}:{number}: `{key}` looks like a secret: {_SECRET_ADVICE}")
    return warnings


# --------------------------------------------------------------------------------------
# Preflight
# --------------------------------------------------------------------------------------


def find_option(args: Sequence[str], names: Sequence[str]) -> str | None:
    """The value of the last `--name VALUE` or `--name=VALUE` among `args`, if any."""
    value = None
    for i, arg in enumerate(args):
        for name in names:
            if arg == name and i + 1 < len(args):
                value = args[i + 1]
            elif arg.startswith(name + "="):
                value = arg[len(name) + 1 :]
    return value


def _managed_flag_problems(extra: Sequence[str]) -> list[str]:
    problems = []
    for arg in extra:
        flag = arg.split("=", 1)[0]
        if flag in ("-i", "--include", "-e", "--exclude"):
            problems.append(
                f"launcher argument `{arg}`: dstrain would get the world size wrong; use "
                f"{MANAGED_FLAGS[flag]} instead"
            )
        elif flag in MANAGED_FLAGS:
            problems.append(
                f"launcher argument `{arg}`: dstrain sets `{flag}` itself; use "
                f"{MANAGED_FLAGS[flag]} instead"
            )
    return problems


def _active_hosts(
    hosts: list[HostEntry], num_nodes: int | None, num_gpus: int | None
) -> tuple[list[HostEntry], list[str]]:
    """Hosts and slots as DeepSpeed will use them: the first `num_nodes` hosts, and
    `num_gpus` ranks on each when given (DeepSpeed overrides the slot count with it)."""
    problems = []
    if num_nodes is not None:
        if num_nodes > len(hosts):
            problems.append(f"--num-nodes {num_nodes} but the hostfile lists {len(hosts)} host(s)")
        hosts = hosts[:num_nodes]
    if num_gpus is not None:
        for entry in hosts:
            if num_gpus > entry.slots:
                problems.append(
                    f"--num-gpus {num_gpus} but host `{entry.host}` has slots={entry.slots} "
                    f"(line {entry.line}); DeepSpeed would start {num_gpus} ranks there anyway"
                )
        hosts = [HostEntry(entry.host, num_gpus, entry.line) for entry in hosts]
    return hosts, problems


def preflight_launch(
    *,
    train_args: Sequence[str],
    num_gpus: int | None = None,
    hostfile: str | None = None,
    launcher: str = "pdsh",
    no_ssh_check: bool = False,
    master_addr: str | None = None,
    master_port: int | None = None,
    node_rank: int | None = None,
    no_ssh: bool = False,
    num_nodes: int | None = None,
    extra_launcher_args: Sequence[str] = (),
    cwd: str | Path | None = None,
    environ: Mapping[str, str] | None = None,
) -> LaunchCheck:
    """Check a launch before DeepSpeed sees it; raise one `DstrainError` listing everything.

    Takes the keywords of `build_launcher_argv` (plus `cwd`/`environ`, for tests). Checks
    the hostfile, the world size it gives with `--num-nodes`/`--num-gpus`, `--no-ssh`
    with `--node-rank`, the launcher backend on PATH, `.deepspeed_env` files, and the
    DeepSpeed config named by `--deepspeed_config` in `train_args` with the batch
    arithmetic for that world size. `--master-addr` must be a host name or an IP address
    (always). On the pdsh path, everything DeepSpeed pastes into the remote command is
    refused when it holds shell syntax: training arguments, paths, `.deepspeed_env`
    values, exported variables of `environ` (MLFLOW*, PYTHON*, MV2*, UCX*, NCCL*) and
    launcher arguments. On any multi-node path, variables named like secrets that
    DeepSpeed would print become `LaunchCheck.warnings`.
    """
    from dstrain.ds_run import load_ds_run

    del no_ssh_check, master_port  # accepted so both functions take the same keywords
    relative_to = cwd
    cwd = Path.cwd() if cwd is None else Path(cwd)
    problems: list[str] = []
    notes: list[str] = []
    warnings: list[str] = []
    if master_addr is not None and (why := check_master_addr(master_addr)):
        problems.append(why)
    if launcher not in LAUNCHER_PROGRAMS:
        problems.append(f"--launcher {launcher}: not one of {', '.join(LAUNCHERS)}")
    problems += _managed_flag_problems(extra_launcher_args)
    for arg in train_args:
        if arg == "--local_rank" or arg.startswith("--local_rank="):
            problems.append(
                f"training argument `{arg}`: DeepSpeed's launcher adds --local_rank itself"
            )
    problems += _train_arg_problems(train_args)

    hosts: list[HostEntry] = []
    world_size = 0
    if hostfile is None and num_gpus is None:
        problems.append("give --hostfile H (several nodes) or --num-gpus N (this machine)")
    elif hostfile is None:
        if num_nodes is not None and num_nodes > 1:
            problems.append(f"--num-nodes {num_nodes} needs a hostfile listing the nodes")
        world_size = num_gpus or 0
    else:
        try:
            listed = parse_hostfile(hostfile)
        except DstrainError as exc:
            problems.append(str(exc))
        else:
            hosts, more = _active_hosts(listed, num_nodes, num_gpus)
            problems += more
            world_size = hostfile_world_size(hosts)

    if no_ssh:
        count = len(hosts) if hostfile is not None else 1
        if node_rank is None:
            problems.append("--no-ssh starts one node per call: give --node-rank (0 on the first)")
        elif count and not 0 <= node_rank < count:
            problems.append(f"--node-rank {node_rank} is outside 0..{count - 1} ({count} node(s))")
        if hostfile is not None and master_addr is None:
            problems.append(
                "--no-ssh needs --master-addr: the address of node 0 that every node can reach"
            )
    elif node_rank is not None:
        problems.append("--node-rank only applies with --no-ssh (one launcher call per node)")

    multi_node = len(hosts) > 1 and not no_ssh
    if multi_node:
        program = LAUNCHER_PROGRAMS.get(launcher)
        if program and shutil.which(program) is None:
            problems.append(
                f"--launcher {launcher} needs `{program}` on PATH and it is not there; install "
                f"it, pick another --launcher ({', '.join(LAUNCHERS)}), or start each node "
                "yourself with --no-ssh --node-rank R --master-addr A"
            )
        for env_file in deepspeed_env_files(cwd=cwd, environ=environ):
            problems += lint_deepspeed_env(env_file)
            warnings += secret_warnings(env_file)
        env_problems, env_warnings = _environment_problems(environ)
        warnings += env_warnings
        if launcher == "pdsh":
            problems += _remote_shell_problems(train_args, cwd)
            problems += _launcher_arg_problems(extra_launcher_args)
            problems += env_problems
        notes.append(
            f"every node runs {sys.executable} from {cwd}: both must exist there with the "
            "same packages (check with `dstrain doctor --hostfile HOSTFILE`)"
        )
        if master_addr is None:
            notes.append(
                f"no --master-addr: DeepSpeed asks `{hosts[0].host}` for it over ssh "
                "(`hostname -I`, first address)"
            )

    config_path = find_option(train_args, DS_CONFIG_FLAGS)
    if config_path is None:
        notes.append("no --deepspeed_config in the training arguments: nothing to check there")
    elif world_size:
        if relative_to is not None and not Path(config_path).is_absolute():
            config_path = str(Path(relative_to) / config_path)
        try:
            run = load_ds_run(config_path, world_size=world_size).run
        except DstrainError as exc:
            problems.append(f"{exc} (world size {world_size})")
        else:
            tbs, micro, accum = run.batch.resolve(world_size)
            notes.append(
                f"{config_path}: {run.describe()}; global batch {tbs} = micro {micro} x "
                f"accumulation {accum} x {world_size} ranks"
            )

    if problems:
        raise DstrainError(
            f"cannot launch ({len(problems)} problem(s)):\n  "
            + "\n  ".join(p.replace("\n", "\n  ") for p in problems)
        )
    return LaunchCheck(world_size, hosts, multi_node, notes, warnings)


class _TrainArgError(Exception):
    pass


def _train_arg_problems(train_args: Sequence[str]) -> list[str]:
    """Parse the training arguments with `dstrain train`'s own parser, so an unknown flag
    or a bad value is named here, not printed once per rank after every node started."""
    from dstrain.train import build_arg_parser

    parser = build_arg_parser()

    def error(message: str) -> None:
        raise _TrainArgError(message)

    parser.error = error  # type: ignore[method-assign]
    try:
        parser.parse_args(list(train_args))
    except _TrainArgError as exc:
        return [f"training arguments: {exc} (see `dstrain train --help`)"]
    except SystemExit:  # --help among them: argparse printed it
        return ["training arguments: --help is not a training run"]
    return []


def _remote_shell_problems(train_args: Sequence[str], cwd: Path) -> list[str]:
    """Arguments and paths pdsh's remote shell would reinterpret."""
    problems = []
    for what, value in (
        ("working directory", str(cwd)),
        ("interpreter path", sys.executable),
        ("training script path", str(TRAIN_SCRIPT)),
    ):
        if not _SHELL_SAFE.fullmatch(value) or " " in value:
            problems.append(
                f"the {what} `{value}` holds a space or shell character; pdsh pastes it "
                "unquoted into the remote command: move to a plain path"
            )
    for arg in train_args:
        if not _SHELL_SAFE.fullmatch(arg):
            problems.append(
                f"training argument `{arg}` holds a character the remote shell would "
                "interpret (pdsh sends arguments as one shell line); use letters, digits, "
                "spaces and @%+=:,./_- only, e.g. move it into a file"
            )
    return problems
