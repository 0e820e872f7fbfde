"""Soft alignment on MLPs of 2, 4 and 8 hidden layers of 512 ReLU units, Fashion-MNIST (offline):
see ``_soft_alignment`` for the settings compared and the measurements. Schedule, sized for 2 CPU
cores: 8 epochs, batch 64, plain SGD (no momentum) with lr 0.01 halved at epochs 5 and 7, wd 1e-4;
sharpness with at most 50 power iterations and 20 Hutchinson probes.
With the Fig. 2 momentum of 0.9, FA's logits explode in the 8-layer network (train loss 2e17 after
one epoch, 10 % test accuracy), which would hide every difference between the feedback settings;
without momentum the same network reaches 72 % after two epochs."""
from experiments.configs import _soft_alignment, common

DEPTHS = (2, 4, 8)


def get_config():
    config = common.ffn2_paper("fashion_mnist")
    common.set_values(config, {"epochs": 8, **_soft_alignment.MEASUREMENTS,
                               "sharpness.iterations": 50, "sharpness.probes": 20})
    config.optimizer.update({"lr_milestones": (5, 7), "momentum": 0.0})
    return config


def runs():
    return _soft_alignment.runs(
        seeds=(0,), depth=[(d, {"model_options.widths": (512,) * d}) for d in DEPTHS])
