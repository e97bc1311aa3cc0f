"""DeepSpeed hostfiles: parse and check them with the launcher's rules, but stricter.

Pure layer (L0). DeepSpeed's launcher reads one `HOST slots=N` entry per line, skips blank
lines and lines starting with `#`, and refuses duplicate hosts. It also accepts things that
later break (`slots=0`, trailing junk after the number) and rejects common scheduler
spellings (`host:4`, `slots = 4`, a bare host name) with a terse message. Here every bad
line is reported at once, with its line number and the accepted form, and host names are
limited to characters a host name can hold, so nothing odd ever reaches pdsh or ssh.
"""

from __future__ import annotations

import re
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

from dstrain.errors import DstrainError

ACCEPTED_FORM = "HOST slots=N   (e.g. `gpu01 slots=4`; N >= 1; `#` starts a comment)"

MAX_SLOTS = 1024
"""Most ranks one host may run: nodes hold up to a few dozen GPUs; DeepSpeed's launcher
starts one process per slot, so `slots=1000000000` (a typo) would try to start that many."""

_HOST = r"[A-Za-z0-9](?:[A-Za-z0-9._-]*[A-Za-z0-9])?"
_ENTRY = re.compile(rf"^(?P<host>{_HOST})\s+slots=(?P<slots>\d+)$")


@dataclass(frozen=True)
class HostEntry:
    """One host of a hostfile and the number of ranks (GPUs) it runs."""

    host: str
    slots: int
    line: int


def _explain(text: str) -> str:
    """Say what is wrong with a hostfile line that did not match `HOST slots=N`."""
    if re.fullmatch(rf"{_HOST}", text):
        return "a bare host name has no slot count"
    if m := re.fullmatch(rf"({_HOST}):(\d+)", text):
        return f"`host:N` is not DeepSpeed's form; write `{m[1]} slots={m[2]}`"
    if m := re.fullmatch(rf"({_HOST})\s+slots\s*=\s*(\d+)", text):
        return f"no spaces around `=`; write `{m[1]} slots={m[2]}`"
    if m := re.fullmatch(r"(.+?)\s+slots=(\S*)", text):
        if not re.fullmatch(_HOST, m[1]):
            return f"`{m[1]}` is not a valid host name (letters, digits, `.`, `-`, `_` only)"
        return f"the slot count `{m[2]}` must be a whole number"
    return "not a hostfile entry"


def parse_hostfile_text(text: str, source: str = "<hostfile>") -> list[HostEntry]:
    """Parse hostfile text; raise one `DstrainError` listing every bad line."""
    entries: list[HostEntry] = []
    problems: list[str] = []
    first_line: dict[str, int] = {}
    for number, raw in enumerate(text.splitlines(), start=1):
        body = raw.split("#", 1)[0].strip()
        if not body:
            continue
        match = _ENTRY.match(body)
        if match is None:
            problems.append(f"{source}:{number}: `{body}`: {_explain(body)}")
            continue
        # over 4300 digits int() raises ValueError; anything that long is past MAX_SLOTS
        digits = match["slots"].lstrip("0") or "0"
        host, slots = match["host"], int(digits[:6])
        if slots < 1:
            problems.append(f"{source}:{number}: `{body}`: slots must be at least 1")
        elif slots > MAX_SLOTS or len(digits) > 6:
            problems.append(
                f"{source}:{number}: `{body[:80]}`: slots must be at most {MAX_SLOTS} (one "
                "process per slot is started on the host)"
            )
        elif host in first_line:
            problems.append(
                f"{source}:{number}: host `{host}` is listed again (first on line "
                f"{first_line[host]}); DeepSpeed refuses duplicate hosts: merge them into "
                "one line with the total slots"
            )
        else:
            first_line[host] = number
            entries.append(HostEntry(host, slots, number))
    if not entries and not problems:
        problems.append(f"{source}: no hosts found (the file is empty or only comments)")
    if problems:
        raise DstrainError(
            "invalid hostfile:\n  "
            + "\n  ".join(problems)
            + f"\nEach line must read: {ACCEPTED_FORM}."
        )
    return entries


