"""Reporting helpers shared by the benchmark scripts: readable tables, JSON lines, line plots.

Pure functions of lists of result dicts (one dict per measured configuration), so the tests can
exercise them with fake results. Plots use matplotlib's Agg backend (no display); matplotlib is only
imported when a plot is written.
"""
from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any, Callable, Iterable, Mapping, Sequence

# A column of a table: (header, function of a row -> value, format spec applied to non-None values).
Column = tuple[str, Callable[[dict[str, Any]], Any], str]
# A panel of a plot: line label -> [(x, y), ...].
Panel = Mapping[str, Sequence[tuple[float, float]]]


def write_jsonl(path: str | Path, rows: Iterable[Mapping[str, Any]]) -> Path:
    """Write one JSON object per line (overwrites `path`; creates its folder)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("w") as out:
        for row in rows:
            out.write(json.dumps(row, default=_json_default) + "\n")
    return path


def read_jsonl(path: str | Path) -> list[dict[str, Any]]:
    return [json.loads(line) for line in Path(path).read_text().splitlines() if line.strip()]


def _json_default(value: Any) -> Any:
    if isinstance(value, Path):
        return str(value)
    if hasattr(value, "item"):  # numpy / torch scalars
        return value.item()
    raise TypeError(f"not JSON serializable: {type(value).__name__}")


def _cell(value: Any, fmt: str) -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "-"
    return format(value, fmt) if fmt else str(value)


def format_table(rows: Sequence[dict[str, Any]], columns: Sequence[Column]) -> str:
    """A plain-text table, one line per row, columns right-aligned to their widest cell."""
    cells = [[header for header, _, _ in columns]]
    for row in rows:
        cells.append([_cell(get(row), fmt) for _, get, fmt in columns])
    widths = [max(len(line[i]) for line in cells) for i in range(len(columns))]
    lines = ["  ".join(cell.rjust(width) if i else cell.ljust(width)
                       for i, (cell, width) in enumerate(zip(line, widths))) for line in cells]
    lines.insert(1, "-" * len(lines[0]))
    return "\n".join(lines)


def plot_lines(path: str | Path, panels: Mapping[str, Panel], xlabel: str, ylabel: str,
               title: str = "", logx: bool = False, hline: float | None = None,
               styles: Mapping[str, Mapping[str, Any]] | None = None) -> Path | None:
    """One subplot per panel (side by side), one line per label (matplotlib keyword arguments per
    label in `styles`); returns the PNG path, or None when every panel is empty."""
    panels = {name: panel for name, panel in panels.items() if any(panel.values())}
    if not panels:
        return None
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from matplotlib.ticker import NullFormatter, ScalarFormatter

    fig, axes = plt.subplots(1, len(panels), figsize=(5.5 * len(panels), 4.2), squeeze=False)
    for ax, (name, panel) in zip(axes[0], panels.items()):
        xs_seen = sorted({x for points in panel.values() for x, _ in points})
        for label, points in panel.items():
            points = sorted(points)
            if not points:
                continue
            xs, ys = zip(*points)
            ax.plot(xs, ys, **{"marker": "o", "label": label, **(styles or {}).get(label, {})})
        if hline is not None:
            ax.axhline(hline, color="grey", linestyle="--", linewidth=0.8)
        if logx:
            ax.set_xscale("log", base=2)
        if len(xs_seen) <= 12:  # label the measured values (not powers of two, not 2.25 steps)
            ax.set_xticks(xs_seen)
            ax.xaxis.set_major_formatter(ScalarFormatter())
            ax.xaxis.set_minor_formatter(NullFormatter())
        ax.set_title(name)
        ax.set_xlabel(xlabel)
        ax.set_ylabel(ylabel)
        ax.grid(True, alpha=0.3)
        ax.legend(fontsize=7)
    if title:
        fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def group_points(rows: Iterable[dict[str, Any]], panel_of: Callable[[dict[str, Any]], str],
                 line_of: Callable[[dict[str, Any]], str], x_of: Callable[[dict[str, Any]], float],
                 y_of: Callable[[dict[str, Any]], float | None]) -> dict[str, dict[str, list]]:
    """rows -> {panel: {line: [(x, y), ...]}}; rows whose y is None are skipped; a repeated
    (panel, line, x) keeps the mean of its y values."""
    sums: dict[tuple[str, str, float], list[float]] = {}
    for row in rows:
        y = y_of(row)
        if y is None:
            continue
        sums.setdefault((panel_of(row), line_of(row), x_of(row)), []).append(y)
    out: dict[str, dict[str, list]] = {}
    for (panel, line, x), ys in sorted(sums.items(), key=lambda item: (item[0][0], item[0][1],
                                                                     item[0][2])):
        out.setdefault(panel, {}).setdefault(line, []).append((x, sum(ys) / len(ys)))
    return out


__all__ = ["write_jsonl", "read_jsonl", "format_table", "plot_lines", "group_points"]
