"""A run's results as ``report.json`` (the record), ``report.md`` (the table), ``report.png`` (a plot).

Rows are ``{"method", "protocol", "metric", "value"}`` plus any extra keys a task adds (e.g.
``n_teachers``); a run over several seeds (``seeds=[0,1,2]``) reports each row's mean as
``value`` with its sample standard deviation ``sd`` and seed count ``n`` (:func:`combine_seeds`). The table puts one row per method (and extra keys) and one column per
(protocol, metric); the plot draws the same numbers as grouped bars. All three files are
written atomically, after the run, so an interrupted run never leaves a half report.
"""
from __future__ import annotations

import json
import statistics
from pathlib import Path
from typing import Any, Mapping, Optional, Sequence

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

from xmodal.files import atomic_write_text  # noqa: E402

BASE_KEYS = ("method", "protocol", "metric", "value", "sd", "n")


def row_key(row: Mapping[str, Any]) -> tuple:
    extra = tuple((k, row[k]) for k in sorted(row) if k not in BASE_KEYS)
    return (row["method"],) + extra


def row_label(key: tuple) -> str:
    return key[0] + "".join(f" ({k}={v})" for k, v in key[1:])


def pivot(rows: Sequence[Mapping[str, Any]]) -> tuple[list[tuple], list[tuple[str, str]], dict, dict]:
    """Row keys (in first-seen order), column keys ``(protocol, metric)``, the cell values and
    their standard deviations over seeds (``None`` for a single run)."""
    row_keys: list[tuple] = []
    columns: list[tuple[str, str]] = []
    cells: dict[tuple, float] = {}
    spreads: dict[tuple, Optional[float]] = {}
    for row in rows:
        key, col = row_key(row), (row["protocol"], row["metric"])
        if key not in row_keys:
            row_keys.append(key)
        if col not in columns:
            columns.append(col)
        cells[(key, col)] = float(row["value"])
        spreads[(key, col)] = None if row.get("sd") is None else float(row["sd"])
    return row_keys, columns, cells, spreads


def combine_seeds(reports: Sequence[Mapping[str, Any]], seeds: Sequence[int]) -> dict[str, Any]:
    """One report of runs that differ only in their seed: each row's mean over the seeds as
    ``value``, its sample standard deviation as ``sd`` (0 for one seed) and the count ``n``; every
    seed's rows are kept under ``by_seed``. A row missing from some seed's run is averaged over
    the seeds that have it (``n`` says how many)."""
    groups: dict[tuple, list[float]] = {}
    for report in reports:
        for row in report["results"]:
            key = tuple((k, v) for k, v in row.items() if k not in ("value", "sd", "n"))
            groups.setdefault(key, []).append(float(row["value"]))
    results = []
    for key, values in groups.items():
        mean = statistics.fmean(values)
        sd = statistics.stdev(values) if len(values) > 1 else 0.0
        results.append({**dict(key), "value": mean, "sd": sd, "n": len(values)})
    combined = {k: v for k, v in reports[0].items() if k not in ("results", "timings", "seed")}
    pools = [(r.get("teachers") or {}).get("ensemble_top1") for r in reports]
    if all(pools):  # the teachers' averaged softmax, per M: the mean over seeds as well
        combined["teachers"] = {**combined["teachers"], "ensemble_top1": {
            m: statistics.fmean(float(p[m]) for p in pools) for m in pools[0] if all(m in p for p in pools)}}
    combined.update(
        results=results, seeds=list(seeds),
        by_seed=[{"seed": seed, "results": r["results"], "teacher": r.get("teacher"), "teachers": r.get("teachers"),
                  "timings": r.get("timings"), "threads": r.get("threads")} for seed, r in zip(seeds, reports)],
        timings={"total": sum((r.get("timings") or {}).get("total", 0.0) for r in reports)},
    )
    return combined


def table(report: Mapping[str, Any], each_seed: bool = False) -> list[str]:
    """The report's rows as a Markdown table: one line per method (and axis value), one column per
    (protocol, metric); over seeds, mean ± sd, with ``each_seed`` every seed's value beside it."""
    row_keys, columns, cells, spreads = pivot(report["results"])
    per_seed: dict[tuple, list[str]] = {}
    for run in report.get("by_seed", []) if each_seed else []:
        for r in run["results"]:
            per_seed.setdefault((row_key(r), (r["protocol"], r["metric"])), []).append(f"{r['value']:.2f}")
    lines = ["| method | " + " | ".join(f"{p} {m}" for p, m in columns) + " |", "|" + "---|" * (len(columns) + 1)]
    for key in row_keys:
        shown = []
        for col in columns:
            cell = _cell(cells.get((key, col)), spreads.get((key, col)))
            values = per_seed.get((key, col))
            shown.append(f"{cell} ({', '.join(values)})" if values and spreads.get((key, col)) is not None else cell)
        lines.append(f"| {row_label(key)} | " + " | ".join(shown) + " |")
    return lines


def markdown(report: Mapping[str, Any]) -> str:
    """The report's table and context as Markdown."""
    lines = [f"# {report.get('recipe', 'xmodal run')}", ""]
    if report.get("description"):
        lines += [str(report["description"]).strip(), ""]
    if report.get("command"):
        lines += ["Command:", "", f"    {report['command']}", ""]
    if report.get("seeds"):
        lines += [f"Mean ± sd over seeds {', '.join(map(str, report['seeds']))}.", ""]
    lines += [*table(report), ""]
    members = (report.get("teachers") or {}).get("members") or []
    described = [("teacher", report.get("teacher") or {})] + [(f"teacher-{i}", m) for i, m in enumerate(members)]
    for name, teacher in described:
        if teacher.get("arch"):
            lines.append(f"- {name}: {_describe_teacher(teacher)}")
    for name, info in (report.get("extra") or {}).items():
        lines.append(f"- {name}: {info}")
    if report.get("timings"):
        total = report["timings"].get("total")
        if total is not None:
            lines.append(f"- wall time: {total:.0f} s")
    return "\n".join(lines) + "\n"


