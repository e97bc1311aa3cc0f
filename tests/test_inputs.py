"""dstrain.inputs: bounded reading of the files users hand dstrain."""

from __future__ import annotations

import json
import os
import threading

import pytest

from dstrain.inputs import (
    MAX_DEPTH,
    InputError,
    check_values,
    decode_utf8,
    parse_json,
    parse_toml,
    read_json_file,
    read_regular_bytes,
)


def test_a_fifo_is_refused_without_blocking(tmp_path):
    fifo = tmp_path / "f"
    os.mkfifo(fifo)
    outcome: list[BaseException] = []

    def read() -> None:
        try:
            read_regular_bytes(fifo, "x")
        except InputError as exc:
            outcome.append(exc)

    # No writer ever opens the FIFO: a blocking open would never return.
    thread = threading.Thread(target=read, daemon=True)
    thread.start()
    thread.join(timeout=5)
    assert not thread.is_alive(), "reading a FIFO blocked"
    assert "FIFO" in str(outcome[0])


@pytest.mark.parametrize(
    "path, words", [("/dev/zero", "a device"), ("/dev/null", "a device"), ("/", "directory")]
)
def test_devices_and_directories_are_refused(path, words):
    with pytest.raises(InputError, match=words):
        read_regular_bytes(path, "config")


def test_size_bound_and_missing_file(tmp_path):
    big = tmp_path / "big.json"
    big.write_bytes(b" " * 101)
    with pytest.raises(InputError, match="101 bytes or more; dstrain reads at most 100"):
        read_regular_bytes(big, "config", max_bytes=100)
    assert read_regular_bytes(big, "config", max_bytes=101) == b" " * 101
    with pytest.raises(InputError, match="does not exist"):
        read_regular_bytes(tmp_path / "nope", "config")


def test_strict_utf8_names_line_and_column():
    with pytest.raises(InputError, match=r"line 2, column 4: not UTF-8 text \(byte 0xff"):
        decode_utf8(b'{\n"a\xc3\xa9\xff": 1}', "f.json")
    assert decode_utf8(b"\xef\xbb\xbf{}", "f.json") == "{}"  # a BOM is dropped


def test_nesting_bound_is_exact():
    ok = "[" * MAX_DEPTH + "]" * MAX_DEPTH
    assert json.loads(ok) == parse_json(ok, "f")
    deeper = "[" * (MAX_DEPTH + 1) + "]" * (MAX_DEPTH + 1)
    with pytest.raises(InputError, match=f"line 1, column {MAX_DEPTH + 1}: nested more than"):
        parse_json(deeper, "f")
    # brackets inside strings do not count
    assert parse_json('{"a": "' + "[" * 5000 + '"}', "f") == {"a": "[" * 5000}
    with pytest.raises(InputError, match="nested more than"):
        parse_json("[" * 100_000, "f")  # unclosed, no RecursionError


@pytest.mark.parametrize(
    "text, words",
    [
        ('{"a": NaN}', "line 1, column 7: NaN is not a finite number"),
        ('{"a": -Infinity}', "-Infinity is not a finite number"),
        ('{"a":\n 1e999}', "line 2, column 2: 1e999 is not a finite number"),
        ('{"a": ' + "9" * 5000 + "}", r"\(5000 digits\) is outside the 64-bit range"),
        ('{"a": 9223372036854775808}', "outside the 64-bit range"),
        ('{"a": "\\ud800"}', r"f: a: a string holds a lone surrogate \(\\ud800\)"),
        ('{"\\udfff": 1}', r"\(a key\): a string holds a lone surrogate"),
        # a NUL in a path reached `dstrain train` and died in os.makedirs with a traceback
        ('{"csv_monitor": {"output_path": "a\\u0000b"}}', r"csv_monitor.output_path: .*NUL"),
        ('{"a\\u0000": 1}', r"\(a key\): a string holds a NUL character"),
        ('{"a": 1,}', "malformed JSON at line 1, column 9"),
    ],
)
def test_json_refusals(text, words):
    with pytest.raises(InputError, match=words):
        parse_json(text, "f")


def test_json_keeps_int64_and_ordinary_values():
    data = parse_json('{"a": 9223372036854775807, "b": -1.5e300, "c": ["é"]}', "f")
    assert data == {"a": 2**63 - 1, "b": -1.5e300, "c": ["é"]}


@pytest.mark.parametrize(
    "text, words",
    [
        ("a = " + "[" * 1000 + "]" * 1000, "nested more than"),
        ("a" + ".a" * 200 + " = 1", "nested more than"),
        ("seed = " + "9" * 5000, "a value TOML cannot read|outside the 64-bit range"),
        ("when = 1979-05-27T07:32:00Z", "when: a TOML date/time value"),
        ("[t]\nd = 1979-05-27", "t.d: a TOML date/time value"),
        ("x = nan", "x: nan is not a finite number"),
        ('[nvme]\npath = "a\\u0000b"', "nvme.path: a string holds a NUL character"),
        ("x = ", "malformed TOML"),
    ],
)
def test_toml_refusals(text, words):
    with pytest.raises(InputError, match=words):
        parse_toml(text, "s.toml")


def test_check_values_walks_without_recursion():
    node: list = []
    for _ in range(10_000):  # deeper than Python's recursion limit
        node = [node]
    with pytest.raises(InputError, match="nested more than"):
        check_values(node, "x")


def test_read_json_file(tmp_path):
    path = tmp_path / "c.json"
    path.write_text('{"a": [1, 2]}')
    assert read_json_file(path, "config") == {"a": [1, 2]}
    path.write_text("  ")
    with pytest.raises(InputError, match="is empty"):
        read_json_file(path, "config")
