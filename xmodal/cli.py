"""``xmodal`` command line: list recipes, run one.

    xmodal recipes
    xmodal run lab-color-transfer                      # built-in data, a few minutes on a CPU
    xmodal run lab-color-transfer quick=true           # every stage on a small slice
    xmodal run lab-color-transfer data=stl10 data.root=/data/stl10
    accelerate launch -m xmodal run lab-color-transfer # several processes / GPUs

A problem with the input (a path, a file, a recipe key, a checkpoint) is printed as one line
and exits with status 2; nothing already written is touched.
"""
from __future__ import annotations

import argparse
import dataclasses
import os
import shlex
import sys
from pathlib import Path
from typing import Any, Optional

import yaml

from xmodal import __version__
from xmodal.config import available_recipes, from_dict, identity, resolve, to_dict
from xmodal.errors import ConfigError, XmodalError

EXIT_USER_ERROR = 2


def _tasks() -> dict[str, Any]:
    """The registered tasks (:mod:`xmodal.tasks`), imported lazily: ``xmodal --help`` stays fast."""
    from xmodal.tasks import tasks

    return tasks()


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="xmodal",
        description="Contrastive representation distillation across modalities and from ensembles.",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog=__doc__.split("\n\n")[1],
    )
    parser.add_argument("--version", action="version", version=f"xmodal {__version__}")
    sub = parser.add_subparsers(dest="command")
    sub.add_parser("recipes", help="list the built-in recipes")
    sub.add_parser("tasks", help="list the tasks a recipe can name, with the protocols that judge their students")
    run = sub.add_parser("run", help="run every stage of a recipe and write its report")
    run.add_argument("recipe", help="a built-in recipe name (see `xmodal recipes`) or a YAML file")
    run.add_argument("overrides", nargs="*", metavar="key=value",
                     help="override recipe keys, dotted for nested ones (e.g. distill.train.epochs=5)")
    combine = sub.add_parser("combine", help="one report (mean ± sd) of finished runs that differ only in their seed")
    combine.add_argument("output", help="folder for the combined report.md / .png / .json")
    combine.add_argument("runs", nargs="+", help="run folders, each holding a report.json")
    return parser


#: Keys in which runs of one experiment may differ: the seed, where they ran, how many loader workers.
_PER_RUN = ("seed", "seeds", "output_dir", "log_with")


def combine_runs(output: str, runs: list[str]) -> dict[str, Path]:
    """Combine finished runs of one recipe and configuration, made with different seeds (for
    example as separate jobs), into one report of every row's mean ± sd."""
    import json

    from xmodal.report import combine_seeds, markdown, write_report

    reports = []
    for run in runs:
        path = Path(run) / "report.json"
        try:
            report = json.loads(path.read_text())
            config = dict(report["config"])
            report["seed"] = int(config["seed"])
        except FileNotFoundError:
            raise ConfigError(f"{path} does not exist: give folders of finished runs") from None
        except (ValueError, KeyError, TypeError) as err:
            raise ConfigError(f"{path} is not an xmodal report ({type(err).__name__})") from None
        reports.append(report)

    tasks = _tasks()

    def experiment(report: dict[str, Any]) -> dict[str, Any]:
        """What the run computed: its config typed by today's schema (a key added since, at its
        default, is no difference) without what changes no result; as written where it no longer types."""
        config = {k: v for k, v in report["config"].items() if k not in _PER_RUN}
        task = tasks.get(config.get("task"))
        if task is not None:
            try:
                typed = identity(from_dict(task.schema, config))
                return {k: v for k, v in typed.items() if k not in _PER_RUN}
            except ConfigError:
                pass
        data = dict(config.get("data") or {})
        data.pop("num_workers", None)
        return {**config, "data": data}

    first = experiment(reports[0])
    for run, report in zip(runs[1:], reports[1:]):
        if experiment(report) != first:
            raise ConfigError(f"{run} ran another configuration than {runs[0]} (more than the seed differs)")
    seeds = [r["seed"] for r in reports]
    if len(set(seeds)) != len(seeds):
        raise ConfigError(f"the runs' seeds {seeds} repeat: give runs of distinct seeds")
    combined = combine_seeds(reports, seeds)
    combined["command"] = "xmodal combine " + " ".join(shlex.quote(a) for a in [output, *runs])
    combined["runs"] = [{"folder": run, "command": r.get("command")} for run, r in zip(runs, reports)]
    paths = write_report(combined, Path(output))
    print(markdown(combined))
    print(f"[xmodal] report: {paths['md']}  {paths['png']}  {paths['json']}")
    return paths


def _workers(dataset: str, requested: Optional[int]) -> int:
    """DataLoader workers: as asked, else none for the in-memory synthetic set (workers would
    only copy tensors between processes) and up to 4 for sets that decode files."""
    if requested is not None:
        return requested
    return 0 if dataset == "synthetic" else min(4, os.cpu_count() or 1)


