"""Scatter plots of ΔD against ΔM, one point per module and step, coloured by step (matplotlib, optional).

matplotlib is an optional extra (`pip install "sdtrain[plots]"`); without it `plots_available()` is False
and the analysis writes its tables only. Figures are drawn on `matplotlib.figure.Figure` objects (no
pyplot, no global backend state). x: ΔM, y: ΔD, with the least-squares line of ΔD on ΔM.
"""

from __future__ import annotations

from pathlib import Path
from typing import Mapping, Sequence

from sdtrain.analysis.collect import ChangeRow
from sdtrain.analysis.table import fit_line, ordered_groups

PLOTS_HINT = 'plots skipped: matplotlib is not installed (pip install "sdtrain[plots]" to get the PNG scatter plots)'
_CMAP = "viridis"


def plots_available() -> bool:
    """True when matplotlib can be imported."""
    try:
        import matplotlib.figure  # noqa: F401
    except ImportError:
        return False
    return True


def _figure(width: float, height: float):
    from matplotlib.figure import Figure

    return Figure(figsize=(width, height), dpi=100, layout="constrained")


def _fmt(value: float, spec: str) -> str:
    return "-" if value != value else format(value, spec)


def draw_group(ax, rows: Sequence[ChangeRow], title: str, step_range: tuple[int, int]) -> int:
    """Scatter `rows` (one group) on `ax` with its fit line; returns the number of points drawn."""
    xs = [r.delta_m for r in rows]
    ys = [r.delta_d for r in rows]
    steps = [r.step for r in rows]
    points = ax.scatter(xs, ys, c=steps, cmap=_CMAP, vmin=step_range[0], vmax=max(step_range[1], step_range[0] + 1),
                        s=18, edgecolors="none")
    slope, intercept, r = fit_line(xs, ys)
    if slope == slope:
        lo, hi = min(xs), max(xs)
        ax.plot([lo, hi], [intercept + slope * lo, intercept + slope * hi], color="crimson", linewidth=1)
    ax.set_title(f"{title}\nslope {_fmt(slope, '.2e')}, r {_fmt(r, '+.2f')}, n {len(rows)}", fontsize=9)
    ax.set_xlabel("ΔM (mean |m' − m0|)", fontsize=8)
    ax.set_ylabel("ΔD (mean 1 − cos)", fontsize=8)
    ax.ticklabel_format(style="sci", scilimits=(-2, 3), useMathText=True)
    ax.tick_params(labelsize=7)
    return len(points.get_offsets())


def _step_range(rows: Sequence[ChangeRow]) -> tuple[int, int]:
    steps = [r.step for r in rows]
    return min(steps), max(steps)


def plot_group(rows: Sequence[ChangeRow], group: str, path, title: str | None = None) -> int:
    """One PNG for one layer group; returns the number of points plotted."""
    chosen = [r for r in rows if r.group == group]
    fig = _figure(4.5, 3.8)
    ax = fig.add_subplot()
    count = draw_group(ax, chosen, title or group, _step_range(rows))
    mappable = ax.collections[0]
    fig.colorbar(mappable, ax=ax, label="step")
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path)
    return count


def plot_groups(rows: Sequence[ChangeRow], out_dir, prefix: str = "dm_dd") -> dict[str, tuple[Path, int]]:
    """`<prefix>_<group>.png` per layer group in `out_dir`; group → (path, points plotted)."""
    written = {}
    for group in ordered_groups(rows):
        path = Path(out_dir) / f"{prefix}_{group}.png"
        written[group] = (path, plot_group(rows, group, path))
    return written


def plot_comparison(series: Mapping[str, Sequence[ChangeRow]], path, groups: Sequence[str] | None = None) -> dict[tuple[str, str], int]:
    """A grid PNG: one row per layer group, one column per labelled series (e.g. LoRA | DoRA).

    Returns (label, group) → points plotted.
    """
    labels = list(series)
    all_rows = [r for rows in series.values() for r in rows]
    groups = list(groups or ordered_groups(all_rows))
    fig = _figure(3.8 * len(labels) + 1.0, 3.4 * len(groups))
    axes = fig.subplots(len(groups), len(labels), squeeze=False)
    step_range = _step_range(all_rows)
    counts = {}
    for i, group in enumerate(groups):
        for j, label in enumerate(labels):
            chosen = [r for r in series[label] if r.group == group]
            ax = axes[i][j]
            if chosen:
                counts[(label, group)] = draw_group(ax, chosen, f"{label}: {group}", step_range)
            else:
                ax.set_title(f"{label}: {group} (no modules)", fontsize=9)
                counts[(label, group)] = 0
    mappable = next((ax.collections[0] for row in axes for ax in row if ax.collections), None)
    if mappable is not None:
        fig.colorbar(mappable, ax=axes, label="step", shrink=min(1.0, 3.0 / len(groups)), aspect=30)
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path)
    return counts
