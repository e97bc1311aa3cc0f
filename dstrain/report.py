"""A picture of a run: OUTPUT_DIR/metrics.jsonl -> one figure of panels against step.

    dstrain report runs/ha                        # runs/ha/report.png
    dstrain report runs/zero2 --compare runs/zero3 -o zero2-vs-3.html

Three steps, each testable without pixels:
- `read_run(run_dir)` -> `RunMetrics`: the rows of metrics.jsonl, one per step (the last
  row for a step wins, so a resumed run is one curve), the precision from the run's
  ds_config.json (through `dstrain.ds_run`), summary.json when the run has finished.
  Pure stdlib: it reads a run in progress too (a half-written last line is left out).
- `build_panels(runs)` -> `Panel`s: the series per panel, pure data.
- `draw_report(runs)` -> `Report`: the panels and the matplotlib `Figure` drawn from
  them. matplotlib is imported there and only there: the rest of the CLI stays light.

The figure is built on `matplotlib.figure.Figure` without pyplot, so it never touches a
GUI backend (no display needed, nothing kept alive in pyplot's figure registry), and it
is saved by the Agg renderer. Its size is fixed, `PANEL_WIDTH_IN x PANEL_HEIGHT_IN` inches
per panel in `COLUMNS` columns at `DPI`: 6 panels = 3 rows = 1200 x 900 pixels.
"""

from __future__ import annotations

import base64
import html
import io
import json
import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from dstrain.ds_config import write_bytes_atomic
from dstrain.errors import DstrainError
from dstrain.inputs import read_regular_bytes

METRICS_NAME = "metrics.jsonl"
MAX_METRICS_BYTES = 2 * 2**30
"""Largest metrics.jsonl read (a million steps logged at every step are about 300 MB)."""
SUMMARY_NAME = "summary.json"
DS_CONFIG_NAME = "ds_config.json"
REPORT_NAME = "report.png"
"""What `dstrain train` writes at the end of a run (unless --no-report)."""

COLUMNS = 2
PANEL_WIDTH_IN = 6.0
PANEL_HEIGHT_IN = 3.0
DPI = 100
"""Figure geometry: 2 columns of 6 x 3 inch panels at 100 dpi (600 x 300 px each)."""

EMA_BETA = 0.9
"""Smoothing of the training loss: exponential moving average over ~1 / (1 - 0.9) = 10
logged rows, debiased at the start (as TensorBoard's smoothing is), so the first points
are not pulled toward zero."""

FORMATS = (".png", ".svg", ".pdf", ".html")
"""What `-o` may end in: an image matplotlib writes, or an HTML page with the PNG inside."""


# --------------------------------------------------------------------------------------
# Reading a run
# --------------------------------------------------------------------------------------


@dataclass(frozen=True)
class RunMetrics:
    """One run directory, read."""

    run_dir: Path
    label: str
    """The legend's name for the run (the directory name, longer only where two collide)."""
    train: tuple[dict[str, Any], ...]
    """Training rows ("loss" present), one per step, by step."""
    evals: tuple[dict[str, Any], ...]
    """Evaluation rows ("val_loss" present), one per step, by step."""
    precision: str | None = None
    """fp16 / bf16 / fp32 from ds_config.json (None: no readable ds_config.json)."""
    describe: str | None = None
    """The DeepSpeed run in one line (`DsRun.describe()`), e.g. "bf16, ZeRO-2"."""
    model: str | None = None
    """The architecture from settings.json."""
    summary: dict[str, Any] | None = None
    """summary.json, when the run wrote it for its last logged step (else in progress)."""
    damaged_lines: tuple[int, ...] = ()
    """1-based numbers of metrics.jsonl lines that are not JSON rows (the half-written
    last line of a run in progress is left out silently, not listed)."""

    @property
    def metrics_path(self) -> Path:
        return self.run_dir / METRICS_NAME

    @property
    def last_step(self) -> int:
        steps = [r["step"] for r in (*self.train, *self.evals)]
        return max(steps) if steps else 0

    @property
    def shows_loss_scale(self) -> bool:
        """fp16 per ds_config.json; without one, whether any row has a loss scale."""
        if self.precision is not None:
            return self.precision == "fp16"
        return any(r.get("loss_scale") is not None for r in self.train)

    @property
    def memory_key(self) -> str:
        """cuda_max_allocated_bytes on a GPU run, rss_bytes on a CPU run."""
        on_gpu = any(r.get("cuda_max_allocated_bytes") is not None for r in self.train)
        return "cuda_max_allocated_bytes" if on_gpu else "rss_bytes"


