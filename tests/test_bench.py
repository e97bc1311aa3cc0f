"""scripts/bench.py: a quick run end to end so it cannot rot, and README's Performance table
in step with the committed scripts/bench-results.json."""

from __future__ import annotations

import hashlib
import importlib.util
import json
import math
import sys
from pathlib import Path

import pytest
from subprocs import clean_env, run_in_session

REPO = Path(__file__).resolve().parent.parent
BENCH = REPO / "scripts" / "bench.py"
RESULTS = REPO / "scripts" / "bench-results.json"
COMPARISONS = (  # every benchmark with a target, in a full and a quick run alike
    "cli_help",
    "cli_gen_config",
    "data_prep",
    "cache_size",
    "throughput_genslm_tiny",
    "loop_overhead",
    "memory_estimate",
)
MIXED_SUFFIXES = ("share", "vs_random", "vs_hf")
"""Section 9's entries per model (`mixed_{model}_{suffix}`), for the plan's models."""
MIXED_SIDES = ("random", "grouped", "packed", "hf_group_by_length")


def load_bench():
    """scripts/bench.py as a module (its top level imports the standard library only)."""
    spec = importlib.util.spec_from_file_location("dstrain_bench", BENCH)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up there
    spec.loader.exec_module(module)
    return module


def check_entry(name: str, entry: dict) -> None:
    assert isinstance(entry["met"], bool), name
    assert math.isfinite(entry["value"]) and math.isfinite(entry["margin"]), name
    assert entry["target"]["op"] in (">=", "<="), name
    assert entry["verdict"].startswith("met" if entry["met"] else "missed"), name
    assert set(entry["summary"]) == {"dstrain", "baseline", "result"}, name


def check_mixed(results: dict) -> None:
    """Section 9 for every model of the plan: the targets, the set, the four sides."""
    benchmarks = results["benchmarks"]
    for model in results["plan"]["mixed"]:
        for suffix in MIXED_SUFFIXES:
            check_entry(f"mixed_{model}_{suffix}", benchmarks[f"mixed_{model}_{suffix}"])
        mixed = benchmarks[f"mixed_{model}_share"]
        composition = mixed["set"]
        assert composition["sars_cov_2_orfs"] > 0 and composition["h3n2_examples"] > 0
        assert (
            composition["min_codons"]
            <= composition["median_codons"]
            <= composition["max_codons"]
            <= mixed["max_length"]
        )
        assert mixed["token_budget"] == mixed["micro_batch"] * mixed["max_length"]
        for side in MIXED_SIDES:
            figures = mixed["sides"][side]
            assert figures["useful_tokens_per_s"] > 0, side
            assert 0 < figures["useful_token_share"] <= 1, side
            assert all(mixed["samples_per_step"][side]), side
        # The HF Trainer's steps were counted in its forward: every position, real or pad.
        for run in mixed["samples_per_step"]["hf_group_by_length"]:
            assert all(s["positions"] >= s["real_tokens"] > 0 for s in run)
        # Packing fills its rows; random micro-batches of mixed lengths do not.
        shares = {side: mixed["sides"][side]["useful_token_share"] for side in MIXED_SIDES}
        assert shares["packed"] > shares["random"], shares


