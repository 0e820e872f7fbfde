"""``ffn2``: a fully connected ReLU network (the PFA paper's MNIST model, 784-512-512-10).

The input, features ``(N, D)`` or images ``(N, H, W, C)``, is flattened to ``(N, -1)``; hidden layers ``hidden_0, hidden_1, ...`` of ``widths`` units
with bias and ReLU, then the ``output`` layer. Only the ``Dense`` layers follow the rule; the ReLUs use
ordinary autodiff. No BatchNorm (``axis_name`` and ``train`` are accepted for uniformity).
"""
from __future__ import annotations

import flax.linen as nn

from pfa_jax.models.base import Model

__all__ = ["MLP"]


class MLP(Model):
    widths: tuple[int, ...] = (512, 512)
    input_ranks = (2, 4)

    @nn.compact
    def __call__(self, x, train: bool = False):
        del train
        return self.classifier(self.inputs(x), self.widths, prefix="hidden")
