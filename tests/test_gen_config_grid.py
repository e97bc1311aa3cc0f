"""gen-config over a seeded sample of flag combinations: each one is refused naming a flag
that was given, or writes a config that `check_ds_config` and DeepSpeed's own parser both
accept. Then a few accepted ones build a real one-rank CPU engine whose precision, stage and
offload are what `dstrain.ds_run.resolve_ds_run` reads from the JSON.
"""

from __future__ import annotations

import json
import random
import re

import pytest
from click.testing import CliRunner

from dstrain.cli import cli
from dstrain.ds_check import check_ds_config, deepspeed_parser_problems
from dstrain.errors import DstrainError

# Each dimension: the choices, a choice being the flags it adds (empty: flag not given).
DIMENSIONS: dict[str, list[tuple[str, ...]]] = {
    "zero": [(), ("--zero", "0"), ("--zero", "1"), ("--zero", "2"), ("--zero", "3")],
    "precision": [(), ("--bf16",), ("--fp16",), ("--fp32",)],
    "offload_optimizer": [
        (),
        ("--offload-optimizer", "none"),
        ("--offload-optimizer", "cpu"),
        ("--offload-optimizer", "nvme"),
    ],
    "offload_param": [(), ("--offload-param", "cpu"), ("--offload-param", "nvme")],
    "nvme_path": [(), ("--nvme-path", "/local/nvme")],
    "micro": [(), ("--micro-batch", "1"), ("--micro-batch", "4")],
    "accum": [(), ("--grad-accum", "1"), ("--grad-accum", "3")],
    "global": [(), ("--global-batch", "12"), ("--global-batch", "10")],
    "scheduler": [
        (),
        ("--scheduler", "none"),
        ("--scheduler", "WarmupLR"),
        ("--scheduler", "WarmupDecayLR"),
        ("--scheduler", "WarmupCosineLR"),
    ],
    "warmup": [(), ("--warmup-steps", "0"), ("--warmup-steps", "500")],
    "total": [(), ("--total-steps", "100"), ("--total-steps", "1000")],
    "clip": [(), ("--clip", "0"), ("--clip", "1.0"), ("--clip", "-1")],
    "activation_checkpointing": [
        (),
        ("--activation-checkpointing",),
        ("--no-activation-checkpointing",),
    ],
    "loss_scaling": [
        (),
        ("--hysteresis", "3"),
        ("--loss-scale-window", "500", "--initial-scale-power", "12"),
        ("--min-loss-scale", "0"),
        ("--loss-scale", "128"),
    ],
    "overlap": [(), ("--overlap-comm",), ("--no-overlap-comm",)],
    "stage_knobs": [
        (),
        ("--stage3-max-live-parameters", "1000000"),
        ("--allgather-bucket-size", "1000000"),
        ("--reduce-bucket-size", "1000000"),
    ],
    "adam": [(), ("--fused-adam",), ("--lr", "0")],
}
SAMPLES = 600


def coherent_argv(rng: random.Random) -> list[str]:
    """A combination a careful user would write (most of these must be accepted)."""
    stage = rng.randrange(4)
    argv = ["--zero", str(stage)]
    precision = rng.choice(["", "--bf16", "--fp16", "--fp32"])
    argv += [precision] if precision else []
    if precision == "--fp16":
        argv += list(rng.choice(DIMENSIONS["loss_scaling"][:3]))
    devices = ["none", "cpu", "nvme"] if stage == 3 else ["none", "cpu"] if stage else ["none"]
    optimizer_device = rng.choice(devices)
    argv += ["--offload-optimizer", optimizer_device]
    param_device = rng.choice(devices) if stage == 3 else "none"
    argv += ["--offload-param", param_device] if param_device != "none" else []
    if "nvme" in (optimizer_device, param_device):
        argv += ["--nvme-path", "/local/nvme"]
    micro, accum = rng.choice([1, 2, 4]), rng.choice([1, 2, 3])
    argv += ["--micro-batch", str(micro), "--grad-accum", str(accum)]
    if rng.random() < 0.3:
        argv += ["--global-batch", str(micro * accum * rng.choice([1, 2, 8]))]
    scheduler = rng.choice(["none", "WarmupLR", "WarmupDecayLR", "WarmupCosineLR"])
    argv += ["--scheduler", scheduler]
    if scheduler in ("WarmupDecayLR", "WarmupCosineLR"):
        total = rng.choice([100, 1000])
        argv += ["--total-steps", str(total), "--warmup-steps", str(rng.randrange(total + 1))]
    elif scheduler == "WarmupLR":
        argv += ["--warmup-steps", str(rng.choice([0, 10, 100]))]
    argv += list(rng.choice(DIMENSIONS["clip"][:3]) + rng.choice(DIMENSIONS["adam"][:2]))
    argv += list(rng.choice(DIMENSIONS["activation_checkpointing"]))
    if stage:
        argv += list(rng.choice(DIMENSIONS["overlap"]))
        knob = "--stage3-max-live-parameters" if stage == 3 else "--allgather-bucket-size"
        argv += [knob, "1000000"] if rng.random() < 0.5 else []
    return argv


