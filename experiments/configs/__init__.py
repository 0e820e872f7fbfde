"""One module per experiment, each a Python file of code (the big_vision habit):

* ``get_config()`` returns the experiment's base run config (a ``pfa_jax.app.config.default_config()``
  with the paper's settings), overridable from the command line with ``--set``;
* ``runs()`` returns the sweep: a list of ``common.Run`` (a run directory name, the labels the
  report groups and tabulates by, and the config values that differ from the base; ``source``
  names another experiment's run of the same config that this sweep shares instead of
  training its own);
* optional ``PLOT_AXIS``: a numeric label the report plots final accuracy against;
* optional ``REPORT``: a module of ``experiments`` whose ``section`` the report adds.

    python -m experiments.run fig2_fashion_mnist            # every run, into experiments/results/
"""
from __future__ import annotations

import importlib
import pathlib
import types

_HERE = pathlib.Path(__file__).parent


def names() -> tuple[str, ...]:
    """The experiments, in the order of RESULTS.md."""
    return ("fig2_fashion_mnist", "expansion_fashion_mnist", "sparse_fashion_mnist",
            "resnet20_fashion_mnist", "soft_alignment_mlp", "soft_alignment_seeds", "soft_alignment_resnet20",
            "rules_zoo_fashion_mnist", "vit_fashion_mnist", "charlm_fortunes",
            "fig2_mnist", "sparse_mnist", "fig4_cifar10", "fig5_imagenet")


def load(name: str) -> types.ModuleType:
    """The config module of experiment ``name``."""
    if name not in names() or not (_HERE / f"{name}.py").exists():
        raise ValueError(f"unknown experiment {name!r}; valid: {', '.join(names())}")
    return importlib.import_module(f"{__name__}.{name}")