def _describe_teacher(teacher: Mapping[str, Any]) -> str:
    size = f" at {teacher['input_size']} px" if teacher.get("input_size") else ""
    where = ("trained here" if teacher.get("trained_here", True) else
             "loaded from its checkpoint" if teacher.get("checkpoint_sha256") else "used as built")
    scored = "" if teacher.get("top1") is None else f", top-1 {teacher['top1']:.2f}"
    return f"{teacher['arch']} on {teacher.get('view')}{size}, {where}{scored}"


def _cell(value: Optional[float], sd: Optional[float]) -> str:
    if value is None:
        return "—"
    return f"{value:.2f}" if sd is None else f"{value:.2f} ± {sd:.2f}"


def plot(report: Mapping[str, Any], path: Path) -> None:
    """Grouped bars: one group per method, one bar per (protocol, metric); over several seeds,
    the mean with a bar of ± one standard deviation. Rows along an axis (``n_unlabeled``: the
    Figure 3 axis; ``n_teachers``) are drawn as curves instead (:func:`plot_against`)."""
    for key in AXES:
        if any(key in row for row in report["results"]):
            plot_against(report, path, key)
            return
    row_keys, columns, cells, spreads = pivot(report["results"])
    fig, ax = plt.subplots(figsize=(max(6.0, 0.9 * len(row_keys) * max(1, len(columns)) / 1.5), 4.2))
    width = 0.8 / max(1, len(columns))
    for j, col in enumerate(columns):
        xs = [i + (j - (len(columns) - 1) / 2) * width for i in range(len(row_keys))]
        ys = [cells.get((k, col), float("nan")) for k in row_keys]
        errors = [spreads.get((k, col)) or 0.0 for k in row_keys]
        bars = ax.bar(xs, ys, width, label=f"{col[0]} {col[1]}",
                      yerr=errors if any(errors) else None, capsize=2 if any(errors) else 0)
        ax.bar_label(bars, fmt="%.1f", fontsize=7)
    ax.set_xticks(range(len(row_keys)), [row_label(k) for k in row_keys], rotation=30, ha="right")
    ax.set_ylabel("value")
    ax.set_title(str(report.get("recipe", "")))
    if columns:  # a run with no rows (every method skipped) draws empty axes, without a legend
        ax.legend(fontsize=8)
    fig.tight_layout()
    save_figure(fig, path)


#: Row keys a figure can take as its x axis, and the axis label.
AXES = {"n_unlabeled": "unlabeled images distilled on", "n_teachers": "number of teachers M"}


def plot_against(report: Mapping[str, Any], path: Path, key: str) -> None:
    """Each protocol's top-1 against ``key`` (one of :data:`AXES`), one line per method (a band of
    ± one sd over seeds); rows without ``key`` or at 0 (``random``, a CE-only student, the teachers'
    own probes) as horizontal lines, and the teachers' own averaged ensemble where the report has
    it. Against ``n_unlabeled`` this is the CRD paper's Figure 3, against ``n_teachers`` its Figure 4."""
    rows = report["results"]
    protocols = list(dict.fromkeys(r["protocol"] for r in rows))
    fig, axes = plt.subplots(1, len(protocols), figsize=(5.2 * len(protocols), 4.2), squeeze=False)
    sizes = sorted({r[key] for r in rows if r.get(key)})
    for ax, protocol in zip(axes[0], protocols):
        mine = [r for r in rows if r["protocol"] == protocol]
        references = 0
        for method in dict.fromkeys(r["method"] for r in mine):
            points = sorted((r[key], r["value"], r.get("sd") or 0.0) for r in mine if r["method"] == method and r.get(key))
            flat = [r for r in mine if r["method"] == method and not r.get(key)]
            if points:
                xs, ys, sds = zip(*points)
                line, = ax.plot(xs, ys, "o-", label=method)
                if any(sds):
                    ax.fill_between(xs, [y - e for y, e in zip(ys, sds)], [y + e for y, e in zip(ys, sds)],
                                    color=line.get_color(), alpha=0.15)
            for row in flat:  # colours from the end of the cycle, away from the curves'
                references += method != "random"
                ax.axhline(row["value"], linestyle="--" if method == "random" else ":",
                           color="gray" if method == "random" else f"C{(10 - references) % 10}", label=method)
        pool = report.get("teachers", {}).get("ensemble_top1", {}) if key == "n_teachers" and protocol == "test" else {}
        if pool:  # the teachers' averaged softmax: what a student of M teachers could reach
            ms = sorted(int(m) for m in pool)
            ax.plot(ms, [pool[str(m)] for m in ms], "k:", marker=".", label="teacher ensemble")
        ax.set_xscale("log")
        ax.set_xticks(sizes, [str(n) for n in sizes])
        ax.minorticks_off()
        ax.set_xlabel(AXES[key])
        ax.set_ylabel(f"{protocol} top-1 (%)")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    title = str(report.get("recipe", ""))
    if report.get("seeds"):
        title += f" (mean ± sd, seeds {', '.join(map(str, report['seeds']))})"
    fig.suptitle(title, fontsize=10)
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
