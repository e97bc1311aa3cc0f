"""Reading the files a user hands dstrain, with every bound checked before it can hurt.

Pure layer (L0): the standard library only. Each reader refuses, with one `InputError`
paragraph naming the file (and line/column or JSON path where there is one):

- anything that is not a regular file: a FIFO would block `open` forever, `/dev/zero` never
  ends, a directory cannot be read. The file is opened with O_NONBLOCK and checked with
  fstat on the open descriptor, so nothing swapped in between a stat and the open blocks;
- files over a size bound (a DeepSpeed config or a settings file is a few KiB);
- bytes that are not strict UTF-8, with the line and column of the first bad byte;
- JSON/TOML nested deeper than `MAX_DEPTH` (Python's parsers recurse and raise
  RecursionError near 1000 levels; everything that walks the result recurses too);
- integers outside int64 (Python refuses to parse more than 4300 digits with a bare
  ValueError; DeepSpeed and torch store counts as int64 anyway), NaN and ±Infinity
  (json accepts them as an extension, `1e999` reads as inf; they pass every `>= 0` rule),
  lone surrogates (`"\\ud800"` decodes to a str that cannot be printed or written as
  UTF-8), NUL characters (no path or name can hold one), and TOML dates and times (no
  setting takes one; json cannot write them).
"""

from __future__ import annotations

import datetime
import json
import math
import os
import re
import stat
from collections.abc import Callable
from pathlib import Path
from typing import Any

from dstrain.errors import DstrainError

MAX_DEPTH = 64
"""Deepest nesting accepted in a JSON/TOML input. dstrain's settings are 4 levels deep and
DeepSpeed's deepest block (zero_optimization.offload_param) 3; 64 leaves room for any
hand-written config while staying far below Python's recursion limit (1000)."""

MAX_CONFIG_BYTES = 16 * 1024 * 1024
"""A DeepSpeed config, settings file or hostfile: real ones are under 100 KiB."""

MAX_INT = 2**63 - 1
"""Largest integer accepted in a config (int64: DeepSpeed and torch keep counts as int64)."""

_MAX_INT_DIGITS = 19  # len(str(MAX_INT)); longer digit strings are refused before int()


class InputError(DstrainError):
    """An input file dstrain cannot use; the message names the file and what is wrong.
    `syntax` is the JSON parser's own error when the text is malformed (else None)."""

    syntax: json.JSONDecodeError | None = None


def _kind(mode: int) -> str | None:
    """What a non-regular file is, in words (None for a regular file)."""
    if stat.S_ISREG(mode):
        return None
    if stat.S_ISDIR(mode):
        return "a directory"
    if stat.S_ISFIFO(mode):
        return "a FIFO (named pipe)"
    if stat.S_ISCHR(mode) or stat.S_ISBLK(mode):
        return "a device"
    if stat.S_ISSOCK(mode):
        return "a socket"
    return "not a regular file"


def check_regular_file(path: str | Path, what: str) -> None:
    """Refuse a path that is missing or is not a regular file, without opening it."""
    try:
        mode = os.stat(path).st_mode
    except FileNotFoundError:
        raise InputError(f"{what} {path} does not exist; check the path") from None
    except OSError as exc:
        raise InputError(f"cannot read {what} {path}: {exc.strerror or exc}") from None
    kind = _kind(mode)
    if kind is not None:
        raise InputError(
            f"{what} {path} is {kind}, not a regular file; dstrain reads only regular files "
            "here (a pipe or device could block or never end). Save it to a file and pass that"
        )


def read_regular_bytes(path: str | Path, what: str, max_bytes: int = MAX_CONFIG_BYTES) -> bytes:
    """The bytes of a regular file of at most `max_bytes`, or an `InputError`."""
    try:
        # O_NONBLOCK: opening a FIFO for reading would otherwise wait for a writer forever.
        fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | getattr(os, "O_CLOEXEC", 0))
    except FileNotFoundError:
        raise InputError(f"{what} {path} does not exist; check the path") from None
    except IsADirectoryError:
        raise InputError(f"{what} {path} is a directory; pass a file") from None
    except OSError as exc:
        raise InputError(f"cannot read {what} {path}: {exc.strerror or exc}") from None
    try:
        info = os.fstat(fd)
        kind = _kind(info.st_mode)
        if kind is not None:
            raise InputError(
                f"{what} {path} is {kind}, not a regular file; dstrain reads only regular "
                "files here (a pipe or device could block or never end). Save it to a file "
                "and pass that"
            )
        if info.st_size > max_bytes:
            raise InputError(_too_big(path, what, info.st_size, max_bytes))
        os.set_blocking(fd, True)
        with os.fdopen(fd, "rb", closefd=True) as handle:
            fd = -1
            data = handle.read(max_bytes + 1)  # a file growing while read stops here too
    except OSError as exc:
        raise InputError(f"cannot read {what} {path}: {exc.strerror or exc}") from None
    finally:
        if fd >= 0:
            os.close(fd)
    if len(data) > max_bytes:
        raise InputError(_too_big(path, what, len(data), max_bytes))
    return data


