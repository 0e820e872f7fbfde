"""Soft alignment on MLPs of 2, 4 and 8 hidden layers of 512 ReLU units, Fashion-MNIST (offline):
see ``_soft_alignment`` for the settings compared and the measurements. Schedule: 20 epochs, batch
64, lr 0.01 halved at epochs 10 and 15, wd 1e-4 (the Fig. 2 schedule, halved in length)."""
from experiments.configs import _soft_alignment, common

DEPTHS = (2, 4, 8)


def get_config():
    config = common.ffn2_paper("fashion_mnist")
    config.update({"epochs": 20, **_soft_alignment.MEASUREMENTS})
    config.optimizer.lr_milestones = (10, 15)
    return config


def runs():
    return _soft_alignment.runs(
        seeds=(0,), depth=[(d, {"model_options.widths": (512,) * d}) for d in DEPTHS])
