"""Renders RESULTS.md and its figures from the run directories alone.

    python -m experiments.report                       # experiments/results -> RESULTS.md
    python -m experiments.report --results DIR --out PAGE.md

For every experiment of ``experiments.configs.names()`` with a results directory: a table with one
row per group of runs that share their labels except ``seed`` (mean and sample standard deviation
over seeds of the final test accuracy; the final per-layer feedback-kernel angle and the angle of
the update to the true gradient, averaged over seeds, each layer for networks of at most four
layers, else the mean and the range over layers; the closing measurements where the runs made them;
the training wall time, and the machine of each row when the runs ran on more than one), the
hardware and the wall times of the invocations recorded, and figures: test accuracy and mean
alignment against the epoch for each group, and final accuracy against the experiment's
``PLOT_AXIS``; an experiment whose config names a ``REPORT`` module of ``experiments`` gets that
module's ``section`` after its table (``soft_alignment_claims``). Runs that diverged are counted
and named with their diagnosis; unfinished runs are
listed as missing. A run shared from another experiment (``source`` in ``experiment.json``) is read
from that experiment's directory. Nothing is typed by hand.
"""
from __future__ import annotations

import argparse
import importlib
import json
import pathlib
import statistics
import sys

from matplotlib.figure import Figure

from experiments import configs

ROOT = pathlib.Path(__file__).resolve().parent.parent


def load_runs(exp_dir: pathlib.Path) -> tuple[dict, list[dict]]:
    """``experiment.json`` and, for each of its runs, the run's labels, state, summary and records."""
    record = json.loads((exp_dir / "experiment.json").read_text())
    runs = []
    for run in record["runs"]:
        run_dir = exp_dir.parent / run["source"] if run.get("source") else exp_dir / run["name"]
        entry = {**run, "state": "missing", "summary": None, "records": []}
        if (run_dir / "metrics.jsonl").exists():
            entry["records"] = [json.loads(line) for line in
                                (run_dir / "metrics.jsonl").read_text().splitlines()]
        if (run_dir / "summary.json").exists():
            entry.update(state="done", summary=json.loads((run_dir / "summary.json").read_text()))
        elif (run_dir / "diverged.json").exists():
            diverged = json.loads((run_dir / "diverged.json").read_text())
            entry.update(state="diverged", error=diverged.get("diagnosis", diverged["error"]))
        runs.append(entry)
    return record, runs


def group_key(labels: dict) -> tuple:
    return tuple((k, v) for k, v in labels.items() if k != "seed")


def groups(runs: list[dict]) -> dict[tuple, list[dict]]:
    """Finished runs by their labels without ``seed``, in sweep order."""
    grouped: dict[tuple, list[dict]] = {}
    for run in runs:
        grouped.setdefault(group_key(run["labels"]), [])
        if run["state"] == "done":
            grouped[group_key(run["labels"])].append(run)
    return grouped


def mean_sd(values: list[float], scale: float = 1.0, digits: int = 2) -> str:
    if not values:
        return "n/a"
    mean = scale * statistics.fmean(values)
    if len(values) == 1:
        return f"{mean:.{digits}f}"
    return f"{mean:.{digits}f} ± {scale * statistics.stdev(values):.{digits}f}"


def layer_angles(runs: list[dict], group: str, key: str) -> str:
    """The final per-layer angle averaged over the runs: each layer (at most four), else the mean
    over layers and their range."""
    finals = [run["summary"].get(group, {}) for run in runs]
    layers = list(finals[0]) if finals else []
    if not layers:
        return "n/a"
    means = {layer: statistics.fmean(f[layer][key] for f in finals) for layer in layers}
    if len(layers) <= 4:
        return " / ".join(f"{v:.1f}" for v in means.values())
    values = list(means.values())
    return f"{statistics.fmean(values):.1f} [{min(values):.1f}, {max(values):.1f}]"


def closing_columns(runs: list[dict]) -> dict[str, list]:
    """Column title -> the value of each run, for the closing measurements every run made."""
    columns: dict[str, list] = {}
    first = runs[0]["summary"]
    if "sharpness" in first:
        columns["top Hessian eig."] = [r["summary"]["sharpness"]["top_eigenvalue"] for r in runs]
        columns["Hessian trace"] = [r["summary"]["sharpness"]["trace"] for r in runs]
    for attack, results in first.get("adversarial", {}).items():
        columns.setdefault("clean (robustness subset) %", [
            100 * r["summary"]["adversarial"][attack]["clean_accuracy"] for r in runs])
        for i, eps in enumerate(results["epsilons"]):
            columns[f"{attack.upper()} {eps} %"] = [
                100 * r["summary"]["adversarial"][attack]["robust_accuracy"][i] for r in runs]
    for i, sigma in enumerate(first.get("noise", {}).get("sigmas", [])):
        columns[f"noise {sigma} %"] = [100 * r["summary"]["noise"]["accuracy"][i] for r in runs]
    return columns


