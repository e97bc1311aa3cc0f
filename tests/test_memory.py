"""Memory estimates: the ZeRO paper's numbers, DeepSpeed's estimators, the CLI, errors.

Pure and fast: no process group, no model. The real-engine measurement lives in
tests/test_memory_engines.py.
"""

from __future__ import annotations

import dataclasses
import json
import subprocess
import sys
import time

import pytest

from dstrain.architectures import get_architecture
from dstrain.cli import main
from dstrain.ds_run import resolve_ds_run
from dstrain.errors import DstrainError
from dstrain.memory import (
    GIB,
    MemoryInputs,
    ModelDims,
    ZeroKnobs,
    estimate_for_run,
    estimate_from_flags,
    estimate_to_json,
    estimate_zero_memory,
    format_estimate_table,
    format_peak_comparison,
    format_run_banner,
    model_dims_from_architecture,
    paper_model_states_bytes,
    run_estimate_notes,
    zero_knobs_from_run,
)

GB = 10**9  # the ZeRO paper's unit

# fmt: off
ACCEPTANCE = [
    "estimate", "--model", "genslm_2.5B", "--gpus-per-node", "4", "--nodes", "2",
    "--seq-len", "2048", "--micro-batch", "1", "--precision", "bf16", "--gpu-mem-gib", "40",
]
# fmt: on


def _params_only(num_params: int) -> ModelDims:
    return ModelDims(name="params-only", num_params=num_params)


def _inputs(dims: ModelDims, world_size: int, **kw) -> MemoryInputs:
    return MemoryInputs(model=dims, world_size=world_size, gpus_per_node=min(8, world_size), **kw)


# --------------------------------------------------------------------------------------
# The ZeRO paper (arXiv 1910.02054, figure 1): 7.5B params, N = 64, K = 12
# --------------------------------------------------------------------------------------


def test_paper_example_7_5b_on_64_gpus():
    psi = 7_500_000_000
    expected_gb = {0: 120.0, 1: 31.4, 2: 16.6, 3: 1.9}
    for stage, gb in expected_gb.items():
        assert paper_model_states_bytes(psi, stage, 64) / GB == pytest.approx(gb, abs=0.05)
    assert paper_model_states_bytes(psi, 0, 64) == 120 * GB  # (2 + 2 + 12) x 7.5e9 exactly


def test_paper_example_through_the_json_output():
    data = estimate_to_json(estimate_zero_memory(_inputs(_params_only(7_500_000_000), 64)))
    assert data["params"] == 7_500_000_000
    paper = [row["paper_model_states_bytes"] / GB for row in data["stages"]]
    assert paper == pytest.approx([120.0, 31.4, 16.6, 1.9], abs=0.05)
    assert [row["stage"] for row in data["stages"]] == [0, 1, 2, 3]
    for row in data["stages"]:
        assert {"model_states_bytes", "activations_bytes", "total_bytes", "fits"} <= row.keys()


def test_paper_fp32_accounting_has_4_byte_params_and_grads_and_k_8():
    psi, n = 1_000_000, 4
    assert paper_model_states_bytes(psi, 0, n, "fp32") == 16 * psi
    assert paper_model_states_bytes(psi, 1, n, "fp32") == 8 * psi + 8 * psi // n
    assert paper_model_states_bytes(psi, 2, n, "fp32") == 4 * psi + 12 * psi // n
    assert paper_model_states_bytes(psi, 3, n, "fp32") == 16 * psi // n


