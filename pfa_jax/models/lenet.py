"""``lenet``: LeNet-5 style convolutional network, for 28x28x1 and 32x32x3 inputs.

``conv_0`` 6@5x5 SAME, ReLU, max-pool 2x2; ``conv_1`` 16@5x5 VALID, ReLU, max-pool 2x2; flatten;
``dense_0`` 120 and ``dense_1`` 84 with ReLU; ``output``. All layers have biases. On 28x28x1 inputs
this is the classic 61,706-parameter LeNet-5. Only ``Conv`` / ``Dense`` follow the rule; ReLU and
pooling use ordinary autodiff. No BatchNorm (``axis_name`` and ``train`` are accepted for uniformity).
"""
from __future__ import annotations

import flax.linen as nn

from pfa_jax import nn as pnn
from pfa_jax.models.base import Model

__all__ = ["LeNet"]


class LeNet(Model):
    @nn.compact
    def __call__(self, x, train: bool = False):
        del train
        x = self.inputs(x)
        for i, (features, padding) in enumerate(((6, "SAME"), (16, "VALID"))):
            x = pnn.Conv(features, (5, 5), padding=padding, rule=self.rule, dtype=self.dtype,
                         name=f"conv_{i}")(x)
            x = nn.max_pool(nn.relu(x), (2, 2), strides=(2, 2))
        return self.classifier(x, (120, 84))
