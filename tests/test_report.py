"""`dstrain report` and the report.png `dstrain train` writes at the end of a run.

The pure part (reading metrics.jsonl, one row per step, the panels' series) is tested on
written rows; the rest on real genslm_tiny runs on CPU (DeepSpeed engines, gloo), checking
the PNG's header and the returned matplotlib Figure's axes, never pixels.
"""

from __future__ import annotations

import base64
import json
import re
import struct
import subprocess
import sys
from pathlib import Path

import pytest

from dstrain.ds_config import build_ds_config, render_ds_config
from dstrain.errors import DstrainError
from dstrain.report import (
    build_panels,
    draw_report,
    ema,
    parse_metrics,
    read_run,
    read_runs,
    run_labels,
    write_report,
)
from dstrain.settings import make_deepspeed_settings

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"
SIX_PANELS_PX = (1200, 900)  # 2 columns x 3 rows of 600 x 300 px
SEVEN_PANELS_PX = (1200, 1200)  # 4 rows (the eighth cell left empty)
FP32_PANELS = ["loss", "perplexity", "lr", "tokens", "samples", "memory"]


def png_size(data: bytes) -> tuple[int, int]:
    """(width, height) from a PNG's IHDR chunk, the first after the 8-byte signature."""
    assert data[:8] == PNG_MAGIC, data[:8]
    length, kind = struct.unpack(">I4s", data[8:16])
    assert kind == b"IHDR" and length == 13
    return struct.unpack(">II", data[16:24])


def metric_rows(run_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


def cli(*args: str, capsys) -> tuple[int, str, str]:
    """`dstrain ARGS` in this process: (exit code, stdout, stderr)."""
    from dstrain.cli import main

    try:
        main([str(a) for a in args])
        code = 0
    except SystemExit as exc:
        code = exc.code or 0
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def write_rows(run_dir: Path, rows: list, tail: str = "") -> Path:
    run_dir.mkdir(parents=True, exist_ok=True)
    lines = "".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in rows)
    (run_dir / "metrics.jsonl").write_text(lines + tail)
    return run_dir


def train_row(step: int, loss: float, **extra) -> dict:
    row = {"step": step, "loss": loss, "lr": 1e-3, "loss_scale": None, "skipped_steps": 0}
    row |= {"samples_per_s": 10.0, "useful_tokens_per_s": 5000.0, "rss_bytes": 2**29}
    return row | extra


# --------------------------------------------------------------------------------------
# Reading metrics.jsonl (pure)
# --------------------------------------------------------------------------------------


def test_the_last_row_for_a_step_wins_and_kinds_stay_apart():
    text = "".join(
        json.dumps(r) + "\n"
        for r in (
            train_row(1, 4.0),
            train_row(2, 3.9),
            train_row(3, 3.8),  # the leg that crashed after step 3 ...
            train_row(2, 3.5),  # ... resumed from step 1's checkpoint: these win
            {"step": 2, "val_loss": 3.6, "val_perplexity": 36.6},
            train_row(3, 3.4),
        )
    )
    train, evals, damaged = parse_metrics(text)
    assert [(r["step"], r["loss"]) for r in train] == [(1, 4.0), (2, 3.5), (3, 3.4)]
    assert [(r["step"], r["val_loss"]) for r in evals] == [(2, 3.6)]
    assert damaged == []


def test_a_half_written_last_line_is_no_damage_but_a_broken_middle_line_is():
    rows = [json.dumps(train_row(1, 4.0)), "{not json", json.dumps(train_row(2, 3.9))]
    train, _, damaged = parse_metrics("\n".join(rows) + '\n{"step": 3, "lo')
    assert [r["step"] for r in train] == [1, 2]
    assert damaged == [2]
    # The same cut line with its newline written is damage: the run moved past it.
    assert parse_metrics('{"step": 3, "lo\n')[2] == [1]
    # Rows without a whole-number step are not rows.
    assert parse_metrics('[1, 2]\n{"step": 1.5, "loss": 1}\n{"step": true}\n')[2] == [1, 2, 3]


def test_ema_is_debiased():
    assert ema([4.0]) == [4.0]
    assert ema([4.0, 2.0]) == pytest.approx([4.0, (0.9 * 0.4 + 0.1 * 2.0) / (1 - 0.81)])
    assert ema([3.0] * 50) == pytest.approx([3.0] * 50)


def test_labels_are_dir_names_with_parents_only_where_they_collide(tmp_path):
    assert run_labels([tmp_path / "zero2", tmp_path / "zero3"]) == ["zero2", "zero3"]
    assert run_labels([tmp_path / "a" / "seed1", tmp_path / "b" / "seed1"]) == [
        "a/seed1",
        "b/seed1",
    ]