def read_run(run_dir: str | Path, label: str | None = None) -> RunMetrics:
    """Read a run directory (finished or in progress). Raises `DstrainError` naming the
    file and the fix when there is nothing to plot."""
    run_dir = Path(run_dir)
    if not run_dir.exists():
        raise DstrainError(
            f"the run directory {run_dir} does not exist: pass the --output-dir of a "
            "`dstrain train` run (the one that holds metrics.jsonl)."
        )
    if not run_dir.is_dir():
        raise DstrainError(
            f"{run_dir} is a file, not a run directory: pass the --output-dir of a "
            f"`dstrain train` run (the directory that holds {METRICS_NAME})."
        )
    path = run_dir / METRICS_NAME
    if not path.exists():
        raise DstrainError(
            f"{run_dir} has no {METRICS_NAME}: it is not a dstrain run directory, or its run "
            "has not logged a step yet (a row is written every --log-every steps). Pass the "
            "run's --output-dir, or wait for its first step."
        )
    # A regular file only (a FIFO or device is refused unopened), of at most 2 GiB: a
    # million steps logged at every step are about 300 MB.
    data = read_regular_bytes(path, "metrics file", MAX_METRICS_BYTES)
    train, evals, damaged = parse_metrics(data.decode("utf-8", errors="replace"))
    if not train and not evals:
        what = (
            f'no line of it is a metrics row (line {damaged[0]} is not JSON with a whole "step")'
            if damaged
            else "it is empty"
        )
        raise DstrainError(
            f"nothing to plot in {path}: {what}. A run writes one JSON row per step "
            "there; wait for its first step, or pass the --output-dir of a `dstrain train` "
            "run."
        )
    precision, describe = read_precision(run_dir / DS_CONFIG_NAME)
    model = _read_json_object(run_dir / "settings.json").get("model")
    summary = _read_json_object(run_dir / SUMMARY_NAME) or None
    last_train = train[-1]["step"] if train else 0
    if summary is not None and summary.get("steps") != last_train:
        summary = None  # an earlier leg's summary: this leg is still running
    return RunMetrics(
        run_dir=run_dir,
        label=label if label is not None else (run_dir.resolve().name or str(run_dir)),
        train=tuple(train),
        evals=tuple(evals),
        precision=precision,
        describe=describe,
        model=model if isinstance(model, str) else None,
        summary=summary,
        damaged_lines=tuple(damaged),
    )


def parse_metrics(text: str) -> tuple[list[dict], list[dict], list[int]]:
    """metrics.jsonl text -> (training rows, evaluation rows, damaged line numbers).

    Each kind keeps one row per step, the last one written: a run resumed from an earlier
    checkpoint writes its steps again, and the newer rows are the ones that led on. An
    unfinished last line (no newline yet: a row being written) is not damage.
    """
    lines = text.split("\n")
    finished = text.endswith("\n")
    train: dict[int, dict] = {}
    evals: dict[int, dict] = {}
    damaged: list[int] = []
    for number, line in enumerate(lines, start=1):
        if not line.strip():
            continue
        row = _parse_row(line)
        if row is None:
            if number == len(lines) and not finished:
                continue  # the row the run is writing now
            damaged.append(number)
            continue
        if "loss" in row:
            train[row["step"]] = row
        if "val_loss" in row:
            evals[row["step"]] = row
    return (
        [train[s] for s in sorted(train)],
        [evals[s] for s in sorted(evals)],
        damaged,
    )


def _parse_row(line: str) -> dict | None:
    try:
        row = json.loads(line)
    except (ValueError, RecursionError):  # RecursionError: nested ~1000 deep
        return None
    step = row.get("step") if isinstance(row, dict) else None
    if isinstance(step, bool) or not isinstance(step, int):
        return None
    return row


