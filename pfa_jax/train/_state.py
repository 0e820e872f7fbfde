"""The training state ``TrainState``, its per-step RNG keys, the batch checks, and the model applied
with its rule (``apply_with_rule``)."""
from __future__ import annotations

import zlib
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import optax
from flax import struct

from pfa_jax import layers as player
from pfa_jax import losses
from pfa_jax import nn as pnn

FEEDBACK_STREAM = "feedback"  # the RNG stream of rules that redraw feedback every step (brsf)


class TrainState(struct.PyTreeNode):
    step: jax.Array
    params: Any
    feedback: Any
    batch_stats: Any
    opt_state: Any  # {'params': tx state, 'feedback': feedback_tx state}
    rng: jax.Array
    model: nn.Module = struct.field(pytree_node=False)
    tx: optax.GradientTransformation = struct.field(pytree_node=False)
    feedback_tx: optax.GradientTransformation = struct.field(pytree_node=False)
    layers: player.Table = struct.field(pytree_node=False, default=())
    rng_streams: tuple[str, ...] = struct.field(pytree_node=False, default=())
    input_shape: tuple[int, ...] = struct.field(pytree_node=False, default=())
    num_classes: int = struct.field(pytree_node=False, default=0)  # the width of the logits
    loss: losses.Loss = struct.field(pytree_node=False, default=losses.classification)

    def check(self, images, labels, where: str) -> None:
        """``check_batch`` against this state's input shape and, under the default loss, its
        number of classes; under an own loss ``labels`` is any pytree of arrays whose leading
        axis is the batch's."""
        if self.loss is losses.classification:
            check_batch(images, labels, input_shape=self.input_shape,
                        num_classes=self.num_classes, where=where)
            return
        check_batch(images, input_shape=self.input_shape, where=where)
        n = jnp.shape(images)[:1]
        bad = {jnp.shape(leaf) for leaf in jax.tree.leaves(labels) if jnp.shape(leaf)[:1] != n}
        if bad:
            raise ValueError(f"{where}: label arrays of shapes {sorted(bad)} do not match images "
                             f"of shape {tuple(jnp.shape(images))}: each needs the batch axis "
                             f"first, {n}")

    def variables(self) -> dict:
        return {"params": self.params, "feedback": self.feedback, "batch_stats": self.batch_stats}

    @property
    def mirrored(self) -> bool:
        """Whether the model has weight-mirror layers."""
        return any(layer.rule.mirrored for layer in self.layers)

    def plastic_feedback(self) -> dict:
        """The feedback arrays the optimizer steps."""
        return player.select(self.feedback, player.feedback_labels(self.layers, self.feedback),
                             player.PLASTIC)

    def init_opt_state(self) -> dict:
        return {"params": self.tx.init(self.params),
                "feedback": self.feedback_tx.init(self.plastic_feedback())}


def mirror(state: TrainState, warmup: bool = False) -> TrainState:
    """Weight-mirror layers take their mirror steps (``warmup``: the initial mirroring phase), with
    noise from a key derived from ``state.rng`` and ``state.step`` (``pfa_jax.layers.mirror``)."""
    key = jax.random.fold_in(jax.random.fold_in(state.rng, state.step), 1)
    return state.replace(feedback=player.mirror(state.layers, state.params, state.feedback, key,
                                                warmup))


def step_rngs(state: TrainState) -> dict:
    """The RNG keys of the state's next train step: ``feedback`` from ``fold_in(rng, step)``, every
    other stream of ``state.rng_streams`` from that key folded with ``crc32(name)``."""
    key = jax.random.fold_in(state.rng, state.step)
    return {FEEDBACK_STREAM: key,
            **{name: jax.random.fold_in(key, zlib.crc32(name.encode())) for name in state.rng_streams}}


def check_batch(images, labels=None, *, input_shape=(), num_classes: int = 0,
                where: str = "batch") -> None:
    """Raises ``ValueError`` naming ``where`` and the shapes unless ``images`` is ``(n >= 1,
    *input_shape)`` (any shape if ``input_shape`` is empty) and ``labels`` ``(n,)`` integers, in
    ``[0, num_classes)`` when ``num_classes`` is given and the labels are concrete (inside ``jit``
    only the shapes can be checked; the data loaders check the values where data enters)."""
    shape = tuple(jnp.shape(images))
    if shape[:1] == (0,):
        raise ValueError(f"{where}: an empty batch (images of shape {shape}); give at least one "
                         "example")
    if input_shape and shape[1:] != tuple(input_shape):
        raise ValueError(f"{where}: images of shape {shape} do not fit the model's inputs of shape "
                         f"(batch, {', '.join(map(str, input_shape))})")
    if labels is None:
        return
    if tuple(jnp.shape(labels)) != shape[:1]:
        raise ValueError(f"{where}: labels of shape {tuple(jnp.shape(labels))} do not match images "
                         f"of shape {shape}: need one label per image, shape {shape[:1]}")
    if not jnp.issubdtype(jnp.result_type(labels), jnp.integer):
        raise ValueError(f"{where}: labels must be integer class indices, got dtype "
                         f"{jnp.result_type(labels)}")
    if not num_classes or not shape[0] or isinstance(labels, jax.core.Tracer):
        return
    low, high = int(jnp.min(labels)), int(jnp.max(labels))
    if low < 0 or high >= num_classes:
        raise ValueError(f"{where}: labels must lie in [0, {num_classes}), got values from {low} "
                         f"to {high}")


cross_entropy = losses.cross_entropy


def apply_with_rule(model, variables, images, train: bool, rngs: dict, collections=()):
    """``model.apply`` wired as in a train step, so that differentiating it follows the rule: the
    RNG streams ``rngs`` (``step_rngs``) and the DFA error taps (``pfa_jax.nn.TAPS``) mutable. In
    training mode BatchNorm normalises with the batch's statistics; its updated running statistics
    come back in the updates. ``collections``: further mutable collections. Returns
    ``(logits, updates)``."""
    return model.apply(variables, images, train=train, rngs=rngs,
                       mutable=["batch_stats", pnn.TAPS, *collections])
