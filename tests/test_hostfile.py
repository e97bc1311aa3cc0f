"""Hostfiles: DeepSpeed's rules with line-numbered errors, and generation from SLURM / PBS."""

from __future__ import annotations

from pathlib import Path

import pytest
from click.testing import CliRunner

from dstrain.cli import cli
from dstrain.errors import DstrainError
from dstrain.hostfile import (
    HostEntry,
    expand_slurm_nodelist,
    format_hostfile,
    hostfile_from_pbs,
    hostfile_from_pbs_text,
    hostfile_from_slurm,
    hostfile_world_size,
    parse_hostfile,
    parse_hostfile_text,
    world_size_from_hostfile,
)

REPO = Path(__file__).resolve().parent.parent
SHIPPED = sorted((REPO / "hostfiles").iterdir())


def test_comments_blank_lines_and_order():
    text = "# two nodes\n\n  gpu01 slots=4   # the first\ngpu02 slots=2\n\n"
    assert parse_hostfile_text(text) == [HostEntry("gpu01", 4, 3), HostEntry("gpu02", 2, 4)]


@pytest.mark.parametrize(
    ("line", "explained"),
    [
        ("gpu01", "bare host name"),
        ("gpu01:4", "write `gpu01 slots=4`"),
        ("gpu01 slots = 4", "no spaces around `=`"),
        ("a;rm -rf / slots=1", "not a valid host name"),
        ("a;rm -rf /", "not a hostfile entry"),
        ("gpu01 slots=0", "at least 1"),
        ("gpu01 slots=four", "whole number"),
        ("-oProxyCommand=x slots=1", "not a valid host name"),
    ],
)
def test_each_bad_line_is_named_with_the_accepted_form(line, explained):
    with pytest.raises(DstrainError) as info:
        parse_hostfile_text(f"# header\nok slots=1\n{line}\n", "hosts")
    message = str(info.value)
    assert f"hosts:3: `{line}`" in message
    assert explained in message
    assert "HOST slots=N" in message


def test_duplicate_host_names_both_lines():
    with pytest.raises(
        DstrainError, match=r"hosts:3: host `a` is listed again \(first on line 1\)"
    ):
        parse_hostfile_text("a slots=1\nb slots=1\na slots=2\n", "hosts")


def test_every_bad_line_is_reported_at_once(tmp_path):
    path = tmp_path / "hosts"
    path.write_text("gpu01\nok slots=2\ngpu02:4\nx slots = 4\nok slots=1\nz slots=0\n")
    with pytest.raises(DstrainError) as info:
        parse_hostfile(path)
    message = str(info.value)
    for number in (1, 3, 4, 5, 6):
        assert f"{path}:{number}:" in message
    assert f"{path}:2:" not in message


def test_empty_and_missing_files(tmp_path):
    (tmp_path / "empty").write_text("# nothing\n\n")
    with pytest.raises(DstrainError, match="no hosts found"):
        parse_hostfile(tmp_path / "empty")
    with pytest.raises(DstrainError, match="does not exist"):
        parse_hostfile(tmp_path / "missing")


@pytest.mark.parametrize("path", SHIPPED, ids=lambda p: p.name)
def test_shipped_hostfiles_are_valid(path):
    assert world_size_from_hostfile(path) >= 1


def test_world_size_is_the_sum_of_slots(tmp_path):
    entries = parse_hostfile_text("gpu01 slots=4\ngpu02 slots=2\n")
    assert hostfile_world_size(entries) == 6
    assert hostfile_world_size([]) == 0
    path = tmp_path / "hosts"
    path.write_text("gpu01 slots=4\ngpu02 slots=2\n")
    assert world_size_from_hostfile(path) == 6


def test_localhost_example_has_two_slots():
    assert parse_hostfile(REPO / "hostfiles" / "localhost") == [HostEntry("localhost", 2, 17)]


# -- SLURM -------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("nodelist", "hosts"),
    [
        ("gpu[01-04,07]", ["gpu01", "gpu02", "gpu03", "gpu04", "gpu07"]),
        ("a[1-2],b3", ["a1", "a2", "b3"]),
        ("node7", ["node7"]),
        ("n[8-10]", ["n8", "n9", "n10"]),
        ("n[098-101]", ["n098", "n099", "n100", "n101"]),
        ("r[1-2]-n[01-02]", ["r1-n01", "r1-n02", "r2-n01", "r2-n02"]),
        ("x1.cluster,y[3,5].cluster", ["x1.cluster", "y3.cluster", "y5.cluster"]),
        (" c[1] ", ["c1"]),
    ],
)
def test_slurm_nodelist_expansion(nodelist, hosts):
    assert expand_slurm_nodelist(nodelist) == hosts


@pytest.mark.parametrize(
    ("nodelist", "error"),
    [
        ("", "empty"),
        ("a[1-", "unclosed"),
        ("a1]", "unmatched"),
        ("a[[1]]", "nested"),
        ("a[3-1]", "backwards"),
        ("a[x]", "neither a number nor a range"),
        ("a,,b", "empty entry"),
    ],
)
def test_slurm_nodelist_errors(nodelist, error):
    with pytest.raises(DstrainError, match=error):
        expand_slurm_nodelist(nodelist)


def test_slurm_hosts_are_checked_like_a_hostfile():
    assert hostfile_from_slurm("gpu[01-02]", 4) == [
        HostEntry("gpu01", 4, 1),
        HostEntry("gpu02", 4, 2),
    ]
    with pytest.raises(DstrainError, match=r"`a1;rm` is not a valid host name"):
        hostfile_from_slurm("a[1-2];rm", 1)
    with pytest.raises(DstrainError, match="appears twice"):
        hostfile_from_slurm("a1,a[1-2]", 1)


