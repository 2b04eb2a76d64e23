"""A run's results as ``report.json`` (the record), ``report.md`` (the table), ``report.png`` (a plot).

Rows are ``{"method", "protocol", "metric", "value"}`` plus any extra keys a task adds (e.g.
``n_teachers``). The table puts one row per method (and extra keys) and one column per
(protocol, metric); the plot draws the same numbers as grouped bars. All three files are
written atomically, after the run, so an interrupted run never leaves a half report.
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Mapping, Sequence

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

from xmodal.engine import atomic_write_text  # noqa: E402

BASE_KEYS = ("method", "protocol", "metric", "value")


def _row_key(row: Mapping[str, Any]) -> tuple:
    extra = tuple((k, row[k]) for k in sorted(row) if k not in BASE_KEYS)
    return (row["method"],) + extra


def _label(key: tuple) -> str:
    return key[0] + "".join(f" ({k}={v})" for k, v in key[1:])


def pivot(rows: Sequence[Mapping[str, Any]]) -> tuple[list[tuple], list[tuple[str, str]], dict]:
    """Row keys (in first-seen order), column keys ``(protocol, metric)``, and the cell values."""
    row_keys: list[tuple] = []
    columns: list[tuple[str, str]] = []
    cells: dict[tuple, float] = {}
    for row in rows:
        key, col = _row_key(row), (row["protocol"], row["metric"])
        if key not in row_keys:
            row_keys.append(key)
        if col not in columns:
            columns.append(col)
        cells[(key, col)] = float(row["value"])
    return row_keys, columns, cells


def markdown(report: Mapping[str, Any]) -> str:
    """The report's table and context as Markdown."""
    row_keys, columns, cells = pivot(report["results"])
    lines = [f"# {report.get('recipe', 'xmodal run')}", ""]
    if report.get("description"):
        lines += [str(report["description"]).strip(), ""]
    if report.get("command"):
        lines += ["Command:", "", f"    {report['command']}", ""]
    header = "| method | " + " | ".join(f"{p} {m}" for p, m in columns) + " |"
    lines += [header, "|" + "---|" * (len(columns) + 1)]
    for key in row_keys:
        values = [cells.get((key, c)) for c in columns]
        lines.append(f"| {_label(key)} | " + " | ".join("—" if v is None else f"{v:.2f}" for v in values) + " |")
    lines.append("")
    for name, info in (report.get("extra") or {}).items():
        lines.append(f"- {name}: {info}")
    if report.get("timings"):
        total = report["timings"].get("total")
        if total is not None:
            lines.append(f"- wall time: {total:.0f} s")
    return "\n".join(lines) + "\n"


def plot(report: Mapping[str, Any], path: Path) -> None:
    """Grouped bars: one group per method, one bar per (protocol, metric)."""
    row_keys, columns, cells = pivot(report["results"])
    fig, ax = plt.subplots(figsize=(max(6.0, 0.9 * len(row_keys) * max(1, len(columns)) / 1.5), 4.2))
    width = 0.8 / max(1, len(columns))
    for j, col in enumerate(columns):
        xs = [i + (j - (len(columns) - 1) / 2) * width for i in range(len(row_keys))]
        ys = [cells.get((k, col), float("nan")) for k in row_keys]
        bars = ax.bar(xs, ys, width, label=f"{col[0]} {col[1]}")
        ax.bar_label(bars, fmt="%.1f", fontsize=7)
    ax.set_xticks(range(len(row_keys)), [_label(k) for k in row_keys], rotation=30, ha="right")
    ax.set_ylabel("value")
    ax.set_title(str(report.get("recipe", "")))
    ax.legend(fontsize=8)
    fig.tight_layout()
    save_figure(fig, path)


def save_figure(fig, path: Path) -> None:
    """Write ``fig`` to ``path`` atomically (a temporary file renamed into place) and close it."""
    tmp = path.with_name(f".{path.name}.tmp.png")
    fig.savefig(tmp, dpi=120)
    plt.close(fig)
    tmp.replace(path)


def write_report(report: Mapping[str, Any], output_dir: Path, plotter=plot) -> dict[str, Path]:
    """Write ``report.json``, ``report.md`` and ``report.png`` into ``output_dir``."""
    output_dir.mkdir(parents=True, exist_ok=True)
    paths = {"json": output_dir / "report.json", "md": output_dir / "report.md", "png": output_dir / "report.png"}
    atomic_write_text(json.dumps(report, indent=2, default=str), paths["json"])
    atomic_write_text(markdown(report), paths["md"])
    plotter(report, paths["png"])
    return paths