def read_precision(path: Path) -> tuple[str | None, str | None]:
    """(precision, one-line description) of a run's ds_config.json, read the way DeepSpeed
    reads it (`dstrain.ds_run.resolve_ds_run`); (None, None) when absent or unreadable."""
    from dstrain.ds_check import read_ds_json
    from dstrain.ds_run import resolve_ds_run

    if not path.is_file():
        return None, None
    config, _problems = read_ds_json(str(path))
    if config is None:
        return None, None
    try:
        run = resolve_ds_run(config)
    except DstrainError:
        return None, None
    return run.precision, run.describe()


def _read_json_object(path: Path) -> dict[str, Any]:
    """A small JSON file dstrain wrote (settings.json, summary.json); {} when unusable."""
    if not path.exists():
        return {}
    try:
        text = read_regular_bytes(path, "run file").decode("utf-8", errors="replace")
        data = json.loads(text)
    except (DstrainError, ValueError, RecursionError):
        return {}
    return data if isinstance(data, dict) else {}


def read_runs(run_dirs: Sequence[str | Path]) -> list[RunMetrics]:
    """Every run, labelled by its directory name (with parents where two names collide)."""
    return [read_run(d, label) for d, label in zip(run_dirs, run_labels(run_dirs), strict=True)]


def run_labels(run_dirs: Sequence[str | Path]) -> list[str]:
    """The shortest path tails that tell the runs apart: runs/a/seed1 and runs/b/seed1
    become a/seed1 and b/seed1; distinct names stay bare."""
    parts = [Path(d).resolve().parts for d in run_dirs]
    depth = 1
    while depth < max((len(p) for p in parts), default=1):
        tails = ["/".join(p[-depth:]) for p in parts]
        if len(set(tails)) == len(tails):
            return tails
        depth += 1
    return ["/".join(p[-depth:]) for p in parts]


# --------------------------------------------------------------------------------------
# Panels: the series, pure data
# --------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Series:
    """One line (or set of markers) on a panel."""

    label: str
    steps: tuple[int, ...]
    values: tuple[float, ...]
    run: int = 0
    """Index of the run it belongs to (its colour)."""
    style: str = "line"
    """line | raw (thin, faint: the unsmoothed loss) | dashed | markers."""


@dataclass(frozen=True)
class Panel:
    key: str
    """Stable name for code and tests: loss, perplexity, lr, loss_scale, tokens, samples,
    memory."""
    title: str
    ylabel: str
    series: tuple[Series, ...] = ()
    log_y: bool = False


def ema(values: Sequence[float], beta: float = EMA_BETA) -> list[float]:
    """Debiased exponential moving average: avg_t = (beta avg_(t-1) + (1 - beta) x_t) /
    (1 - beta^t); e.g. [4, 2] -> [4, (0.9 * 0.4 + 0.2) / 0.19 = 2.947]."""
    out, avg = [], 0.0
    for t, value in enumerate(values, start=1):
        avg = beta * avg + (1 - beta) * value
        out.append(avg / (1 - beta**t))
    return out


MAX_PLOTTED = 1e100
"""Finite values beyond ±1e100 are left out: matplotlib cannot lay out an axis whose span
overflows (a loss of 1e308 next to -1e308: "arange: cannot compute length")."""


def column(rows: Sequence[dict], key: str, scale: float = 1.0) -> tuple[tuple, tuple]:
    """(steps, values) of the rows that have a number under `key` (null = NaN/inf)."""
    pairs = [
        (r["step"], float(r[key]) * scale)
        for r in rows
        if isinstance(r.get(key), (int, float))
        and not isinstance(r.get(key), bool)
        and not abs(r[key]) > MAX_PLOTTED  # NaN/inf stay (null rows; matplotlib skips them)
    ]
    return tuple(s for s, _ in pairs), tuple(v for _, v in pairs)


