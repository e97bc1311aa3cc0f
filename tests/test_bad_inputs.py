"""Generated bad inputs for every command: no traceback, no hang, the right exit code.

The inputs are built by mutation: every leaf of a real DeepSpeed config and of a real
settings file replaced by each wrong type, deep nesting, huge integers, NaN/Infinity,
lone surrogates, invalid UTF-8, truncated and binary files, empty files, directories,
FIFOs, /dev/zero, missing paths and non-ASCII names, fed to validate, gen-config,
estimate, hostfile, launch --dry-run, prepare, report, train (refused before any engine
is built), export and convert-checkpoint. Most run in this process through
`dstrain.cli.main` (the console script's entry) under click's CliRunner, each under a
SIGALRM timeout; a sample runs as real `dstrain` processes with a subprocess timeout
(FIFOs among them: a FIFO that is opened blocks forever, so a hang fails the test).
"""

from __future__ import annotations

import copy
import json
import os
import random
import signal
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import pytest
from click.testing import CliRunner
from subprocs import through_main

REPO = Path(__file__).resolve().parent.parent
DSTRAIN = Path(sys.executable).parent / "dstrain"
CASE_TIMEOUT_S = 20  # one in-process case; the slowest fine case takes well under 2 s

BASE_DS = {
    "train_micro_batch_size_per_gpu": 4,
    "gradient_accumulation_steps": 1,
    "gradient_clipping": 1.0,
    "steps_per_print": 10,
    "fp16": {"enabled": True, "loss_scale": 0.0, "initial_scale_power": 16, "hysteresis": 2},
    "zero_optimization": {
        "stage": 3,
        "reduce_bucket_size": 500000000,
        "stage3_max_live_parameters": 1000000000,
        "offload_optimizer": {"device": "cpu", "pin_memory": True},
    },
    "optimizer": {
        "type": "AdamW",
        "params": {"lr": 5e-05, "betas": [0.9, 0.999], "eps": 1e-08, "weight_decay": 0.01},
    },
    "scheduler": {
        "type": "WarmupDecayLR",
        "params": {
            "warmup_min_lr": 0.0,
            "warmup_max_lr": 5e-05,
            "warmup_num_steps": 100,
            "warmup_type": "linear",
            "total_num_steps": 1000,
        },
    },
}
BASE_SETTINGS = {
    "precision": "fp16",
    "fp16": {"loss_scale_window": 500, "hysteresis": 2},
    "zero_optimization": {"stage": 2, "offload_optimizer": {"device": "cpu"}},
    "batch": {"train_micro_batch_size_per_gpu": 2, "gradient_accumulation_steps": 4},
    "optimizer": {"lr": 3e-4, "betas": [0.9, 0.95], "eps": 1e-8, "weight_decay": 0.1},
    "scheduler": {"type": "WarmupDecayLR", "warmup_num_steps": 10, "total_num_steps": 100},
    "gradient_clipping": 1.0,
}
# Each leaf is replaced by each of these, written as JSON text ("1e309" reads as inf).
LEAF_MUTATIONS = {
    "list": "[]",
    "object": "{}",
    "string": '"x"',
    "minus_one": "-1",
    "inf_literal": "1e309",
    "null": "null",
    "true": "true",
}
FASTA_OK = b">r1 gene\nATGGCTAAATTTGGGCCCTAA\n>r2\nATGAAACCCGGGTTTTAG\n"
HOSTFILE_OK = b"localhost slots=1\n"
METRICS_OK = (
    b'{"step": 1, "loss": 4.1, "lr": 1e-4, "tokens_per_s": 10.0}\n'
    b'{"step": 2, "loss": 3.9, "lr": 1e-4, "tokens_per_s": 11.0}\n'
)


@dataclass(frozen=True)
class Case:
    name: str
    argv: tuple[str, ...]
    expect: str  # "fail": exit code != 0; "ok": exit code 0; "any": either, cleanly
    stdin: bytes | None = None


class Hang(Exception):
    """A case ran past CASE_TIMEOUT_S."""