def test_skipped_steps_are_where_the_count_rose(tmp_path):
    scale = {"loss_scale": 256.0}
    rows = [
        train_row(1, 4.0, **scale),
        train_row(2, 4.0, **scale),
        train_row(3, 4.0, skipped_steps=1, loss_scale=128.0),
        train_row(4, 4.0, skipped_steps=1, loss_scale=128.0),
        train_row(5, 4.0, skipped_steps=3, loss_scale=32.0),
    ]
    run = read_run(write_rows(tmp_path / "run", rows))
    assert run.precision is None and run.shows_loss_scale  # no ds_config.json: the rows say
    panel = {p.key: p for p in build_panels([run])}["loss_scale"]
    markers = [s for s in panel.series if s.style == "markers"]
    assert [(m.steps, m.values) for m in markers] == [((3, 5), (128.0, 32.0))]


def test_memory_is_gpu_max_allocated_on_a_gpu_run(tmp_path):
    gpu = [train_row(s, 4.0, cuda_max_allocated_bytes=s * 2**30) for s in (1, 2)]
    cpu = [train_row(s, 4.0) for s in (1, 2, 3)]
    for row in gpu:
        del row["rss_bytes"]
    runs = read_runs([write_rows(tmp_path / "gpu", gpu), write_rows(tmp_path / "cpu", cpu)])
    panel = {p.key: p for p in build_panels(runs[:1])}["memory"]
    assert (panel.title, panel.ylabel) == ("memory: GPU max allocated", "GiB")
    assert panel.series[0].values == (1.0, 2.0)
    both = {p.key: p for p in build_panels(runs)}["memory"]
    assert both.title == "memory: GPU max allocated / process RSS"
    assert [s.label for s in both.series] == ["gpu", "cpu"]
    assert [len(s.steps) for s in both.series] == [2, 3]


def test_pure_part_stays_light(tmp_path):
    """Reading a run and building its panels imports no matplotlib (nor torch)."""
    run_dir = write_rows(tmp_path / "run", [train_row(1, 4.0), train_row(2, 3.9)])
    code = (
        "import sys; from dstrain.report import read_run, build_panels; "
        f"build_panels([read_run({str(run_dir)!r})]); "
        "print(sorted(m for m in ('matplotlib', 'torch') if m in sys.modules))"
    )
    result = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, timeout=60, check=False
    )
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "[]"


# --------------------------------------------------------------------------------------
# Errors: one paragraph naming the file and the fix, no traceback
# --------------------------------------------------------------------------------------


def test_errors_name_the_file_and_the_fix(tmp_path, capsys):
    errors = []

    def cli(*args, capsys):  # every error is one line (one paragraph), no traceback
        code, out, err = globals()["cli"](*args, capsys=capsys)
        errors.append(err)
        return code, out, err

    missing = tmp_path / "nowhere"
    code, _, err = cli("report", missing, capsys=capsys)
    assert code == 1 and f"the run directory {missing} does not exist" in err

    no_metrics = tmp_path / "empty-dir"
    no_metrics.mkdir()
    code, _, err = cli("report", no_metrics, capsys=capsys)
    assert code == 1 and f"{no_metrics} has no metrics.jsonl" in err and "--output-dir" in err

    empty = write_rows(tmp_path / "empty-file", [])
    code, _, err = cli("report", empty, capsys=capsys)
    assert code == 1
    assert f"nothing to plot in {empty / 'metrics.jsonl'}: it is empty" in err

    garbage = write_rows(tmp_path / "garbage", ["step 1 loss 4.2", "\x00\x01binary"])
    code, _, err = cli("report", garbage, capsys=capsys)
    assert code == 1
    assert "no line of it is a metrics row (line 1 is not JSON" in err

    code, _, err = cli("report", garbage, "-o", tmp_path / "r.jpg", capsys=capsys)
    assert code == 2 and "must end in .png, .svg, .pdf, .html" in err

    for err in errors:
        assert err.startswith("error: ") and err.count("\n") == 1, err
    assert not list(tmp_path.rglob("report*.png"))


def test_damaged_lines_are_left_out_with_a_warning(tmp_path, capsys):
    run_dir = write_rows(
        tmp_path / "run", [train_row(1, 4.0), "garbage", train_row(2, 3.9), train_row(3, 3.8)]
    )
    code, out, err = cli("report", run_dir, capsys=capsys)
    assert code == 0, err
    assert f"warning: left out 1 damaged line(s) of {run_dir / 'metrics.jsonl'} (line 2)" in err
    assert f"wrote {run_dir / 'report.png'}" in out
    assert png_size((run_dir / "report.png").read_bytes()) == (1200, 900)  # no val: 5 panels


# --------------------------------------------------------------------------------------
# Real runs (genslm_tiny on CPU, DeepSpeed engines)
# --------------------------------------------------------------------------------------


