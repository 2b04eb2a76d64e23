"""Print the Markdown table of a run's report.json, as docs/results.md shows it.

    python tools/results_table.py results/lab-imagenet-teacher.json

A report over several seeds (``seeds=[...]``) gives mean ± sd with every seed's value beside it;
a single run gives its values. Tables in docs are pasted from this output, never typed.
"""
from __future__ import annotations

import argparse
import json
from pathlib import Path

from xmodal.report import table


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("report", type=Path)
    report = json.loads(parser.parse_args().report.read_text())
    print(f"`{report['command']}`" + (f" — seeds {report['seeds']}" if report.get("seeds") else ""))
    print()
    print("\n".join(table(report, each_seed=True)))
    wall = report.get("timings", {}).get("total")
    print()
    threads = sorted({run.get("threads") for run in report.get("by_seed", [])} - {None}) or [report.get("threads")]
    print(f"torch {report.get('torch')}, {'/'.join(map(str, threads))} threads, device {report.get('device')}"
          + (f", {wall / 60:.1f} min of stage time in all" if wall else ""))


if __name__ == "__main__":
    main()
