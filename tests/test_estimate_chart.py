"""`dstrain estimate --plot`: the chart shows the table's numbers.

Checked on the data behind the figure and on the Figure's own artists (bar patches, the
usable-memory line, the recommended marker), never on pixels.
"""

from __future__ import annotations

import re
import struct
import subprocess
import sys

import pytest
from click.testing import CliRunner

from dstrain.cli import cli
from dstrain.estimate_chart import (
    COMPONENTS,
    MEASURED_OFFSET,
    draw_estimate_chart,
    estimate_chart_data,
)
from dstrain.memory import GIB, estimate_from_flags, format_estimate_table

ACCEPTANCE = ["--model", "genslm_2.5B", "--gpus-per-node", "8", "--gpu-mem-gib", "40"]
"""The issue's acceptance command (without --plot)."""

TABLE_COLUMNS = {
    "parameters": 1,
    "gradients": 2,
    "optimizer states": 3,
    "activations": 6,
    "buffers": 7,
}
"""Component -> column of a `format_estimate_table` row (0 is the stage, 4 the states,
5 the paper's states, 8 the total)."""


def acceptance_estimate(**overrides):
    flags = {"model_name": "genslm_2.5B", "gpus_per_node": 8, "gpu_mem_gib": 40.0}
    return estimate_from_flags(**{**flags, **overrides})


def table_rows(table: str) -> dict[int, list[str]]:
    """Stage -> the printed columns of its row (`*` of the configured stage dropped)."""
    rows = {}
    for line in table.splitlines():
        if re.match(r"^[0-3][ *]", line):
            cols = line.replace("*", " ").replace("(", " ").replace(")", " ").split()
            rows[int(cols[0])] = cols
    assert sorted(rows) == [0, 1, 2, 3], table
    return rows


def bar_containers(fig) -> dict[str, list]:
    """Component -> its bar patches, one per stage in stage order."""
    (ax,) = fig.axes
    return {c.get_label(): list(c.patches) for c in ax.containers}


def by_gid(artists, gid: str) -> list:
    return [a for a in artists if a.get_gid() == gid]


def png_size(data: bytes) -> tuple[int, int]:
    """(width, height) from the IHDR chunk that follows a PNG's 8-byte signature."""
    assert data[:8] == b"\x89PNG\r\n\x1a\n", data[:8]
    assert data[12:16] == b"IHDR"
    return struct.unpack(">II", data[16:24])


def test_acceptance_command_writes_a_png_and_still_prints_the_table(tmp_path):
    path = tmp_path / "e.png"
    result = CliRunner().invoke(cli, ["estimate", *ACCEPTANCE, "--plot", str(path)])
    assert result.exit_code == 0, result.output
    assert result.stdout == format_estimate_table(acceptance_estimate()) + "\n"
    assert f"wrote {path}" in result.stderr
    assert png_size(path.read_bytes()) == (1080, 600)


def test_json_and_plot_together(tmp_path):
    path = tmp_path / "sub" / "e.svg"  # the directory is made; svg by the suffix
    result = CliRunner().invoke(cli, ["estimate", *ACCEPTANCE, "--json", "--plot", str(path)])
    assert result.exit_code == 0, result.output
    assert result.stdout.lstrip().startswith("{")
    assert path.read_text().lstrip().startswith("<?xml")


def test_bar_heights_are_the_tables_numbers():
    estimate = acceptance_estimate()
    rows = table_rows(format_estimate_table(estimate))
    chart = estimate_chart_data(estimate)
    fig = draw_estimate_chart(chart)
    patches = bar_containers(fig)
    assert list(patches) == list(COMPONENTS)
    for bar in chart.stages:
        printed = rows[bar.stage]
        for component, column in TABLE_COLUMNS.items():
            assert f"{bar.gib[component]:.2f}" == printed[column], (bar.stage, component)
        assert f"{bar.total_gib:.2f}" == printed[8]
        assert sum(bar.gib.values()) == pytest.approx(bar.total_gib)
        bottom = 0.0
        for component in COMPONENTS:  # the drawn patch: same height, stacked in order
            patch = patches[component][bar.stage]
            assert patch.get_x() + patch.get_width() / 2 == pytest.approx(bar.stage)
            assert patch.get_y() == pytest.approx(bottom)
            assert patch.get_height() == pytest.approx(bar.gib[component])
            bottom += patch.get_height()
        assert bottom == pytest.approx(bar.total_gib)