def run_recipe(recipe: str, overrides: list[str]) -> dict[str, Path]:
    """Resolve, run and report one recipe; returns the report's paths.

    With ``seeds=[...]`` the recipe runs once per seed, each a complete resumable run in
    ``<output_dir>/seed-<s>/`` with its own report, and ``<output_dir>/report.*`` gives the mean
    and standard deviation of every row over the seeds.
    """
    from xmodal.report import combine_seeds

    tasks = _tasks()
    cfg = resolve(recipe, overrides, {name: task.schema for name, task in tasks.items()})
    output_dir = Path(cfg.output_dir or Path("runs") / cfg.recipe)
    if output_dir.exists() and not output_dir.is_dir():
        raise ConfigError(f"output_dir={output_dir} is a file; choose a folder")
    command = "xmodal run " + " ".join(shlex.quote(a) for a in [recipe, *overrides])
    if cfg.seeds is None:
        return _run_one(cfg, output_dir, command, tasks)[1]
    if not cfg.seeds or len(set(cfg.seeds)) != len(cfg.seeds):
        raise ConfigError(f"seeds={cfg.seeds}: expected a non-empty list of distinct seeds")
    reports = []
    for seed in cfg.seeds:
        print(f"[xmodal] seed {seed} ({len(reports) + 1} of {len(cfg.seeds)}) -> {output_dir / f'seed-{seed}'}",
              flush=True)
        one = dataclasses.replace(cfg, seed=seed, seeds=None, output_dir=str(output_dir / f"seed-{seed}"))
        report, _ = _run_one(one, output_dir / f"seed-{seed}", command, tasks, show=False)
        reports.append(report)
    combined = combine_seeds(reports, cfg.seeds)
    combined["config"] = to_dict(cfg)
    paths: dict[str, Path] = {}
    if _is_main():
        from xmodal.report import markdown, write_report

        paths = write_report(combined, output_dir)
        print(markdown(combined))
        print(f"[xmodal] report: {paths['md']}  {paths['png']}  {paths['json']}")
    return paths


def _is_main() -> bool:
    """Whether this is the process that writes reports (the only one, when not launched)."""
    from accelerate.state import PartialState

    return PartialState().is_main_process


def _run_one(cfg: Any, output_dir: Path, command: str, tasks: dict,
             show: bool = True) -> tuple[dict[str, Any], dict[str, Path]]:
    """One run of a resolved recipe into ``output_dir``: its report and the report's paths."""
    from xmodal.engine import Engine

    resolved = yaml.safe_dump(to_dict(cfg), sort_keys=False)
    engine = Engine(output_dir, seed=cfg.seed, mixed_precision=cfg.mixed_precision, cpu=cfg.cpu,
                    cpu_bf16_convs=cfg.cpu_bf16_convs, log=cfg.log_with,
                    num_workers=_workers(cfg.data.name, cfg.data.num_workers), resolved_config=resolved)
    try:
        return _run_and_report(cfg, engine, command, tasks, show)
    finally:
        engine.close()


def _run_and_report(cfg: Any, engine: Any, command: str, tasks: dict,
                    show: bool) -> tuple[dict[str, Any], dict[str, Path]]:
    import torch

    from xmodal.report import write_report

    output_dir = engine.output_dir
    report = tasks[cfg.task].run(cfg, engine)
    report.update(
        recipe=cfg.recipe,
        description=cfg.description,
        command=command,
        seed=cfg.seed,
        config=to_dict(cfg),
        processes=engine.world,
        device=str(engine.device),
        # What ran it: intra-op threads per process (results move with summation order), torch's build.
        threads=torch.get_num_threads(),
        torch=torch.__version__,
        xmodal=__version__,
        # bf16 on the CPU: "emulated" or "native" convolutions (None otherwise); cpu_bf16_convs=auto resolved.
        cpu_bf16_convs=engine.cpu_bf16_convs,
    )
    paths: dict[str, Path] = {}
    if engine.is_main:
        from xmodal.report import markdown

        paths = write_report(report, output_dir)
        if show:
            print(markdown(report))
            print(f"[xmodal] report: {paths['md']}  {paths['png']}  {paths['json']}")
    return report, paths


def main(argv: Optional[list[str]] = None) -> int:
    args = _parser().parse_args(argv)
    try:
        if args.command == "recipes":
            for name, description in available_recipes().items():
                print(f"{name:28s} {description}")
            return 0
        if args.command == "tasks":
            from xmodal.tasks import PROTOCOLS

            for task in _tasks().values():
                print(f"{task.name:10s} {task.summary}\n{'':10s} protocols: {', '.join(task.protocols)}")
            print("\nprotocols:")
            for name, what in PROTOCOLS.items():
                print(f"  {name:13s} {what}")
            return 0
        if args.command == "run":
            run_recipe(args.recipe, args.overrides)
            return 0
        if args.command == "combine":
            combine_runs(args.output, args.runs)
            return 0
        _parser().print_help()
        return 0
    except XmodalError as err:
        print(f"xmodal: error: {one_line(err)}", file=sys.stderr)
        return EXIT_USER_ERROR


def one_line(err: BaseException) -> str:
    """The message of ``err`` on one line.

    An error raised in a DataLoader worker comes back wrapped ("Caught DataError in DataLoader
    worker process 0. Original Traceback ..."): its last line is the original message.
    """
    lines = [line.strip() for line in str(err).splitlines() if line.strip()]
    if not lines:
        return type(err).__name__
    if lines[0].startswith("Caught ") and len(lines) > 1:
        last = lines[-1]
        return last.split(": ", 1)[1] if ": " in last else last
    return " ".join(lines)


if __name__ == "__main__":
    sys.exit(main())
