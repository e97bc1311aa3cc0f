"""`dstrain estimate --plot FILE.png`: the memory estimate as a stacked bar per ZeRO stage.

Two steps, so tests read numbers, not pixels:

- `estimate_chart_data(estimate)` -> `EstimateChart`: per stage and per component the GiB
  the table prints (`memory.format_estimate_table`: params, grads, optim, activ, buffers;
  they add up to its `total`), the usable GPU memory, the recommended and configured
  stages, and measured peaks when there are any. Pure, no matplotlib.
- `draw_estimate_chart(chart)` -> a `matplotlib.figure.Figure`: one BarContainer per
  component (its label is the component), the usable-memory line (gid `usable`), an
  arrow over the recommended bar (gid `recommended`), measured peaks as points beside the
  bars (gid `measured`). matplotlib is imported there and only there, so `estimate`
  without --plot stays light; the Figure is built without pyplot (no global state, no
  display) and rendered by Agg.

Measured peaks (stage -> bytes, e.g. `torch.cuda.max_memory_allocated` from a short real
run per stage, as `estimate --measure` of issue 13 will give) are drawn when passed.
"""

from __future__ import annotations

import dataclasses
import io
from collections.abc import Mapping
from pathlib import Path
from typing import TYPE_CHECKING

from dstrain.errors import DstrainError
from dstrain.memory import GIB, MemoryEstimate, StageEstimate

if TYPE_CHECKING:
    from matplotlib.figure import Figure

COMPONENTS = ("parameters", "gradients", "optimizer states", "activations", "buffers")
"""Bar segments, bottom to top: the table's params, grads, optim, activ, buffers columns."""

COLORS = ("#4c72b0", "#55a868", "#c44e52", "#8172b2", "#ccb974")
"""One colour per component (colour-blind friendly enough, and stable between runs)."""

FORMATS = (".png", ".svg", ".pdf")
"""What --plot may end in: matplotlib writes each without a display."""

MEASURED_OFFSET = 0.38
"""Measured peaks sit this far right of their bar's centre (bars are 0.6 wide)."""

AXIS_MARGIN = 1.25
"""The y axis ends this far above the highest value: room for the totals and the arrow."""

CLIP_USABLE = 2.5
"""The axis shows up to this many times the usable memory (higher bars are cut, their
total printed with an arrow)."""

FIGSIZE_IN = (9.0, 5.0)
DPI = 120
"""A PNG of 1080 x 600 pixels."""


@dataclasses.dataclass(frozen=True)
class StageBar:
    """One ZeRO stage's bar, in GiB per GPU (GiB = 2**30 bytes, as the table)."""

    stage: int
    gib: dict[str, float]
    """Component (`COMPONENTS`, in order) -> GiB; unknown activations count 0."""
    total_gib: float
    """The table's `total`: the sum of `gib`."""
    startup_gib: float
    """GPU memory while the engine starts (ZeRO-3 without zero.Init holds the model)."""
    fits: bool | None
    configured: bool
    """The stage the DeepSpeed config asks for."""
    activations_known: bool
    measured_peak_gib: float | None = None
    """A measured peak for this stage, when one was given."""

    @property
    def need_gib(self) -> float:
        """What decides the fit: the larger of the step peak and the startup peak."""
        return max(self.total_gib, self.startup_gib)


@dataclasses.dataclass(frozen=True)
class EstimateChart:
    """Everything the figure shows."""

    title: str
    stages: tuple[StageBar, ...]
    gpu_mem_gib: float | None
    usable_gib: float | None
    """gpu_mem_gib x (1 - headroom); None without --gpu-mem-gib."""
    headroom: float
    recommended_stage: int | None
    configured_stage: int | None
    caption: str
    """One line under the title: the verdict in short."""


def _gib(nbytes: int | None) -> float:
    return 0.0 if nbytes is None else nbytes / GIB


def _stage_bar(row: StageEstimate, measured_bytes: int | None) -> StageBar:
    gib = dict(
        zip(
            COMPONENTS,
            (
                _gib(row.params_bytes),
                _gib(row.gradients_bytes),
                _gib(row.optimizer_states_bytes),
                _gib(row.activations_bytes),
                _gib(row.comm_buffer_bytes),
            ),
            strict=True,
        )
    )
    return StageBar(
        stage=row.stage,
        gib=gib,
        total_gib=_gib(row.total_bytes),
        startup_gib=_gib(row.startup_bytes),
        fits=row.fits,
        configured=row.configured,
        activations_known=row.activations_bytes is not None,
        measured_peak_gib=None if measured_bytes is None else _gib(measured_bytes),
    )