def test_usable_line_and_recommended_marker():
    estimate = acceptance_estimate()
    chart = estimate_chart_data(estimate)
    assert chart.usable_gib == pytest.approx(40 * 0.9, abs=1e-6)
    assert chart.usable_gib == estimate.usable_gpu_bytes / GIB
    assert estimate.recommended_stage == chart.recommended_stage == 1
    fig = draw_estimate_chart(chart)
    (ax,) = fig.axes
    (line,) = by_gid(ax.lines, "usable")
    assert list(line.get_ydata()) == pytest.approx([chart.usable_gib] * 2)
    (marker,) = by_gid(ax.texts, "recommended")
    assert marker.xy[0] == 1
    assert marker.get_text() == "recommended"
    bold = [t.get_text() for t in ax.get_xticklabels() if t.get_fontweight() == "bold"]
    assert bold == ["ZeRO-1"]


def test_without_gpu_memory_there_is_no_line_and_no_recommendation():
    chart = estimate_chart_data(acceptance_estimate(gpu_mem_gib=None))
    assert chart.usable_gib is None and chart.recommended_stage is None
    (ax,) = draw_estimate_chart(chart).axes
    assert by_gid(ax.lines, "usable") == []
    assert by_gid(ax.texts, "recommended") == []
    assert "--gpu-mem-gib" in ax.get_title()


def test_configured_stage_is_marked():
    chart = estimate_chart_data(acceptance_estimate(ds_config_path="ds_configs/zero3_bf16.json"))
    assert chart.configured_stage == 3
    (ax,) = draw_estimate_chart(chart).axes
    labels = [t.get_text() for t in ax.get_xticklabels()]
    assert labels == ["ZeRO-0", "ZeRO-1", "ZeRO-2", "ZeRO-3\n(config)"]


def test_measured_peaks_are_points_beside_the_bars():
    measured = {2: 18 * GIB, 3: 14 * GIB}
    chart = estimate_chart_data(acceptance_estimate(), measured_peak_bytes=measured)
    assert [bar.measured_peak_gib for bar in chart.stages] == [None, None, 18.0, 14.0]
    (ax,) = draw_estimate_chart(chart).axes
    (points,) = by_gid(ax.lines, "measured")
    assert list(points.get_xdata()) == pytest.approx([2 + MEASURED_OFFSET, 3 + MEASURED_OFFSET])
    assert list(points.get_ydata()) == pytest.approx([18.0, 14.0])


def test_unknown_activations_are_zero_height_and_said_so():
    estimate = estimate_from_flags(params=2.5e9, gpus_per_node=2, gpu_mem_gib=24.0)
    chart = estimate_chart_data(estimate)
    assert all(not bar.activations_known for bar in chart.stages)
    assert all(bar.gib["activations"] == 0.0 for bar in chart.stages)
    (ax,) = draw_estimate_chart(chart).axes
    assert sum("activations ?" in t.get_text() for t in ax.texts) == 4


def test_startup_peak_is_drawn_where_it_exceeds_the_step_peak():
    # ZeRO-3 without zero.Init: every GPU holds the whole 16-bit model while it starts
    chart = estimate_chart_data(
        estimate_from_flags(
            model_name="genslm_25B",
            gpus_per_node=8,
            nodes=4,
            gpu_mem_gib=80.0,
            activation_checkpointing="full",
            zero_init=False,  # dstrain train --no-zero-init
        )
    )
    zero3 = chart.stages[3]
    assert zero3.startup_gib > zero3.total_gib
    (ax,) = draw_estimate_chart(chart).axes
    (startup,) = by_gid(ax.collections, "startup")
    ((_, y0), (_, y1)) = startup.get_segments()[0]
    assert y0 == y1 == pytest.approx(zero3.startup_gib)


def run_dstrain(*args: str) -> subprocess.CompletedProcess:
    code = "import sys; from dstrain.cli import main; main(sys.argv[1:])"
    return subprocess.run(
        [sys.executable, "-c", code, *args], capture_output=True, text=True, timeout=120
    )


def test_unwritable_path_is_one_paragraph_naming_it(tmp_path):
    blocker = tmp_path / "file"
    blocker.write_text("")
    target = blocker / "e.png"  # a directory that cannot exist: its parent is a file
    result = run_dstrain("estimate", *ACCEPTANCE, "--plot", str(target))
    assert result.returncode == 1
    assert "Traceback" not in result.stderr
    assert result.stderr.startswith(f"error: cannot write the chart to {target}:")
    assert len(result.stderr.strip().splitlines()) == 1


def test_unknown_suffix_is_a_usage_error_before_any_work(tmp_path):
    result = run_dstrain("estimate", *ACCEPTANCE, "--plot", str(tmp_path / "e.jpeg2"))
    assert result.returncode == 2
    assert "--plot must end in .png, .svg, .pdf" in result.stderr
    assert result.stdout == ""
