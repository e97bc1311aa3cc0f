"""The watchdog: dead, frozen and stuck ranks, long phases, and the parent's death.

Verdict logic is checked on hand-made heartbeat records (no processes); the faults are
injected into real 2-rank CPU jobs under DeepSpeed's launcher with real signals (SIGKILL,
SIGSTOP), and the clock runs from the signal to the moment no process of the job is left.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
import time
from pathlib import Path

import psutil
import pytest
from subprocs import clean_env, deepspeed_launcher

from dstrain.watchdog import STALE_S, Seen, Watchdog, process_start_ticks, same_process_alive

REPO = Path(__file__).resolve().parent.parent
TRAIN_PY = REPO / "dstrain" / "train.py"


# --------------------------------------------------------------------------------------
# Verdicts on hand-made records (no processes, no store)
# --------------------------------------------------------------------------------------


def record(rank: int, step: int, phase: str = "train", host: str = "far-host", pid: int = 1):
    """A heartbeat; host "here" means this machine and pid namespace (its machine key)."""
    from dstrain.watchdog import LONG_PHASES, machine_key

    where = machine_key() if host == "here" else f"{host}/boot/1"
    return {"rank": rank, "host": host, "where": where, "pid": pid, "start": 1, "step": step,
            "micro": 0, "phase": phase, "long": phase in LONG_PHASES, "beat": 1}  # fmt: skip


def watchdog_seeing(*seen: tuple[dict, float, float], hang: float = 10.0) -> Watchdog:
    """Rank 0 of a world of len(seen): each entry is (record, beat_at, progress_at)."""
    dog = Watchdog(0, len(seen), hang, store=object())
    for rec, beat_at, progress_at in seen:
        dog.seen[rec["rank"]] = Seen(rec, beat_at, progress_at)
    return dog


def test_a_beat_older_than_the_hang_timeout_is_a_frozen_rank():
    dog = watchdog_seeing((record(0, 7), 100, 100), (record(1, 7), 89, 89))
    verdict = dog._judge(now=100)
    assert verdict["kind"] == "frozen" and verdict["rank"] == 1 and verdict["step"] == 7
    assert "rank 1 (host far-host, pid 1)" in verdict["text"] and "step 7" in verdict["text"]
    assert dog._judge(now=98) is None  # 9 s: not yet


def test_a_stale_beat_after_a_failed_collective_is_a_dead_rank():
    dog = watchdog_seeing((record(0, 3), 100, 100), (record(1, 3), 100 - STALE_S, 95))
    assert dog._judge(now=100) is None  # a remote stale beat alone: could be frozen
    dog.collective_failed = True
    assert dog._judge(now=100)["kind"] == "dead"


def test_a_rank_on_this_host_whose_pid_is_gone_is_dead_at_once():
    import socket

    gone = subprocess.Popen([sys.executable, "-c", "pass"])
    gone.wait()
    rec = record(1, 4, host="here", pid=gone.pid)
    dog = watchdog_seeing((record(0, 4), 100, 100), (rec, 100, 100))
    assert dog._judge(now=100)["kind"] == "dead"
    # The same host name in another pid namespace (a container per GPU with --net=host):
    # its pid means nothing here, so a missing /proc entry proves nothing.
    twin = {**rec, "host": socket.gethostname(), "where": socket.gethostname() + "/other/2"}
    assert watchdog_seeing((record(0, 4), 100, 100), (twin, 100, 100))._judge(now=100) is None


def test_micro_batches_are_progress_inside_a_long_accumulation_window():
    """An optimizer step of many micro-batches may take longer than --hang-timeout: each
    finished micro-batch counts as progress."""
    dog = watchdog_seeing((record(0, 3), 100, 80), (record(1, 3), 100, 80))
    dog._observe(1, {**record(1, 3), "micro": 5, "beat": 2}, now=99)
    dog._observe(0, {**record(0, 3), "micro": 5, "beat": 2}, now=99)
    assert dog._judge(now=100) is None
    for rank in (0, 1):  # alive (new beats) but no further micro-batch
        dog._observe(rank, {**record(rank, 3), "micro": 5, "beat": 3}, now=109)
    assert dog._judge(now=110)["kind"] == "stuck"  # 11 s after the last micro-batch


def test_a_rank_that_finished_is_not_a_dead_one():

    gone = subprocess.Popen([sys.executable, "-c", "pass"])
    gone.wait()
    rec = record(1, 9, phase="done", host="here", pid=gone.pid)
    dog = watchdog_seeing((record(0, 9, phase="finish"), 100, 100), (rec, 80, 80))
    assert dog._judge(now=100) is None


def test_no_progress_names_the_rank_behind_and_long_phases_suspend_it():
    dog = watchdog_seeing((record(0, 8), 100, 80), (record(1, 7), 100, 80))
    verdict = dog._judge(now=100)
    assert verdict["kind"] == "stuck" and verdict["rank"] == 1
    for phase in ("save", "eval", "first step", "finish", "setup"):
        dog = watchdog_seeing((record(0, 8), 100, 80), (record(1, 7, phase), 100, 80))
        assert dog._judge(now=100) is None, phase
    waiting, working = {**record(0, 7), "in_collective": True}, record(1, 7)
    verdict = watchdog_seeing((waiting, 100, 80), (working, 100, 80))._judge(now=100)
    assert verdict["rank"] == 1 and "while the others wait for it" in verdict["text"]
    both = {**working, "in_collective": True}
    verdict = watchdog_seeing((waiting, 100, 80), (both, 100, 80))._judge(now=100)
    assert verdict["text"].startswith("no rank has finished a step for 20 s")
    dog = watchdog_seeing((record(0, 8), 100, 80), (record(1, 7), 100, 80), hang=0)
    assert dog._judge(now=100) is None  # --hang-timeout 0: no frozen-rank check


def test_process_identity_is_pid_and_start_time():
    me = os.getpid()
    assert same_process_alive(me, process_start_ticks(me))
    assert not same_process_alive(me, process_start_ticks(me) + 1)  # a reused pid
    assert not same_process_alive(me, None)


# --------------------------------------------------------------------------------------
# Real 2-rank jobs
# --------------------------------------------------------------------------------------


def start_job(tmp_path: Path, command: list[str], **env: str) -> subprocess.Popen:
    out = open(tmp_path / "out.txt", "w")  # noqa: SIM115 (read back in finish_job)
    err = open(tmp_path / "err.txt", "w")  # noqa: SIM115
    return subprocess.Popen(
        command, stdout=out, stderr=err, env=clean_env(**env), cwd=REPO, start_new_session=True
    )


def deepspeed_job(tmp_path: Path, *args: str, **env: str) -> subprocess.Popen:

    return start_job(
        tmp_path,
        [
            *deepspeed_launcher(2),
            str(TRAIN_PY),
            "--output-dir",
            str(tmp_path / "run"),
            "--max-steps",
            "100000",
            "--eval-every",
            "0",
            "--no-export",
            "--no-progress",
            "--no-report",
            *args,
        ],
        **env,
    )


def job_processes(proc: subprocess.Popen) -> list[psutil.Process]:
    try:
        top = psutil.Process(proc.pid)
        return [top, *top.children(recursive=True)]
    except psutil.NoSuchProcess:
        return []


def rank_process(proc: subprocess.Popen, local_rank: int) -> psutil.Process:
    for child in job_processes(proc)[1:]:
        with _gone_ok():
            if f"--local_rank={local_rank}" in child.cmdline():
                return child
    raise psutil.NoSuchProcess(proc.pid, msg=f"no rank {local_rank} under pid {proc.pid}")


class _gone_ok:
    def __enter__(self):
        return self

    def __exit__(self, kind, *_):
        return kind is not None and issubclass(kind, psutil.Error)


def alive(processes: list[psutil.Process]) -> list[psutil.Process]:
    left = []
    for p in processes:
        with _gone_ok():
            if p.is_running() and p.status() != psutil.STATUS_ZOMBIE:
                left.append(p)
    return left


def seconds_until_all_gone(proc, processes, limit: float) -> float:
    t0 = time.monotonic()
    while alive(processes) and time.monotonic() - t0 < limit:
        proc.poll()  # reap the launcher
        time.sleep(0.1)
    return time.monotonic() - t0


def wait_for_step(proc: subprocess.Popen, run_dir: Path, step: int, limit: float = 180) -> None:
    metrics, deadline = run_dir / "metrics.jsonl", time.monotonic() + limit
    while time.monotonic() < deadline:
        assert proc.poll() is None, read_logs(run_dir.parent)
        if metrics.exists() and f'"step": {step},' in metrics.read_text():
            return
        time.sleep(0.1)
    raise AssertionError(f"step {step} not reached\n{read_logs(run_dir.parent)}")


def read_logs(tmp_path: Path) -> str:
    return (tmp_path / "out.txt").read_text()[-3000:] + (tmp_path / "err.txt").read_text()[-3000:]


def kill_all(processes: list[psutil.Process]) -> None:
    for p in alive(processes):
        with _gone_ok():
            p.kill()


@pytest.mark.slow
@pytest.mark.multiproc
def test_a_dead_rank_stops_the_job_within_10_s_naming_it(tmp_path):
    proc = deepspeed_job(tmp_path)
    try:
        wait_for_step(proc, tmp_path / "run", 3)
        processes = job_processes(proc)
        victim = rank_process(proc, 1)
        victim.kill()
        took = seconds_until_all_gone(proc, processes, limit=60)
    finally:
        kill_all(job_processes(proc))
    err, log = (tmp_path / "err.txt").read_text(), read_logs(tmp_path)
    print(f"dead rank: all processes gone {took:.1f} s after SIGKILL")
    assert took <= 10, log
    assert proc.returncode != 0
    assert err.count(f"error: rank 1 (host {os.uname().nodename}, pid {victim.pid}) died") == 1
    assert named_step(err) >= 2 and "Traceback" not in err, err  # step 3 logged: lockstep


def named_step(err: str) -> int:
    """The step in the watchdog's message: `... after finishing step N ...`."""
    return int(re.search(r"after finishing step (\d+)", err).group(1))