def train(*args) -> int:
    from dstrain.train import main

    return main(["--no-progress", *map(str, args)])


def ds_config(path: Path, **settings) -> Path:
    base = {"scheduler": {"type": "none"}, "steps_per_print": 1_000_000, "optimizer": {"lr": 2e-3}}
    path.write_text(render_ds_config(build_ds_config(make_deepspeed_settings(base | settings))))
    return path


@pytest.fixture(scope="module")
def fp32_run(tmp_path_factory) -> Path:
    """10 steps, evaluated at 5 and 10, with the default end-of-run report."""
    run_dir = tmp_path_factory.mktemp("fp32") / "run"
    config = ds_config(run_dir.parent / "ds.json", precision="fp32")
    where = ["--deepspeed_config", config, "--output-dir", run_dir]
    assert train(*where, "--max-steps", 10, "--eval-every", 5, "--no-export") == 0
    return run_dir


@pytest.mark.slow
def test_train_writes_report_png_with_a_panel_per_metric(fp32_run):
    data = (fp32_run / "report.png").read_bytes()
    assert png_size(data) == SIX_PANELS_PX

    rows = metric_rows(fp32_run)
    train_rows = [r for r in rows if "loss" in r]
    eval_rows = [r for r in rows if "val_loss" in r]
    assert (len(train_rows), len(eval_rows)) == (10, 2)

    report = draw_report([read_run(fp32_run)])
    assert [p.key for p in report.panels] == FP32_PANELS
    axes = report.figure.axes
    assert [ax.get_title() for ax in axes] == [
        "loss (train and validation)",
        "validation perplexity",
        "learning rate",
        "useful tokens/s (non-pad codons)",
        "samples/s",
        "memory: process RSS",
    ]
    points = [[len(line.get_xdata()) for line in ax.get_lines()] for ax in axes]
    assert points == [[10, 10, 2], [2], [10], [10], [10], [10]]
    loss_ax = axes[0]
    assert [t.get_text() for t in loss_ax.get_legend().get_texts()] == [
        "train",
        "train (EMA)",
        "validation",
    ]
    assert list(loss_ax.get_lines()[0].get_ydata()) == [r["loss"] for r in train_rows]
    assert list(axes[1].get_lines()[0].get_xdata()) == [5, 10]
    assert report.figure.get_suptitle().endswith("genslm_tiny | fp32, ZeRO-2 | finished at step 10")


@pytest.mark.slow
def test_html_page_embeds_the_png_and_a_summary_table(fp32_run, tmp_path, capsys):
    page = tmp_path / "out" / "report.html"
    code, out, err = cli("report", fp32_run, "-o", page, capsys=capsys)
    assert code == 0, err
    assert f"wrote {page} (6 panels; run step 10)" in out
    text = page.read_text()
    assert text.startswith("<!doctype html>")
    png = base64.b64decode(re.search(r'src="data:image/png;base64,([^"]+)"', text).group(1))
    assert png_size(png) == SIX_PANELS_PX
    summary = json.loads((fp32_run / "summary.json").read_text())
    cells = re.findall(r"<td>([^<]*)</td>", text)
    assert cells[:5] == ["run", "genslm_tiny", "fp32, ZeRO-2", "finished", "10"]
    assert f"{summary['val_loss']:.4f}" in cells


