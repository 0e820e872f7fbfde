"""The PFA paper's sparse-feedback experiment on MNIST (tensorflow-datasets): density in
{1, .5, .3, .17, .1, .05} for FA, DFA, uSF and PFA on ffn2, Fig. 2 schedule, 5 seeds."""
from experiments.configs import _sparse, common

PLOT_AXIS = "density"


def get_config():
    return common.ffn2_paper("mnist")


def runs():
    return _sparse.runs(seeds=range(5))
