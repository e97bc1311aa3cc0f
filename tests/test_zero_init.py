"""ZeRO-3 builds the model inside `deepspeed.zero.Init` (no rank holds it whole) and loads
--init-checkpoint module by module; the weights, and so the losses, equal the old path's
(`--no-zero-init`: built whole on every rank, then partitioned by the engine)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from subprocs import deepspeed_launcher, run_in_session

from dstrain.ds_config import build_ds_config, render_ds_config
from dstrain.settings import make_deepspeed_settings

pytestmark = pytest.mark.slow

REPO = Path(__file__).resolve().parent.parent
TRAIN_PY = REPO / "dstrain" / "train.py"


def write_config(path: Path, **settings) -> Path:
    base = {"scheduler": {"type": "none"}, "steps_per_print": 1_000_000, "optimizer": {"lr": 2e-3}}
    base.update(settings)
    path.write_text(render_ds_config(build_ds_config(make_deepspeed_settings(base))))
    return path


def train(*args) -> int:
    from dstrain.train import main

    return main(["--no-progress", "--no-report", "--no-export", *map(str, args)])


def losses(run_dir: Path) -> list[float]:
    lines = (run_dir / "metrics.jsonl").read_text().splitlines()
    return [row["loss"] for row in map(json.loads, lines) if "loss" in row]


def load_params(path: Path) -> dict:
    import torch

    return torch.load(path, weights_only=True)


@pytest.fixture
def count_zero_init_builds(monkeypatch):
    """How many models `build_model` built under zero.Init (the real build runs)."""
    import dstrain.model

    calls = []
    real = dstrain.model._zero_init_build

    def counted(config, ds_config):
        calls.append(ds_config["zero_optimization"]["stage"])
        return real(config, ds_config)

    monkeypatch.setattr(dstrain.model, "_zero_init_build", counted)
    return calls


@pytest.mark.parametrize("precision", ["fp32", "bf16"])
def test_zero_init_builds_the_plain_builds_weights(precision):
    import deepspeed
    import torch

    from dstrain.ds_runtime import prepare_deepspeed
    from dstrain.model import build_model, is_partitioned

    prepare_deepspeed(timeout_s=60)
    deepspeed.init_distributed(dist_backend="gloo")
    config = {
        "train_micro_batch_size_per_gpu": 1,
        "zero_optimization": {"stage": 3},
        "bf16": {"enabled": precision == "bf16"},
    }
    torch.manual_seed(11)
    plain = build_model("genslm_tiny")
    after_plain = torch.rand(4)  # where the build left the RNG
    torch.manual_seed(11)
    model = build_model("genslm_tiny", zero_init=config)
    after = torch.rand(4)
    assert is_partitioned(model) and not is_partitioned(plain)
    assert all(p.numel() == 0 for p in model.parameters())  # nothing whole is left
    assert torch.equal(after, after_plain)
    dtype = torch.bfloat16 if precision == "bf16" else torch.float32
    reference = dict(plain.named_parameters())
    with deepspeed.zero.GatheredParameters(list(model.parameters())):
        for name, param in model.named_parameters():
            assert param.dtype == dtype, name
            assert torch.equal(param, reference[name].detach().to(dtype)), name
    # the rotary buffers stay fp32, computed in fp32, as in the plain build
    for name, buffer in plain.named_buffers():
        assert torch.equal(model.get_buffer(name), buffer), name


def test_zero3_losses_equal_the_old_paths_over_10_steps(tmp_path, count_zero_init_builds):
    config = write_config(
        tmp_path / "ds.json",
        precision="fp32",
        zero_optimization={"stage": 3},
        batch={"train_micro_batch_size_per_gpu": 4},
    )
    common = ["--deepspeed_config", config, "--max-steps", 10, "--eval-every", 0, "--seed", 5]
    assert train(*common, "--output-dir", tmp_path / "new", "--dump-params") == 0
    assert count_zero_init_builds == [3]
    assert train(*common, "--output-dir", tmp_path / "old", "--no-zero-init", "--dump-params") == 0
    assert count_zero_init_builds == [3]  # --no-zero-init: the whole model first
    new, old = losses(tmp_path / "new"), losses(tmp_path / "old")
    assert len(new) == len(old) == 10
    assert new == pytest.approx(old, abs=1e-5, rel=0)
    assert new[-1] < new[0]  # it trained
    new_params = load_params(tmp_path / "new" / "params_rank0.pt")
    old_params = load_params(tmp_path / "old" / "params_rank0.pt")
    assert new_params.keys() == old_params.keys()
    for name, value in new_params.items():
        assert (value - old_params[name]).abs().max().item() <= 1e-5, name


def test_zero_init_needs_stage_3(tmp_path, capsys, count_zero_init_builds):
    config = write_config(tmp_path / "ds.json", precision="fp32", zero_optimization={"stage": 2})
    args = ["--deepspeed_config", config, "--output-dir", tmp_path / "run", "--max-steps", 1]
    assert train(*args, "--zero-init") == 1
    err = capsys.readouterr().err
    assert "--zero-init (zero_init) needs ZeRO stage 3" in err and "stage 2" in err
    assert count_zero_init_builds == []


def _source_model(tmp_path: Path):
    import torch

    from dstrain.model import build_model

    torch.manual_seed(123)
    source = build_model("genslm_tiny")
    with torch.no_grad():  # no RNG-seed coincidence can make these equal a fresh build
        for param in source.parameters():
            param.add_(0.25)
    return source


def test_init_checkpoint_under_zero_init_loads_every_tensor(tmp_path, count_zero_init_builds):
    import torch

    source = _source_model(tmp_path)
    pt = tmp_path / "weights.pt"
    torch.save(source.state_dict(), pt)
    hf_dir = tmp_path / "hf"
    source.save_pretrained(hf_dir)
    config = write_config(
        tmp_path / "ds.json",
        precision="fp32",
        zero_optimization={"stage": 3},
        optimizer={"lr": 1e-12},
    )
    for name, path in (("pt", pt), ("hf", hf_dir)):
        run_dir = tmp_path / name
        args = ["--deepspeed_config", config, "--output-dir", run_dir, "--max-steps", 1]
        assert train(*args, "--init-checkpoint", path, "--eval-every", 0, "--dump-params") == 0
        trained = load_params(run_dir / "params_rank0.pt")
        for key, param in source.named_parameters():
            torch.testing.assert_close(trained[key], param.detach(), atol=1e-6, rtol=0)
    assert count_zero_init_builds == [3, 3]


def test_init_checkpoint_mismatch_under_zero_init_names_the_tensors(tmp_path, capsys):
    import torch

    source = _source_model(tmp_path)
    state = source.state_dict()
    state["gpt_neox.embed_in.weight"] = state["gpt_neox.embed_in.weight"][:, :8].clone()
    del state["lm_head.weight"]
    pt = tmp_path / "bad.pt"
    torch.save(state, pt)
    config = write_config(tmp_path / "ds.json", precision="fp32", zero_optimization={"stage": 3})
    args = ["--deepspeed_config", config, "--output-dir", tmp_path / "run", "--max-steps", 1]
    assert train(*args, "--init-checkpoint", pt) == 1
    err = capsys.readouterr().err
    assert "does not fit genslm_tiny" in err
    assert "missing tensor(s): lm_head.weight" in err
    assert "gpt_neox.embed_in.weight is [69, 8] in the checkpoint but [69, " in err


@pytest.mark.multiproc
def test_two_ranks_load_an_init_checkpoint_partition_by_partition(tmp_path):
    import torch

    source = _source_model(tmp_path)
    pt = tmp_path / "weights.pt"
    torch.save(source.state_dict(), pt)
    config = write_config(
        tmp_path / "ds.json",
        precision="fp32",
        zero_optimization={"stage": 3},
        optimizer={"lr": 1e-12},
        batch={"train_micro_batch_size_per_gpu": 4},
    )
    run_dir = tmp_path / "run"
    result = run_in_session(
        [
            *deepspeed_launcher(2),
            str(TRAIN_PY),
            *("--deepspeed_config", str(config), "--output-dir", str(run_dir)),
            *("--init-checkpoint", str(pt), "--max-steps", "1", "--eval-every", "0"),
            *("--dump-params", "--no-progress", "--no-report", "--no-export"),
        ],
        timeout=240,
        cwd=REPO,
    )
    assert result.returncode == 0, result.stdout[-4000:]
    assert "world size 2" in result.stdout
    for rank in (0, 1):
        trained = load_params(run_dir / f"params_rank{rank}.pt")
        for key, param in source.named_parameters():
            torch.testing.assert_close(trained[key], param.detach(), atol=1e-6, rtol=0)
