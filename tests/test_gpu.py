"""GPU checks: skipped without CUDA (this project's CI has none; run them on a GPU box)."""

from __future__ import annotations

import gc
import json
import re

import pytest

torch = pytest.importorskip("torch")

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.slow,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device"),
]


# measured peak / estimated total that the estimate must hit on a GPU. Measured
# (scripts/gpu_check.py, scripts/gpu-results.json; 2026-11-27, one NVIDIA H200, driver
# 580.159.04, torch 2.11.0+cu130, DeepSpeed 0.19.8, transformers 5.23.0, commit 09d9658):
# this test passed with 0.98 at ZeRO-2 (2.90 of 2.94 GiB) and 0.98 at ZeRO-3 (2.94 of
# 2.99 GiB), twice, the same to the byte. The same script's runs at 2048 codons (bf16
# ZeRO-2) gave 1.00-1.01 for genslm_25M at micro 8-32 and 0.82-0.87 for genslm_250M at
# micro 4-16 (the estimate is high there). The band keeps about 15% either side of 0.98
# for other GPUs, torch builds and attention kernels; an estimate off by 2x (a missing
# gradient copy, a bucket counted twice) or a lost activation term falls well outside it.
# Those runs used torch's AdamW; the configs below leave torch_adam out, so since then
# they run DeepSpeed's FusedAdam (dstrain's GPU default, no foreach temporaries at the
# step): scripts/gpu_check.py records the ratio under it.
PEAK_OVER_ESTIMATE = (0.83, 1.15)


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
    # The peak is per process: start from this run (the stage-2 case ran in this process).
    gc.collect()
    torch.cuda.empty_cache()
    torch.cuda.reset_peak_memory_stats()
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
    # max_memory_allocated() over the whole run (the final eval and export included)
    peak = json.loads((run_dir / "summary.json").read_text())["peak_memory_bytes"]
    assert peak >= train_rows[-1]["cuda_max_allocated_bytes"]
    # "peak GPU memory: measured X GiB, estimated Y GiB for ZeRO-s (measured / estimated = R)"
    # The estimate is the banner's: this run's model, batch, longest sequence and stage.
    out = capsys.readouterr().out
    # dstrain's GPU defaults, named by the banner: bf16 as asked, FusedAdam for the auto
    # optimizer block (torch AdamW only where it cannot be built, saying why), SDPA.
    assert re.search(
        r"device cuda:\d+ \(.+\) \| bf16 \| (FusedAdam \(|torch AdamW \(FusedAdam "
        r"unavailable: ).* \| attention sdpa\n",
        out,
    ), out[:3000]
    line = re.search(
        r"peak GPU memory: .* for ZeRO-(\d) \(measured / estimated = ([\d.]+)\)",
        out,
    )
    assert line, "the end summary has no peak-memory comparison"
    assert int(line.group(1)) == stage
    low, high = PEAK_OVER_ESTIMATE
    assert low <= float(line.group(2)) <= high, (
        f"ZeRO-{stage}: torch.cuda.max_memory_allocated() = {peak:,} bytes is "
        f"{line.group(2)} x the estimate's total, outside [{low}, {high}]"
    )
    assert (run_dir / "export" / "model.safetensors").exists()
