"""Alignment of the feedback with the kernels, and of the rule's gradients with backprop's."""
from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from flax import traverse_util

from pfa_jax import layers as player
from pfa_jax import losses
from pfa_jax import nn as pnn
from pfa_jax.metrics._inputs import as_state, batch_list
from pfa_jax.train import apply_with_rule, step_rngs


def angle(a, b) -> jax.Array:
    """Angle in degrees between two tensors as flat vectors.

    ``arccos(<a, b> / (||a|| ||b||))``, computed as ``2 atan2(||u - v||, ||u + v||)`` with
    ``u = a / ||a||``, ``v = b / ||b||`` (``||u -+ v|| = 2 sin, 2 cos`` of half the angle), which keeps
    full precision near 0 and 180 degrees where arccos loses half the digits. NaN if either is zero.
    """
    u, v = (jnp.ravel(t) / jnp.linalg.norm(t) for t in (a, b))
    return jnp.degrees(2 * jnp.arctan2(jnp.linalg.norm(u - v), jnp.linalg.norm(u + v)))


def _by_layer(tree, leaf: str) -> dict:
    """``{layer path: value}`` for every entry ``.../layer/leaf`` of a nested dict."""
    return {"/".join(path[:-1]): value for path, value in traverse_util.flatten_dict(tree).items()
            if path[-1] == leaf}


def kernels_and_feedback(state) -> dict[str, tuple[jax.Array, jax.Array]]:
    """``{layer: (K, F)}`` for every rule-following layer (slice) of the state's model."""
    state = as_state(state)
    return player.kernels_and_feedback(state.layers, state.params, state.feedback)


@jax.jit
def _alignment(state) -> dict[str, dict[str, jax.Array]]:
    return {path: {"weight_angle": angle(f, k), "norm_ratio": jnp.linalg.norm(f) / jnp.linalg.norm(k)}
            for path, (k, f) in kernels_and_feedback(state).items()}


def alignment(state) -> dict[str, dict[str, jax.Array]]:
    """How close each layer's effective feedback ``F`` is to its kernel ``K``.

    Args:
      state: a ``TrainState`` or an NNX model (``as_state``).

    Returns:
      Per layer (a lifted layer per slice, ``path[i]``) ``{'weight_angle': angle(F, K) in degrees,
      'norm_ratio': ||F|| / ||K||}``: 0 degrees for backprop; for PFA the paper's "path
      alignment". Layers without a kernel-shaped ``F`` (DFA) are left out.

    Example:
      >>> import jax, jax.numpy as jnp, pfa_jax as pj
      >>> model = pj.models.get("ffn2", rule=pj.rules.get("fa", rho=0.5), widths=(16,))
      >>> state = pj.train.create_train_state(jax.random.key(0), model, jnp.ones((1, 8, 8, 1)))
      >>> angles = pj.metrics.alignment(state)
      >>> sorted(angles), round(float(angles["hidden_0"]["weight_angle"]), 3)  # arccos(0.5)
      (['hidden_0', 'output'], 60.0)
    """
    return _alignment(as_state(state))


def layer_gradients(state, batch, rngs) -> dict[str, tuple[jax.Array, jax.Array]]:
    """``{layer: (dL/dK, dL/dy)}`` under the backward pass in force (the rule's, or backprop's
    inside ``pfa_jax.nn.backprop()``), for every rule layer (slice).

    ``L`` is the state's loss (``pfa_jax.losses``) of a training-mode forward pass (``apply_with_rule``),
    ``y`` each layer's output: ``dL/dy`` is the gradient w.r.t. a zero ``perturbations`` collection
    (a lifted layer needs ``perturbations`` among its lifted collections).
    """
    def loss(params, perturbations):
        variables = {**state.variables(), "params": params, pnn.PERTURBATIONS: perturbations}
        outputs, _ = apply_with_rule(state.model, variables, batch["image"], True, rngs)
        return losses.value_and_aux(state.loss, outputs, batch)[0]

    _, shapes = jax.eval_shape(functools.partial(
        apply_with_rule, state.model, state.variables(), batch["image"], True, rngs,
        [pnn.PERTURBATIONS]))
    zeros = jax.tree.map(lambda s: jnp.zeros(s.shape, s.dtype), shapes[pnn.PERTURBATIONS])
    dparams, dperturbations = jax.grad(loss, argnums=(0, 1))(state.params, zeros)
    kernels, deltas = _by_layer(dparams, "kernel"), _by_layer(dperturbations, pnn.PERTURBATION)
    return {name: (kernels[layer.path][index], deltas[layer.path][index])
            for layer in state.layers for name, index in layer.slices(kernels[layer.path])}


def gradient_alignment(state, batch) -> dict[str, dict[str, jax.Array]]:
    """Per layer, how far the rule's gradients are from backprop's on ``batch``, in one compiled call.

    The true values come from plain autodiff of the same forward pass (``pfa_jax.nn.backprop``).
    Both passes are in training mode (see ``layer_gradients``) with the RNG keys of the state's next
    train step (the same dropout masks). The output layer receives the true error under every
    layer-wise rule, so its angles are 0.

    Args:
      state: a ``TrainState`` or an NNX model (``as_state``).
      batch: ``{'image', 'label'}`` (a sequence of batches: its first).

    Returns:
      Per layer ``{'grad_angle': angle(dK_rule, dL/dK), 'delta_angle': angle(g_rule, g_bp),
      'delta_norm_rule': ||g_rule||, 'delta_norm_bp': ||g_bp||}``, angles in degrees, where
      ``dK`` is the kernel gradient and ``g = dL/dy`` the error reaching the layer's output
      (Frobenius norms over the batch, of the mean loss).

    Example:
      >>> import jax, jax.numpy as jnp, pfa_jax as pj
      >>> model = pj.models.get("ffn2", rule="fa", widths=(16,))
      >>> batch = {"image": jax.random.uniform(jax.random.key(1), (8, 8, 8, 1)),
      ...          "label": jnp.arange(8)}
      >>> state = pj.train.create_train_state(jax.random.key(0), model, batch)
      >>> result = pj.metrics.gradient_alignment(state, batch)
      >>> float(result["output"]["delta_angle"]), float(result["hidden_0"]["delta_angle"]) > 1
      (0.0, True)
    """
    state = as_state(state)
    return _gradient_alignment(state, batch_list(state, batch, "gradient_alignment")[0])


@jax.jit
def _gradient_alignment(state, batch):
    rngs = step_rngs(state)
    rule = layer_gradients(state, batch, rngs)
    with pnn.backprop():
        true = layer_gradients(state, batch, rngs)
    return {path: {"grad_angle": angle(dk, true[path][0]), "delta_angle": angle(g, true[path][1]),
                   "delta_norm_rule": jnp.linalg.norm(g),
                   "delta_norm_bp": jnp.linalg.norm(true[path][1])}
            for path, (dk, g) in rule.items()}
