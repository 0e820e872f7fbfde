"""The rules inside a transformer, projection by projection: called by ``experiments.report`` for
experiments whose config names it (``REPORT = "transformer_report"``: ``vit_fashion_mnist``,
``charlm_fortunes``).

A transformer's kernels come in kinds that play different parts: each block's attention
``query``, ``key``, ``value`` and ``out`` projections and its MLP's ``mlp_in`` and ``mlp_out``,
plus the ``patch`` embedding (ViT) and the ``output`` head. The section gives, per rule (mean
over seeds, then over the blocks of a kind):

- for a language model, the final test loss in bits per character (``test_bits_per_token``) and
  by how much it beat the first epoch's;
- the final weight angle (feedback against forward kernel) and update angle (the rule's update
  against the true gradient, on the fixed held-out batch) of every kind;
- a figure: the weight angle of every kind against the epoch, a line per rule.
"""
from __future__ import annotations

import pathlib
import statistics

from matplotlib.figure import Figure

from experiments.report import groups, mean_sd

KINDS = ("patch", "query", "key", "value", "out", "mlp_in", "mlp_out", "output")


def kind(layer: str) -> str:
    """The projection kind of a kernel's path: its last component (``block_1/attention/key``:
    ``key``)."""
    return layer.rsplit("/", 1)[-1]


def by_kind(angles: dict, key: str) -> dict[str, float]:
    """``{kind: mean angle over the blocks}`` of one record's per-layer angles (``KINDS`` order;
    only the kinds the model has)."""
    values: dict[str, list[float]] = {}
    for layer, measured in angles.items():
        values.setdefault(kind(layer), []).append(measured[key])
    return {k: statistics.fmean(values[k]) for k in KINDS if k in values}


def kinds_of(grouped: dict) -> list[str]:
    """The projection kinds of the experiment's model (``KINDS`` order)."""
    layers = {layer for members in grouped.values() for m in members
              for group in ("alignment", "gradient_alignment") for layer in m["summary"].get(group, {})}
    return [k for k in KINDS if k in {kind(layer) for layer in layers}]


def _over_seeds(members: list[dict], group: str, key: str) -> dict[str, float]:
    """``{kind: final angle}``, mean over the seeds ``members`` (``by_kind`` of each)."""
    per_run = [by_kind(m["summary"].get(group, {}), key) for m in members]
    return {k: statistics.fmean(run[k] for run in per_run) for k in per_run[0]}


def angle_table(grouped: dict) -> list[str]:
    """One row per rule: the weight and update angle of every projection kind."""
    kinds = kinds_of(grouped)
    header = ["rule"] + kinds
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for key, members in grouped.items():
        weights = _over_seeds(members, "alignment", "weight_angle")
        updates = _over_seeds(members, "gradient_alignment", "grad_angle")
        cells = [dict(key)["rule"]] + [(
            f"{weights[k]:.1f}" if k in weights else "n/a") + " / " + (
            f"{updates[k]:.1f}" if k in updates else "n/a") for k in kinds]
        lines.append("| " + " | ".join(cells) + " |")
    return lines


def bits_table(grouped: dict) -> list[str]:
    """One row per rule: final test bits per character and the gain over the first epoch."""
    lines = ["| rule | seeds | test bits / char | first epoch | gain |", "|---|---|---|---|---|"]
    for key, members in grouped.items():
        final = [m["summary"]["test_bits_per_token"] for m in members]
        first = [m["records"][0]["test_bits_per_token"] for m in members]
        lines.append(f"| {dict(key)['rule']} | {len(members)} | {mean_sd(final, digits=3)} | "
                     f"{mean_sd(first, digits=3)} | "
                     f"{mean_sd([a - b for a, b in zip(first, final)], digits=3)} |")
    return lines


def angle_figure(grouped: dict) -> Figure:
    """The weight angle of every projection kind against the epoch, a line per rule (rules
    without a feedback kernel, DFA's, have no line)."""
    kinds = kinds_of(grouped)
    rows = -(-len(kinds) // 4)
    figure = Figure(figsize=(13, 3.0 * rows))
    axes = figure.subplots(rows, 4, squeeze=False).ravel()
    for key, members in grouped.items():
        length = min(len(m["records"]) for m in members)
        for axis, name in zip(axes, kinds):
            curve = [statistics.fmean(by_kind(m["records"][i]["alignment"], "weight_angle")
                                      .get(name, float("nan")) for m in members)
                     for i in range(length)]
            axis.plot(range(1, length + 1), curve, marker=".", label=dict(key)["rule"])
    for axis, name in zip(axes, kinds):
        axis.set_title(name, fontsize=9)
        axis.set_xlabel("epoch")
        axis.grid(alpha=0.3)
    for axis in axes[len(kinds):]:
        axis.set_axis_off()
    for axis in axes[::4]:
        axis.set_ylabel("weight angle (deg)")
    axes[0].legend(fontsize=7)
    figure.tight_layout()
    return figure


def section(name: str, runs: list[dict], exp_dir: pathlib.Path, folder: pathlib.Path,
            page: pathlib.Path) -> list[str]:
    """The per-projection tables and figure (lines of RESULTS.md)."""
    del exp_dir
    grouped = {key: members for key, members in groups(runs).items() if members}
    if not grouped:
        return []
    lines = ["### Per projection", ""]
    if "test_bits_per_token" in next(iter(grouped.values()))[0]["summary"]:
        lines += ["Next-character loss on the test split in bits per character (mean ± sd "
                  "over seeds); gain: the first epoch's minus the final.", ""]
        lines += bits_table(grouped) + [""]
    lines += ["Final weight angle (feedback against forward kernel; n/a: the rule has no "
              "feedback kernel) and update angle (against the true gradient, on the fixed "
              "held-out batch) per projection kind, each cell `weight / update`, in degrees, mean "
              "over seeds and over the blocks.", ""]
    lines += angle_table(grouped) + [""]
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / f"{name}_projections.png"
    angle_figure(grouped).savefig(path, dpi=90)
    return lines + [f"![{name}: weight angle per projection]({path.relative_to(page.parent)})", ""]
