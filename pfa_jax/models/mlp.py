"""``ffn2``: a fully connected network (the PFA paper's MNIST model, 784-512-512-10, ReLU).

The input, features ``(N, D)`` or images ``(N, H, W, C)``, is flattened to ``(N, -1)``; hidden layers
``hidden_0, hidden_1, ...`` of ``widths`` units with bias and the nonlinearity ``activation``, then
the ``output`` layer. Only the ``Dense`` layers follow the rule; the nonlinearities use ordinary
autodiff. No BatchNorm (``axis_name`` and ``train`` are accepted for uniformity).

``activation`` is ``"relu"`` (default; the PFA paper's) or ``"tanh"`` (the DRTP authors' hidden
units, Frenkel et al. 2021): a rule whose hidden-layer signal does not vanish as the error does
(DFA with ``signal="target"``) keeps pushing the pre-activations the same way, which tanh's
saturation ``f'(a) -> 0`` ends and ReLU's ``f'(a) = 1`` does not (docs/rules.md).
"""
from __future__ import annotations

import flax.linen as nn

from pfa_jax.models.base import Model, activation

__all__ = ["MLP"]


class MLP(Model):
    widths: tuple[int, ...] = (512, 512)
    activation: str = "relu"
    input_ranks = (2, 4)

    def __post_init__(self):
        activation(self.activation)  # an unknown name fails here, not at the first call
        super().__post_init__()

    @nn.compact
    def __call__(self, x, train: bool = False):
        del train
        return self.classifier(self.inputs(x), self.widths, prefix="hidden",
                               nonlinearity=activation(self.activation))
