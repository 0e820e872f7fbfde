"""Fig. 4 of the PFA paper: ResNet-20 on CIFAR-10 (tensorflow-datasets), 250 epochs, batch 128,
lr 0.1 x0.1 at 100/150/200, wd 1e-4, crop-pad-4 + flip, 45k/5k split (accuracy on the 5k
validation images); DFA lr 0.001; PFA and PFA-o wd 0.005 in epoch 0, then 1e-4. Reported
(validation accuracy %): BP 91.44, FA 63.86, DFA 30.89, SF 89.84, PFA 90.70, PFA-o 91.36."""
from experiments.configs import common

RULES = ("bp", "fa", "dfa", "usf", "pfa", "pfa_o")


def get_config():
    return common.resnet20_paper("cifar10")


def runs():
    return common.sweep("fig4", seeds=(0,), rules=RULES)
