"""The soft-alignment comparison (Cheon, Bae & Paik 2025) on Fashion-MNIST: FA whose fixed feedback
starts at cosine ``rho`` to the initial kernel, rho in {0, .25, .5, .75, .9, 1}, against BP, plain FA
(an independent draw) and FA after noise pretraining (Cheon, Lee & Paik 2024: N(0, 1) images with
random labels, then the data; 2000 steps unless an experiment says otherwise). Closing measurements:
sharpness (top Hessian eigenvalue and trace on 1000 training images), FGSM / PGD-10 accuracy at eps
0.01, 0.03, 0.1 and accuracy under Gaussian noise of std 0.1, 0.2, 0.4 (pixel units, 1000 test
images); an experiment may shrink these sizes to fit its hardware."""
from experiments.configs import common

RHOS = (0.0, 0.25, 0.5, 0.75, 0.9, 1.0)
NOISE_PRETRAIN_STEPS = 2000
MEASUREMENTS = {"sharpness.enabled": True, "robustness.adversarial_epsilons": (0.01, 0.03, 0.1),
                "robustness.noise_sigmas": (0.1, 0.2, 0.4)}


def feedback_settings(noise_pretrain_steps: int = NOISE_PRETRAIN_STEPS):
    """(label, overrides) of every feedback setting compared."""
    return ([("bp", {"rule.name": "bp"}), ("fa", {"rule.name": "fa"}),
             ("fa noise-pretrained", {"rule.name": "fa",
                                      "noise_pretrain_steps": noise_pretrain_steps})]
            + [(f"fa rho={rho}", {"rule.name": "fa", "rule.options.rho": rho}) for rho in RHOS])


def runs(seeds, noise_pretrain_steps: int = NOISE_PRETRAIN_STEPS, **axes):
    """The sweep over ``feedback_settings`` (label ``feedback``) and ``axes``."""
    return common.sweep(None, seeds, feedback=feedback_settings(noise_pretrain_steps), **axes)
