"""Watchdog: a rank that dies or stops progressing ends the whole job with one message.

Every rank runs one daemon thread that, once a second, writes a heartbeat record to the
job's rendezvous store (the TCPStore rank 0 hosts; our own client connection to it, so a
stalled store call never blocks the process group) and reads everyone else's:

    {"rank", "host", "pid", "start" (the process's start time in clock ticks), "step"
     (the last optimizer step it finished), "phase", "long", "beat" (a counter)}

Each reader times what it sees on its own monotonic clock (never another host's), so
clocks need not agree. Two signals, told apart because they fail differently:

- Liveness: `beat` changes every second while the process runs at all, whatever its main
  thread does (a long save, a JIT build, a wait inside a collective). A beat that stops
  means the process is gone or not scheduled: dead (SIGKILL, OOM killer), stopped
  (SIGSTOP, a debugger) or its host is unreachable. A SIGSTOPped process stops its
  heartbeat thread too, so a stale beat alone cannot tell dead from frozen. It is dead
  when that can be proven: the pid is gone from /proc on this host (checked every tick
  for ranks on this host), the store that rank 0 hosts refuses connections, or this rank's
  own collective just failed and the peer's beat is stale. Otherwise a stale beat counts
  as frozen once it is `hang_timeout` seconds old.
- Progress: `(step, phase)` changes. The job is stuck when no rank has changed it for
  `hang_timeout` seconds while every rank sits in an ordinary phase (training steps).
  While any rank declares a long phase (setup and data preparation, the first step with
  its JIT builds, evaluation, a checkpoint save, the finish and export) the progress
  clock is suspended for the whole job (the others wait for it in a collective); the
  liveness check still runs.

The first rank to reach a verdict writes it to the store; every rank adopts it, the
lowest surviving rank prints it (one line, naming the rank, its host and the last step it
finished), survivors on the frozen rank's host SIGKILL it (after checking that its pid
and start time still match its heartbeat: a SIGSTOPped process ignores the launcher's
SIGTERM until continued), and each survivor leaves with `os._exit(1)`: its main thread
may be stuck inside a collective. DeepSpeed's launcher then sees a non-zero exit and
terminates the rest.

Parent watch (any world size): `dstrain train --num-gpus/--hostfile` starts the launcher
in a session of its own, with DSTRAIN_PARENT=host:pid:start; when that process is gone,
the ranks on its host kill the session's process group (launcher and ranks). The launcher
itself gets SIGTERM from the kernel when the parent dies (PR_SET_PDEATHSIG).

Costs per step: two attribute writes in the main thread; no collective is added.
"""

from __future__ import annotations

import contextlib
import functools
import json
import os
import signal
import socket
import sys
import threading
import time
from dataclasses import dataclass
from datetime import timedelta

HEARTBEAT_S = 1.0
"""Seconds between two heartbeats (and two looks at the others)."""

STEP_PUBLISH_S = 0.1
"""A finished step is published within this long (so a report names the true last step)."""

STALE_S = 4.0
"""A heartbeat this old means the process is not running (four missed beats)."""

STORE_TIMEOUT_S = 5.0
"""Our store client's timeout: a stopped rank 0 (which hosts the store) must not hang it."""

CLOSE_WAIT_S = 10.0
"""How long rank 0, done, keeps the store up for ranks that are still finishing."""

PREFIX = "dstrain/watchdog/"
VERDICT_KEY = PREFIX + "verdict"
VERDICTS_KEY = PREFIX + "verdicts"  # a counter: store.add(key, 0) reads it without waiting

LONG_PHASES = frozenset({"setup", "first step", "eval", "save", "finish", "stopping"})
"""Phases that may legitimately last longer than --hang-timeout without a step."""

PARENT_ENV = "DSTRAIN_PARENT"


def process_start_ticks(pid: int) -> int | None:
    """The start time of `pid` (clock ticks since boot, /proc/PID/stat field 22), or None
    if there is no such process (or it is a zombie: dead, not yet reaped)."""
    try:
        with open(f"/proc/{pid}/stat") as handle:
            stat = handle.read()
    except OSError:
        return None
    fields = stat[stat.rindex(")") + 2 :].split()  # the name may hold spaces and ')'
    if fields[0] in ("Z", "X"):
        return None
    return int(fields[19])