def _too_big(path: str | Path, what: str, size: int, max_bytes: int) -> str:
    return (
        f"{what} {path} is {size:,} bytes or more; dstrain reads at most {max_bytes:,} "
        "here (real ones are a few KiB). Is it the right file?"
    )


def line_column(text: str, offset: int) -> tuple[int, int]:
    """1-based line and column of a character offset."""
    line = text.count("\n", 0, offset) + 1
    return line, offset - (text.rfind("\n", 0, offset) + 1) + 1


def decode_utf8(data: bytes, source: str) -> str:
    """Strict UTF-8 (a BOM is dropped), naming line and column of the first bad byte."""
    if b"\x00" in data[:8192]:
        raise InputError(f"{source} is a binary file, not text")
    try:
        return data.decode("utf-8-sig")
    except UnicodeDecodeError as exc:
        good = data[: exc.start].decode("utf-8-sig", errors="replace")
        line, column = line_column(good, len(good))
        raise InputError(
            f"{source}: line {line}, column {column}: not UTF-8 text (byte "
            f"0x{data[exc.start]:02x} is invalid); save the file as UTF-8"
        ) from None


# JSON tokens outside strings: a string is skipped whole, so `"[[["` counts nothing.
_JSON_TOKENS = re.compile(
    r'"(?:[^"\\]|\\.)*"?|[\[{]|[\]}]|-?\d+(?:\.\d+)?(?:[eE][-+]?\d+)?'
    r"|NaN|-?Infinity"
)


def _json_locate(text: str, predicate: Callable[[str], bool]) -> str:
    """'line L, column C' of the first JSON token (outside strings) `predicate` accepts."""
    for match in _JSON_TOKENS.finditer(text):
        if predicate(match.group()):
            line, column = line_column(text, match.start())
            return f"line {line}, column {column}"
    return "somewhere"  # not reached for text json parsed


def _json_depth_problem(text: str) -> str | None:
    depth = 0
    for match in _JSON_TOKENS.finditer(text):
        token = match.group()
        if token in "[{":
            depth += 1
            if depth > MAX_DEPTH:
                line, column = line_column(text, match.start())
                return f"line {line}, column {column}"
        elif token in "]}":
            depth -= 1
    return None


class _Refused(Exception):
    def __init__(self, token: str):
        self.token = token


def _parse_int(token: str) -> int:
    if len(token.lstrip("-")) > _MAX_INT_DIGITS or abs(int(token)) > MAX_INT:
        raise _Refused(token)
    return int(token)


def _parse_float(token: str) -> float:
    value = float(token)
    if not math.isfinite(value):
        raise _Refused(token)
    return value


def _parse_constant(token: str) -> float:
    raise _Refused(token)


def parse_json(
    text: str,
    source: str,
    *,
    object_pairs_hook: Callable[[list[tuple[str, Any]]], Any] | None = None,
) -> Any:
    """Parse JSON text with the bounds above; errors name line and column."""
    where = _json_depth_problem(text)
    if where is not None:
        raise InputError(
            f"{source}: {where}: nested more than {MAX_DEPTH} levels deep; no config needs "
            "that (is it generated by mistake?)"
        )
    try:
        data = json.loads(
            text,
            object_pairs_hook=object_pairs_hook,
            parse_int=_parse_int,
            parse_float=_parse_float,
            parse_constant=_parse_constant,
        )
    except _Refused as exc:
        token = exc.token
        where = _json_locate(text, lambda t: t == token)
        if token.lstrip("-") in ("NaN", "Infinity") or "." in token or "e" in token.lower():
            raise InputError(
                f"{source}: {where}: {token} is not a finite number; NaN and Infinity are not "
                "JSON and pass no range check. Write a finite number"
            ) from None
        raise InputError(
            f"{source}: {where}: the integer {token[:30]}{'...' if len(token) > 30 else ''} "
            f"({len(token.lstrip('-'))} digits) is outside the 64-bit range dstrain accepts"
        ) from None
    except json.JSONDecodeError as exc:
        error = InputError(
            f"{source}: malformed JSON at line {exc.lineno}, column {exc.colno}: {exc.msg} "
            "(JSON allows no comments or trailing commas)"
        )
        error.syntax = exc
        raise error from None
    except RecursionError:  # guarded above; kept so no input can ever raise it
        raise InputError(f"{source}: nested too deeply to parse") from None
    check_values(data, source)
    return data