def skipped_steps(rows: Sequence[dict]) -> tuple[tuple[int, ...], tuple[float, ...]]:
    """(steps, loss scales) where DeepSpeed's skipped_steps count rose: the step skipped
    for an fp16 overflow (with --log-every N, a skip somewhere in the N steps up to it)."""
    steps, scales, before = [], [], 0
    for row in rows:
        count = row.get("skipped_steps")
        if not isinstance(count, int):
            continue
        if count > before and row.get("loss_scale") is not None:
            steps.append(row["step"])
            scales.append(float(row["loss_scale"]))
        before = count
    return tuple(steps), tuple(scales)


def build_panels(runs: Sequence[RunMetrics]) -> list[Panel]:
    """The report's panels for one run or several overlaid (one colour per run). The
    loss-scale panel appears when a run is fp16, perplexity when a run has evaluated."""
    many = len(runs) > 1

    def name(run: RunMetrics, what: str) -> str:
        return f"{run.label} {what}".strip() if many else what

    loss, ppl, lr, scale, tokens, samples, memory = ([] for _ in range(7))
    for i, run in enumerate(runs):
        steps, values = column(run.train, "loss")
        # Raw rows faint, their EMA on top; overlaid runs name only the EMA in the legend.
        loss.append(Series("_raw" if many else "train", steps, values, i, "raw"))
        loss.append(Series(name(run, "train (EMA)"), steps, tuple(ema(values)), i))
        val_steps, val_values = column(run.evals, "val_loss")
        if val_steps:
            loss.append(Series(name(run, "validation"), val_steps, val_values, i, "dashed"))
        ppl_steps, ppl_values = column(run.evals, "val_perplexity")
        if ppl_steps:
            ppl.append(Series(name(run, ""), ppl_steps, ppl_values, i))
        lr.append(Series(name(run, ""), *column(run.train, "lr"), i))
        if run.shows_loss_scale:
            scale.append(Series(name(run, ""), *column(run.train, "loss_scale"), i))
            skip_steps, skip_scales = skipped_steps(run.train)
            skip_label = name(run, "skipped step") if skip_steps else "_none skipped"
            scale.append(Series(skip_label, skip_steps, skip_scales, i, "markers"))
        tokens.append(Series(name(run, ""), *column(run.train, "useful_tokens_per_s"), i))
        samples.append(Series(name(run, ""), *column(run.train, "samples_per_s"), i))
        memory.append(Series(name(run, ""), *column(run.train, run.memory_key, 2.0**-30), i))
    memory_keys = {run.memory_key for run in runs}
    memory_title = (
        "memory: process RSS"
        if memory_keys == {"rss_bytes"}
        else "memory: GPU max allocated"
        if memory_keys == {"cuda_max_allocated_bytes"}
        else "memory: GPU max allocated / process RSS"
    )
    panels = [Panel("loss", "loss (train and validation)", "loss (nats per codon)", tuple(loss))]
    if ppl:
        panels.append(Panel("perplexity", "validation perplexity", "exp(val loss)", tuple(ppl)))
    panels.append(Panel("lr", "learning rate", "lr", tuple(lr)))
    if scale:
        panels.append(
            Panel("loss_scale", "fp16 loss scale (x = skipped step)", "scale", tuple(scale), True)
        )
    panels += [
        Panel("tokens", "useful tokens/s (non-pad codons)", "tokens/s", tuple(tokens)),
        Panel("samples", "samples/s", "sequences/s", tuple(samples)),
        Panel("memory", memory_title, "GiB", tuple(memory)),
    ]
    return panels


# --------------------------------------------------------------------------------------
# Drawing (the only place matplotlib is imported)
# --------------------------------------------------------------------------------------


@dataclass
class Report:
    """The drawn report: its data and the matplotlib Figure made from it."""

    runs: list[RunMetrics]
    panels: list[Panel]
    figure: Any
    """A `matplotlib.figure.Figure`; axes in panel order (`figure.axes[i]` is panels[i])."""
    warnings: list[str] = field(default_factory=list)