# -- PBS ---------------------------------------------------------------------------------


def test_pbs_nodefile_counts_lines_as_slots_in_first_seen_order(tmp_path):
    text = "n2.hpc\nn2.hpc\nn1.hpc\nn2.hpc\n\nn1.hpc\n"
    assert hostfile_from_pbs_text(text) == [HostEntry("n2.hpc", 3, 1), HostEntry("n1.hpc", 2, 2)]
    assert hostfile_from_pbs_text(text, slots=4) == [
        HostEntry("n2.hpc", 4, 1),
        HostEntry("n1.hpc", 4, 2),
    ]
    with pytest.raises(DstrainError, match="lists no hosts"):
        hostfile_from_pbs_text("\n\n")
    with pytest.raises(DstrainError, match="cannot read the PBS node file"):
        hostfile_from_pbs(tmp_path / "missing")


def test_format_round_trips_through_the_parser():
    entries = [HostEntry("gpu01", 4, 3), HostEntry("gpu02", 8, 4)]
    text = format_hostfile(entries, comment="made by a test\nsecond line")
    assert text == "# made by a test\n# second line\ngpu01 slots=4\ngpu02 slots=8\n"
    assert parse_hostfile_text(text) == entries


# -- dstrain hostfile --------------------------------------------------------------------


def test_cli_from_slurm_writes_a_valid_hostfile(tmp_path):
    env = {"SLURM_JOB_NODELIST": "gpu[01-02,07]", "SLURM_GPUS_ON_NODE": "4"}
    out = tmp_path / "hostfile"
    result = CliRunner().invoke(cli, ["hostfile", "--from-slurm", "-o", str(out)], env=env)
    assert result.exit_code == 0, result.output
    assert [(e.host, e.slots) for e in parse_hostfile(out)] == [
        ("gpu01", 4),
        ("gpu02", 4),
        ("gpu07", 4),
    ]
    assert "world size 12" in result.output
    printed = CliRunner().invoke(cli, ["hostfile", "--from-slurm", "--slots", "2"], env=env)
    assert printed.output.endswith("gpu01 slots=2\ngpu02 slots=2\ngpu07 slots=2\n")


def test_cli_from_slurm_needs_slots_without_gpus():
    env = {"SLURM_JOB_NODELIST": "gpu01", "SLURM_GPUS_ON_NODE": None}
    result = CliRunner().invoke(cli, ["hostfile", "--from-slurm"], env=env)
    assert result.exit_code == 1
    assert "--slots" in str(result.exception)


def test_cli_from_pbs(tmp_path):
    nodefile = tmp_path / "nodes"
    nodefile.write_text("n1\nn1\nn2\nn2\n")
    result = CliRunner().invoke(
        cli, ["hostfile", "--from-pbs"], env={"PBS_NODEFILE": str(nodefile)}
    )
    assert result.exit_code == 0, result.output
    assert result.output.endswith("n1 slots=2\nn2 slots=2\n")
    assert result.output.startswith("# dstrain hostfile --from-pbs")


def test_cli_check_and_usage(tmp_path):
    runner = CliRunner()
    ok = runner.invoke(cli, ["hostfile", "--check", str(REPO / "hostfiles" / "localhost")])
    assert ok.exit_code == 0 and "world size 2" in ok.output
    bad = tmp_path / "bad"
    bad.write_text("a;rm -rf / slots=1\n")
    failed = runner.invoke(cli, ["hostfile", "--check", str(bad)])
    assert failed.exit_code == 1 and f"{bad}:1:" in str(failed.exception)
    assert runner.invoke(cli, ["hostfile"]).exit_code == 2
    assert runner.invoke(cli, ["hostfile", "--from-slurm", "--from-pbs"]).exit_code == 2


# -- DeepSpeed's own parser agrees -------------------------------------------------------


@pytest.mark.slow
def test_deepspeed_accepts_what_we_accept_and_write():
    from deepspeed.launcher.runner import _parse_hostfile

    for path in SHIPPED:
        ours = {e.host: e.slots for e in parse_hostfile(path)}
        assert dict(_parse_hostfile(path.read_text().splitlines(keepends=True))) == ours
    written = format_hostfile(hostfile_from_slurm("gpu[01-03]", 4), comment="x")
    assert dict(_parse_hostfile(written.splitlines(keepends=True))) == {
        "gpu01": 4,
        "gpu02": 4,
        "gpu03": 4,
    }


@pytest.mark.parametrize(
    "nodelist", ["gpu[1-99999999]", "a[1-999],b[1-999]x[1-999]", "n[0-99999],m[0-9]"]
)
def test_a_node_list_that_expands_past_any_cluster_is_refused_at_once(nodelist):
    # Expanding gpu[1-99999999] would build 10^8 names (minutes, gigabytes) before any check.
    with pytest.raises(DstrainError, match="more than 100,000 hosts"):
        expand_slurm_nodelist(nodelist)
    assert len(expand_slurm_nodelist("n[1-50000],m[1-50000]")) == 100_000


@pytest.mark.parametrize("slots", ["1025", "1000000000", "9223372036854775807", "9" * 5000])
def test_absurd_slots_are_refused_not_launched(slots):
    # DeepSpeed starts one process per slot; 5000 digits also used to raise int()'s
    # ValueError (a traceback).
    with pytest.raises(DstrainError, match="slots must be at most 1024"):
        parse_hostfile_text(f"h1 slots={slots}\n", "hf")
    with pytest.raises(DstrainError, match="slots must be at most 1024"):
        hostfile_from_slurm("n[1-2]", 1025)
    assert parse_hostfile_text("h1 slots=0001024\n", "hf")[0].slots == 1024
