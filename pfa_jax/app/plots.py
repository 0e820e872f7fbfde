"""PNG figures of a run's ``metrics.jsonl`` records (matplotlib's object-oriented ``Figure``: no
pyplot, so the global backend, e.g. a notebook's inline one, is left as it is).

``run_curves`` draws, against the epoch: train and test accuracy; the per-layer angle between
feedback and kernel (``weight_angle``, PFA's path alignment; layers without kernel-shaped feedback
are absent); and the per-layer angle between the rule's update and the true gradient
(``grad_angle``), where recorded.
"""
from __future__ import annotations

from etils import epath
from matplotlib.figure import Figure

__all__ = ["run_curves"]


def _layer_series(records: list[dict], group: str, key: str) -> dict[str, list[float]]:
    layers = records[-1].get(group, {})
    return {layer: [r[group][layer][key] for r in records] for layer in layers}


def run_curves(records: list[dict], path, title: str = "") -> Figure:
    """Saves the accuracy and alignment curves of one run's epoch records to ``path`` (PNG; any
    ``etils.epath`` path, e.g. on cloud storage); returns the figure (a notebook shows it)."""
    epochs = [r["epoch"] for r in records]
    panels = [("accuracy (%)", {split: [100 * r[f"{split}_accuracy"] for r in records]
                                for split in ("train", "test")}),
              ("feedback-kernel angle (deg)", _layer_series(records, "alignment", "weight_angle")),
              ("update angle to BP gradient (deg)",
               _layer_series(records, "gradient_alignment", "grad_angle"))]
    panels = [(label, series) for label, series in panels if series]
    figure = Figure(figsize=(4.5 * len(panels), 3.4))
    axes = figure.subplots(1, len(panels), squeeze=False)
    for axis, (label, series) in zip(axes[0], panels):
        for name, values in series.items():
            axis.plot(epochs, values, label=name)
        axis.set_xlabel("epoch")
        axis.set_ylabel(label)
        axis.legend(fontsize=7)
        axis.grid(alpha=0.3)
    if title:
        figure.suptitle(title)
    figure.tight_layout()
    with epath.Path(path).open("wb") as file:
        figure.savefig(file, format="png", dpi=100)
    return figure