def draw_report(runs: Sequence[RunMetrics]) -> Report:
    """Draw the panels of `runs` into one Figure (Agg, no display)."""
    from matplotlib.figure import Figure

    panels = build_panels(runs)
    rows = math.ceil(len(panels) / COLUMNS)
    figure = Figure(
        figsize=(COLUMNS * PANEL_WIDTH_IN, rows * PANEL_HEIGHT_IN), dpi=DPI, layout="constrained"
    )
    grid = figure.add_gridspec(rows, COLUMNS)
    colors = [f"C{i % 10}" for i in range(len(runs))]
    steps = [x for panel in panels for s in panel.series for x in s.steps]
    if not steps:
        raise DstrainError(
            "nothing to plot in "
            + ", ".join(str(run.metrics_path) for run in runs)
            + ": its rows have a step but no number under loss, val_loss, lr or any other "
            "plotted key (wrong types?). Pass the --output-dir of a `dstrain train` run."
        )
    pad = max(0.5, 0.02 * (max(steps) - min(steps)))  # every panel spans the same steps
    for index, panel in enumerate(panels):
        ax = figure.add_subplot(grid[index // COLUMNS, index % COLUMNS])
        _draw_panel(ax, panel, colors)
        ax.set_xlim(min(steps) - pad, max(steps) + pad)
    figure.suptitle(_title(runs), fontsize="medium")
    warnings = [
        f"left out {len(run.damaged_lines)} damaged line(s) of {run.metrics_path} (line "
        + ", ".join(map(str, run.damaged_lines[:5]))
        + (", ..." if len(run.damaged_lines) > 5 else "")
        + ")"
        for run in runs
        if run.damaged_lines
    ]
    return Report(list(runs), panels, figure, warnings)


def _draw_panel(ax, panel: Panel, colors: list[str]) -> None:
    from matplotlib.ticker import MaxNLocator

    for s in panel.series:
        color = colors[s.run]
        label = s.label if s.label and not s.label.startswith("_") else "_nolegend_"
        if s.style == "markers":
            ax.plot(s.steps, s.values, "x", color="red", markersize=9, mew=2, label=label)
        elif s.style == "raw":
            ax.plot(s.steps, s.values, color=color, alpha=0.3, linewidth=0.8, label=label)
        else:
            linestyle = "--" if s.style == "dashed" else "-"
            marker = "o" if len(s.steps) <= 20 or s.style == "dashed" else None  # few: show each
            ax.plot(s.steps, s.values, linestyle, color=color, marker=marker, ms=3, label=label)
    ax.set_title(panel.title, fontsize="medium")
    ax.set_xlabel("step")
    ax.set_ylabel(panel.ylabel)
    if panel.log_y and any(v > 0 for s in panel.series for v in s.values):
        ax.set_yscale("log", base=2)
    else:  # plain numbers on a linear axis, never "+5.893e-1" offsets
        ax.ticklabel_format(axis="y", useOffset=False)
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))  # steps are whole numbers
    ax.grid(True, alpha=0.3)
    if any(s.label and not s.label.startswith("_") for s in panel.series):
        ax.legend(fontsize="small")


def _title(runs: Sequence[RunMetrics]) -> str:
    if len(runs) > 1:
        return "dstrain runs: " + " vs ".join(r.label for r in runs)
    run = runs[0]
    parts = [p for p in (run.model, run.describe) if p]
    state = (
        f"finished at step {run.summary['steps']}"
        if run.summary
        else f"in progress or stopped, step {run.last_step}"
    )
    return f"{run.run_dir}: " + " | ".join([*parts, state])


# --------------------------------------------------------------------------------------
# Writing: PNG (or SVG/PDF), or an HTML page with the PNG and a summary table
# --------------------------------------------------------------------------------------


def default_output(run_dirs: Sequence[str | Path]) -> Path:
    """RUN_DIR/report.png for one run; RUN_DIR/report-compare.png (the first run's) for
    several."""
    return Path(run_dirs[0]) / (REPORT_NAME if len(run_dirs) == 1 else "report-compare.png")