@pytest.mark.slow
@pytest.mark.multiproc
def test_quick_benchmark_runs_every_comparison(tmp_path):
    out = tmp_path / "bench.json"
    # --peak-tflops: on CPU too the MFU arithmetic and its summary run end to end.
    command = [sys.executable, str(BENCH), "--quick", "--output", str(out), "--peak-tflops", "0.01"]
    result = run_in_session(command, timeout=240, env=clean_env(), cwd=REPO)
    output = result.stdout
    assert result.returncode == 0, output[-4000:]
    assert "benchmark" in output and f"wrote {out}" in output

    results = json.loads(out.read_text())
    assert results["mode"] == "quick"
    assert results["machine"]["logical_cores"] >= 1
    assert results["versions"]["torch"] and results["versions"]["deepspeed"]
    assert len(results["load_average"]["before"]) == 3
    benchmarks = results["benchmarks"]
    for name in COMPARISONS:
        check_entry(name, benchmarks[name])
    # Raw samples are kept, and the loops really ran and moved tokens.
    throughput = benchmarks["throughput_genslm_tiny"]
    for side in ("dstrain", "upstream"):
        assert throughput["samples_useful_tokens_per_s"][side]
        assert throughput["median_useful_tokens_per_s"][side] > 0
    # Pad-to-2048 pushes more positions than real codons; longest padding hardly any.
    medians = throughput["median_tokens_per_s"]
    assert medians["upstream"] > throughput["median_useful_tokens_per_s"]["upstream"]
    assert benchmarks["loop_overhead"]["samples_s_per_step"]["bare_loop"]
    assert benchmarks["cache_size"]["token_file_bytes_per_codon"] == 1.0
    assert benchmarks["cache_size"]["upstream_int64_bytes_per_codon"] == 8
    data_prep = benchmarks["data_prep"]
    assert data_prep["spread"]["min"] <= data_prep["value"] <= data_prep["spread"]["max"]
    assert len(data_prep["samples"]["speedup"]) == results["plan"]["data_repetitions"]
    check_entry("embed_genslm_tiny", benchmarks["embed_genslm_tiny"])
    # Both embedding ways pooled the same weights over the same real codons.
    assert benchmarks["embed_genslm_tiny"]["max_abs_diff_whole_codon_records"] < 1e-4
    generation = benchmarks["generate_genslm_tiny"]["median_codons_per_s"]
    assert generation["dstrain"] > 0 and generation["upstream"] > 0
    assert results["git"]["bench_py_sha256"] == sha256(BENCH)
    assert benchmarks["memory_estimate"]["cases"]
    # No GPU: the MFU code still ran, on CPU, and says it was skipped for real numbers.
    mfu = benchmarks["mfu"]
    assert mfu["runs"] and mfu["runs"][0]["mfu"] > 0
    if not results["machine"]["gpu"]:
        assert "skipped" in mfu
    assert list(results["plan"]["mixed"]) == ["genslm_tiny"]
    check_mixed(results)
    # README's block gains the mixed-length table, with the HF Trainer's row.
    block = load_bench().render_readme_block(results)
    assert "Mixed-length set:" in block and "| genslm_tiny | HF Trainer, `group_by_length`" in block


def test_committed_results_cover_every_comparison():
    results = json.loads(RESULTS.read_text())
    assert results["mode"] == "full"
    assert RESULTS.read_text().endswith("}\n")
    for name in COMPARISONS:
        check_entry(name, results["benchmarks"][name])
    assert "mfu" in results["benchmarks"]
    embeds = [k for k in results["benchmarks"] if k.startswith("embed_")]
    assert embeds and any(k.startswith("generate_") for k in results["benchmarks"])
    for name in embeds:
        check_entry(name, results["benchmarks"][name])
    assert {"genslm_small", "genslm_25M"} <= set(results["plan"].get("mixed", {})), (
        "scripts/bench-results.json has no mixed-length section (9); run "
        "`python scripts/bench.py --update-readme` again and commit the results"
    )
    check_mixed(results)


def sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def test_committed_results_come_from_the_current_bench_py():
    """scripts/bench-results.json must be produced by this scripts/bench.py: after any edit
    to bench.py, regenerate the results (and README's table) on a quiet machine with
    `python scripts/bench.py --update-readme` and commit them together."""
    git = json.loads(RESULTS.read_text())["git"]
    assert git.get("bench_py_sha256") == sha256(BENCH), (
        "scripts/bench-results.json was written by another version of scripts/bench.py "
        f"(recorded sha256 {git.get('bench_py_sha256')}, commit {git.get('commit')}); run "
        "`python scripts/bench.py --update-readme` again and commit the results"
    )


def test_readme_performance_table_matches_results_file():
    bench = load_bench()
    expected = bench.render_readme_block(json.loads(RESULTS.read_text()))
    assert bench.readme_block() == expected, (
        "README's Performance table differs from scripts/bench-results.json; run "
        "`python scripts/bench.py --update-readme` (or paste render_readme_block's output)"
    )


def test_mfu_arithmetic():
    from dstrain.architectures import get_architecture

    bench = load_bench()
    arch = get_architecture("genslm_25M")
    # 6 FLOPs per matmul parameter (embedding lookup excluded) + attention 12 * L * h * s.
    matmul = 25_290_752 - 69 * 512
    assert bench.train_flops_per_token(arch, 2048) == 6 * matmul + 12 * 8 * 512 * 2048
    assert bench.bf16_peak_flops("NVIDIA H100 80GB HBM3") == 989e12
    assert bench.bf16_peak_flops("NVIDIA H100 PCIe") == 756e12
    assert bench.bf16_peak_flops("NVIDIA A100-SXM4-80GB") == 312e12
    assert bench.bf16_peak_flops("Some Future GPU") is None
