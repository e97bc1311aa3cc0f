"""The validator agrees with DeepSpeed on a corpus of hand-written configs.

Property: `dstrain validate` exits 0 <=> DeepSpeed 0.19.8 accepts the config. Each case in
tests/assets/ds_corpus/manifest.json carries one verdict:
- `ok`: validate passes and DeepSpeed accepts;
- `refused`: validate fails and DeepSpeed refuses (initialize or its parser raises);
- `silently-wrong`: validate fails, DeepSpeed accepts, and the test shows DeepSpeed ignored
  or misread what was written (each `ignored` probe below).
The light `validate --no-deepspeed` must give the same exit code: dstrain's own rules see
every one of these faults. `check: engine` cases run a real one-rank `deepspeed.initialize` on CPU with genslm_tiny;
`check: parser` cases need CUDA (fp16, NVMe) and go through `DeepSpeedConfig` instead.
Stage-3 engines run last: ZeRO-3 patches torch for the rest of the process.
"""

from __future__ import annotations

import copy
import importlib.util
import json
from pathlib import Path

import pytest
from click.testing import CliRunner

from dstrain.cli import cli

pytestmark = pytest.mark.slow

REPO = Path(__file__).resolve().parent.parent
CORPUS = Path(__file__).parent / "assets" / "ds_corpus"
CASES = json.loads((CORPUS / "manifest.json").read_text())["cases"]
VERDICTS = ("ok", "refused", "silently-wrong")


def _stage(name: str) -> int:
    config = json.loads((CORPUS / f"{name}.json").read_text())
    zero = config.get("zero_optimization")
    return zero.get("stage", 0) if isinstance(zero, dict) else int(bool(zero))


ORDER = sorted(CASES, key=lambda name: (_stage(name) == 3, name))


def test_manifest_lists_every_file_once():
    files = {p.stem for p in CORPUS.glob("*.json")} - {"manifest"}
    assert files == set(CASES)
    assert len(CASES) >= 40
    for name, case in CASES.items():
        assert case["verdict"] in VERDICTS and case["reason"], name
        assert case["check"] in ("engine", "parser"), name
        assert (case["verdict"] == "silently-wrong") == bool(case.get("ignored")), name


@pytest.fixture(scope="module")
def tiny_model():
    import torch

    from dstrain.architectures import resolve_architecture
    from dstrain.ds_runtime import prepare_deepspeed
    from dstrain.model import build_model

    prepare_deepspeed(timeout_s=120)
    torch.manual_seed(0)
    return build_model(resolve_architecture("genslm_tiny"))


def _recorder_module():
    spec = importlib.util.spec_from_file_location(
        "gen_ds_schema", REPO / "scripts" / "gen_ds_schema.py"
    )
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _recording(node, module, log, path=""):
    if not isinstance(node, dict):
        return node
    items = {k: _recording(v, module, log, f"{path}.{k}" if path else k) for k, v in node.items()}
    return module._Recorder(log, path, items)


def _initialize(model, config):
    import deepspeed

    from dstrain.ds_runtime import redirect_fds

    try:
        with redirect_fds():
            engine, *_ = deepspeed.initialize(
                model=copy.deepcopy(model), model_parameters=None, config=config
            )
    finally:
        # initialize configures DeepSpeed's one process-wide comms logger; left enabled it
        # outlives this engine, and 0.19.8's logger calls exit(0) on a collective it cannot
        # size (all_gather_object), which would end later tests in this process.
        from deepspeed.comm import comm as ds_comm

        ds_comm.comms_logger.enabled = False
    return engine


def _parse(config):
    from deepspeed.runtime.config import DeepSpeedConfig

    from dstrain.ds_runtime import redirect_fds

    with redirect_fds():
        return DeepSpeedConfig(copy.deepcopy(config))


def _unread(model, config, dotted: str) -> bool:
    """DeepSpeed never asks for `dotted` by name during a real initialize.

    (It does walk the whole config once, to print it to its log: that is no read.)
    """
    module = _recorder_module()
    log = module._Log()
    _initialize(model, _recording(config, module, log))
    parent, _, key = dotted.rpartition(".")
    return key not in log.reads[parent]


def _ignored(probe: str, model, config, engine, parsed) -> bool:
    """Evidence that DeepSpeed accepted the config but did not do what it says."""
    if probe.startswith("unread:"):
        return _unread(model, config, probe.removeprefix("unread:"))
    if probe == "fp32":
        return not engine.fp16_enabled() and not engine.bfloat16_enabled()
    if probe == "params_not_partitioned":  # ZeRO-3 tags (and offloads) partitioned params
        return not any(hasattr(p, "ds_id") for p in engine.module.parameters())
    if probe == "no_zero_optimizer":
        return (
            engine.zero_optimization_stage() == 0
            and "zero" not in type(engine.optimizer).__module__
        )
    if probe == "default_reduce_bucket":
        return engine.zero_reduce_bucket_size() == 500_000_000
    if probe == "warmup_over_total":
        return engine.lr_scheduler.total_num_steps < engine.lr_scheduler.warmup_num_steps
    if probe == "no_partition":
        ac = _parse(config).activation_checkpointing_config
        return ac.contiguous_memory_optimization and not ac.partition_activations
    if probe == "nvme_path_none":
        return parsed.zero_config.offload_param.nvme_path is None
    raise AssertionError(f"unknown probe {probe}")


def _expected(expect: dict, engine) -> list[str]:
    wrong = []
    if "stage" in expect and engine.zero_optimization_stage() != expect["stage"]:
        wrong.append(f"stage {engine.zero_optimization_stage()} != {expect['stage']}")
    if "precision" in expect:
        precision = (
            "bf16" if engine.bfloat16_enabled() else "fp16" if engine.fp16_enabled() else "fp32"
        )
        if precision != expect["precision"]:
            wrong.append(f"precision {precision} != {expect['precision']}")
    return wrong


@pytest.mark.parametrize("name", ORDER)
def test_validator_agrees_with_deepspeed(name, tiny_model):
    case = CASES[name]
    path = CORPUS / f"{name}.json"
    result = CliRunner().invoke(cli, ["validate", "--world-size", "1", str(path)])
    assert result.exit_code in (0, 1), result.output
    # dstrain's own rules reach the same verdict without DeepSpeed's parser
    light = CliRunner().invoke(cli, ["validate", "--world-size", "1", "--no-deepspeed", str(path)])
    assert light.exit_code == result.exit_code, light.output
    config = json.loads(path.read_text())
    engine = parsed = None
    try:
        if case["check"] == "engine":
            engine = _initialize(tiny_model, config)
        else:
            parsed = _parse(config)
        accepted, why = True, ""
    except Exception as exc:  # any refusal counts; its text goes in the failure message
        accepted, why = False, f"{type(exc).__name__}: {str(exc)[:300]}"
    verdict = "refused" if not accepted else "ok" if result.exit_code == 0 else "silently-wrong"
    if verdict == "silently-wrong" and not all(
        _ignored(probe, tiny_model, config, engine, parsed) for probe in case["ignored"]
    ):
        verdict = "flagged, but DeepSpeed did what the file says"
    agree = verdict == case["verdict"] and (verdict != "refused" or result.exit_code == 1)
    assert agree, (
        f"{name}: expected {case['verdict']} ({case['reason']}); validate exit "
        f"{result.exit_code}, DeepSpeed {'accepted' if accepted else 'refused: ' + why}\n"
        + result.output
    )
    if engine is not None:
        assert _expected(case.get("expect", {}), engine) == []
