"""Write an analysis to a folder: CSV + JSON tables, per-group PNGs (when matplotlib is there), the fit table."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Sequence

from sdtrain.analysis.collect import ChangeRow
from sdtrain.analysis.plots import PLOTS_HINT, plot_groups, plots_available
from sdtrain.analysis.table import CSV_NAME, JSON_NAME, GroupFit, format_fits, group_fits, write_csv, write_json


@dataclass
class AnalysisReport:
    rows: list[ChangeRow]
    fits: list[GroupFit]
    csv_path: Path
    json_path: Path
    plots: dict[str, tuple[Path, int]] = field(default_factory=dict)  # group -> (png, points plotted)
    plots_skipped: bool = False

    def format(self) -> str:
        steps = sorted({r.step for r in self.rows})
        modules = len({r.module for r in self.rows})
        lines = [
            f"{modules} module(s) × {len(steps)} step(s) ({', '.join(map(str, steps[:8]))}{', …' if len(steps) > 8 else ''})",
            "",
            format_fits(self.fits),
            "",
            f"table: {self.csv_path} and {self.json_path}",
        ]
        if self.plots:
            lines.append(f"plots: {len(self.plots)} PNG(s) in {self.csv_path.parent} ({', '.join(p.name for p, _ in self.plots.values())})")
        if self.plots_skipped:
            lines.append(PLOTS_HINT)
        return "\n".join(lines)


def write_report(rows: Sequence[ChangeRow], out_dir, *, info: dict | None = None, plots: bool = True) -> AnalysisReport:
    """Fit per group, write `dm_dd.csv`, `dm_dd.json` and (with matplotlib) `dm_dd_<group>.png` into `out_dir`."""
    out_dir = Path(out_dir)
    rows = list(rows)
    fits = group_fits(rows)
    report = AnalysisReport(rows, fits, write_csv(rows, out_dir / CSV_NAME), write_json(rows, fits, out_dir / JSON_NAME, info))
    if plots and plots_available():
        report.plots = plot_groups(rows, out_dir)
    elif plots:
        report.plots_skipped = True
    return report