def parse_hostfile(path: str | Path) -> list[HostEntry]:
    """Read and parse a DeepSpeed hostfile, naming the file in every error."""
    from dstrain.inputs import read_text_file

    path = Path(path)
    if not path.exists() and not path.is_symlink():
        raise DstrainError(
            f"hostfile {path} does not exist; pass the path of a file with one "
            f"`{ACCEPTED_FORM}` line per node (see hostfiles/ for examples)"
        )
    # A FIFO or device is refused unopened (`dstrain.inputs`), a file over 16 MiB unread.
    text = read_text_file(path, "hostfile")
    return parse_hostfile_text(text, str(path))


def hostfile_world_size(entries: Iterable[HostEntry]) -> int:
    """Total ranks these hostfile entries launch: the sum of their slots (the one place
    it is summed: `validate`, `estimate`, `launch`, `hostfile` and `doctor` all ask here)."""
    return sum(entry.slots for entry in entries)


def world_size_from_hostfile(path: str | Path) -> int:
    """Total ranks the hostfile at `path` launches."""
    return hostfile_world_size(parse_hostfile(path))


def format_hostfile(entries: list[HostEntry], *, comment: str = "") -> str:
    """Render entries as DeepSpeed hostfile text, one `HOST slots=N` line each.

    `comment` (may span lines) goes on top as `#` lines; DeepSpeed skips them.
    """
    lines = [f"# {line}".rstrip() for line in comment.splitlines()]
    lines += [f"{entry.host} slots={entry.slots}" for entry in entries]
    return "\n".join(lines) + "\n"


def _checked_entries(hosts: list[tuple[str, int]], source: str) -> list[HostEntry]:
    """Entries for generated (host, slots) pairs, held to the rules a hostfile line obeys.

    `line` is the entry's line in the `format_hostfile` output without a comment.
    """
    problems: list[str] = []
    seen: set[str] = set()
    for host, slots in hosts:
        if not re.fullmatch(_HOST, host):
            problems.append(
                f"`{host}` is not a valid host name (letters, digits, `.`, `-`, `_` only)"
            )
        elif host in seen:
            problems.append(f"host `{host}` appears twice")
        seen.add(host)
        if slots < 1:
            problems.append(f"`{host}` would get slots={slots}; slots must be at least 1")
        elif slots > MAX_SLOTS:
            problems.append(f"`{host}` would get slots={slots}; slots must be at most {MAX_SLOTS}")
    if problems:
        raise DstrainError(f"cannot make a hostfile from {source}:\n  " + "\n  ".join(problems))
    return [HostEntry(host, slots, i) for i, (host, slots) in enumerate(hosts, start=1)]


# --------------------------------------------------------------------------------------
# Schedulers: SLURM node lists and PBS node files -> hostfile entries
# --------------------------------------------------------------------------------------

_RANGE = re.compile(r"^(\d+)(?:-(\d+))?$")

MAX_HOSTS = 100_000
"""More nodes than any machine has (the largest hold ~10,000): a node list that expands
past this is a typo (`gpu[1-99999999]`), refused before anything is built."""


def _too_many(where: str, what: str) -> DstrainError:
    return DstrainError(
        f"{where}: {what} expands to more than {MAX_HOSTS:,} hosts, more than any cluster "
        "has; check the node list"
    )


def _expand_brackets(body: str, where: str) -> list[str]:
    """`0[1-3]` inside one range set -> the numbers as strings, zero-padding kept."""
    numbers: list[str] = []
    for part in body.split(","):
        match = _RANGE.match(part.strip())
        if match is None:
            raise DstrainError(
                f"{where}: `[{body}]` holds `{part}`, which is neither a number nor a range "
                "like `01-04`"
            )
        low, high = match[1], match[2]
        if high is None:
            numbers.append(low)
            continue
        if int(high) < int(low):
            raise DstrainError(f"{where}: the range `{part}` runs backwards")
        if int(high) - int(low) + len(numbers) >= MAX_HOSTS:
            raise _too_many(where, f"`[{body}]`")
        width = len(low)  # SLURM keeps the lower bound's width: 01-10 -> 01 ... 10
        numbers += [str(n).zfill(width) for n in range(int(low), int(high) + 1)]
    return numbers


