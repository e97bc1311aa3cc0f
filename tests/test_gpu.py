"""GPU checks: skipped without CUDA (this project's CI has none; run them on a GPU box)."""

from __future__ import annotations

import json

import pytest

torch = pytest.importorskip("torch")

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.slow,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device"),
]


@pytest.mark.parametrize("stage", [2, 3])
def test_bf16_training_on_one_gpu_reports_peak_memory(tmp_path, capsys, stage):
    from dstrain.ds_config import build_ds_config, render_ds_config
    from dstrain.settings import make_deepspeed_settings
    from dstrain.train import main

    config = tmp_path / "ds.json"
    config.write_text(
        render_ds_config(
            build_ds_config(
                make_deepspeed_settings(
                    {
                        "precision": "bf16",
                        "zero_optimization": {"stage": stage},
                        "batch": {"train_micro_batch_size_per_gpu": 8},
                    }
                )
            )
        )
    )
    run_dir = tmp_path / "run"
    assert (
        main(
            [
                "--deepspeed_config",
                str(config),
                "--model",
                "genslm_25M",
                "--output-dir",
                str(run_dir),
                "--max-steps",
                "5",
                "--eval-every",
                "0",
                "--no-progress",
            ]
        )
        == 0
    )
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    train_rows = [r for r in rows if "loss" in r]
    assert train_rows[-1]["cuda_max_allocated_bytes"] > 0
    assert "peak GPU memory: measured" in capsys.readouterr().out
    assert (run_dir / "export" / "model.safetensors").exists()