def table(runs: list[dict]) -> list[str]:
    grouped = {key: members for key, members in groups(runs).items() if members}
    if not grouped:
        return ["No finished runs."]
    label_keys = [k for k, _ in next(iter(grouped))]
    layer_names = next(iter(grouped.values()))[0]["summary"].get("alignment", {})
    legend = " / ".join(layer_names) if 0 < len(layer_names) <= 4 else "mean [min, max] over layers"
    extra = list(closing_columns(next(iter(grouped.values()))))
    machines = {key: ", ".join(sorted({m["summary"].get("machine", "not recorded")
                                       for m in members})) for key, members in grouped.items()}
    several = len({m["summary"].get("machine", "not recorded")
                   for members in grouped.values() for m in members}) > 1
    header = (label_keys + ["seeds", "test acc. %", f"weight angle ({legend})",
                            "update angle to BP gradient"] + extra + ["train time / run (s)"]
              + ["machine"] * several)
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for key, members in grouped.items():
        closing = closing_columns(members)
        cells = ([str(v) for _, v in key] + [str(len(members)),
                 mean_sd([m["summary"]["test_accuracy"] for m in members], 100),
                 layer_angles(members, "alignment", "weight_angle"),
                 layer_angles(members, "gradient_alignment", "grad_angle")]
                 + [mean_sd(closing[c], digits=1 if "%" in c else 3) for c in extra]
                 + [f"{statistics.fmean(m['summary']['wall_time'] for m in members):.0f}"]
                 + [machines[key]] * several)
        lines.append("| " + " | ".join(cells) + " |")
    return lines


def _mean_curve(members: list[dict], value) -> tuple[list[int], list[float]]:
    length = min(len(m["records"]) for m in members)
    epochs = [r["epoch"] for r in members[0]["records"][:length]]
    return epochs, [statistics.fmean(value(m["records"][i]) for m in members)
                    for i in range(length)]


def _mean_angle(record: dict, group: str, key: str) -> float:
    values = [v[key] for layer, v in record.get(group, {}).items() if layer != "output"]
    return statistics.fmean(values) if values else float("nan")


def series_and_rows(runs: list[dict], axis: str | None) -> tuple[str, list[str]]:
    """The label drawn as separate lines (``axis`` if set, else the first) and the labels with
    several values that split the figure into rows."""
    keys = [k for k in runs[0]["labels"] if k != "seed"]
    series = axis or keys[0]
    rows = [k for k in keys if k != series and len({str(r["labels"][k]) for r in runs}) > 1]
    return series, rows


def curves_figure(runs: list[dict], axis: str | None) -> Figure:
    """Test accuracy, mean hidden-layer feedback angle and update angle against the epoch
    (matplotlib's object-oriented ``Figure``: a notebook shows it, the global backend is left
    alone)."""
    series, rows = series_and_rows(runs, axis)
    row_values = sorted({tuple(r["labels"][k] for k in rows) for r in runs}, key=str) or [()]
    panels = [("test accuracy (%)", lambda r: 100 * r["test_accuracy"]),
              ("feedback-kernel angle (deg), hidden mean",
               lambda r: _mean_angle(r, "alignment", "weight_angle")),
              ("update angle to BP (deg), hidden mean",
               lambda r: _mean_angle(r, "gradient_alignment", "grad_angle"))]
    figure = Figure(figsize=(15, 3.6 * len(row_values)))
    axes = figure.subplots(len(row_values), 3, squeeze=False)
    for row, values in zip(axes, row_values):
        members_of = {}
        for run in runs:
            if run["state"] == "done" and tuple(run["labels"][k] for k in rows) == values:
                members_of.setdefault(run["labels"][series], []).append(run)
        for axis_, (title, value) in zip(row, panels):
            for label, members in members_of.items():
                axis_.plot(*_mean_curve(members, value), marker=".", label=f"{series}={label}"
                           if not isinstance(label, str) else label)
            axis_.set_xlabel("epoch")
            axis_.set_ylabel(title)
            axis_.set_title(", ".join(f"{k}={v}" for k, v in zip(rows, values)), fontsize=9)
            axis_.grid(alpha=0.3)
        if members_of:
            row[0].legend(fontsize=7, ncol=2)
    figure.tight_layout()
    return figure


def axis_figure(runs: list[dict], axis: str) -> Figure:
    """Final test accuracy (mean and sd over seeds) against ``axis``, a line per other label set."""
    lines: dict[tuple, dict] = {}
    for key, members in groups(runs).items():
        if members:
            rest = tuple((k, v) for k, v in key if k != axis)
            lines.setdefault(rest, {})[dict(key)[axis]] = [
                100 * m["summary"]["test_accuracy"] for m in members]
    figure = Figure(figsize=(5.5, 3.8))
    plot = figure.subplots()
    for rest, points in lines.items():
        xs = sorted(points)
        plot.errorbar(xs, [statistics.fmean(points[x]) for x in xs],
                      yerr=[statistics.stdev(points[x]) if len(points[x]) > 1 else 0 for x in xs],
                      marker="o", capsize=3, label=", ".join(str(v) for _, v in rest))
    plot.set_xscale("log")
    plot.set_xlabel(axis)
    plot.set_ylabel("final test accuracy (%)")
    plot.grid(alpha=0.3)
    plot.legend(fontsize=8)
    figure.tight_layout()
    return figure


