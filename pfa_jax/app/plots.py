"""PNG figures of a run's ``metrics.jsonl`` records (matplotlib, headless).

``run_curves`` draws, against the epoch: train and test accuracy; the per-layer angle between
feedback and kernel (``weight_angle``, PFA's path alignment; layers without kernel-shaped feedback
are absent); and the per-layer angle between the rule's update and the true gradient
(``grad_angle``), where recorded.
"""
from __future__ import annotations

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402 - the backend must be chosen first

__all__ = ["run_curves"]


def _layer_series(records: list[dict], group: str, key: str) -> dict[str, list[float]]:
    layers = records[-1].get(group, {})
    return {layer: [r[group][layer][key] for r in records] for layer in layers}


def run_curves(records: list[dict], path, title: str = "") -> None:
    """Saves the accuracy and alignment curves of one run's epoch records to ``path`` (PNG)."""
    epochs = [r["epoch"] for r in records]
    panels = [("accuracy (%)", {split: [100 * r[f"{split}_accuracy"] for r in records]
                                for split in ("train", "test")}),
              ("feedback-kernel angle (deg)", _layer_series(records, "alignment", "weight_angle")),
              ("update angle to BP gradient (deg)",
               _layer_series(records, "gradient_alignment", "grad_angle"))]
    panels = [(label, series) for label, series in panels if series]
    figure, axes = plt.subplots(1, len(panels), figsize=(4.5 * len(panels), 3.4), squeeze=False)
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
    figure.savefig(path, dpi=100)
    plt.close(figure)
