"""Process set-up that DeepSpeed needs before `deepspeed.initialize`, on GPU or CPU.

Heavy edge (imports deepspeed and torch inside functions only). The facts behind each
step were measured here with DeepSpeed 0.19.8 (see shared FACTS.md):
- a process started without a launcher still needs RANK, WORLD_SIZE, LOCAL_RANK,
  MASTER_ADDR and MASTER_PORT, else DeepSpeed falls back to MPI discovery;
- on a CPU-only machine the first `init_distributed` JIT-builds a shared-memory comm op
  (~35 s) that gloo does not need;
- ZeRO's collectives keep gloo's 30-minute default timeout, so a dead peer hangs a job
  for half an hour unless the default is lowered before `initialize`.
"""

from __future__ import annotations

import contextlib
import os
import socket
import sys
from collections.abc import Iterator
from datetime import timedelta


def free_port() -> int:
    """A TCP port on 127.0.0.1 that was free a moment ago."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def check_rendezvous_env() -> None:
    """Refuse rendezvous variables torch cannot use, before anything reads them: a
    non-integer gives a bare ValueError, WORLD_SIZE=0 or a MASTER_PORT over 65535 a torch
    traceback, and a RANK outside [0, WORLD_SIZE) waits for its peers until the timeout."""
    from dstrain.errors import DstrainError

    values: dict[str, int] = {}
    for name, low, high in (
        ("WORLD_SIZE", 1, 2**31 - 1),
        ("RANK", 0, 2**31 - 2),
        ("LOCAL_RANK", 0, 2**31 - 2),
        ("LOCAL_WORLD_SIZE", 1, 2**31 - 1),
        ("MASTER_PORT", 1, 65535),
    ):
        raw = os.environ.get(name)
        if raw is None:
            continue
        try:
            value = int(raw.strip(), 10)
        except ValueError:
            value = None
        if value is None or not low <= value <= high:
            raise DstrainError(
                f"environment variable {name}={raw!r} is not a whole number from {low} to "
                f"{high}. It is set by the launcher (deepspeed, torchrun, SLURM); unset it "
                "to run a single process, or fix the value"
            )
        values[name] = value
    address = os.environ.get("MASTER_ADDR")
    if address is not None:  # torch retries an unresolvable name silently until the timeout
        try:
            socket.getaddrinfo(address, None)
        except (OSError, UnicodeError, ValueError) as exc:
            raise DstrainError(
                f"environment variable MASTER_ADDR={address!r} cannot be resolved ({exc}): "
                "every rank would wait for it until the collective timeout. Set it to node "
                "0's address, or unset it to run a single process"
            ) from None
    world = values.get("WORLD_SIZE", 1)
    if values.get("RANK", 0) >= world:
        raise DstrainError(
            f"environment variable RANK={values['RANK']} is not below WORLD_SIZE={world}: "
            "ranks count from 0 to WORLD_SIZE-1, so this rank would wait for peers that "
            "never come. Unset RANK and WORLD_SIZE to run a single process"
        )


def ensure_single_process_env() -> None:
    """Fill in the rendezvous variables for a process not started by a launcher."""
    os.environ.setdefault("RANK", "0")
    os.environ.setdefault("LOCAL_RANK", "0")
    os.environ.setdefault("WORLD_SIZE", "1")
    os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
    if "MASTER_PORT" not in os.environ:
        os.environ["MASTER_PORT"] = str(free_port())


def prepare_deepspeed(timeout_s: float | None = None) -> None:
    """Steps to take once per process before `deepspeed.initialize`.

    Without CUDA: pick DeepSpeed's CPU accelerator quietly and skip the shm comm op build.
    `timeout_s` lowers the collective timeout (also for ZeRO's own process groups).
    """
    import torch

    if not torch.cuda.is_available():
        os.environ.setdefault("DS_ACCELERATOR", "cpu")
    import deepspeed.ops

    if not torch.cuda.is_available():
        deepspeed.ops.__compatible_ops__["deepspeed_shm_comm"] = False
    if timeout_s is not None:
        import torch.distributed.distributed_c10d as c10d

        c10d.default_pg_timeout = timedelta(seconds=timeout_s)
    ensure_single_process_env()


@contextlib.contextmanager
def redirect_fds(target: str | os.PathLike[str] = os.devnull) -> Iterator[None]:
    """Point fds 1 and 2 at `target` (appended) for a while: DeepSpeed, tqdm and C
    extensions write there directly, past `sys.stdout`."""
    sys.stdout.flush()
    sys.stderr.flush()
    saved = os.dup(1), os.dup(2)
    try:
        with open(target, "ab") as sink:
            os.dup2(sink.fileno(), 1)
            os.dup2(sink.fileno(), 2)
            yield
    finally:
        sys.stdout.flush()
        sys.stderr.flush()
        os.dup2(saved[0], 1)
        os.dup2(saved[1], 2)
        os.close(saved[0])
        os.close(saved[1])