@functools.cache
def machine_key() -> str:
    """Which pid space this process lives in: host name, boot id and pid-namespace inode.
    Host names alone collide (one container per GPU with --net=host, cloned nodes), and a
    pid is only worth looking up in /proc when the keys are equal."""
    try:
        with open("/proc/sys/kernel/random/boot_id") as handle:
            boot = handle.read().strip()
    except OSError:
        boot = "?"
    try:
        namespace = os.stat("/proc/self/ns/pid").st_ino
    except OSError:
        namespace = 0
    return f"{socket.gethostname()}/{boot}/{namespace}"


def same_process_alive(pid: int, start: int | None) -> bool:
    """Whether `pid` is still the very process that started at `start`."""
    return start is not None and process_start_ticks(pid) == start


def parent_spec(pid: int | None = None) -> str:
    """DSTRAIN_PARENT for the launcher we start: this host, pid and start time."""
    pid = os.getpid() if pid is None else pid
    return f"{machine_key()}:{pid}:{process_start_ticks(pid)}"


def set_parent_death_signal(signum: int = signal.SIGTERM) -> None:
    """Ask the kernel to send `signum` to this process when its parent dies (Linux
    PR_SET_PDEATHSIG; nothing elsewhere). For `preexec_fn` of the launcher's Popen."""
    if not sys.platform.startswith("linux"):
        return
    import ctypes

    libc = ctypes.CDLL(None, use_errno=True)
    libc.prctl(1, signum, 0, 0, 0)  # 1 = PR_SET_PDEATHSIG


@dataclass
class Seen:
    """What this rank saw of another one, timed on this rank's monotonic clock."""

    record: dict
    beat_at: float
    progress_at: float


