"""Fig. 2 of the PFA paper: every rule on ffn2 on MNIST (tensorflow-datasets), 40 epochs, 5 seeds.
Reported (final test accuracy %): BP 98.38, FA 98.23, DFA 98.15, SF 98.25, PFA 98.39, PFA-o 98.42."""
from experiments.configs import common


def get_config():
    return common.ffn2_paper("mnist")


def runs():
    return common.sweep("fig2", seeds=range(5), rules=common.PAPER_RULES)