def estimate_chart_data(
    estimate: MemoryEstimate, measured_peak_bytes: Mapping[int, int] | None = None
) -> EstimateChart:
    """The numbers behind the chart, from the same `MemoryEstimate` the table prints.

    `measured_peak_bytes`: ZeRO stage -> measured peak GPU bytes per rank, drawn as points
    beside the bars (stages without a measurement get none)."""
    measured = dict(measured_peak_bytes or {})
    unknown = sorted(set(measured) - {row.stage for row in estimate.stages})
    if unknown:
        raise DstrainError(f"measured peaks for ZeRO stages {unknown}: stages are 0-3")
    inp = estimate.inputs
    usable = None if estimate.usable_gpu_bytes is None else _gib(estimate.usable_gpu_bytes)
    title = (
        f"{inp.model.name}: {inp.num_nodes} node(s) x {inp.gpus_per_node} GPU(s), "
        f"{inp.precision}, micro batch {inp.micro_batch} x {inp.seq_len} tokens"
    )
    if estimate.recommended_stage is not None:
        caption = f"recommended: ZeRO-{estimate.recommended_stage}, the lowest stage that fits"
    elif inp.gpu_mem_gib is None:
        caption = "give --gpu-mem-gib to judge fit"
    elif all(row.fits is False for row in estimate.stages):
        caption = "no stage fits: see the table's recommendation"
    else:
        caption = "fit unknown without the activations: see the table's recommendation"
    return EstimateChart(
        title=title,
        stages=tuple(_stage_bar(row, measured.get(row.stage)) for row in estimate.stages),
        gpu_mem_gib=inp.gpu_mem_gib,
        usable_gib=usable,
        headroom=inp.headroom,
        recommended_stage=estimate.recommended_stage,
        configured_stage=inp.zero.stage,
        caption=caption,
    )


