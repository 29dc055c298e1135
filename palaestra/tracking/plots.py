"""Training curves as PNG files (reward, accuracy, loss over steps), drawn without a display.

We build a bare `Figure` on the Agg canvas instead of going through `pyplot`: no backend is switched
for the whole process (a notebook keeps its own) and no global figure is left open between calls.
"""

from __future__ import annotations

import os
from pathlib import Path

from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure

__all__ = ["plot_curves"]


def _moving_average(values: list[float], window: int) -> list[float]:
    """Trailing mean over the last `window` points (fewer at the start).

    >>> _moving_average([1.0, 3.0, 5.0, 7.0], 2)
    [1.0, 2.0, 4.0, 6.0]
    """
    out, total = [], 0.0
    for i, v in enumerate(values):
        total += v
        if i >= window:
            total -= values[i - window]
        out.append(total / min(i + 1, window))
    return out


def plot_curves(
    series: dict[str, list[tuple[int, float]]],
    path: Path,
    title: str,
    ylabel: str = "value",
    smooth: int = 0,
    xlabel: str = "step",
) -> Path:
    """Draw one line per series, e.g. {"reward/mean": [(step, value), ...], "eval/accuracy": ...}.

    Args:
        series: name -> (step, value) points, in any order; empty series are skipped.
        path: the PNG to write (via a temp file and a rename: readers never see half a file).
        title: figure title.
        ylabel: y axis label.
        smooth: when > 1, draw the raw curve faintly and a trailing moving average of this many
            points over it, in the same colour.
        xlabel: x axis label (the step, unless the points are over something else).

    Returns:
        `path`.
    """
    path = Path(path)
    fig = Figure(figsize=(8, 4.5), dpi=100)
    FigureCanvasAgg(fig)
    ax = fig.add_subplot()
    for name, points in series.items():
        if not points:
            continue
        steps, values = zip(*sorted(points))
        if smooth > 1 and len(values) > smooth:
            (raw,) = ax.plot(steps, values, alpha=0.3, linewidth=1)
            ax.plot(steps, _moving_average(list(values), smooth), color=raw.get_color(), label=name)
        else:
            ax.plot(steps, values, marker="." if len(values) < 50 else None, label=name)
    ax.set_title(title)
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    ax.grid(True, alpha=0.3)
    if ax.get_legend_handles_labels()[0]:
        ax.legend()
    fig.tight_layout()

    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    try:
        fig.savefig(tmp, format="png")
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
    return path
