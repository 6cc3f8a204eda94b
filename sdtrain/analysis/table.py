"""The ΔM / ΔD table: per-group fits (least-squares slope of ΔD on ΔM, Pearson r), CSV / JSON, terminal text."""

from __future__ import annotations

import csv
import json
import math
from dataclasses import asdict, dataclass, fields
from pathlib import Path
from typing import Sequence

from sdtrain.analysis.collect import GROUPS, ChangeRow

CSV_NAME = "dm_dd.csv"
JSON_NAME = "dm_dd.json"


@dataclass(frozen=True)
class GroupFit:
    """Least-squares line ΔD = intercept + slope·ΔM over a group's points, and their Pearson correlation."""

    group: str
    points: int
    slope: float  # NaN when ΔM does not vary
    intercept: float
    pearson_r: float  # NaN when ΔM or ΔD does not vary


def fit_line(xs: Sequence[float], ys: Sequence[float]) -> tuple[float, float, float]:
    """(slope, intercept, Pearson r) of y on x by least squares; NaN where undefined."""
    n = len(xs)
    if n < 2:
        return math.nan, math.nan, math.nan
    mx, my = sum(xs) / n, sum(ys) / n
    sxx = sum((x - mx) ** 2 for x in xs)
    syy = sum((y - my) ** 2 for y in ys)
    sxy = sum((x - mx) * (y - my) for x, y in zip(xs, ys))
    if sxx <= 0:
        return math.nan, math.nan, math.nan
    slope = sxy / sxx
    r = sxy / math.sqrt(sxx * syy) if syy > 0 else math.nan
    return slope, my - slope * mx, r


def ordered_groups(rows: Sequence[ChangeRow]) -> list[str]:
    """The groups present in `rows`, in GROUPS order."""
    present = {row.group for row in rows}
    return [g for g in GROUPS if g in present] + sorted(present - set(GROUPS))


def group_fits(rows: Sequence[ChangeRow]) -> list[GroupFit]:
    """One fit per layer group over all its modules and steps."""
    fits = []
    for group in ordered_groups(rows):
        points = [r for r in rows if r.group == group]
        slope, intercept, r = fit_line([p.delta_m for p in points], [p.delta_d for p in points])
        fits.append(GroupFit(group, len(points), slope, intercept, r))
    return fits


def _number(value: float, spec: str) -> str:
    return "-" if math.isnan(value) else format(value, spec)


def format_fits(fits: Sequence[GroupFit], title: str | None = None) -> str:
    """The terminal table: group, points, slope dΔD/dΔM, Pearson r."""
    header = ("group", "points", "slope dΔD/dΔM", "pearson r")
    body = [(f.group, str(f.points), _number(f.slope, ".3e"), _number(f.pearson_r, "+.3f")) for f in fits]
    widths = [max(len(row[i]) for row in [header, *body]) for i in range(4)]
    lines = [f"{r[0]:<{widths[0]}}  {r[1]:>{widths[1]}}  {r[2]:>{widths[2]}}  {r[3]:>{widths[3]}}" for r in [header, *body]]
    lines.insert(1, "-" * len(lines[0]))
    if title:
        lines.insert(0, title)
    return "\n".join(lines)


def write_csv(rows: Sequence[ChangeRow], path) -> Path:
    """One row per module and step, columns as `ChangeRow`'s fields."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    names = [f.name for f in fields(ChangeRow)]
    with open(path, "w", newline="", encoding="utf-8") as handle:
        writer = csv.DictWriter(handle, fieldnames=names)
        writer.writeheader()
        for row in rows:
            writer.writerow({k: (repr(v) if isinstance(v, float) else v) for k, v in row.as_dict().items()})
    return path


def read_csv(path) -> list[ChangeRow]:
    """Rows written by `write_csv`."""
    types = {f.name: f.type for f in fields(ChangeRow)}
    casts = {"int": int, "float": float, "str": str}
    with open(path, newline="", encoding="utf-8") as handle:
        return [ChangeRow(**{k: casts[types[k]](v) for k, v in record.items()}) for record in csv.DictReader(handle)]


def _json_safe(value):
    return None if isinstance(value, float) and math.isnan(value) else value


def write_json(rows: Sequence[ChangeRow], fits: Sequence[GroupFit], path, info: dict | None = None) -> Path:
    """{"info": ..., "fits": [...], "rows": [...]} (NaN written as null)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    payload = {
        "info": dict(info or {}),
        "fits": [{k: _json_safe(v) for k, v in asdict(f).items()} for f in fits],
        "rows": [row.as_dict() for row in rows],
    }
    path.write_text(json.dumps(payload, indent=1), encoding="utf-8")
    return path