# --------------------------------------------------------------------------------------
# What DeepSpeed 0.19 holds (measured in tests/test_memory_engines.py): bytes per param
# --------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("precision", "world", "per_param"),
    [
        # stage 0, 1, 2, 3 model-state bytes per parameter, as in the module docstring
        ("bf16", 8, [20, 2 + 2 + 12 / 8, 2 + 20 / 8, 22 / 8]),  # stage 1: max(2, 8/8) = 2
        ("bf16", 2, [20, 2 + 8 / 2 + 12 / 2, 2 + 20 / 2, 22 / 2]),  # stage 1: max(2, 8/2) = 4
        ("fp16", 64, [20, 2 + 2 + 12 / 64, 2 + 20 / 64, 22 / 64]),
        ("fp32", 8, [16, 4 + 4 + 12 / 8, 4 + 20 / 8, 24 / 8]),
        ("fp32", 2, [16, 4 + 4 + 12 / 2, 4 + 20 / 2, 24 / 2]),
    ],
)
def test_model_states_bytes_per_parameter(precision, world, per_param):
    psi = 1_000_000_000
    est = estimate_zero_memory(_inputs(_params_only(psi), world, precision=precision))
    got = [row.model_states_bytes / psi for row in est.stages]
    assert got == pytest.approx(per_param, rel=1e-6)
    for row in est.stages:
        assert row.model_states_bytes == (
            row.params_bytes + row.gradients_bytes + row.optimizer_states_bytes
        )