@pytest.mark.slow
@pytest.mark.multiproc
def test_a_slow_save_passes_and_a_frozen_rank_stops_the_job(tmp_path):
    """Rank 1's first checkpoint save takes 2 x --hang-timeout (a hook in sitecustomize,
    test-only): the job goes on. Then SIGSTOP rank 1: every process is gone within
    --hang-timeout + 30 s (the stopped rank ignores the launcher's SIGTERM: killed)."""
    hang = 8
    hooks = tmp_path / "hooks"
    hooks.mkdir()
    (hooks / "sitecustomize.py").write_text(
        "import os, sys, time\n"
        "if os.environ.get('RANK') == '1' and sys.argv[0].endswith('train.py'):\n"
        "    import dstrain.checkpoints as c\n"
        "    save, slept = c.save_run_checkpoint, []\n"
        "    def slow_save(*args, **kwargs):\n"
        "        if not slept:\n"
        f"            time.sleep({2 * hang}); slept.append(1)\n"
        "            print('slow save hook: slept', file=sys.stderr, flush=True)\n"
        "        return save(*args, **kwargs)\n"
        "    c.save_run_checkpoint = slow_save\n"
    )
    proc = deepspeed_job(
        tmp_path, "--hang-timeout", str(hang), "--save-every", "2", PYTHONPATH=str(hooks)
    )
    try:
        wait_for_step(proc, tmp_path / "run", 5)
        assert "slow save hook: slept" in (tmp_path / "err.txt").read_text()
        processes = job_processes(proc)
        victim = rank_process(proc, 1)
        victim.suspend()  # SIGSTOP
        took = seconds_until_all_gone(proc, processes, limit=hang + 60)
    finally:
        kill_all(job_processes(proc))
    err, log = (tmp_path / "err.txt").read_text(), read_logs(tmp_path)
    print(f"frozen rank: all processes gone {took:.1f} s after SIGSTOP (--hang-timeout {hang})")
    assert took <= hang + 30, log
    assert proc.returncode != 0
    assert err.count(f"error: rank 1 (host {os.uname().nodename}, pid {victim.pid})") == 1, err
    assert "stopped responding after finishing step" in err and "Traceback" not in err, err
    assert named_step(err) >= 4, err  # rank 0 logged step 5: rank 1 was in it (lockstep)