class Watchdog:
    """One per rank. `start()` after the process group exists; the loop calls
    `step_done(step)` and wraps long work in `with watchdog.phase("save"):`."""

    def __init__(self, rank: int, world: int, hang_timeout_s: float, store=None):
        self.rank, self.world = rank, world
        self.hang_timeout_s = hang_timeout_s
        self.store = store
        self.host = socket.gethostname()
        self.where = machine_key()
        self.pid = os.getpid()
        self.start_ticks = process_start_ticks(self.pid)
        self.step = 0
        self.micro = 0  # micro-batches done: progress inside a long accumulation window
        self.phase_name = "setup"
        self.beat = 0
        self.seen: dict[int, Seen] = {}
        self.collective_failed = False
        self.all_present = False
        self.stepped = threading.Event()
        self.warned = False
        self.store_failed_at: float | None = None
        self.closing = False
        self.released = threading.Event()
        self.thread: threading.Thread | None = None

    @property
    def active(self) -> bool:
        """Watching other ranks (world size > 1 and a store)."""
        return self.world > 1 and self.store is not None

    def describe(self) -> str:
        if not self.active:
            return "off (one rank)"
        frozen = (
            f"a rank without progress for {self.hang_timeout_s:g} s (--hang-timeout)"
            if self.hang_timeout_s
            else "no frozen-rank check (--hang-timeout 0)"
        )
        return f"on: a dead rank stops the job within ~{STALE_S + 2 * HEARTBEAT_S:g} s, {frozen}"

    # -- the main thread's side: attribute writes (and an Event.set per step) ---------------

    def micro_done(self) -> None:
        """One forward/backward finished: progress even when an optimizer step (many
        micro-batches of accumulation) takes longer than --hang-timeout."""
        self.micro += 1

    def step_done(self, step: int) -> None:
        self.step = step
        self.stepped.set()
        if self.phase_name == "first step":
            self.phase_name = "train"

    @contextlib.contextmanager
    def phase(self, name: str):
        previous, self.phase_name = self.phase_name, name
        try:
            yield
        finally:
            self.phase_name = previous

    def enter(self, name: str) -> None:
        self.phase_name = name

    def start(self) -> Watchdog:
        if self.active:
            self.thread = threading.Thread(target=self._run, name="dstrain-watchdog", daemon=True)
            self.thread.start()
        return self

    def explain_failure(self) -> None:
        """The main thread hit an exception (a collective that failed because a peer is
        gone, typically): give the watchdog thread time to name the rank and end the
        process. Returns if it finds nobody gone (then the error is this rank's own)."""
        if not self.active or self.thread is None:
            return
        self.note_failure()
        self.collective_failed = True
        deadline = time.monotonic() + STALE_S + 3 * HEARTBEAT_S
        while time.monotonic() < deadline and self.thread.is_alive():
            time.sleep(0.1)

    def note_failure(self) -> None:
        """This rank stops with an error of its own: say so in its heartbeat, so that the
        others report 'stopped with an error' rather than 'died' (published by the thread,
        the only user of our store client)."""
        self.phase_name = "failed"
        if self.active and self.thread is not None:
            self.stepped.set()
            time.sleep(2 * STEP_PUBLISH_S)

    def close(self) -> None:
        """This rank finished: publish phase 'done' so the others do not take its exit for
        a death. Rank 0 hosts the store and stays until every rank is done (10 s at most),
        so that none of them takes the store's end for rank 0's death."""
        self.phase_name = "done"
        if self.active and self.thread is not None:
            self.closing = True
            self.stepped.set()
            self.released.wait(CLOSE_WAIT_S)

    # -- the thread ------------------------------------------------------------------------

    def _release(self) -> bool:
        """While closing: True once 'done' is published (rank 0: and every rank is done)."""
        keys = [f"{PREFIX}{r}" for r in range(self.world)]
        self.store.set(keys[self.rank], json.dumps(self._record()))
        if self.rank != 0:
            return True
        if not self.store.check(keys):
            return False
        records = [json.loads(raw) for raw in self.store.multi_get(keys)]
        return all(rec["phase"] == "done" or self._gone_from_this_host(rec) for rec in records)

    def _run(self) -> None:
        next_tick = time.monotonic()
        while not self.released.is_set():
            try:
                if self.closing and self._release():
                    self.released.set()
                elif time.monotonic() >= next_tick:
                    next_tick = time.monotonic() + HEARTBEAT_S
                    self._tick()
                elif self.stepped.is_set():  # publish the step at once (10 a second at most)
                    self.stepped.clear()
                    with contextlib.suppress(Exception):  # a failing store: the tick's to judge
                        self.store.set(f"{PREFIX}{self.rank}", json.dumps(self._record()))
            except Exception as exc:  # the watchdog must never take a healthy rank down
                if not self.warned:
                    self.warned = True
                    print(f"warning (rank {self.rank}): watchdog: {exc!r}", file=sys.stderr)
            time.sleep(STEP_PUBLISH_S)
            self.stepped.wait(max(0.0, next_tick - time.monotonic()))

    def _record(self) -> dict:
        self.beat += 1
        return {
            "rank": self.rank,
            "host": self.host,
            "where": self.where,
            "pid": self.pid,
            "start": self.start_ticks,
            "step": self.step,
            "micro": self.micro,
            "phase": self.phase_name,
            "long": self.phase_name in LONG_PHASES,
            "beat": self.beat,
            "in_collective": self._main_in_collective(),
        }

    @staticmethod
    def _main_in_collective() -> bool:
        """Whether the main thread is inside torch.distributed / deepspeed.comm now."""
        frame = sys._current_frames().get(threading.main_thread().ident)
        while frame is not None:
            name = frame.f_code.co_filename
            if "torch/distributed/" in name or "deepspeed/comm/" in name:
                return True
            frame = frame.f_back
        return False

    def _tick(self) -> None:
        now = time.monotonic()
        seen = self.seen.get(0)  # before using the store that rank 0 hosts
        if (
            self.rank != 0
            and seen
            and not _done(seen.record)
            and self._gone_from_this_host(seen.record)
        ):
            self._stop(self._verdict("dead", self._last_record(0), now - seen.beat_at))
        mine = self._record()
        keys = [f"{PREFIX}{r}" for r in range(self.world)]
        try:  # get/multi_get wait for missing keys: read only keys known to exist
            self.store.set(keys[self.rank], json.dumps(mine))
            verdict = self.store.get(VERDICT_KEY) if self.store.add(VERDICTS_KEY, 0) else None
            self.all_present = self.all_present or self.store.check(keys)
            values = self.store.multi_get(keys) if self.all_present else []
        except Exception as exc:
            self._store_failed(now, exc)
            return
        self.store_failed_at = None
        if verdict:
            self._stop(json.loads(verdict))
        for r, raw in enumerate(values):
            if r != self.rank:
                self._observe(r, json.loads(raw), now)
        self._observe(self.rank, mine, now)
        verdict = self._judge(now)
        if verdict:
            with contextlib.suppress(Exception):
                self.store.set(VERDICT_KEY, json.dumps(verdict))
                self.store.add(VERDICTS_KEY, 1)
            self._stop(verdict)

    def _observe(self, rank: int, record: dict, now: float) -> None:
        old = self.seen.get(rank)
        if old is None:
            self.seen[rank] = Seen(record, now, now)
            return
        if record["beat"] != old.record["beat"] or record["pid"] != old.record["pid"]:
            old.beat_at = now
        progress = ("step", "micro", "phase")
        if any(record.get(key) != old.record.get(key) for key in progress):
            old.progress_at = now
        old.record = record

    def _judge(self, now: float) -> dict | None:
        hang = self.hang_timeout_s
        for r, seen in sorted(self.seen.items()):
            if r == self.rank or _done(seen.record):
                continue
            rec, stale = seen.record, now - seen.beat_at
            if self._gone_from_this_host(rec):
                return self._verdict("dead", self._last_record(r), stale)
            if stale >= STALE_S and self.collective_failed:
                return self._verdict("dead", self._last_record(r), stale)
            if hang and stale >= hang:
                return self._verdict("frozen", self._last_record(r), stale)
        if not hang or len(self.seen) < self.world:
            return None
        records = [s.record for s in self.seen.values()]
        if any(rec["long"] or _done(rec) for rec in records):
            return None
        idle = now - max(s.progress_at for s in self.seen.values())
        if idle < hang:
            return None
        # The rank behind; among equals, one whose main thread is not waiting in a
        # collective (the others wait there for it).
        behind = min(rec["step"] for rec in records)
        suspects = [rec for rec in records if rec["step"] == behind]
        outside = [rec for rec in suspects if not rec.get("in_collective")]
        named = outside if 0 < len(outside) < len(records) else suspects
        culprit = min(named, key=lambda rec: rec["rank"])
        return self._verdict("stuck", culprit, idle, all_equal=len(named) == len(records))

    def _verdict(self, kind: str, rec: dict, seconds: float, all_equal: bool = False) -> dict:
        who = f"rank {rec['rank']} (host {rec['host']}, pid {rec['pid']})"
        after = (
            f"after finishing step {rec['step']}" if rec["step"] else "before finishing any step"
        )
        if kind == "dead" and rec["phase"] == "failed":
            text = (
                f"{who} stopped with an error {after} (its message is above); stopping all ranks."
            )
        elif kind == "dead":
            text = f"{who} died {after}; stopping all ranks."
        elif kind == "frozen":
            text = (
                f"{who} stopped responding {after} (no heartbeat for {seconds:.0f} s, in "
                f"phase '{rec['phase']}'; stopped, or its host is unreachable); stopping all ranks."
            )
        elif all_equal:
            text = (
                f"no rank has finished a step for {seconds:.0f} s (--hang-timeout "
                f"{self.hang_timeout_s:g}); every rank {after}, in phase '{rec['phase']}' "
                "(a hung collective or kernel); stopping all ranks. Raise --hang-timeout if "
                "steps legitimately take this long."
            )
        else:
            text = (
                f"{who} made no progress {after} for {seconds:.0f} s (--hang-timeout "
                f"{self.hang_timeout_s:g}, phase '{rec['phase']}') while the others wait for "
                "it in a collective; stopping all ranks. Raise --hang-timeout if steps "
                "legitimately take this long."
            )
        return {"kind": kind, "rank": rec["rank"], "host": rec["host"], "pid": rec["pid"],
                "where": rec.get("where"), "start": rec["start"], "step": rec["step"],
                "text": text}  # fmt: skip

    def _gone_from_this_host(self, rec: dict) -> bool:
        return (
            rec.get("where") == self.where
            and rec["start"] is not None
            and not same_process_alive(rec["pid"], rec["start"])
        )

    def _last_record(self, rank: int) -> dict:
        """The culprit's last heartbeat, read again when the store is up (ours may be a
        second old), its step raised to the lockstep bound: a rank that finished step s
        took part in step s's gradient exchange, so the culprit finished s - 1 at least
        (it publishes its own step within STEP_PUBLISH_S, and may die in between)."""
        rec = self.seen[rank].record if rank in self.seen else None
        if rank != 0 or self.rank == 0:
            with contextlib.suppress(Exception):
                rec = json.loads(self.store.get(f"{PREFIX}{rank}"))
        if rec is None:
            rec = {"rank": rank, "host": "?", "pid": "?", "start": None, "step": 0, "phase": "?"}
        return {**rec, "step": max(rec["step"], self.step - 1)}

    def _store_failed(self, now: float, exc: Exception) -> None:
        """The store lives in rank 0's process: unreachable means rank 0 is gone."""
        if self.rank == 0 or self.closing:
            return
        if _done(self._last_record(0)):  # rank 0 finished and left (after waiting for us)
            self.released.set()
            return
        if self.store_failed_at is None:
            self.store_failed_at = now
        seen = self.seen.get(0)
        rec = self._last_record(0)
        failed_s = now - self.store_failed_at
        timeout = "timeout" in str(exc).lower() or "timed out" in str(exc).lower()
        refused = not timeout and failed_s >= HEARTBEAT_S  # reset or refused, twice
        if self._gone_from_this_host(rec) or refused or self.collective_failed:
            self._stop(self._verdict("dead", rec, failed_s))
        stale = now - seen.beat_at if seen else failed_s
        if self.hang_timeout_s and stale >= self.hang_timeout_s:
            self._stop(self._verdict("frozen", rec, stale))

    def _stop(self, verdict: dict) -> None:
        """Print (lowest survivor only), kill a frozen rank on this host, leave."""
        culprit = verdict["rank"]
        if verdict["kind"] == "stuck":
            survivors = [r for r in range(self.world)]
        else:
            survivors = [r for r in range(self.world) if r != culprit]
        if self.rank == min(survivors):
            print(f"error: {verdict['text']}", file=sys.stderr, flush=True)
        if (
            verdict["kind"] != "stuck"
            and culprit != self.rank
            and verdict.get("where") == self.where
            and same_process_alive(verdict["pid"], verdict["start"])
        ):
            with contextlib.suppress(OSError):
                os.kill(verdict["pid"], signal.SIGKILL)
        if self.rank == 0:  # the store lives here: let the others read the verdict first
            time.sleep(1.5 * HEARTBEAT_S)
        _leave(1)