def draw_estimate_chart(chart: EstimateChart) -> Figure:
    """The stacked bars, the usable-memory line and the markers, as a matplotlib Figure."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=FIGSIZE_IN, dpi=DPI, layout="constrained")
    FigureCanvasAgg(fig)  # Agg renders it: no display, no pyplot, no backend switch
    ax = fig.add_subplot()
    top = _axis_top(chart)
    ax.set_ylim(0, top * AXIS_MARGIN)
    _draw_bars(ax, chart, top)
    _draw_points(ax, chart)
    if chart.usable_gib is not None:
        ax.axhline(
            chart.usable_gib,
            color="crimson",
            linestyle="--",
            linewidth=1.5,
            gid="usable",
            label=f"usable: {chart.usable_gib:.1f} GiB "
            f"({chart.gpu_mem_gib:g} GiB less {chart.headroom:.0%})",
        )
    _label_axes(ax, chart)
    return fig


def _axis_top(chart: EstimateChart) -> float:
    """The highest value to show. A bar far above the usable line (ZeRO-0 of a large
    model) is cut at CLIP_USABLE x usable so the stages near the line stay readable."""
    values = [bar.need_gib for bar in chart.stages]
    values += [bar.measured_peak_gib or 0.0 for bar in chart.stages]
    values.append(chart.usable_gib or 0.0)
    top = max(values) or 1.0
    if chart.usable_gib:
        top = min(top, CLIP_USABLE * chart.usable_gib)
    return top


def _bar_label(bar: StageBar, top: float) -> str:
    """The numbers over a bar, as the table prints them."""
    lines = [f"{bar.total_gib:.2f}"]
    if bar.startup_gib > bar.total_gib:
        lines.append(f"startup {bar.startup_gib:.2f}")
    if not bar.activations_known:
        lines.append("+ activations ?")
    if bar.need_gib > top:
        lines[0] = f"\u2191 {lines[0]}"  # the bar goes on above the axis
    return "\n".join(lines)


def _draw_bars(ax, chart: EstimateChart, top: float) -> None:
    """One BarContainer per component, stacked bottom to top; the numbers over each bar
    and an arrow over the recommended one."""
    xs = [bar.stage for bar in chart.stages]
    bottoms = [0.0] * len(xs)
    for name, color in zip(COMPONENTS, COLORS, strict=True):
        heights = [bar.gib[name] for bar in chart.stages]
        ax.bar(xs, heights, width=0.6, bottom=bottoms, label=name, color=color)
        bottoms = [b + h for b, h in zip(bottoms, heights, strict=True)]
    for bar in chart.stages:
        label = _bar_label(bar, top)
        y = bar.need_gib
        if y > top:  # cut by the axis: the numbers go inside its top edge
            ax.annotate(
                label,
                (bar.stage, top * AXIS_MARGIN),
                xytext=(0, -3),
                textcoords="offset points",
                ha="center",
                va="top",
                fontsize=9,
                bbox={"facecolor": "white", "edgecolor": "none", "pad": 1},
            )
            continue
        ax.annotate(
            label,
            (bar.stage, y),
            xytext=(0, 3),
            textcoords="offset points",
            ha="center",
            va="bottom",
            fontsize=9,
        )
        if bar.stage == chart.recommended_stage:
            above = 3 + 11 * (label.count("\n") + 1)  # points taken by the label
            ax.annotate(
                "recommended",
                (bar.stage, y),
                xytext=(0, above + 22),
                textcoords="offset points",
                ha="center",
                va="bottom",
                fontweight="bold",
                arrowprops={"arrowstyle": "->", "linewidth": 1.5, "shrinkB": above + 2},
                gid="recommended",
            )


def _draw_points(ax, chart: EstimateChart) -> None:
    """Startup peaks over the bars they exceed; measured peaks beside their bars."""
    startup = [bar for bar in chart.stages if bar.startup_gib > bar.total_gib]
    if startup:  # ZeRO-3 without zero.Init: the whole 16-bit model lands on each GPU first
        ax.hlines(
            [bar.startup_gib for bar in startup],
            [bar.stage - 0.3 for bar in startup],
            [bar.stage + 0.3 for bar in startup],
            color="black",
            linewidth=2,
            label="startup peak",
            gid="startup",
        )
    measured = [bar for bar in chart.stages if bar.measured_peak_gib is not None]
    if measured:  # beside the bar, not on it: both stay readable
        ax.plot(
            [bar.stage + MEASURED_OFFSET for bar in measured],
            [bar.measured_peak_gib for bar in measured],
            linestyle="none",
            marker="D",
            markersize=7,
            color="black",
            label="measured peak",
            gid="measured",
        )


def _label_axes(ax, chart: EstimateChart) -> None:
    """Stage names (the configured one says so, the recommended one in bold), legend."""
    labels = [
        f"ZeRO-{bar.stage}" + ("\n(config)" if bar.configured else "") for bar in chart.stages
    ]
    ax.set_xticks([bar.stage for bar in chart.stages], labels)
    for tick, bar in zip(ax.get_xticklabels(), chart.stages, strict=True):
        if bar.stage == chart.recommended_stage:
            tick.set_fontweight("bold")
        if bar.fits is False:
            tick.set_color("dimgray")
    ax.set_ylabel("GiB per GPU")
    ax.set_title(f"{chart.title}\n{chart.caption}", fontsize=10)
    handles, names = ax.get_legend_handles_labels()
    order = [i for i, n in enumerate(names) if n not in COMPONENTS]  # lines and points
    order += [names.index(n) for n in reversed(COMPONENTS)]  # top to bottom, as stacked
    ax.legend(
        [handles[i] for i in order],
        [names[i] for i in order],
        loc="upper left",
        bbox_to_anchor=(1.01, 1.0),
        fontsize=9,
        frameon=False,
    )
    ax.grid(axis="y", alpha=0.3)
    ax.set_axisbelow(True)


def check_plot_path(path: str | Path) -> Path:
    """Refuse a --plot name matplotlib cannot write before any work is done (exit 2)."""
    path = Path(path)
    if path.suffix.lower() not in FORMATS:
        raise DstrainError(
            f"cannot write the chart as {path}: --plot must end in {', '.join(FORMATS)} "
            "(e.g. --plot estimate.png).",
            exit_code=2,
        )
    return path


def write_estimate_chart(
    estimate: MemoryEstimate,
    path: str | Path,
    measured_peak_bytes: Mapping[int, int] | None = None,
) -> Figure:
    """Draw `estimate` and write it to `path` (format from the suffix, atomically)."""
    from dstrain.ds_config import write_bytes_atomic

    path = check_plot_path(path)
    fig = draw_estimate_chart(estimate_chart_data(estimate, measured_peak_bytes))
    buffer = io.BytesIO()
    fig.savefig(buffer, format=path.suffix.lower()[1:])
    try:
        write_bytes_atomic(path, buffer.getvalue())
    except OSError as exc:
        raise DstrainError(
            f"cannot write the chart to {path}: {exc.strerror or exc}. Give --plot a path in "
            "a directory you can write to."
        ) from None
    return fig