def sample_argvs(count: int, seed: int = 0) -> list[list[str]]:
    """Half careful combinations, half drawn from every dimension at random."""
    rng = random.Random(seed)
    argvs, seen = [], set()
    while len(argvs) < count:
        if len(argvs) % 2:
            argv = [flag for choices in DIMENSIONS.values() for flag in rng.choice(choices)]
        else:
            argv = coherent_argv(rng)
        if tuple(argv) not in seen:
            seen.add(tuple(argv))
            argvs.append(argv)
    return argvs


def gen_config(argv: list[str]):
    """(config or None, error text): gen-config in this process."""
    result = CliRunner().invoke(cli, ["gen-config", *argv])
    if result.exit_code == 0:
        return json.loads(result.stdout), ""
    if isinstance(result.exception, DstrainError):
        return None, str(result.exception)
    assert result.exception is None or isinstance(result.exception, SystemExit), argv
    return None, result.output  # a click usage error (exit 2)


def test_every_combination_is_refused_by_flag_or_accepted_by_both_checkers():
    refused = accepted = 0
    for argv in sample_argvs(SAMPLES):
        config, error = gen_config(argv)
        if config is None:
            refused += 1
            given = {a for a in argv if a.startswith("--")}
            named = set(re.findall(r"--[a-z0-9][\w-]*", error))
            assert named & given, f"{argv}: the refusal names no given flag:\n{error}"
            continue
        accepted += 1
        errors = [p.format() for p in check_ds_config(config) if p.severity == "error"]
        assert errors == [], f"{argv}: gen-config wrote a config ds_check refuses"
        theirs = deepspeed_parser_problems(config, "gen-config")
        assert theirs is not None, "deepspeed is not importable"
        assert theirs == [], f"{argv}: DeepSpeed's parser refuses {theirs}"
    assert refused >= 150 and accepted >= 150, (refused, accepted)


# --------------------------------------------------------------------------------------
# A sample on real engines: what DeepSpeed builds is what the typed run says
# --------------------------------------------------------------------------------------

ENGINE_SAMPLE = [
    ["--bf16", "--zero", "0"],
    ["--fp32", "--zero", "1"],
    ["--bf16", "--zero", "2"],
    ["--fp32", "--zero", "2", "--offload-optimizer", "cpu"],  # JIT-builds CPUAdam once
    ["--fp32", "--zero", "3"],
    ["--bf16", "--zero", "3"],  # stage 3 last: it patches torch for good
]


@pytest.mark.slow
@pytest.mark.parametrize("argv", ENGINE_SAMPLE, ids=lambda a: "_".join(a).replace("--", ""))
def test_engine_matches_the_typed_run(argv):
    import deepspeed
    import torch

    from dstrain.ds_run import choose_optimizer, resolve_ds_run
    from dstrain.ds_runtime import prepare_deepspeed
    from dstrain.model import build_model

    base = ["--micro-batch", "2", "--scheduler", "none", "--steps-per-print", "1000"]
    config, error = gen_config([*argv, *base])
    assert config is not None, error
    run = resolve_ds_run(config)
    # What `dstrain train` hands DeepSpeed on CPU: torch's AdamW for an Adam left on auto.
    config, optimizer = choose_optimizer(config, "cpu")
    prepare_deepspeed(timeout_s=120)
    torch.manual_seed(0)
    model = build_model("genslm_tiny")
    engine, *_ = deepspeed.initialize(
        model=model, model_parameters=model.parameters(), config=config
    )
    assert engine.zero_optimization_stage() == run.zero.stage
    named = {"torch AdamW": "AdamW", "DeepSpeed CPUAdam": "DeepSpeedCPUAdam"}
    assert type(engine.basic_optimizer).__name__ == named[optimizer.split(" (")[0]], optimizer
    assert engine.bfloat16_enabled() == (run.precision == "bf16")
    assert engine.fp16_enabled() == (run.precision == "fp16")
    offload = engine.zero_offload_optimizer()
    device = "none" if offload is None else str(getattr(offload.device, "value", offload.device))
    assert device == run.zero.offload_optimizer.device
    param = engine.zero_offload_param()
    device = "none" if param is None else str(getattr(param.device, "value", param.device))
    assert device == run.zero.offload_param.device
    ids = torch.randint(5, 69, (2, 16))
    loss = engine(input_ids=ids, attention_mask=torch.ones_like(ids), labels=ids).loss
    engine.backward(loss)
    engine.step()
    assert engine.global_steps == 1