@pytest.mark.slow
@pytest.mark.multiproc
def test_the_parents_death_takes_launcher_and_ranks_down(tmp_path):
    proc = start_job(
        tmp_path,
        [
            sys.executable,
            "-m",
            "dstrain",
            "train",
            "--num-gpus",
            "2",
            "--max-steps",
            "100000",
            "--output-dir",
            str(tmp_path / "run"),
            "--no-progress",
        ],
    )
    processes: list[psutil.Process] = []
    try:
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:  # both ranks watch (a 2nd thread: the watch)
            assert proc.poll() is None, read_logs(tmp_path)
            with _gone_ok():
                ranks = [rank_process(proc, 0), rank_process(proc, 1)]
                if all(p.num_threads() >= 2 for p in ranks):
                    break
            time.sleep(0.1)
        processes = job_processes(proc)
        assert len(processes) >= 4, processes  # dstrain, the launcher(s) and two ranks
        proc.kill()  # SIGKILL the `dstrain train` parent
        took = seconds_until_all_gone(proc, processes, limit=30)
        left = alive(processes)
    finally:
        kill_all(job_processes(proc))
        kill_all(processes)
    print(f"parent SIGKILL: all {len(processes)} processes gone after {took:.1f} s")
    assert not left and took <= 5, [p.cmdline() for p in left]
    assert "the `dstrain train` process that launched this job" in read_logs(tmp_path)