def _done(rec: dict) -> bool:
    return rec.get("phase") == "done"


def _leave(code: int) -> None:
    for stream in (sys.stdout, sys.stderr):
        with contextlib.suppress(Exception):
            stream.flush()
    os._exit(code)


def watch_parent() -> threading.Thread | None:
    """When `dstrain train --num-gpus/--hostfile` launched us (DSTRAIN_PARENT names a
    process on this host): a daemon thread that takes the job down once that process is
    gone. Started first thing in a rank, before the slow imports."""
    try:
        host, pid, start = os.environ[PARENT_ENV].rsplit(":", 2)
        parent = (int(pid), int(start))
    except (KeyError, ValueError):
        return None
    if host != machine_key():  # another host or pid namespace: its pids mean nothing here
        return None
    thread = threading.Thread(target=_watch_parent, args=parent, name="dstrain-parent", daemon=True)
    thread.start()
    return thread


def _watch_parent(pid: int, start: int) -> None:
    while same_process_alive(pid, start):
        time.sleep(HEARTBEAT_S / 2)
    if int(os.environ.get("LOCAL_RANK", "0")) != 0:
        time.sleep(2 * HEARTBEAT_S)  # local rank 0 says it and kills the group; else we do
    else:
        print(
            f"error: the `dstrain train` process that launched this job (pid {pid}) is gone; "
            "stopping the launcher and every rank on this host without saving.",
            file=sys.stderr,
            flush=True,
        )
    group = os.getpgrp()
    if group == os.getsid(0):  # the launcher's own session (hand_off starts one)
        os.killpg(group, signal.SIGKILL)
    _leave(1)


def open_store_client():
    """Our own connection to the process group's store (a clone of the default store's
    client), with a short timeout; None if there is none (world size 1, other rendezvous)."""
    import torch.distributed as dist
    from torch.distributed import distributed_c10d as c10d

    if not dist.is_initialized() or dist.get_world_size() == 1:
        return None
    store = c10d._get_default_store()
    while isinstance(store, dist.PrefixStore):
        store = store.underlying_store
    if not isinstance(store, dist.TCPStore):
        return None
    client = store.clone()
    client.set_timeout(timedelta(seconds=STORE_TIMEOUT_S))
    return client


def start_watchdog(hang_timeout_s: float) -> Watchdog:
    """After `init_distributed`: the watchdog of this rank, started."""
    import torch.distributed as dist

    rank = dist.get_rank() if dist.is_initialized() else 0
    world = dist.get_world_size() if dist.is_initialized() else 1
    store = open_store_client() if world > 1 else None
    return Watchdog(rank, world, hang_timeout_s, store).start()