def test_zero3_counts_persistent_parameters_whole_on_every_rank():
    dims = ModelDims("tiny", 0, hidden_size=256, num_layers=4, num_heads=4, intermediate_size=1024)
    dims = dataclasses.replace(dims, num_params=sum(dims.tensor_numels()))
    zero = ZeroKnobs(stage3_param_persistence_threshold=10_000)
    row = estimate_zero_memory(_inputs(dims, 2, zero=zero)).stage(3)
    # LayerNorm weights/biases and linear biases (<= 10,000 elements): 4 x 3,328 + 512.
    assert row.params_bytes == 2 * (dims.num_params // 2) + 2 * 13_824


def test_zero3_fp32_gradient_copy_is_capped_by_sub_group_size():
    psi, world = 1_600_000_000, 2  # 8e8 per rank, under the default sub_group_size (1e9)
    small = ZeroKnobs(sub_group_size=1_000_000)
    big = estimate_zero_memory(_inputs(_params_only(psi), world)).stage(3)
    capped = estimate_zero_memory(_inputs(_params_only(psi), world, zero=small)).stage(3)
    # flat 16-bit copy (2) + fp32 cast (4) per element of one sub-group, not of the partition
    assert big.gradients_bytes - capped.gradients_bytes == 6 * (psi // world - 1_000_000)


def test_optimizer_offload_leaves_16_bit_params_on_the_gpu():
    psi, world = 1_000_000_000, 8
    zero = ZeroKnobs(offload_optimizer="cpu")
    est = estimate_zero_memory(_inputs(_params_only(psi), world, zero=zero))
    assert est.stage(2).model_states_bytes == 2 * psi
    assert est.stage(1).model_states_bytes == 4 * psi  # full grads until the reduction
    assert est.stage(3).model_states_bytes == 2 * psi // world
    # fp32 master + fp32 grads + moments + 16-bit staging = 18 bytes per param, per rank
    assert est.stage(2).cpu_offload_bytes_per_node == 8 * 18 * psi // world
    assert "ignores it at stage 0" in " ".join(est.stage(0).notes)


def test_zero2_offload_cpu_ram_per_node_scales_with_gpus_per_node_not_total_gpus():
    psi = 1_000_000_000
    zero = ZeroKnobs(offload_optimizer="cpu")

    def per_node(gpus_per_node: int, nodes: int) -> int:
        inp = MemoryInputs(
            model=_params_only(psi),
            world_size=gpus_per_node * nodes,
            gpus_per_node=gpus_per_node,
            zero=zero,
        )
        return estimate_zero_memory(inp).stage(2).cpu_offload_bytes_per_node

    # A node hosts gpus_per_node partitions of 1/N of the state: more nodes, less per node.
    assert per_node(4, 2) == 2 * per_node(4, 4)
    assert per_node(8, 1) == per_node(4, 1) == 18 * psi


def test_offload_param_below_stage_3_is_ignored_like_deepspeed_does():
    zero = ZeroKnobs(offload_param="cpu")
    est = estimate_zero_memory(_inputs(_params_only(10**9), 8, zero=zero))
    plain = estimate_zero_memory(_inputs(_params_only(10**9), 8))
    assert est.stage(2).model_states_bytes == plain.stage(2).model_states_bytes
    assert "offload_param needs ZeRO-3" in " ".join(est.stage(2).notes)
    assert est.stage(3).params_bytes == 0  # no shape: no persistent params known


# --------------------------------------------------------------------------------------
# DeepSpeed's own estimators, where their assumptions coincide with ours
# --------------------------------------------------------------------------------------


def test_zero2_matches_deepspeed_estimator_plus_the_flat_gradient_copy():
    stage_1_and_2 = pytest.importorskip("deepspeed.runtime.zero.stage_1_and_2")
    psi, gpus_per_node, nodes = 2_533_931_008, 4, 2
    world = gpus_per_node * nodes
    _, ds_gpu = stage_1_and_2.estimate_zero2_model_states_mem_needs(
        psi, gpus_per_node, nodes, cpu_offload=False
    )
    row = estimate_zero_memory(_inputs(_params_only(psi), world)).stage(2)
    # Same: 16-bit params (2), 16-bit grads (2), fp32 grads (4), fp32 master (4), moments (8).
    # DeepSpeed's estimator leaves out the flat 16-bit copy step() makes before the fp32
    # cast (stage_1_and_2.py: self.flatten(self.averaged_gradients[i])): 2Ψ/N more here.
    assert row.model_states_bytes == pytest.approx(ds_gpu + 2 * psi / world, rel=1e-6)


def test_zero2_offload_gpu_matches_deepspeed_but_cpu_figure_differs():
    stage_1_and_2 = pytest.importorskip("deepspeed.runtime.zero.stage_1_and_2")
    psi = 2_533_931_008
    zero = ZeroKnobs(offload_optimizer="cpu")
    for gpus_per_node, nodes in [(4, 1), (4, 2), (4, 8)]:
        ds_cpu, ds_gpu = stage_1_and_2.estimate_zero2_model_states_mem_needs(
            psi, gpus_per_node, nodes, cpu_offload=True
        )
        inp = MemoryInputs(
            model=_params_only(psi),
            world_size=gpus_per_node * nodes,
            gpus_per_node=gpus_per_node,
            zero=zero,
        )
        row = estimate_zero_memory(inp).stage(2)
        assert row.model_states_bytes == ds_gpu  # 2Ψ of 16-bit params
        # DeepSpeed: Ψ x max(4 x total GPUs, 16) x 1.5, growing with the node count;
        # dstrain: (16 + 2)Ψ/N per rank x GPUs per node, shrinking with it.
        assert ds_cpu == int(psi * max(4 * gpus_per_node * nodes, 16) * 1.5)
        assert row.cpu_offload_bytes_per_node == pytest.approx(18 * psi / nodes, rel=1e-6)


def test_zero3_matches_deepspeed_estimator_plus_the_16_bit_gradient_partition():
    stage3 = pytest.importorskip("deepspeed.runtime.zero.stage3")
    dims = model_dims_from_architecture(get_architecture("genslm_2.5B"))
    gpus_per_node, nodes = 4, 2
    world = gpus_per_node * nodes
    largest_layer = max(dims.module_numels())
    _, ds_gpu, ds_largest_layer_bytes = stage3.estimate_zero3_model_states_mem_needs(
        dims.num_params, largest_layer, gpus_per_node, nodes, cpu_offload=False
    )
    zero = ZeroKnobs(stage3_param_persistence_threshold=0, stage3_prefetch_bucket_size=0)
    row = estimate_zero_memory(_inputs(dims, world, zero=zero)).stage(3)
    # DeepSpeed: 18Ψ/N (16-bit params, fp32 grads, master, moments) + 4 x largest layer.
    # dstrain adds the 16-bit gradient partition kept all run (stage3.py
    # grad_partitions_flat_buffer) and the flat copy before the fp32 cast: 4Ψ/N; the largest
    # layer (16-bit, gathered) is a buffer here, its gradient goes through the reduce bucket.
    psi = dims.num_params
    assert row.model_states_bytes == pytest.approx(
        ds_gpu - ds_largest_layer_bytes + 4 * psi / world, rel=1e-6
    )
    assert row.comm_buffers["live_params_bytes"] == ds_largest_layer_bytes // 2


# --------------------------------------------------------------------------------------
# Activations (Korthikanti et al., arXiv 2205.05198)
# --------------------------------------------------------------------------------------


def _layer_bytes(field: str, **kw) -> int:
    """Activation bytes of one layer: (2 layers) - (1 layer)."""
    dims = ModelDims("x", 10**6, hidden_size=512, num_heads=8, intermediate_size=2048, **kw)
    one, two = (
        estimate_zero_memory(
            _inputs(
                dataclasses.replace(dims, num_layers=layers),
                1,
                micro_batch=2,
                seq_len=256,
                attention="eager",
            )
        ).stage(0)
        for layers in (1, 2)
    )
    return getattr(two, field) - getattr(one, field)


def test_paper_activation_formula_per_layer_sbh_34_plus_5as_over_h():
    s, b, h, a = 256, 2, 512, 8  # intermediate 4h, as the paper assumes
    assert _layer_bytes("paper_activations_bytes") == s * b * h * (34 + 5 * a * s / h)


def test_genslm_activations_follow_gpt_neox_as_transformers_runs_it():
    s, b, h, a, i = 256, 2, 512, 8, 2048
    sbh, sbi, as2b = s * b * h, s * b * i, a * s * s * b
    # 4sbh shared + Q, K, V (b > 1: V is its own copy) + fp32 softmax and its bf16 cast +
    # 8 saved s x b x i tensors for gelu_fast's MLP; no dropout masks.
    eager = 2 * (4 * sbh + 3 * sbh + 8 * sbi) + 6 * as2b
    assert _layer_bytes("activations_bytes") == eager


def test_sdpa_and_checkpointing_shrink_activations():
    dims = model_dims_from_architecture(get_architecture("genslm_2.5B"))
    s, h, layers = 2048, dims.hidden_size, dims.num_layers

    def acts(**kw) -> int:
        return estimate_zero_memory(_inputs(dims, 8, **kw)).stage(2).activations_bytes

    eager, sdpa, full = acts(attention="eager"), acts(), acts(activation_checkpointing="full")
    assert sdpa < eager
    assert full < sdpa / 10
    # About 2sbh per layer (the layer input in bf16) plus one recomputed layer.
    one_layer = (sdpa - 2 * 2 * s * h - 4 * s * 69) // layers
    assert full == layers * 2 * s * h + one_layer + 2 * 2 * s * h + 4 * s * 69


def test_params_only_reports_activations_unknown():
    est = estimate_from_flags(params=7.5e9, gpus_per_node=8, nodes=8, gpu_mem_gib=80)
    row = est.stage(2)
    assert row.activations_bytes is None
    assert row.fits is None  # model states fit; activations unknown
    assert est.stage(0).fits is False  # 140 GiB of model states alone
    assert "activations are unknown" in est.recommendation
    assert "?" in format_estimate_table(est)


# --------------------------------------------------------------------------------------
# Recommendation
# --------------------------------------------------------------------------------------


def test_recommends_the_lowest_stage_that_fits_with_headroom():
    dims = model_dims_from_architecture(get_architecture("genslm_2.5B"))
    est = estimate_zero_memory(_inputs(dims, 8, gpu_mem_gib=40))
    assert [r.fits for r in est.stages] == [False, True, True, True]
    assert est.recommended_stage == 1
    assert est.recommendation.startswith("ZeRO-1, the lowest stage that fits")
    # 0% headroom lets more fit; 90% nothing
    assert (
        estimate_zero_memory(_inputs(dims, 8, gpu_mem_gib=40, headroom=0.9)).recommended_stage
        is None
    )


def test_when_nothing_fits_it_names_the_changes_that_make_a_stage_fit():
    dims = model_dims_from_architecture(get_architecture("genslm_2.5B"))
    est = estimate_zero_memory(_inputs(dims, 8, gpu_mem_gib=24, micro_batch=8))
    assert est.recommended_stage is None
    assert "--activation-checkpointing full" in est.recommendation
    assert "fits" in est.recommendation
    hopeless = estimate_zero_memory(_inputs(_params_only(10**12), 1, gpu_mem_gib=1))
    assert "add GPUs" in hopeless.recommendation


def test_zero3_without_zero_init_must_fit_the_whole_16_bit_model_at_startup():
    dims = model_dims_from_architecture(get_architecture("genslm_25B"))
    inp = _inputs(dims, 64, gpu_mem_gib=40, activation_checkpointing="full", zero_init=False)
    row = estimate_zero_memory(inp).stage(3)
    assert row.startup_bytes == 2 * dims.num_params > 36 * GIB
    assert row.fits is False
    assert "--zero-init" in estimate_zero_memory(inp).recommendation
    # dstrain train builds under zero.Init at stage 3 unless told not to (zero_init None)
    for zero_init in (True, None):
        row = estimate_zero_memory(dataclasses.replace(inp, zero_init=zero_init)).stage(3)
        assert row.fits is True and row.startup_bytes == 0


def test_cpu_per_node_counts_the_whole_fp32_build_where_train_does_one():
    dims = model_dims_from_architecture(get_architecture("genslm_2.5B"))
    whole = 4 * dims.num_params * 8  # fp32 on each of 8 ranks of the node
    default = estimate_zero_memory(_inputs(dims, 8))
    assert [r.cpu_bytes_per_node for r in default.stages] == [whole, whole, whole, 0]
    old_path = estimate_zero_memory(_inputs(dims, 8, zero_init=False))
    assert [r.cpu_bytes_per_node for r in old_path.stages] == [whole] * 4
    # --zero-init cannot help stages 0-2: DeepSpeed partitions at build time for stage 3 only
    forced = estimate_zero_memory(_inputs(dims, 8, zero_init=True))
    assert [r.cpu_bytes_per_node for r in forced.stages] == [whole, whole, whole, 0]


def test_no_gpu_memory_given_means_fit_unknown():
    est = estimate_from_flags(model_name="genslm_25M")
    assert all(r.fits is None for r in est.stages)
    assert est.recommendation.startswith("give --gpu-mem-gib")


def test_cpu_ram_per_node_is_checked_when_given():
    dims = model_dims_from_architecture(get_architecture("genslm_2.5B"))
    zero = ZeroKnobs(offload_optimizer="cpu")
    inp = _inputs(dims, 8, gpu_mem_gib=40, cpu_mem_gib=16, zero=zero)
    row = estimate_zero_memory(inp).stage(2)
    assert row.fits is False
    assert "CPU RAM per node" in " ".join(row.notes)


# --------------------------------------------------------------------------------------
# DeepSpeed config and the train loop's banner
# --------------------------------------------------------------------------------------

DS_CONFIG = {
    "train_micro_batch_size_per_gpu": 2,
    "gradient_accumulation_steps": 4,
    "bf16": {"enabled": True},
    "zero_optimization": {
        "stage": 3,
        "reduce_bucket_size": 5e7,
        "stage3_prefetch_bucket_size": 1e7,
        "stage3_max_live_parameters": 1e8,
        "stage3_param_persistence_threshold": "auto",
        "offload_optimizer": {"device": "cpu", "pin_memory": True},
    },
}


def test_reads_stage_buckets_offload_precision_and_micro_batch_from_a_ds_config():
    run = resolve_ds_run(DS_CONFIG)
    zero = zero_knobs_from_run(run)
    micro, _ = run_estimate_notes(run, world_size=8)
    assert (zero.stage, zero.reduce_bucket_size, zero.stage3_prefetch_bucket_size) == (
        3,
        5 * 10**7,
        10**7,
    )
    assert zero.offload_optimizer == "cpu" and zero.offload_param == "none"
    assert zero.overlap_comm is True  # DeepSpeed's default for stage 3
    assert zero.stage3_param_persistence_threshold == 100_000  # "auto" -> default
    assert (run.precision, micro) == ("bf16", 2)


def test_micro_batch_derived_from_train_batch_size_like_deepspeed():
    config = {"train_batch_size": 64, "gradient_accumulation_steps": 2}
    run = resolve_ds_run(config)
    micro, notes = run_estimate_notes(run, world_size=8)
    assert micro == 4 and run.precision == "fp32"  # no bf16 / fp16 block: DeepSpeed trains fp32
    assert any("train_batch_size 64" in note for note in notes)


@pytest.mark.parametrize(
    ("config", "precision", "stage"),
    [
        ({"bfloat16": {"enabled": True}}, "bf16", 0),  # DeepSpeed's old alias
        ({"bf16": {"enabled": True}, "zero_optimization": False}, "bf16", 0),
        ({"zero_optimization": True}, "fp32", 1),  # the deprecated boolean form
        ({"fp16": {"enabled": True}, "zero_optimization": {"stage": 2}}, "fp16", 2),
    ],
)
def test_estimate_config_file_reads_aliases_as_deepspeed_does(tmp_path, config, precision, stage):
    path = tmp_path / "ds.json"
    path.write_text(json.dumps({"train_micro_batch_size_per_gpu": 1, **config}))
    est = estimate_from_flags(model_name="genslm_25M", ds_config_path=str(path))
    assert (est.inputs.precision, est.inputs.zero.stage) == (precision, stage)
    # Model-state bytes are those of the precision DeepSpeed trains in (fp32 differs).
    same = estimate_from_flags(model_name="genslm_25M", precision=precision)
    other = estimate_from_flags(
        model_name="genslm_25M", precision="fp32" if precision != "fp32" else "bf16"
    )
    assert est.stage(0).model_states_bytes == same.stage(0).model_states_bytes
    assert est.stage(0).model_states_bytes != other.stage(0).model_states_bytes


def test_ds_config_problems_are_reported_together(tmp_path):
    bad = {
        "train_micro_batch_size_per_gpu": 1,
        "zero_optimization": {"stage": 4, "reduce_bucket_size": "big"},
        "bf16": {"enabled": True},
        "fp16": {"enabled": True},
    }
    path = tmp_path / "bad.json"
    path.write_text(json.dumps(bad))
    with pytest.raises(DstrainError) as err:
        estimate_from_flags(model_name="genslm_25M", ds_config_path=str(path))
    message = str(err.value)
    for fragment in ("zero_optimization.stage", "bf16"):
        assert fragment in message


def test_estimate_for_run_and_banner_lines():
    arch = get_architecture("genslm_250M")
    est = estimate_for_run(
        arch, resolve_ds_run(DS_CONFIG), world_size=8, gpus_per_node=4, seq_len=2048
    )
    assert est.inputs.zero.stage == 3 and est.inputs.micro_batch == 2
    assert est.stage(3).configured and not est.stage(2).configured
    banner = format_run_banner(est)
    assert banner.startswith("memory estimate, ZeRO-3, per GPU:")
    assert "CPU RAM per node for offload" in banner
    line = format_peak_comparison(est, measured_peak_bytes=est.stage(3).total_bytes // 2)
    assert "measured / estimated = 0.50" in line


# --------------------------------------------------------------------------------------
# CLI
# --------------------------------------------------------------------------------------


def test_acceptance_command_prints_table_and_recommendation(capsys):
    main(ACCEPTANCE)
    out = capsys.readouterr().out
    assert "genslm_2.5B, 2,533,931,008 params" in out
    assert "2 node(s) x 4 GPU(s) = 8 ranks" in out
    for stage in range(4):
        assert f"\n{stage} " in out
    assert "Recommendation: ZeRO-1, the lowest stage that fits" in out


def test_json_output(capsys):
    main([*ACCEPTANCE, "--json"])
    data = json.loads(capsys.readouterr().out)
    assert data["params"] == 2_533_931_008
    assert data["recommended_stage"] == 1
    rows = data["stages"]
    assert [r["fits"] for r in rows] == [False, True, True, True]
    for r in rows:
        assert (
            r["total_bytes"]
            == r["model_states_bytes"] + r["activations_bytes"] + r["comm_buffer_bytes"]
        )


def test_cli_reads_deepspeed_config_and_flags_win(tmp_path, capsys):
    path = tmp_path / "ds.json"
    path.write_text(json.dumps(DS_CONFIG))
    main(
        [
            "estimate",
            "--model",
            "genslm_250M",
            "--deepspeed_config",
            str(path),
            "--micro-batch",
            "1",
            "--json",
        ]
    )
    data = json.loads(capsys.readouterr().out)
    assert data["run"]["micro_batch"] == 1  # the flag beats the config's 2
    assert data["run"]["zero_optimization"]["offload_optimizer"] == "cpu"
    assert [r["configured"] for r in data["stages"]] == [False, False, False, True]


def test_hostfile_gives_world_size_and_gpus_per_node(tmp_path, capsys):
    hostfile = tmp_path / "hostfile"
    hostfile.write_text("node-a slots=4\nnode-b slots=4\nnode-c slots=4\n")
    main(["estimate", "--model", "genslm_25M", "--hostfile", str(hostfile), "--json"])
    cluster = json.loads(capsys.readouterr().out)["cluster"]
    assert (cluster["world_size"], cluster["gpus_per_node"], cluster["nodes"]) == (12, 4, 3)


def test_custom_shape_counts_params_like_gpt_neox(capsys):
    main(
        [
            "estimate",
            "--hidden",
            "512",
            "--layers",
            "8",
            "--heads",
            "8",
            "--intermediate",
            "2048",
            "--json",
        ]
    )
    assert (
        json.loads(capsys.readouterr().out)["params"] == get_architecture("genslm_25M").num_params()
    )


def test_model_config_json_path(tmp_path, capsys):
    config = {
        "model_type": "gpt_neox",
        "hidden_size": 512,
        "num_hidden_layers": 8,
        "num_attention_heads": 8,
        "intermediate_size": 2048,
        "vocab_size": 69,
    }
    (tmp_path / "config.json").write_text(json.dumps(config))
    main(["estimate", "--model", str(tmp_path / "config.json"), "--json"])
    assert json.loads(capsys.readouterr().out)["params"] == 25_290_752


@pytest.mark.parametrize(
    ("argv", "fragments"),
    [
        (["--model", "genslm_2.5b"], ["unknown model architecture", "Did you mean 'genslm_2.5B'"]),
        ([], ["give --model NAME"]),
        (["--model", "genslm_25M", "--params", "1e9"], ["not both"]),
        (["--params", "1e9", "--hidden", "512"], ["--layers, --heads, --intermediate missing"]),
        (["--params", "2.5"], ["--params must be a whole number"]),
        (["--model", "genslm_25M", "--nodes", "2", "--hostfile", "h"], ["--hostfile or --nodes"]),
        (
            ["--model", "genslm_25M", "--deepspeed_config", "/nonexistent/ds.json"],
            ["does not exist", "--deepspeed_config"],
        ),
        (
            ["--model", "genslm_25M", "--hostfile", "/nonexistent/hostfile"],
            ["hostfile", "does not exist"],
        ),
    ],
)
def test_cli_errors_are_one_paragraph_with_the_flag(argv, fragments, capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(["estimate", *argv])
    assert exit_info.value.code in (1, 2)
    err = capsys.readouterr().err
    assert err.startswith("error: ") and "Traceback" not in err
    for fragment in fragments:
        assert fragment in err


def test_cli_rejects_a_ds_config_that_is_not_json(tmp_path, capsys):
    path = tmp_path / "ds.json"
    path.write_text('{"zero_optimization": {"stage": 2,}}')
    with pytest.raises(SystemExit):
        main(["estimate", "--model", "genslm_25M", "--deepspeed_config", str(path)])
    assert "malformed JSON at line 1" in capsys.readouterr().err


def test_estimate_imports_no_torch_deepspeed_or_transformers():
    code = (
        "import sys, time\n"
        "t = time.perf_counter()\n"
        "from dstrain.cli import main\n"
        "try:\n"
        f"    main({ACCEPTANCE!r})\n"
        "except SystemExit as e:\n"
        "    assert not e.code, e.code\n"
        "heavy = sorted(m for m in ('torch', 'deepspeed', 'transformers') if m in sys.modules)\n"
        "print('HEAVY', heavy, time.perf_counter() - t)\n"
    )
    started = time.perf_counter()
    out = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, timeout=60, check=True
    ).stdout
    assert "Recommendation:" in out
    assert "HEAVY []" in out
    assert time.perf_counter() - started < 20  # well under a second when the box is idle
