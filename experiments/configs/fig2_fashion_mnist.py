"""Fig. 2 analogue on Fashion-MNIST (offline): every rule on ffn2 with the paper's full 40-epoch
MNIST schedule (lr 0.01 halved at epochs 20 and 30, wd 1e-4; PFA / PFA-o wd 0.03 in epoch 0, then
9e-5), 3 seeds."""
from experiments.configs import common


def get_config():
    return common.ffn2_paper("fashion_mnist")


def runs():
    return common.sweep("fig2", seeds=(0, 1, 2), rules=common.PAPER_RULES)
