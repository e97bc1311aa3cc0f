"""The DeepSpeed presets committed in ds_configs/, defined once.

`scripts/gen_ds_configs.py` writes them; a test regenerates them in memory and compares
byte for byte, so a change of defaults shows up as a diff in ds_configs/.
"""

from __future__ import annotations

from dstrain.ds_config import build_ds_config, render_ds_config
from dstrain.settings import make_deepspeed_settings

_OFFLOAD_CPU = {"device": "cpu", "pin_memory": True}


def preset_settings() -> dict[str, dict]:
    """Preset name -> settings dict (everything else stays at its default)."""
    presets: dict[str, dict] = {}
    for stage in range(4):
        for precision in ("bf16", "fp16", "fp32"):
            presets[f"zero{stage}_{precision}"] = {
                "precision": precision,
                "zero_optimization": {"stage": stage},
            }
    presets["zero2_bf16_offload"] = {
        "precision": "bf16",
        "zero_optimization": {"stage": 2, "offload_optimizer": _OFFLOAD_CPU},
    }
    presets["zero3_bf16_offload"] = {
        "precision": "bf16",
        "zero_optimization": {
            "stage": 3,
            "offload_optimizer": _OFFLOAD_CPU,
            "offload_param": _OFFLOAD_CPU,
        },
    }
    return presets


def render_presets() -> dict[str, str]:
    """File name -> exact file text for every preset."""
    return {
        f"{name}.json": render_ds_config(build_ds_config(make_deepspeed_settings(data, name)))
        for name, data in preset_settings().items()
    }
