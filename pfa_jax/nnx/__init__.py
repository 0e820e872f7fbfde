"""Flax NNX: every rule as NNX layers, the models as NNX modules, an NNX train step.

    from flax import nnx
    import pfa_jax as pj
    layer = pj.nnx.Linear(784, 512, rule="pfa", rngs=nnx.Rngs(0))
    model = pj.nnx.with_rule(MyNet(rngs=nnx.Rngs(0)), "pfa", rngs=nnx.Rngs(1))  # flax's own layers
    model = pj.nnx.models.get("resnet20", rule="pfa", input_shape=(32, 32, 3), rngs=nnx.Rngs(0))
    optimizer = pj.nnx.optimizer(model, tx)          # nnx.Optimizer(wrt=Param | PlasticFeedback)
    metrics = nnx.jit(pj.nnx.train_step)(model, optimizer, batch)

See ``pfa_jax.nnx.layers`` (layers and feedback variable types), ``pfa_jax.nnx.models`` and
``pfa_jax.nnx.train`` (train step, linen conversion), and the repository's ``docs/nnx.md``.
"""
from pfa_jax.nnx import models
from pfa_jax.nnx.intercept import with_rule
from pfa_jax.nnx.layers import (Conv, Feedback, FixedFeedback, Linear, MirroredFeedback,
                                PlasticFeedback, RuleFollowing, RuleLayer, add_taps, mirror,
                                rule_layers)
from pfa_jax.nnx.train import TRAINED, eval_step, from_linen, linen_state, optimizer, to_linen, train_step

__all__ = ["Conv", "eval_step", "FixedFeedback", "from_linen", "linen_state", "Linear", "models",
           "optimizer", "PlasticFeedback", "to_linen", "train_step", "with_rule"]
