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
from dataclasses import dataclass
from pathlib import Path

from dstrain.errors import DstrainError

ACCEPTED_FORM = "HOST slots=N   (e.g. `gpu01 slots=4`; N >= 1; `#` starts a comment)"

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
        host, slots = match["host"], int(match["slots"])
        if slots < 1:
            problems.append(f"{source}:{number}: `{body}`: slots must be at least 1")
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
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise DstrainError(
            f"hostfile {path} does not exist; pass the path of a file with one "
            f"`{ACCEPTED_FORM}` line per node (see hostfiles/ for examples)"
        ) from None
    except (UnicodeDecodeError, IsADirectoryError, PermissionError) as exc:
        raise DstrainError(f"cannot read hostfile {path}: {exc}") from None
    return parse_hostfile_text(text, str(path))


def world_size_from_hostfile(path: str | Path) -> int:
    """Total ranks a hostfile launches: the sum of its slots."""
    return sum(entry.slots for entry in parse_hostfile(path))
