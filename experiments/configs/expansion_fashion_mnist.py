"""PFA's expansion ratio on Fashion-MNIST: r = mid / out in {1, 2, 5, 10, 20, 50} on ffn2 with the
Fig. 2 schedule; final accuracy and path alignment (the angle between F = R Bp^T and K) per layer."""
from experiments.configs import common

PLOT_AXIS = "r"
RATIOS = (1, 2, 5, 10, 20, 50)


def get_config():
    return common.ffn2_paper("fashion_mnist")


def runs():
    return common.sweep("fig2", seeds=(0, 1), rules=["pfa"],
                        r=[(r, {"rule.options.expansion": r}) for r in RATIOS])
