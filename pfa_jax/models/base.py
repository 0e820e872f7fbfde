"""What every model shares: the common fields, the layer helpers and the classifier head.

Every ``Dense`` / ``Conv`` is a ``pfa_jax.nn`` layer with the model's ``rule`` passed through
unchanged (each layer resolves a per-layer mapping from its own path). BatchNorm follows PyTorch's
defaults (scale 1, bias 0, ``momentum=0.9`` in flax's convention, i.e. PyTorch's 0.1, ``epsilon=1e-5``)
and averages its batch statistics over ``axis_name`` under ``pmap``. BatchNorm, activations, pooling
and residual additions use ordinary autodiff: only ``Dense`` and ``Conv`` follow the rule.

``dtype`` (default ``None``: float32 for float32 inputs) is the computation dtype of every layer,
BatchNorm included, with the parameters, feedback and BatchNorm statistics kept in float32 (Flax's
``dtype`` / ``param_dtype``); ``dtype=jnp.bfloat16`` is mixed-precision training. The logits are
returned in float32, so the loss is computed in float32.
"""

from collections.abc import Sequence
from typing import Any, ClassVar

import flax.linen as nn
import jax.numpy as jnp

from pfa_jax import nn as pnn

__all__ = ["ACTIVATIONS", "activation", "Layers", "Model"]

# the hidden layers' nonlinearities a model may take (``ffn2``'s option ``activation``)
ACTIVATIONS = {"relu": nn.relu, "tanh": jnp.tanh}


def activation(name: str):
    """The function ``ACTIVATIONS[name]``; an unknown name raises ``ValueError`` naming the valid
    ones."""
    if name not in ACTIVATIONS:
        raise ValueError(f"unknown activation {name!r}; valid activations: {', '.join(ACTIVATIONS)}")
    return ACTIVATIONS[name]


class Layers(nn.Module):
    """A module made of rule-following layers and BatchNorm."""

    rule: pnn.RuleSpec = "bp"
    axis_name: str | None = None
    dtype: Any = None

    def conv_bn(self, x, features: int, kernel: int, strides: int, train: bool,
                names: tuple[str, str]):
        """Conv without bias, symmetric padding ``kernel // 2`` (as PyTorch), then BatchNorm."""
        x = pnn.Conv(features, (kernel, kernel), strides=strides, padding=kernel // 2,
                     use_bias=False, rule=self.rule, dtype=self.dtype, name=names[0])(x)
        return nn.BatchNorm(use_running_average=not train, momentum=0.9, epsilon=1e-5,
                            axis_name=self.axis_name, dtype=self.dtype, name=names[1])(x)


class Model(Layers):
    """A classifier: ``__call__(x, train=False)`` maps images ``(N, H, W, C)`` to logits."""

    num_classes: int = 10
    input_ranks: ClassVar[tuple[int, ...]] = (4,)  # the ranks of input ``__call__`` takes

    def inputs(self, x):
        """``x``, checked to be a batch (rank in ``input_ranks``), so that a single image without
        its batch axis is an error instead of a batch of rows."""
        if x.ndim not in self.input_ranks:
            takes = " or ".join({2: "(batch, features)", 4: "(batch, height, width, channels)"}[r]
                                for r in self.input_ranks)
            raise ValueError(f"{type(self).__name__} takes inputs of shape {takes}, got shape "
                             f"{tuple(x.shape)}; a single image needs a batch axis: x[None]")
        return x

    def classifier(self, x, widths: Sequence[int] = (), prefix: str = "dense",
                   nonlinearity=nn.relu):
        """Flattens ``x``, applies ``Dense`` layers ``{prefix}_{i}`` each followed by
        ``nonlinearity`` (ReLU), then the ``output`` layer,
        and adds the DFA error taps of the whole model to the logits (``pfa_jax.nn.add_taps``).

        Every model ends here, so at init this also checks that a rule mapping names only layers the
        model has (``pfa_jax.nn.check_rule_map``) when the model is the top-level module.
        """
        x = x.reshape(x.shape[0], -1)
        for i, width in enumerate(widths):
            x = nonlinearity(pnn.Dense(width, rule=self.rule, dtype=self.dtype,
                                       name=f"{prefix}_{i}")(x))
        logits = pnn.Dense(self.num_classes, rule=self.rule, dtype=self.dtype, name="output")(x)
        if self.is_initializing() and not self.scope.path:
            pnn.check_rule_map(self.rule, self.variables["params"])
        return jnp.asarray(pnn.add_taps(self, logits), jnp.float32)
