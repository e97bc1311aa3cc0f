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