def _split_top_level(nodelist: str, where: str) -> list[str]:
    """Split a SLURM node list on the commas that are not inside brackets."""
    items, depth, start = [], 0, 0
    for i, char in enumerate(nodelist):
        if char == "[":
            depth += 1
            if depth > 1:
                raise DstrainError(f"{where}: nested `[` at character {i + 1} of `{nodelist}`")
        elif char == "]":
            depth -= 1
            if depth < 0:
                raise DstrainError(f"{where}: unmatched `]` at character {i + 1} of `{nodelist}`")
        elif char == "," and depth == 0:
            items.append(nodelist[start:i])
            start = i + 1
    if depth:
        raise DstrainError(f"{where}: unclosed `[` in `{nodelist}`")
    items.append(nodelist[start:])
    return items


def expand_slurm_nodelist(nodelist: str, where: str = "SLURM_JOB_NODELIST") -> list[str]:
    """Expand SLURM's compressed host list: `gpu[01-04,07]` -> gpu01 gpu02 gpu03 gpu04 gpu07.

    Handles several items (`a[1-2],b3`), several ranges in one name (`r[1-2]n[1-2]`, the
    product in SLURM's order) and keeps zero-padding. `where` names the source in errors.
    """
    nodelist = nodelist.strip()
    if not nodelist:
        raise DstrainError(f"{where} is empty: is this running inside a SLURM allocation?")
    hosts: list[str] = []
    for item in _split_top_level(nodelist, where):
        if not item:
            raise DstrainError(f"{where}: empty entry in `{nodelist}` (two commas in a row?)")
        names = [""]
        for text, body in re.findall(r"([^\[]*)(?:\[([^\]]*)\])?", item):
            numbers = _expand_brackets(body, where) if body else [""]
            if len(names) * len(numbers) + len(hosts) > MAX_HOSTS:
                raise _too_many(where, f"`{nodelist[:200]}`")
            names = [name + text + number for name in names for number in numbers]
        hosts += names
    return hosts


def hostfile_from_slurm(
    nodelist: str, slots: int, where: str = "SLURM_JOB_NODELIST"
) -> list[HostEntry]:
    """Entries for every node of a SLURM node list, `slots` ranks each."""
    hosts = expand_slurm_nodelist(nodelist, where)
    return _checked_entries([(host, slots) for host in hosts], f"{where}={nodelist}")


def hostfile_from_pbs_text(
    text: str, source: str = "PBS_NODEFILE", slots: int | None = None
) -> list[HostEntry]:
    """Entries from a PBS node file: one line per slot, so a host's count is its slots.

    Hosts keep the order of their first line. `slots` overrides the counts (PBS repeats a
    host once per MPI process or CPU, which need not be its GPU count).
    """
    counts: dict[str, int] = {}
    for raw in text.splitlines():
        host = raw.strip()
        if host:
            counts[host] = counts.get(host, 0) + 1
    if not counts:
        raise DstrainError(f"{source} lists no hosts: is this running inside a PBS job?")
    return _checked_entries(
        [(host, slots if slots is not None else count) for host, count in counts.items()], source
    )


def hostfile_from_pbs(path: str | Path, slots: int | None = None) -> list[HostEntry]:
    """Read a PBS node file (`$PBS_NODEFILE`) into entries; see `hostfile_from_pbs_text`."""
    from dstrain.inputs import InputError, read_text_file

    try:  # bounded, regular files only (`dstrain.inputs`)
        text = read_text_file(path, "PBS node file")
    except InputError as exc:
        why = str(exc).removeprefix(f"PBS node file {path}").lstrip(": ")
        raise DstrainError(f"cannot read the PBS node file {path}: {why}") from None
    return hostfile_from_pbs_text(text, str(path), slots)
