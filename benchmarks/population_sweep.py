"""A sweep trained both ways on one machine: every run one after another (``experiments.run``), and
the runs that differ only in seed as populations (``experiments.run --population``).

Runs the experiment (default ``fig2_fashion_mnist``: 10 rules x 3 seeds of ffn2 on Fashion-MNIST)
twice into fresh directories under ``--out``, with the same ``--set`` overrides and ``--workers``,
timing each invocation, then compares per run and per rule: the test accuracy of every run both
ways (a population member should equal its single run to float32 rounding, so the two agree far
inside the seeds' spread), each rule's mean and standard deviation over seeds both ways, and the
wall time of the sweep both ways. Prints JSON (also to ``--json PATH``), then a markdown table.

    .venv/bin/python benchmarks/population_sweep.py --set epochs=2 --workers 2 --json PATH
"""
from __future__ import annotations

import fnmatch
import json
import pathlib
import statistics
import sys
import tempfile
import time

from common import machine, markdown_table, parser, report

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1]))  # the experiments package
from experiments import configs  # noqa: E402
from experiments import run as runner  # noqa: E402


def _sweep(name: str, out: pathlib.Path, sets: list[str], only: str, workers: int,
           population: bool) -> float:
    """Seconds of one invocation of the runner."""
    started = time.perf_counter()
    argv = [name, "--out", str(out), "--quiet", "--workers", str(workers), "--only", only,
            *[a for s in sets for a in ("--set", s)], *(["--population"] if population else [])]
    if runner.main(argv) != 0:
        raise SystemExit(f"experiments.run {' '.join(argv)} failed")
    return time.perf_counter() - started


def _accuracies(out: pathlib.Path, name: str, runs) -> dict[str, float]:
    return {run.name: json.loads((out / name / run.name / "summary.json").read_text())
            ["test_accuracy"] for run in runs}


def main(argv=None):
    p = parser(__doc__, repeats=1)
    p.add_argument("--experiment", default="fig2_fashion_mnist")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE")
    p.add_argument("--only", default="*", metavar="GLOB", help="runs whose name matches")
    p.add_argument("--workers", type=int, default=2)
    p.add_argument("--out", type=pathlib.Path, default=None, help="where both sweeps are written "
                   "(default: a temporary directory)")
    args = p.parse_args(argv)
    sets = args.set + (["epochs=1", "sharpness.examples=0", "robustness.examples=0"]
                       if args.quick else [])
    out = args.out or pathlib.Path(tempfile.mkdtemp(prefix="population_sweep_"))
    wall = {kind: _sweep(args.experiment, out / kind, sets, args.only, args.workers,
                         kind == "population") for kind in ("sequential", "population")}
    runs = [run for run in configs.load(args.experiment).runs()
            if fnmatch.fnmatch(run.name, args.only)]
    accuracy = {kind: _accuracies(out / kind, args.experiment, runs) for kind in wall}
    rules, rows = {}, []
    for rule in dict.fromkeys(run.labels["rule"] for run in runs):
        names = [run.name for run in runs if run.labels["rule"] == rule]
        stats = {kind: {"mean": statistics.mean(accuracy[kind][n] for n in names),
                        "sd": statistics.stdev(accuracy[kind][n] for n in names)
                        if len(names) > 1 else 0.0} for kind in wall}
        gap = max(abs(accuracy["population"][n] - accuracy["sequential"][n]) for n in names)
        within = abs(stats["population"]["mean"] - stats["sequential"]["mean"]) <= max(
            stats["sequential"]["sd"], 1e-4)
        rules[rule] = {**stats, "largest_run_difference": gap, "within_seed_spread": within}
        rows.append([rule, len(names), 100 * stats["sequential"]["mean"],
                     100 * stats["sequential"]["sd"], 100 * stats["population"]["mean"],
                     100 * stats["population"]["sd"], 100 * gap, "yes" if within else "NO"])
    table = markdown_table(["rule", "seeds", "sequential %", "sd", "population %", "sd",
                            "largest run difference (points)", "within spread"], rows)
    report({"machine": machine(), "experiment": args.experiment, "only": args.only, "overrides": sets,
            "workers": args.workers, "wall_time_s": wall,
            "speedup": wall["sequential"] / wall["population"], "rules": rules,
            "runs": accuracy}, {f"{args.experiment} both ways (wall time: sequential "
                                f"{wall['sequential']:.0f} s, population "
                                f"{wall['population']:.0f} s)": table}, args.json)


if __name__ == "__main__":
    main()
