"""Print the Markdown table of a run's report.json, as docs/results.md shows it.

    python tools/results_table.py results/lab-imagenet-teacher.json

A report over several seeds (``seeds=[...]``) gives mean ± sd with every seed's value beside it;
a single run gives its values. Tables in docs are pasted from this output, never typed.
"""
from __future__ import annotations

import argparse
import json
from pathlib import Path


def table(report: dict) -> str:
    rows = report["results"]
    protocols = list(dict.fromkeys(r["protocol"] for r in rows))
    per_seed = {}
    for run in report.get("by_seed", []):
        for r in run["results"]:
            key = (r["method"], r["protocol"], r.get("n_unlabeled"))
            per_seed.setdefault(key, []).append(f"{r['value']:.2f}")
    methods = list(dict.fromkeys((r["method"], r.get("n_unlabeled")) for r in rows))
    head = "| method | " + " | ".join(f"{p} top-1" for p in protocols) + " |"
    lines = [head, "|" + "---|" * (len(protocols) + 1)]
    for method, n in methods:
        cells = []
        for protocol in protocols:
            row = next((r for r in rows if (r["method"], r.get("n_unlabeled"), r["protocol"]) == (method, n, protocol)),
                       None)
            if row is None:
                cells.append("—")
            elif "sd" in row:
                seeds = per_seed.get((method, protocol, n), [])
                cells.append(f"{row['value']:.2f} ± {row['sd']:.2f} ({', '.join(seeds)})")
            else:
                cells.append(f"{row['value']:.2f}")
        label = method if n is None else f"{method} (n={n})"
        lines.append(f"| {label} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("report", type=Path)
    report = json.loads(parser.parse_args().report.read_text())
    print(f"`{report['command']}`" + (f" — seeds {report['seeds']}" if report.get("seeds") else ""))
    print()
    print(table(report))
    wall = report.get("timings", {}).get("total")
    print()
    threads = sorted({run.get("threads") for run in report.get("by_seed", [])} - {None}) or [report.get("threads")]
    print(f"torch {report.get('torch')}, {'/'.join(map(str, threads))} threads, device {report.get('device')}"
          + (f", {wall / 60:.1f} min of stage time in all" if wall else ""))


if __name__ == "__main__":
    main()