# --------------------------------------------------------------------------------------
# Building the inputs
# --------------------------------------------------------------------------------------


def leaf_paths(node, path=()):
    if isinstance(node, dict):
        for key, value in node.items():
            yield from leaf_paths(value, (*path, key))
    elif isinstance(node, list):
        for index, value in enumerate(node):
            yield from leaf_paths(value, (*path, index))
    else:
        yield path


def with_leaf(base, path, marker):
    data = copy.deepcopy(base)
    node = data
    for part in path[:-1]:
        node = node[part]
    node[path[-1]] = marker
    return data


def mutated_texts(base: dict) -> list[tuple[str, str]]:
    """(name, JSON text) for every leaf x every mutation (raw text, so 1e309 stays)."""
    out = []
    for path in leaf_paths(base):
        for name, raw in LEAF_MUTATIONS.items():
            text = json.dumps(with_leaf(base, path, "@@MUTANT@@")).replace('"@@MUTANT@@"', raw)
            out.append((f"{'.'.join(map(str, path))}={name}", text))
    return out


def structural_variants(base_text: str) -> list[tuple[str, bytes, str]]:
    """(name, bytes, expect) of broken JSON files; `expect` for validate and --settings."""
    deep = 1000
    rng = random.Random(11)
    data = base_text.encode()
    variants = [
        ("deep_objects_1000", ('{"a":' * deep + "1" + "}" * deep).encode(), "fail"),
        ("deep_lists_5000", ("[" * 5000 + "]" * 5000).encode(), "fail"),
        ("deep_in_value_900", ('{"optimizer": ' + "[" * 900 + "]" * 900 + "}").encode(), "fail"),
        ("deep_unclosed_100k", ("[" * 100_000).encode(), "fail"),
        ("huge_int_5000_digits", b'{"steps_per_print": ' + b"9" * 5000 + b"}", "fail"),
        ("int_beyond_int64", b'{"steps_per_print": 99999999999999999999}', "fail"),
        ("nan", b'{"gradient_clipping": NaN}', "fail"),
        ("infinity", b'{"gradient_clipping": Infinity}', "fail"),
        (
            "minus_infinity",
            b'{"optimizer": {"type": "AdamW", "params": {"lr": -Infinity}}}',
            "fail",
        ),
        ("exp_overflow", b'{"gradient_clipping": 1e999}', "fail"),
        ("surrogate_value", b'{"optimizer": {"type": "\\ud800"}}', "fail"),
        ("surrogate_key", b'{"\\udfff": 1}', "fail"),
        ("invalid_utf8", b'{"optimizer": {"type": "\xff\xfe"}}', "fail"),
        ("latin1", '{"x": "caf\xe9"}'.encode("latin-1"), "fail"),
        ("utf16", base_text.encode("utf-16"), "fail"),
        ("empty", b"", "fail"),
        ("whitespace", b"  \n\t\n", "fail"),
        ("top_level_list", b"[1, 2]", "fail"),
        ("top_level_string", b'"x"', "fail"),
        ("top_level_number", b"3", "fail"),
        ("trailing_comma", b'{"steps_per_print": 1,}', "fail"),
        ("comment", b'// hi\n{"steps_per_print": 1}', "fail"),
        ("nul_bytes", b"\x00" * 64, "fail"),
        ("bom_then_fine", b"\xef\xbb\xbf" + data, "any"),
    ]
    for cut in (1, 7, len(data) // 3, len(data) // 2, len(data) - 2):
        variants.append((f"truncated_at_{cut}", data[:cut], "fail"))
    for seed in range(4):
        garbage = bytes(rng.randrange(256) for _ in range(rng.randrange(1, 4000)))
        variants.append((f"garbage_{seed}", garbage, "fail"))
    return variants


def special_paths(tmp: Path) -> list[tuple[str, str]]:
    """(name, path) of inputs that are not regular files, or do not exist."""
    fifo = tmp / "a.fifo"
    if not fifo.exists():
        os.mkfifo(fifo)
    directory = tmp / "a_dir.json"
    directory.mkdir(exist_ok=True)
    return [
        ("fifo", str(fifo)),
        ("dev_zero", "/dev/zero"),
        ("dev_null", "/dev/null"),
        ("directory", str(directory)),
        ("missing", str(tmp / "missing" / "nope.json")),
        ("missing_unicode", str(tmp / "nö_ファイル.json")),
        ("empty_name_dir", str(tmp) + "/"),
    ]


def write(tmp: Path, name: str, data: bytes, suffix: str = ".json") -> str:
    path = tmp / f"{name}{suffix}"
    path.write_bytes(data)
    return str(path)


def build_cases(tmp: Path) -> list[Case]:
    cases: list[Case] = []
    base_text = json.dumps(BASE_DS, indent=2)
    ok_config = write(tmp, "base_ds", base_text.encode())
    ok_hostfile = write(tmp, "hostfile_ok", HOSTFILE_OK, "")
    ok_settings = write(tmp, "settings_ok", json.dumps(BASE_SETTINGS).encode())

    # Fine inputs, to prove the harness sees success (exit 0) where there is one.
    cases += [
        Case("validate/fine", ("validate", "--no-deepspeed", ok_config), "ok"),
        Case("gen-config/fine_settings", ("gen-config", "--settings", ok_settings), "ok"),
        Case("estimate/fine", ("estimate", "--model", "genslm_25M", "--json"), "ok"),
        Case("hostfile/fine", ("hostfile", "--check", ok_hostfile), "ok"),
        Case(
            "validate/unicode_name",
            ("validate", "--no-deepspeed", write(tmp, "ünïcødé ✓", base_text.encode())),
            "ok",
        ),
    ]

    # 1. Every leaf of a DeepSpeed config x every wrong value: validate (and estimate).
    for name, text in mutated_texts(BASE_DS):
        path = write(tmp, f"ds_{len(cases)}", text.encode())
        cases.append(Case(f"validate/leaf/{name}", ("validate", "--no-deepspeed", path), "any"))
    # a value dstrain must refuse at each numeric leaf, whatever else passes
    for name, text in mutated_texts(BASE_DS):
        if name.endswith(("=inf_literal", "=minus_one")) and not name.startswith(
            ("steps_per_print", "fp16.loss_scale=", "zero_optimization.stage=")
        ):
            path = write(tmp, f"dsn_{len(cases)}", text.encode())
            cases.append(
                Case(f"validate/refused/{name}", ("validate", "--no-deepspeed", path), "fail")
            )
    for name, text in mutated_texts(BASE_DS)[::5]:
        path = write(tmp, f"dse_{len(cases)}", text.encode())
        argv = ("estimate", "--model", "genslm_25M", "--deepspeed_config", path)
        cases.append(Case(f"estimate/leaf/{name}", argv, "any"))

    # 2. Every leaf of a settings file x every wrong value: gen-config --settings.
    for name, text in mutated_texts(BASE_SETTINGS):
        path = write(tmp, f"settings_{len(cases)}", text.encode())
        expect = "fail" if name.endswith(("=list", "=object", "=inf_literal")) else "any"
        cases.append(Case(f"gen-config/leaf/{name}", ("gen-config", "--settings", path), expect))

    # 3. Broken files for every command that reads JSON.
    for name, data, expect in structural_variants(base_text):
        path = write(tmp, f"broken_{name}", data)
        cases.append(Case(f"validate/{name}", ("validate", "--no-deepspeed", path), expect))
        cases.append(Case(f"gen-config/{name}", ("gen-config", "--settings", path), expect))
        argv = ("estimate", "--model", "genslm_25M", "--deepspeed_config", path)
        cases.append(Case(f"estimate/{name}", argv, expect))
        cases.append(Case(f"estimate-model/{name}", ("estimate", "--model", path), "fail"))
        argv = ("launch", "--dry-run", "--num-gpus", "1", "--", "--deepspeed_config", path)
        cases.append(Case(f"launch/{name}", argv, expect))
        if expect == "fail":
            cases.append(Case(f"stdin/{name}", ("validate", "--no-deepspeed", "-"), "fail", data))
    for name, path in special_paths(tmp):
        cases.append(Case(f"validate/{name}", ("validate", "--no-deepspeed", path), "fail"))
        cases.append(Case(f"gen-config/{name}", ("gen-config", "--settings", path), "fail"))
        argv = ("estimate", "--model", "genslm_25M", "--deepspeed_config", path)
        cases.append(Case(f"estimate/{name}", argv, "fail"))
        cases.append(Case(f"estimate-model/{name}", ("estimate", "--model", path), "fail"))
        cases.append(Case(f"hostfile/{name}", ("hostfile", "--check", path), "fail"))
        argv = ("estimate", "--model", "genslm_25M", "--hostfile", path)
        cases.append(Case(f"estimate-hostfile/{name}", argv, "fail"))
        argv = ("validate", "--no-deepspeed", "--hostfile", path, ok_config)
        cases.append(Case(f"validate-hostfile/{name}", argv, "fail"))
        argv = ("launch", "--dry-run", "--hostfile", path, "--", "--deepspeed_config", ok_config)
        cases.append(Case(f"launch-hostfile/{name}", argv, "fail"))
        argv = ("launch", "--dry-run", "--num-gpus", "1", "--", "--deepspeed_config", path)
        cases.append(Case(f"launch/{name}", argv, "fail"))
        if name != "empty_name_dir":
            out = str(tmp / f"cache_{name}")
            cases.append(Case(f"prepare/{name}", ("prepare", path, "-o", out), "fail"))
    toml = {
        "deep_arrays": b"a = " + b"[" * 1000 + b"]" * 1000 + b"\n",
        "deep_inline_tables": b"a = " + b"{b = " * 1000 + b"1" + b"}" * 1000 + b"\n",
        "deep_dotted_key": b"a" + b".a" * 2000 + b" = 1\n",
        "huge_int": b"seed = " + b"9" * 5000 + b"\n",
        "datetime": b"precision = 1979-05-27T07:32:00Z\n",
        "local_date": b"[optimizer]\nlr = 1979-05-27\n",
        "nan": b"[optimizer]\nlr = nan\n",
        "inf": b"[optimizer]\nlr = -inf\n",
        "invalid_utf8": b'precision = "\xff"\n',
        "garbage": bytes(range(256)),
        "empty": b"",
    }
    for name, data in toml.items():
        path = write(tmp, f"toml_{name}", data, ".toml")
        cases.append(Case(f"gen-config/toml_{name}", ("gen-config", "--settings", path), "fail"))

    # 4. Flags: NaN/Infinity, absurd sizes, contradictions.
    for flag in ("--lr", "--eps", "--weight-decay", "--clip", "--loss-scale"):
        for value in ("inf", "-inf", "nan", "NaN", "1e309", "-1", "abc", ""):
            cases.append(Case(f"gen-config{flag}={value}", ("gen-config", flag, value), "fail"))
    for argv in (
        ("--fp16", "--bf16"),
        ("--bf16", "--fp32"),
        ("--fp32", "--fp16", "--bf16"),
        ("--zero", "7"),
        ("--zero", "-1"),
        ("--micro-batch", "0"),
        ("--micro-batch", "9" * 5000),
        ("--warmup-steps", "0"),
        ("--scheduler", "WarmupDecayLR"),
        ("--scheduler", "WarmupDecayLR", "--total-steps", "5", "--warmup-steps", "50"),
        ("--global-batch", "7", "--micro-batch", "2"),
    ):
        cases.append(Case(f"gen-config/{'_'.join(argv)[:60]}", ("gen-config", *argv), "fail"))
    cases.append(Case("gen-config/fp16_twice", ("gen-config", "--fp16", "--fp16"), "ok"))
    plot = str(tmp / "new" / "dir" / "x.png")  # the parent directories are made
    cases.append(
        Case("estimate/plot_new_dir", ("estimate", "--model", "genslm_25M", "--plot", plot), "ok")
    )
    shape = ("--hidden", "64", "--heads", "4", "--intermediate", "256")
    for argv in (
        ("--layers", "50000000", *shape),
        ("--layers", "9" * 5000, *shape),
        ("--layers", "2", "--hidden", "99999999999", "--heads", "4", "--intermediate", "8"),
        ("--params", "inf"),
        ("--params", "nan"),
        ("--params", "1e300"),
        ("--params", "-5"),
        ("--params", "2.5"),
        ("--model", "genslm_25M", "--gpu-mem-gib", "inf", "--json"),
        ("--model", "genslm_25M", "--gpu-mem-gib", "nan", "--json"),
        ("--model", "genslm_25M", "--cpu-mem-gib", "nan", "--json"),
        ("--model", "genslm_25M", "--cpu-mem-gib", "1e308", "--json"),
        ("--model", "genslm_25M", "--headroom", "nan"),
        ("--model", "genslm_25M", "--seq-len", "999999999999"),
        ("--model", "genslm_25M", "--micro-batch", "999999999999"),
        ("--model", "genslm_25M", "--gpus-per-node", "99999999", "--nodes", "99999999"),
        ("--model", "genslm_25M", "--plot", str(tmp / "x.gif")),
        ("--model", "no_such_model"),
        ("--model", "genslm_25M", "--params", "5"),
        (),
    ):
        cases.append(Case(f"estimate/{'_'.join(argv)[:60]}", ("estimate", *argv), "fail"))

    # Found by a fuzzing pass: tracebacks, and values that would start absurd launches.
    huge_slots = write(tmp, "hostfile_huge_slots", b"h1 slots=" + b"9" * 5000 + b"\n", "")
    big_slots = write(tmp, "hostfile_big_slots", b"h1 slots=1000000000\n", "")
    for name, path in (("huge_slots", huge_slots), ("big_slots", big_slots)):
        cases.append(Case(f"hostfile/{name}", ("hostfile", "--check", path), "fail"))
        argv = ("launch", "--dry-run", "--hostfile", path, "--", "--deepspeed_config", ok_config)
        cases.append(Case(f"launch-hostfile/{name}", argv, "fail"))
    argv = ("launch", "--dry-run", "--num-gpus", "5000", "--", "--deepspeed_config", ok_config)
    cases.append(Case("launch/num_gpus_5000", argv, "fail"))
    for extra in (("--no-such-flag",), ("--max-steps", "abc"), ("--deepspeed_config",)):
        argv = ("launch", "--dry-run", "--num-gpus", "1", "--", "--deepspeed_config", ok_config)
        cases.append(Case(f"launch/train_args{'_'.join(extra)}", (*argv, *extra), "fail"))
    argv = ("doctor", "--hostfile", ok_hostfile, "--timeout", "9223372036854775807")
    cases.append(Case("doctor/timeout_int64", argv, "fail"))  # poll() OverflowError
    bool_stage = write(tmp, "bool_stage", b"[zero_optimization]\nstage = true\n", ".toml")
    cases.append(Case("gen-config/bool_stage", ("gen-config", "--settings", bool_stage), "fail"))
    nul_path = json.dumps({**BASE_DS, "csv_monitor": {"enabled": True, "output_path": "a\0b"}})
    path = write(tmp, "ds_nul_path", nul_path.encode())
    cases.append(Case("validate/nul_in_path", ("validate", "--no-deepspeed", path), "fail"))
    argv = ("train", "--deepspeed_config", path, "--output-dir", str(tmp / "t_out"))
    cases.append(Case("train/nul_in_path", argv, "fail"))

    # 5. prepare: broken FASTA.
    fasta = {
        "empty": b"",
        "no_header": b"ATGGCT\n",
        "protein": b">p\nMKVLAAGIVGLLLAAQPAMA\n",
        "binary": bytes(range(256)) * 4,
        "bad_gzip": b"\x1f\x8b" + b"garbage" * 10,
        "header_only": b">r1\n",
        "invalid_utf8_header": b">r\xff\xfe\nATGGCTAAA\n",
        "digits": b">r\n1 atggct aaattt\n",
        "nul": b">r\nATG\x00GCT\n",
    }
    for name, data in fasta.items():
        path = write(tmp, f"fasta_{name}", data, ".fasta")
        out = str(tmp / f"cache_fasta_{name}")
        cases.append(Case(f"prepare/{name}", ("prepare", path, "-o", out), "any"))
    for flag, value in (("--max-length", "0"), ("--val-fraction", "nan"), ("--val-fraction", "2")):
        path = write(tmp, "fasta_ok", FASTA_OK, ".fasta")
        argv = ("prepare", path, "-o", str(tmp / "cache_flags"), flag, value)
        cases.append(Case(f"prepare{flag}={value}", argv, "fail"))

    # 6. report: broken run directories.
    runs = {
        "empty_metrics": (b"", None),
        "garbage_metrics": (bytes(range(256)), None),
        "deep_rows": (b'{"step": ' + b"[" * 5000 + b"]" * 5000 + b"}\n", None),
        "huge_int_step": (b'{"step": ' + b"9" * 5000 + b"}\n", None),
        "surrogate_rows": (b'{"step": "\\ud800"}\n', None),
        # found by fuzzing: max() of no steps, and matplotlib's "arange: cannot compute length"
        "wrong_type_rows": (b'{"step": 1, "loss": "x"}\n{"step": 2, "loss": [1]}\n', None),
        "huge_losses": (b'{"step": 1, "loss": 1e308}\n{"step": 2, "loss": -1e308}\n', None),
        "deep_summary": (METRICS_OK, b'{"a":' * 2000 + b"1" + b"}" * 2000),
        "garbage_summary": (METRICS_OK, bytes(range(256))),
    }
    for name, (metrics, summary) in runs.items():
        run = tmp / f"run_{name}"
        run.mkdir(exist_ok=True)
        (run / "metrics.jsonl").write_bytes(metrics)
        if summary is not None:
            (run / "summary.json").write_bytes(summary)
        expect = "any" if summary is not None else "fail"
        argv = ("report", str(run), "-o", str(tmp / f"report_{name}.png"))
        cases.append(Case(f"report/{name}", argv, expect))
    fifo_run = tmp / "run_fifo"
    fifo_run.mkdir(exist_ok=True)
    if not (fifo_run / "metrics.jsonl").exists():
        os.mkfifo(fifo_run / "metrics.jsonl")
    cases.append(Case("report/fifo_metrics", ("report", str(fifo_run)), "fail"))
    for name, path in special_paths(tmp):
        cases.append(Case(f"report/{name}", ("report", path), "fail"))

    # 7. train: refused before anything is built (see `train_cases`), export, convert.
    for name, path in [*special_paths(tmp), ("deep", write(tmp, "t_deep", b"[" * 3000))]:
        argv = ("train", "--deepspeed_config", path, "--output-dir", str(tmp / "t_out"))
        cases.append(Case(f"train/{name}", argv, "fail"))
    for argv in (
        ("--lr", "inf"),
        ("--lr", "nan"),
        ("--fp16", "--bf16"),
        ("--bf16", "--fp32"),
        ("--max-steps", "0"),
        ("--epochs", "nan"),
        ("--epochs", "inf"),
        ("--timeout-s", "inf"),
        ("--warmup-steps", "0"),
        ("--clip", "nan"),
        ("--no-such-flag",),
        ("--num-gpus", "0"),  # used to train in this process
        ("--num-gpus", "-1"),  # used to hand DeepSpeed every GPU, exit 0
        ("--padding", "max_length", "--max-length", "9223372036854775807"),  # torch traceback
        ("--output-dir", ""),  # wrote the run into the current directory
    ):
        full = ("train", "--output-dir", str(tmp / "t_out"), *argv)
        cases.append(Case(f"train/{'_'.join(argv)}", full, "fail"))
    refused = ("=inf_literal", "=object", "=string")
    for name, text in [m for m in mutated_texts(BASE_DS) if m[0].endswith(refused)][::4]:
        path = write(tmp, f"tds_{len(cases)}", text.encode())
        argv = ("train", "--deepspeed_config", path, "--output-dir", str(tmp / "t_out"))
        cases.append(Case(f"train/leaf/{name}", argv, "fail"))
    for name, path in special_paths(tmp):
        out = str(tmp / f"export_{name}")
        cases.append(Case(f"export/{name}", ("export", path, "-o", out), "fail"))
        argv = ("convert-checkpoint", path, "--model", "genslm_tiny", "-o", out)
        cases.append(Case(f"convert/{name}", argv, "fail"))
    garbage_ckpt = write(tmp, "garbage_ckpt", bytes(range(256)) * 8, ".pt")
    cases.append(
        Case("export/garbage_file", ("export", garbage_ckpt, "-o", str(tmp / "e")), "fail")
    )
    argv = ("convert-checkpoint", garbage_ckpt, "--model", "genslm_tiny", "-o", str(tmp / "c"))
    cases.append(Case("convert/garbage_file", argv, "fail"))
    return cases


# --------------------------------------------------------------------------------------
# Running them
# --------------------------------------------------------------------------------------


def _alarm(_signum, _frame):
    raise Hang


class BuiltEngine(Exception):
    """Raised if `dstrain train` reaches the output directory, past every input check."""


def run_in_process(case: Case) -> tuple[int, str, BaseException | None]:
    previous = signal.signal(signal.SIGALRM, _alarm)
    signal.alarm(CASE_TIMEOUT_S)
    try:
        result = CliRunner().invoke(through_main, list(case.argv), input=case.stdin)
    finally:
        signal.alarm(0)
        signal.signal(signal.SIGALRM, previous)
    exception = result.exception
    if isinstance(exception, Hang):  # raised by the alarm inside the command, caught by click
        raise exception
    if isinstance(exception, SystemExit):
        exception = None
    return result.exit_code, result.output, exception


def check(case: Case, code: int, output: str, exception: BaseException | None) -> str | None:
    """What is wrong with one case's outcome, or None."""
    if exception is not None:
        return f"raised {type(exception).__name__}: {exception}"
    if "Traceback (most recent call last)" in output:
        return "printed a traceback"
    if case.expect == "fail" and code == 0:
        return "exit 0 for an input that must be refused"
    if case.expect == "ok" and code != 0:
        return f"exit {code} for a fine input"
    if code != 0 and not output.strip():
        return f"exit {code} with no message"
    return None


@pytest.fixture(scope="module")
def inputs_dir(tmp_path_factory):
    return tmp_path_factory.mktemp("bad_inputs")


def test_generated_bad_inputs_in_process(inputs_dir, monkeypatch):
    """>= 300 generated inputs through `dstrain.cli.main`: no traceback, no hang, refused."""
    import dstrain.train

    # `dstrain train` checks its flags and DeepSpeed config before anything is built; a
    # case reaching the output-directory check (the step before deepspeed is imported)
    # got past them, which no case here may.
    def built(*_args, **_kwargs):
        raise BuiltEngine("dstrain train got past its input checks")

    monkeypatch.setattr(dstrain.train, "check_output_dir", built)
    monkeypatch.setenv("NO_COLOR", "1")
    cases = build_cases(inputs_dir)
    assert len(cases) >= 300, len(cases)
    failures, refused = [], 0
    for case in cases:
        try:
            code, output, exception = run_in_process(case)
        except Hang:
            failures.append(f"{case.name}: hung for {CASE_TIMEOUT_S} s")
            continue
        refused += code != 0
        problem = check(case, code, output, exception)
        if problem:
            failures.append(f"{case.name} {list(case.argv)}: {problem}\n    {output[-400:]}")
    assert not failures, f"{len(failures)} of {len(cases)} cases:\n" + "\n".join(failures)
    assert refused >= 0.8 * len(cases), (refused, len(cases))


SUBPROCESS_SAMPLE = 24


@pytest.mark.slow
def test_generated_bad_inputs_in_real_processes(inputs_dir):
    """A sample as real `dstrain` processes (FIFOs first): exit code, no traceback, and a
    subprocess timeout for hangs. Light commands only (no torch import), 2 at a time."""
    cases = build_cases(inputs_dir)
    fifo = [
        c
        for c in cases
        if "fifo" in c.name
        and c.argv[0] not in ("train", "export", "convert-checkpoint", "prepare")
    ]
    rest = [
        c
        for c in cases
        if c not in fifo
        and c.argv[0] in ("validate", "gen-config", "estimate", "hostfile", "launch")
        and c.stdin is None
    ]
    sample = fifo + random.Random(5).sample(rest, SUBPROCESS_SAMPLE - len(fifo))
    env = dict(os.environ, NO_COLOR="1")
    failures = []
    running: list[tuple[Case, subprocess.Popen]] = []

    def finish(case: Case, proc: subprocess.Popen) -> None:
        try:
            out, _ = proc.communicate(timeout=60)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.communicate()
            failures.append(f"{case.name}: hung (killed after 60 s)")
            return
        problem = check(case, proc.returncode, out.decode(errors="replace"), None)
        if problem:
            failures.append(f"{case.name} {list(case.argv)}: {problem}\n    {out[-400:]!r}")

    for case in sample:
        proc = subprocess.Popen(
            [str(DSTRAIN), *case.argv],
            stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            env=env,
            cwd=inputs_dir,
        )
        running.append((case, proc))
        if len(running) == 2:
            finish(*running.pop(0))
    for item in running:
        finish(*item)
    assert len(sample) >= 20 and any("fifo" in c.name for c in sample)
    assert not failures, "\n".join(failures)


@pytest.mark.parametrize(
    "env, words",
    [
        ({"LOCAL_RANK": "abc"}, "LOCAL_RANK='abc' is not a whole number"),
        ({"WORLD_SIZE": "0"}, "WORLD_SIZE='0' is not a whole number from 1"),
        ({"MASTER_PORT": "99999"}, "MASTER_PORT='99999'"),
        ({"RANK": "-1", "WORLD_SIZE": "1"}, "RANK='-1'"),
        ({"RANK": "1", "WORLD_SIZE": "1"}, "RANK=1 is not below WORLD_SIZE=1"),
        ({"MASTER_ADDR": "no-such-host.invalid"}, "MASTER_ADDR='no-such-host.invalid' cannot"),
    ],
)
def test_bad_rendezvous_env_is_refused_first(env, words, monkeypatch, capsys):
    """Found by fuzzing: torch tracebacks (LOCAL_RANK=abc, WORLD_SIZE=0, MASTER_PORT=99999)
    and a silent wait for peers until the timeout (RANK=-1, an unresolvable MASTER_ADDR).
    Refused before anything runs."""
    import dstrain.train

    def built(*_args, **_kwargs):
        raise BuiltEngine("dstrain train got past the environment check")

    monkeypatch.setattr(dstrain.train, "run", built)
    for name in ("RANK", "LOCAL_RANK", "WORLD_SIZE", "MASTER_PORT", "MASTER_ADDR"):
        monkeypatch.delenv(name, raising=False)
    for name, value in env.items():
        monkeypatch.setenv(name, value)
    assert dstrain.train.main(["--max-steps", "1"]) == 1
    err = capsys.readouterr().err
    assert words in err and "Traceback" not in err, err


def test_a_training_checkpoint_given_as_model_directory_says_export(tmp_path):
    """Found by fuzzing: `convert-checkpoint RUN/checkpoints` (or --init-checkpoint) said
    "model config RUN/checkpoints/config.json does not exist", as if --model were wrong."""
    from dstrain.errors import DstrainError
    from dstrain.model import load_init_checkpoint

    (tmp_path / "checkpoints").mkdir()
    (tmp_path / "checkpoints" / "latest").write_text("global_step1")
    for path in (tmp_path, tmp_path / "checkpoints"):
        with pytest.raises(DstrainError, match=r"is a dstrain training checkpoint.*dstrain export"):
            load_init_checkpoint("genslm_tiny", path)
