"""Measurements of learning without weight transport (SPEC.md, "Metrics").

Per layer, in degrees unless stated:

* ``weight_angle = arccos(<vec F, vec K> / (||F|| ||K||))``: the angle between a layer's effective
  feedback ``F`` and its kernel ``K`` (0 for backprop; for PFA the paper's "path alignment");
* ``norm_ratio = ||F|| / ||K||``.
"""
from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import traverse_util

from pfa_jax import nn as pnn


def angle(a, b) -> jax.Array:
    """Angle in degrees between two tensors, as flat vectors."""
    a, b = jnp.ravel(a), jnp.ravel(b)
    cos = jnp.vdot(a, b) / (jnp.linalg.norm(a) * jnp.linalg.norm(b))
    return jnp.degrees(jnp.arccos(jnp.clip(cos, -1.0, 1.0)))


def kernels_and_feedback(state) -> dict[str, tuple[jax.Array, jax.Array]]:
    """``{layer path: (K, F)}`` for every rule-following layer of the state's model."""
    images = jnp.zeros((1,) + tuple(state.input_shape), jnp.float32)
    _, captured = state.model.apply(state.variables(), images, train=False,
                                    mutable=[pnn.EFFECTIVE_FEEDBACK])
    flat = traverse_util.flatten_dict(captured[pnn.EFFECTIVE_FEEDBACK])
    return {"/".join(path[:-1]): pair for path, pair in flat.items()}


@jax.jit
def alignment(state) -> dict[str, dict[str, jax.Array]]:
    """Per layer ``{'weight_angle': degrees, 'norm_ratio': ||F|| / ||K||}``."""
    return {path: {"weight_angle": angle(f, k), "norm_ratio": jnp.linalg.norm(f) / jnp.linalg.norm(k)}
            for path, (k, f) in kernels_and_feedback(state).items()}