def write_report(run_dirs: Sequence[str | Path], output: str | Path | None = None) -> Report:
    """Read the runs, draw them, write `output` (by its suffix); returns the Report."""
    output = Path(output) if output is not None else default_output(run_dirs)
    if output.suffix.lower() not in FORMATS:
        raise DstrainError(
            f"cannot write a report as {output}: the name must end in "
            + ", ".join(FORMATS)
            + " (e.g. -o report.png, or -o report.html for a page with a summary table).",
            exit_code=2,
        )
    report = draw_report(read_runs(run_dirs))
    if output.suffix.lower() == ".html":
        data = render_html(report).encode("utf-8")
    else:
        buffer = io.BytesIO()
        report.figure.savefig(buffer, format=output.suffix.lower()[1:], dpi=DPI)
        data = buffer.getvalue()
    write_bytes_atomic(output, data)  # a viewer never sees half a picture
    return report


def summary_rows(runs: Sequence[RunMetrics]) -> list[dict[str, str]]:
    """One row per run for the HTML table (summary.json first, metrics.jsonl otherwise)."""
    out = []
    for run in runs:
        s = run.summary or {}
        last = run.train[-1] if run.train else {}
        last_eval = run.evals[-1] if run.evals else {}
        val_losses = [r["val_loss"] for r in run.evals if isinstance(r.get("val_loss"), float)]
        tokens = column(run.train, "useful_tokens_per_s")[1]
        memory = column(run.train, run.memory_key)[1]
        peak = s.get("peak_memory_bytes") or (max(memory) if memory else None)
        out.append(
            {
                "run": run.label,
                "model": run.model or "",
                "DeepSpeed": run.describe or "",
                "state": "finished" if run.summary else "in progress or stopped",
                "steps": str(s.get("steps", last.get("step", run.last_step))),
                "skipped steps": _fmt(s.get("skipped_steps", last.get("skipped_steps")), "d"),
                "last train loss": _fmt(last.get("loss"), ".4f"),
                "val loss": _fmt(s.get("val_loss", last_eval.get("val_loss")), ".4f"),
                "best val loss": _fmt(
                    s.get("best_val_loss", min(val_losses) if val_losses else None), ".4f"
                ),
                "val perplexity": _fmt(
                    s.get("val_perplexity", last_eval.get("val_perplexity")), ".3f"
                ),
                "median useful tokens/s": _fmt(_median(tokens), ",.0f"),
                "peak memory (GiB)": _fmt(peak / 2**30 if peak else None, ".2f"),
                "elapsed (s)": _fmt(s.get("elapsed_s", last.get("elapsed_s")), ".1f"),
            }
        )
    return out


def _fmt(value: Any, spec: str) -> str:
    if value is None or isinstance(value, bool) or not isinstance(value, (int, float)):
        return "n/a"
    return format(int(value) if spec.endswith("d") else value, spec)


def _median(values: Sequence[float]) -> float | None:
    ordered = sorted(values)
    if not ordered:
        return None
    mid = len(ordered) // 2
    return ordered[mid] if len(ordered) % 2 else (ordered[mid - 1] + ordered[mid]) / 2


def render_html(report: Report) -> str:
    """A self-contained page: the figure as an embedded PNG and the summary table."""
    buffer = io.BytesIO()
    report.figure.savefig(buffer, format="png", dpi=DPI)
    png = base64.b64encode(buffer.getvalue()).decode("ascii")
    rows = summary_rows(report.runs)
    head = "".join(f"<th>{html.escape(k)}</th>" for k in rows[0])
    body = "".join(
        "<tr>" + "".join(f"<td>{html.escape(v)}</td>" for v in row.values()) + "</tr>\n"
        for row in rows
    )
    title = html.escape(_title(report.runs))
    notes = "".join(f"<p>warning: {html.escape(w)}</p>\n" for w in report.warnings)
    return (
        '<!doctype html>\n<html><head><meta charset="utf-8">'
        f"<title>{title}</title>\n<style>body{{font-family:sans-serif;margin:1em}}"
        "table{border-collapse:collapse}td,th{border:1px solid #ccc;padding:2px 8px;"
        "text-align:right}</style></head>\n<body>\n"
        f"<h1>{title}</h1>\n<table>\n<tr>{head}</tr>\n{body}</table>\n{notes}"
        f'<img alt="dstrain report" src="data:image/png;base64,{png}">\n</body></html>\n'
    )