@pytest.mark.slow
def test_a_run_in_progress_is_read_as_far_as_it_got(fp32_run, tmp_path):
    lines = (fp32_run / "metrics.jsonl").read_text().splitlines(keepends=True)
    # Rows up to step 7 and half of step 8's, with no summary.json yet.
    upto7 = [line for line in lines if json.loads(line)["step"] <= 7]
    step8 = next(line for line in lines if json.loads(line)["step"] == 8)
    partial = tmp_path / "run"
    partial.mkdir()
    (partial / "metrics.jsonl").write_text("".join(upto7) + step8[: len(step8) // 2])
    (partial / "ds_config.json").write_bytes((fp32_run / "ds_config.json").read_bytes())
    report = write_report([partial], tmp_path / "partial.png")
    assert png_size((tmp_path / "partial.png").read_bytes()) == SIX_PANELS_PX
    run = report.runs[0]
    assert run.summary is None and run.damaged_lines == () and run.last_step == 7
    assert [len(ax.get_lines()[0].get_xdata()) for ax in report.figure.axes] == [7, 1, 7, 7, 7, 7]
    assert "in progress or stopped, step 7" in report.figure.get_suptitle()


@pytest.fixture(scope="module")
def resumed_run(tmp_path_factory) -> Path:
    """4 steps with --no-report, then --resume auto to 8 (report on)."""
    run_dir = tmp_path_factory.mktemp("resumed") / "run"
    config = ds_config(run_dir.parent / "ds.json", precision="fp32")
    common = ["--deepspeed_config", config, "--output-dir", run_dir, "--eval-every", 2]
    assert train(*common, "--no-export", "--max-steps", 4, "--no-report") == 0
    assert not (run_dir / "report.png").exists()
    assert train(*common, "--no-export", "--max-steps", 8, "--resume", "auto") == 0
    return run_dir


@pytest.mark.slow
def test_a_resumed_run_is_one_curve(resumed_run):
    assert png_size((resumed_run / "report.png").read_bytes()) == SIX_PANELS_PX
    report = draw_report([read_run(resumed_run)])
    for panel, ax in zip(report.panels, report.figure.axes, strict=True):
        for series, line in zip(panel.series, ax.get_lines(), strict=True):
            steps = list(line.get_xdata())
            assert steps == sorted(set(steps)), (panel.key, steps)  # no step twice
            assert steps == list(series.steps)
    loss = report.panels[0].series
    assert list(loss[0].steps) == list(range(1, 9))
    assert list(loss[2].steps) == [2, 4, 6, 8]  # validation, across both legs


@pytest.mark.slow
def test_compare_overlays_runs_with_a_legend(fp32_run, resumed_run, tmp_path, capsys):
    out_png = tmp_path / "both.png"
    code, out, err = cli("report", fp32_run, "--compare", resumed_run, "-o", out_png, capsys=capsys)
    assert code == 0, err
    assert png_size(out_png.read_bytes()) == SIX_PANELS_PX
    labels = [f"{fp32_run.parent.name}/run", f"{resumed_run.parent.name}/run"]  # both "run"
    assert f"(6 panels; {labels[0]} step 10, {labels[1]} step 8)" in out

    report = draw_report(read_runs([fp32_run, resumed_run]))
    for ax in report.figure.axes[1:]:  # one line per run, named by its directory
        assert [len(line.get_xdata()) for line in ax.get_lines()] in ([2, 4], [10, 8])
        assert [t.get_text() for t in ax.get_legend().get_texts()] == labels
    loss_legend = [t.get_text() for t in report.figure.axes[0].get_legend().get_texts()]
    assert loss_legend == [
        f"{label} {what}" for label in labels for what in ("train (EMA)", "validation")
    ]
    colors = {line.get_color() for line in report.figure.axes[2].get_lines()}
    assert len(colors) == 2


@pytest.mark.slow
def test_fp16_overflow_is_marked_on_the_loss_scale_panel(tmp_path, fp16_on_cpu, inject_inf):
    inject_inf["poison"] = {3}  # the third backward = optimizer step 3 is skipped
    config = ds_config(
        tmp_path / "ds.json",
        precision="fp16",
        zero_optimization={"stage": 2},
        batch={"train_micro_batch_size_per_gpu": 4},
        fp16={"initial_scale_power": 8, "hysteresis": 1},
    )
    run_dir = tmp_path / "run"
    where = ["--deepspeed_config", config, "--output-dir", run_dir]
    assert train(*where, "--max-steps", 5, "--eval-every", 0, "--no-export") == 0
    assert png_size((run_dir / "report.png").read_bytes()) == SEVEN_PANELS_PX
    run = read_run(run_dir)
    assert run.precision == "fp16"
    report = draw_report([run])
    keys = [p.key for p in report.panels]
    assert keys == ["loss", "perplexity", "lr", "loss_scale", "tokens", "samples", "memory"]
    ax = report.figure.axes[keys.index("loss_scale")]
    assert ax.get_title() == "fp16 loss scale (x = skipped step)"
    scale_line, skipped = ax.get_lines()
    assert list(scale_line.get_ydata()) == [256.0, 256.0, 128.0, 128.0, 128.0]
    assert skipped.get_marker() == "x"
    assert (list(skipped.get_xdata()), list(skipped.get_ydata())) == ([3], [128.0])
    assert ax.get_yscale() == "log"


@pytest.mark.slow
def test_a_report_that_cannot_be_written_does_not_fail_the_run(tmp_path, capsys):
    run_dir = tmp_path / "run"
    (run_dir / "report.png").mkdir(parents=True)  # os.replace cannot put a file there
    code = train("--output-dir", run_dir, "--max-steps", 2, "--eval-every", 0, "--no-export")
    assert code == 0
    out = capsys.readouterr().out
    assert f"warning: could not write {run_dir / 'report.png'}" in out
    assert f"dstrain report {run_dir}" in out
    assert (run_dir / "summary.json").exists()


def test_read_run_refuses_a_file(tmp_path):
    path = tmp_path / "metrics.jsonl"
    path.write_text("{}\n")
    with pytest.raises(DstrainError, match="is a file, not a run directory"):
        read_run(path)