def xla_flags(invocation: dict) -> str:
    """``, XLA_FLAGS=...`` where the invocation ran under flags (older records lack the key)."""
    flags = invocation.get("xla_flags", "")
    return f", XLA_FLAGS={flags}" if flags else ""


def hardware_line(record: dict) -> str:
    invocations = record["invocations"]
    devices = sorted({f"{i['device']} ({i['platform']}, {i['cpu_cores']} CPU cores: {i['cpu']}; "
                      f"JAX {i['jax']}{xla_flags(i)})" for i in invocations})
    wall = sum(i["wall_time"] for i in invocations)
    return (f"Hardware: {'; '.join(devices)}. Wall time of the "
            f"sweep: {wall / 60:.1f} min over {len(invocations)} invocation(s) (with "
            f"{', '.join(str(i['workers']) for i in invocations)} run(s) at once; invocations that "
            "ran several experiments together count their whole time for each).")


def section(name: str, exp_dir: pathlib.Path, figures: pathlib.Path, page: pathlib.Path
            ) -> list[str]:
    module = configs.load(name)
    record, runs = load_runs(exp_dir)
    counts = {s: sum(r["state"] == s for r in runs) for s in ("done", "diverged", "missing")}
    lines = [f"## {name}", "", record["description"], "",
             f"Config: `experiments/configs/{name}.py`; command: `python -m experiments.run "
             f"{name}`. Runs: {len(runs)} ({counts['done']} finished, {counts['diverged']} "
             f"diverged, {counts['missing']} missing).", "", hardware_line(record), ""]
    lines += table(runs) + [""]
    for run in runs:
        if run["state"] == "diverged":
            lines.append(f"- `{run['name']}` diverged: {run['error']}")
        elif run["state"] == "missing":
            lines.append(f"- `{run['name']}` has not finished.")
    if counts["done"]:
        figures.mkdir(parents=True, exist_ok=True)
        curves = figures / f"{name}_curves.png"
        curves_figure(runs, getattr(module, "PLOT_AXIS", None)).savefig(curves, dpi=90)
        lines += ["", f"![{name}: curves]({curves.relative_to(page.parent)})"]
        if hasattr(module, "PLOT_AXIS"):
            axis = figures / f"{name}_{module.PLOT_AXIS}.png"
            axis_figure(runs, module.PLOT_AXIS).savefig(axis, dpi=90)
            lines += ["", f"![{name}: final accuracy against {module.PLOT_AXIS}]"
                      f"({axis.relative_to(page.parent)})"]
    if getattr(module, "REPORT", None):
        extra = importlib.import_module(f"experiments.{module.REPORT}")
        lines += [""] + extra.section(name, runs, exp_dir, figures, page)
    return lines + [""]


def render(results: pathlib.Path, page: pathlib.Path) -> str:
    """Writes ``page`` (and its figures beside it, in ``experiments/figures`` or ``figures/``)."""
    figures = page.parent / ("experiments/figures" if page.parent == ROOT else "figures")
    present = [n for n in configs.names() if (results / n / "experiment.json").exists()]
    if not present:
        raise FileNotFoundError(f"no experiment results in {results}; run `python -m "
                                f"experiments.run NAME` first (valid: {', '.join(configs.names())})")
    lines = ["# Results", "",
             "Generated by `python -m experiments.report` from the run directories in "
             f"`{results.resolve().relative_to(ROOT) if results.resolve().is_relative_to(ROOT) else results}`"
             " (each run's `config.json`, `metrics.jsonl` and `summary.json`); do not edit by hand. "
             "Accuracies are final-epoch test accuracies in %, mean ± sample standard deviation "
             "over seeds; angles are in degrees, final epoch, averaged over seeds.", ""]
    lines += [f"- [{n}](#{n})" for n in present] + [""]
    for name in present:
        lines += section(name, results / name, figures, page)
    text = "\n".join(lines)
    page.write_text(text)
    return text


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m experiments.report",
                                     description=__doc__.split("\n")[0])
    parser.add_argument("--results", type=pathlib.Path, default=ROOT / "experiments" / "results")
    parser.add_argument("--out", type=pathlib.Path, default=ROOT / "RESULTS.md")
    args = parser.parse_args(argv)
    try:
        render(args.results, args.out.resolve())
    except FileNotFoundError as error:
        print(f"experiments.report: error: {error}", file=sys.stderr)
        return 2
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
