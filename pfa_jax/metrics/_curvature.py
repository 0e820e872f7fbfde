"""The sharpness of the loss: the top Hessian eigenvalue and the Hessian trace."""
from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import numpy as np
from jax.flatten_util import ravel_pytree

from pfa_jax import losses
from pfa_jax import nn as pnn
from pfa_jax.metrics._inputs import as_state, batch_list, default_key, mean_over


@jax.jit
def hessian_vector_product(state, batch, vector) -> jax.Array:
    """``H v`` for the batch's mean loss, ``H`` the Hessian w.r.t. ``params`` flattened
    (``jax.flatten_util.ravel_pytree`` order), of the true model in eval mode (BatchNorm with running
    statistics), as forward-over-reverse ``jvp(grad(L))``."""
    state.check(batch["image"], batch["label"], "hessian_vector_product")
    flat, unravel = ravel_pytree(state.params)

    def grad(flat_params):
        def loss(params):
            outputs = state.model.apply({**state.variables(), "params": params}, batch["image"],
                                        train=False)
            return losses.value_and_aux(state.loss, outputs, batch)[0]
        return ravel_pytree(jax.grad(loss)(unravel(flat_params)))[0]

    with pnn.backprop():
        return jax.jvp(grad, (flat,), (vector.astype(flat.dtype),))[1]


def _relative_change(new: float, old: float) -> float:
    """``|new - old| / |new|``; 0 where both are 0 (a zero Hessian, e.g. of a network whose
    softmax saturated), infinite where only ``new`` is."""
    if new == 0:
        return 0.0 if old == 0 else math.inf
    return abs(new - old) / abs(new)


def sharpness(state, batches, key=None, *, iterations: int = 100, tolerance: float = 1e-3,
              probes: int = 100) -> dict:
    """Top Hessian eigenvalue and Hessian trace of the mean loss over ``batches`` w.r.t. ``params``.

    ``params`` are all forward parameters (kernels, biases, BatchNorm scales and offsets), never the
    feedback; BatchNorm is in eval mode; ``H v`` by ``hessian_vector_product`` (one compiled call per
    batch shape, summed over the batches with weights ``n_b / N``).

    * Power iteration: ``v <- H v / ||H v||`` from a random normal ``v``; the estimate is the Rayleigh
      quotient ``lambda = v^T H v``, stopped when ``|lambda_k - lambda_{k-1}| / |lambda_k| < tolerance``
      or after ``iterations``. It finds the eigenvalue of largest magnitude (the top one near a
      minimum, where the Hessian is close to positive semi-definite).
    * Hutchinson: ``tr H = E[z^T H z]`` over ``probes`` Rademacher vectors ``z``; reported with the
      standard error of the mean.

    Args:
      state: a ``TrainState`` or an NNX model (``as_state``).
      batches: a batch ``{'image', 'label'}`` or a sequence of them.
      key: the start vector's and the probes' key (default: one derived from ``state.rng``).
      iterations: the most power iterations.
      tolerance: the relative change of the estimate at which the power iteration stops.
      probes: Hutchinson's number of Rademacher vectors (at least 2).

    Returns:
      Python numbers: ``top_eigenvalue``, ``iterations`` (run), ``converged``, ``relative_change``
      (the last one), ``trace``, ``trace_std_error``, ``probes``.

    Example:
      >>> import jax, jax.numpy as jnp, pfa_jax as pj
      >>> model = pj.models.get("ffn2", rule="pfa", widths=(8,))
      >>> batch = {"image": jax.random.uniform(jax.random.key(1), (8, 4, 4, 1)),
      ...          "label": jnp.arange(8)}
      >>> state = pj.train.create_train_state(jax.random.key(0), model, batch)
      >>> result = pj.metrics.sharpness(state, batch, iterations=50, probes=4)
      >>> result["converged"], result["top_eigenvalue"] > 0, result["probes"]
      (True, True, 4)
    """
    state = as_state(state)
    if iterations < 1 or tolerance < 0 or probes < 2:
        raise ValueError(f"sharpness: iterations={iterations!r} must be >= 1, tolerance={tolerance!r} "
                         f">= 0 and probes={probes!r} >= 2")
    batches = batch_list(state, batches, "sharpness")
    size = ravel_pytree(state.params)[0].size
    power_key, probe_key = jax.random.split(default_key(state, key, 1))

    def hvp(v):
        return mean_over(batches, lambda b, _: hessian_vector_product(state, b, v))

    v = jax.random.normal(power_key, (size,))
    estimate, change = math.nan, math.inf
    for iteration in range(1, iterations + 1):
        v = v / jnp.linalg.norm(v)
        hv = hvp(v)
        estimate, previous = float(jnp.vdot(v, hv)), estimate
        change = _relative_change(estimate, previous) if iteration > 1 else math.inf
        v = hv
        if change < tolerance:
            break
    samples = np.asarray([float(jnp.vdot(z, hvp(z))) for z in (
        jax.random.rademacher(k, (size,), jnp.float32) for k in jax.random.split(probe_key, probes))])
    return {"top_eigenvalue": estimate, "iterations": iteration, "converged": change < tolerance,
            "relative_change": change, "trace": float(samples.mean()),
            "trace_std_error": float(samples.std(ddof=1) / math.sqrt(probes)), "probes": probes}