def parse_toml(text: str, source: str) -> dict[str, Any]:
    """Parse TOML text with the bounds above (Python 3.11+'s tomllib)."""
    try:
        import tomllib
    except ImportError:  # Python 3.10
        raise InputError(f"{source}: TOML needs Python 3.11 or newer; write JSON instead") from None
    try:
        data = tomllib.loads(text)
    except tomllib.TOMLDecodeError as exc:
        raise InputError(f"{source}: malformed TOML: {exc}") from None
    except RecursionError:
        raise InputError(
            f"{source}: nested more than {MAX_DEPTH} levels deep; no config needs that"
        ) from None
    except ValueError as exc:  # int() over 4300 digits inside tomllib
        raise InputError(f"{source}: a value TOML cannot read: {exc}") from None
    check_values(data, source)
    return data


def _join(path: str, key: object) -> str:
    if isinstance(key, int):
        return f"{path}[{key}]"
    return f"{path}.{key}" if path else str(key)


def check_values(data: Any, source: str) -> None:
    """Refuse what a parser let through: depth, NaN/±Infinity, huge integers, lone
    surrogates (in keys and values), dates and times. Iterative, so depth is no risk."""
    stack: list[tuple[Any, str, int]] = [(data, "", 0)]
    while stack:
        node, path, depth = stack.pop()
        where = f"{source}: {path}" if path else source
        if depth > MAX_DEPTH:
            raise InputError(
                f"{where}: nested more than {MAX_DEPTH} levels deep; no config needs that"
            )
        if isinstance(node, dict):
            for key, value in node.items():
                _check_string(str(key), f"{where} (a key)")
                stack.append((value, _join(path, key), depth + 1))
        elif isinstance(node, list):
            stack.extend((value, _join(path, i), depth + 1) for i, value in enumerate(node))
        elif isinstance(node, str):
            _check_string(node, where)
        elif isinstance(node, bool) or node is None:
            pass
        elif isinstance(node, int):
            if abs(node) > MAX_INT:
                raise InputError(
                    f"{where}: the integer is outside the 64-bit range dstrain accepts"
                )
        elif isinstance(node, float):
            if not math.isfinite(node):
                raise InputError(
                    f"{where}: {node} is not a finite number; NaN and Infinity pass no range "
                    "check. Write a finite number"
                )
        elif isinstance(node, datetime.date | datetime.time):
            raise InputError(
                f"{where}: a TOML date/time value ({node.isoformat()}); no setting takes one. "
                'Quote it if you meant a string ("...")'
            )


def _check_string(text: str, where: str) -> None:
    if "\x00" in text:  # os/open refuse it ("embedded null byte") once training starts
        raise InputError(
            f"{where}: a string holds a NUL character (\\u0000), which no name, path or "
            "setting may contain; remove it"
        )
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as exc:
        raise InputError(
            f"{where}: a string holds a lone surrogate (\\u{ord(text[exc.start]):04x}), which "
            "is no character and cannot be printed or saved as UTF-8; remove it"
        ) from None


def read_json_file(path: str | Path, what: str, max_bytes: int = MAX_CONFIG_BYTES) -> Any:
    """A bounded regular file, strictly decoded and parsed as JSON."""
    text = decode_utf8(read_regular_bytes(path, what, max_bytes), f"{what} {path}")
    if not text.strip():
        raise InputError(f"{what} {path} is empty")
    return parse_json(text, f"{what} {path}")


def read_text_file(path: str | Path, what: str, max_bytes: int = MAX_CONFIG_BYTES) -> str:
    """A bounded regular file, strictly decoded as UTF-8."""
    return decode_utf8(read_regular_bytes(path, what, max_bytes), f"{what} {path}")
