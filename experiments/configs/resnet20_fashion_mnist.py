"""Deep conv on Fashion-MNIST (offline): ResNet-20 on the images zero-padded to 32x32, for bp, fa,
dfa, usf, kp, pfa and pfa_o, with the Fig. 4 settings on a shortened schedule: 15 epochs (lr 0.1
x0.1 at epochs 8 and 12, wd 1e-4, batch 128, no augmentation, the official test set), DFA lr 0.001,
PFA / PFA-o wd 0.005 in epoch 0 then 1e-4; alignment logged every epoch."""
from experiments.configs import common

RULES = ("bp", "fa", "dfa", "usf", "kp", "pfa", "pfa_o")


def get_config():
    config = common.resnet20_paper("fashion_mnist")
    config.update({"pad_to": 32, "holdout": 0, "augment": "none", "epochs": 15})
    config.optimizer.lr_milestones = (8, 12)
    return config


def runs():
    """The Fig. 4 sweep: every rule with its Fig. 4 exceptions (DFA's lr and its error projected
    over each conv layer's output grid, ``grid='output'``)."""
    return common.sweep("fig4", seeds=(0,), rules=RULES)
