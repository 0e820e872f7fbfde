"""The sparse-feedback sweep of the PFA paper: fixed Bernoulli(density) masks on the
feedback of FA, DFA, uSF (the paper's "SF") and PFA, density in {1, .5, .3, .17, .1, .05}, ffn2 with the
Fig. 2 schedule."""
from experiments.configs import common

DENSITIES = (1.0, 0.5, 0.3, 0.17, 0.1, 0.05)
RULES = ("fa", "dfa", "usf", "pfa")


def runs(seeds):
    return common.sweep("fig2", seeds, rules=RULES,
                        density=[(d, {"rule.options.density": d}) for d in DENSITIES])
