"""Sparse feedback on Fashion-MNIST (offline): density in {1, .5, .3, .17, .1, .05} for FA, DFA,
uSF and PFA on ffn2, Fig. 2 schedule (see ``_sparse``)."""
from experiments.configs import _sparse, common

PLOT_AXIS = "density"


def get_config():
    return common.ffn2_paper("fashion_mnist")


def runs():
    return _sparse.runs(seeds=(0,))
