"""``report.png`` of an ensemble recipe: test error against the number of teachers (CRD Figure 4)."""
from __future__ import annotations

from pathlib import Path
from typing import Any, Mapping

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

from xmodal.report import save_figure  # noqa: E402

STYLES = {"kd_ensemble": "s-", "crd_ensemble": "o-", "crd_kd_ensemble": "^-"}


def plot_error_vs_teachers(report: Mapping[str, Any], path: Path) -> None:
    """One line per method (mean over seeds, bars from the lowest to the highest seed), CE and
    the teachers' own ensemble as references."""
    rows, per_seed = report["results"], report.get("per_seed", [])
    counts = sorted({r["n_teachers"] for r in rows if r["n_teachers"] > 0})
    fig, ax = plt.subplots(figsize=(6.4, 4.4))
    for method in dict.fromkeys(r["method"] for r in rows):
        mine = sorted((r["n_teachers"], 100.0 - r["value"]) for r in rows if r["method"] == method)
        if method == "ce":
            ax.axhline(mine[0][1], color="gray", linestyle="--", label="ce (no teacher)")
            continue
        xs, ys = [m for m, _ in mine], [e for _, e in mine]
        spread = [[100.0 - r["top1"] for r in per_seed if (r["method"], r["n_teachers"]) == (method, m)] for m in xs]
        low = [y - min(s, default=y) for y, s in zip(ys, spread)]
        high = [max(s, default=y) - y for y, s in zip(ys, spread)]
        ax.errorbar(xs, ys, yerr=[low, high], fmt=STYLES.get(method, "o-"), capsize=3, label=method)
    pool = report.get("teachers", {}).get("ensemble_top1", {})
    if pool:
        ms = sorted(int(m) for m in pool)
        ax.plot(ms, [100.0 - pool[str(m)] for m in ms], "k:", marker=".", label="teacher ensemble")
    if counts:
        ax.set_xscale("log", base=2)
        ax.set_xticks(counts, [str(m) for m in counts])
        ax.minorticks_off()
    ax.set_xlabel("number of teachers M")
    ax.set_ylabel("test error (%)")
    ax.set_title(f"{report.get('recipe', '')}: student error against M")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    save_figure(fig, path)
