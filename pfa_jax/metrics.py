"""Measurements of learning without weight transport.

Every function takes a ``TrainState`` (``pfa_jax.train``), or a Flax NNX model of ``pfa_jax.nnx``
(measured as its linen twin, ``pfa_jax.nnx.linen_state``), and a batch ``{'image', 'label'}`` or (where
it says ``batches``) a sequence of them, whose means are over all their examples; none changes the
state. Per layer, angles in degrees:

* ``alignment(state)``: ``weight_angle = angle(F, K)`` between each layer's effective feedback ``F``
  and its kernel ``K`` (0 for backprop; for PFA the paper's "path alignment") and
  ``norm_ratio = ||F|| / ||K||``; layers without a kernel-shaped ``F`` (DFA) are left out.
* ``gradient_alignment(state, batch)``: ``grad_angle = angle(dK_rule, dL/dK)`` between the rule's
  kernel gradient and the true one; ``delta_angle = angle(g_rule, g_bp)`` between the error
  ``g = dL/dy`` reaching the layer's output under the rule and the true one; ``delta_norm_rule`` and
  ``delta_norm_bp``: their norms (gradient flow across depth).
* ``sharpness(state, batches)``: top Hessian eigenvalue (power iteration) and Hessian trace (Hutchinson)
  of the loss w.r.t. ``params``, BatchNorm in eval mode.
* ``adversarial(state, batches, epsilons, attack=...)``: clean and robust accuracy under L-inf FGSM or
  PGD; ``attack_images`` returns the perturbed images themselves.
* ``corruption(state, batches, sigmas)``: accuracy under additive Gaussian noise.

The true quantities (gradients, Hessian, input gradients) are plain autodiff of the same forward
function: the state's model applied inside ``pfa_jax.nn.backprop()``, where every rule layer follows
backprop; since every rule leaves the forward pass identical to BP, this is the same function with
the same variables, for any linen model. Rule layers come from the state's layer table
(``pfa_jax.layers``); a layer lifted by ``nn.scan`` / ``nn.vmap`` is reported once per slice,
``path[i]``. Training-mode passes draw every RNG stream (dropout included) from the keys of the
state's next train step (``pfa_jax.train.step_rngs``), the rule's pass and the true one alike.
The metrics' definitions are in the repository's ``docs/rules.md`` (Metrics).
"""
from __future__ import annotations

import functools
import math
from collections.abc import Mapping, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx, traverse_util
from jax.flatten_util import ravel_pytree

from pfa_jax import layers as player
from pfa_jax import loops, losses
from pfa_jax import nn as pnn
from pfa_jax.nnx.train import linen_state
from pfa_jax.train import apply_with_rule, eval_step, step_rngs

__all__ = ["adversarial", "alignment", "angle", "as_state", "attack_convergence", "attack_images",
           "ATTACKS",
           "check_attack", "corruption", "gradient_alignment", "GRADIENTS",
           "hessian_vector_product", "input_gradient", "kernels_and_feedback", "layer_gradients",
           "sharpness"]

ATTACKS = ("fgsm", "pgd")
GRADIENTS = ("true", "rule")


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


def as_state(state):
    """A ``TrainState`` as it is; an NNX model as its linen twin's state (``linen_state``)."""
    return linen_state(state) if isinstance(state, nnx.Module) else state


def kernels_and_feedback(state) -> dict[str, tuple[jax.Array, jax.Array]]:
    """``{layer: (K, F)}`` for every rule-following layer (slice) of the state's model."""
    state = as_state(state)
    return player.kernels_and_feedback(state.layers, state.params, state.feedback)


@jax.jit
def _alignment(state) -> dict[str, dict[str, jax.Array]]:
    return {path: {"weight_angle": angle(f, k), "norm_ratio": jnp.linalg.norm(f) / jnp.linalg.norm(k)}
            for path, (k, f) in kernels_and_feedback(state).items()}


def alignment(state) -> dict[str, dict[str, jax.Array]]:
    """Per layer ``{'weight_angle': degrees, 'norm_ratio': ||F|| / ||K||}``."""
    return _alignment(as_state(state))


# -- gradient alignment -----------------------------------------------------------------------------
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

    ``{'grad_angle': angle(dK_rule, dL/dK), 'delta_angle': angle(g_rule, g_bp),
    'delta_norm_rule': ||g_rule||, 'delta_norm_bp': ||g_bp||}`` where ``dK`` is the kernel gradient,
    ``g = dL/dy`` the error reaching the layer's output (Frobenius norms over the batch, of the mean
    loss) and the true values come from plain autodiff of the same forward pass
    (``pfa_jax.nn.backprop``). Both passes are in training mode (see ``layer_gradients``) with the
    RNG keys of the state's next train step (the same dropout masks). The output layer receives the
    true error under every layer-wise rule, so its angles are 0.
    """
    state = as_state(state)
    return _gradient_alignment(state, _batch_list(state, batch, "gradient_alignment")[0])


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


# -- batches ----------------------------------------------------------------------------------------
def _batch_list(state, batches, where: str) -> list[dict]:
    """One batch dict or a sequence of them, as a non-empty list, each checked against ``state``
    (``pfa_jax.train.check_batch``)."""
    batches = [batches] if isinstance(batches, Mapping) else list(batches)
    if not batches:
        raise ValueError(f"{where}: no batches given; pass a batch {{'image', 'label'}} or a list "
                         "of them")
    for batch in batches:
        state.check(batch["image"], batch["label"], where)
    return batches


def _mean_over(batches: list[dict], fn):
    """The mean over all examples of the per-batch means ``fn(b, i_b)``."""
    return loops.weighted_mean([fn(b, i) for i, b in enumerate(batches)],
                               [len(b["label"]) for b in batches])


@jax.jit
def _accuracy(state, images, labels) -> jax.Array:
    metrics = eval_step(state, {"image": images, "label": labels})
    if "accuracy" not in metrics:
        raise ValueError("the robustness metrics report accuracy, and the state's loss gives no "
                         f"'accuracy' among its aux metrics (it gives {sorted(metrics)}); return "
                         "(loss, {'accuracy': ...}) from it")
    return metrics["accuracy"]


def _default_key(state, key, salt: int):
    return jax.random.fold_in(state.rng, salt) if key is None else key


# -- sharpness --------------------------------------------------------------------------------------
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

    Returns Python numbers: ``top_eigenvalue``, ``iterations`` (run), ``converged``,
    ``relative_change`` (the last one), ``trace``, ``trace_std_error``, ``probes``.
    ``key`` defaults to one derived from ``state.rng``.
    """
    state = as_state(state)
    if iterations < 1 or tolerance < 0 or probes < 2:
        raise ValueError(f"sharpness: iterations={iterations!r} must be >= 1, tolerance={tolerance!r} "
                         f">= 0 and probes={probes!r} >= 2")
    batches = _batch_list(state, batches, "sharpness")
    size = ravel_pytree(state.params)[0].size
    power_key, probe_key = jax.random.split(_default_key(state, key, 1))

    def hvp(v):
        return _mean_over(batches, lambda b, _: hessian_vector_product(state, b, v))

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


# -- robustness -------------------------------------------------------------------------------------
def _clip(x, lower, upper):
    if lower is not None:
        x = jnp.maximum(x, lower)
    if upper is not None:
        x = jnp.minimum(x, upper)
    return x


def input_gradient(state, images, labels, key, gradient: str = "true") -> jax.Array:
    """``d(n L)/d images`` in eval mode, ``L`` the state's loss of the ``n`` images (for a mean
    such as the default, the sum of the per-example losses): of the true model (``"true"``) or
    through the rule's own backward pass (``"rule"``, a diagnostic: it is not the gradient of the
    function attacked)."""
    state.check(images, labels, "input_gradient")

    def loss(x):
        outputs, _ = apply_with_rule(state.model, state.variables(), x, False, {"feedback": key})
        batch = {"image": x, "label": labels}
        return losses.value_and_aux(state.loss, outputs, batch)[0] * x.shape[0]

    if gradient == "rule":
        return jax.grad(loss)(images)
    with pnn.backprop():
        return jax.grad(loss)(images)


@functools.partial(jax.jit, static_argnames=("attack", "steps", "gradient"))
def attack_images(state, batch, epsilon, key=None, *, attack: str = "fgsm", steps: int = 10,
                  step_size=None, gradient: str = "true", lower=None, upper=None, scale=None):
    """Adversarial versions of ``batch['image']`` in the L-inf ball of radius ``epsilon * scale``.

    * FGSM: ``x + r sign(grad_x L)``, ``r = epsilon * scale``;
    * PGD (Madry et al. 2018): random start ``x + U(-r, r)``, then ``steps`` times
      ``x <- P(x + step_size * scale * sign(grad_x L))``, ``P`` the projection onto the ball (and the
      bounds); ``step_size`` defaults to ``2.5 * epsilon / steps``.

    ``L`` is the state's loss of the eval-mode model, ``grad_x`` its true input gradient, or with
    ``gradient='rule'`` the rule's (``input_gradient``). ``scale`` (default 1) is a per-channel
    multiplier broadcast against the images, e.g. ``1 / std`` so that ``epsilon`` is in pixel units
    for standardised images. ``lower`` / ``upper``: optional bounds on the result (e.g. the
    standardised images of pixel values 0 and 1); without them nothing is clipped, since the images'
    valid range is unknown here. ``key`` (PGD's start, ``brsf``'s feedback) defaults to one derived
    from ``state.rng``.
    """
    check_attack(attack, gradient)
    x0, labels = batch["image"], batch["label"]
    state.check(x0, labels, "attack_images")
    start_key, key = jax.random.split(_default_key(state, key, 2))
    unit = 1.0 if scale is None else jnp.asarray(scale)
    radius = epsilon * unit

    def project(x):
        return _clip(jnp.clip(x, x0 - radius, x0 + radius), lower, upper)

    def step(i, x, size):
        g = input_gradient(state, x, labels, jax.random.fold_in(key, i), gradient)
        return project(x + size * jnp.sign(g))

    if attack == "fgsm":
        return step(0, x0, radius)
    size = (2.5 * epsilon / steps if step_size is None else step_size) * unit
    start = project(x0 + radius * jax.random.uniform(start_key, x0.shape, minval=-1.0, maxval=1.0))
    x = start
    for i in range(steps):  # unrolled: XLA:CPU runs convolutions in a loop body far slower
        x = step(i, x, size)
    return x


def check_attack(attack: str, gradient: str = "true", *epsilons) -> None:
    """Raises ``ValueError`` for an unknown attack or gradient or a negative epsilon."""
    if attack not in ATTACKS:
        raise ValueError(f"unknown attack {attack!r}; valid attacks: {', '.join(ATTACKS)}")
    if gradient not in GRADIENTS:
        raise ValueError(f"unknown gradient {gradient!r}; valid: {', '.join(GRADIENTS)}")
    bad = [e for e in epsilons if not e >= 0]
    if bad:
        raise ValueError(f"epsilons must be >= 0, got {bad}")


def adversarial(state, batches, epsilons: Sequence[float], attack: str = "fgsm", key=None, *,
                steps: int = 10, step_size: float | None = None, gradient: str = "true",
                lower=None, upper=None, scale=None, source=None) -> dict:
    """Clean and robust accuracy over ``batches`` under an L-inf attack for each epsilon.

    See ``attack_images`` for the attacks and options. Returns ``{'attack', 'gradient', 'diagnostic',
    'transfer', 'epsilons', 'clean_accuracy', 'robust_accuracy'}`` (``robust_accuracy[i]`` at
    ``epsilons[i]``; PGD also ``steps``). ``gradient='rule'`` attacks through the rule's own
    backward pass and is labelled ``diagnostic: True``: it measures how useful the rule's input
    error is to an attacker, not the model's robustness.

    ``source``: a transfer attack (Athalye et al. 2018's check for gradient masking): the
    perturbations are computed on ``source`` (another state or NNX model of the same input shape,
    for instance an independently trained bp model) with its true gradients, and applied to the
    model of ``state``. A rule whose own-gradient attacks are weak but whose transfer accuracy is no
    higher than bp's masks its gradients rather than being robust.
    """
    check_attack(attack, gradient, *epsilons)
    state = as_state(state)
    batches = _batch_list(state, batches, "adversarial")
    attacker = state if source is None else as_state(source)
    key = _default_key(state, key, 2)
    options = dict(attack=attack, steps=steps, step_size=step_size, gradient=gradient, lower=lower,
                   upper=upper, scale=scale)

    def robust(epsilon):
        return float(_mean_over(batches, lambda b, i: _accuracy(state, attack_images(
            attacker, b, epsilon, jax.random.fold_in(key, i), **options), b["label"])))

    result = {"attack": attack, "gradient": gradient, "diagnostic": gradient == "rule",
              "transfer": source is not None,
              "epsilons": [float(e) for e in epsilons],
              "clean_accuracy": float(_mean_over(batches, lambda b, _: _accuracy(state, b["image"],
                                                                                 b["label"]))),
              "robust_accuracy": [robust(e) for e in epsilons]}
    return {**result, "steps": steps} if attack == "pgd" else result


def attack_convergence(state, batches, epsilon: float, steps: int, key=None, *,
                       tolerance: float = 0.005, **options) -> dict:
    """Whether PGD has converged at ``steps``: its accuracy against PGD with twice the steps (the
    same start), ``converged`` when the doubled attack lowers the accuracy by at most
    ``tolerance`` (a fraction, default half a point). ``options`` as for ``adversarial`` (``source``
    included). Returns ``{'epsilon', 'steps', 'accuracy', 'accuracy_doubled', 'converged'}``."""
    accuracy, doubled = (adversarial(state, batches, [epsilon], "pgd", key, steps=n, **options)
                         ["robust_accuracy"][0] for n in (steps, 2 * steps))
    return {"epsilon": float(epsilon), "steps": steps, "accuracy": accuracy,
            "accuracy_doubled": doubled, "converged": accuracy - doubled <= tolerance}


@jax.jit
def _noisy_accuracy(state, batch, sigma, key, lower, upper, scale):
    noise = jax.random.normal(key, batch["image"].shape, batch["image"].dtype)
    return _accuracy(state, _clip(batch["image"] + sigma * scale * noise, lower, upper), batch["label"])


def corruption(state, batches, sigmas: Sequence[float], key=None, *, lower=None, upper=None,
               scale=None) -> dict:
    """Accuracy under additive Gaussian noise, ``x + sigma * scale * N(0, 1)``, for each ``sigma``.

    ``scale``, ``lower``, ``upper`` as in ``attack_images`` (default: no scaling, no clipping).
    Returns ``{'sigmas', 'accuracy'}``; ``sigma = 0`` is the clean accuracy.
    """
    if any(not s >= 0 for s in sigmas):
        raise ValueError(f"noise sigmas must be >= 0, got {list(sigmas)}")
    state = as_state(state)
    batches = _batch_list(state, batches, "corruption")
    key = _default_key(state, key, 3)
    scale = 1.0 if scale is None else scale
    accuracy = [float(_mean_over(batches, lambda b, i: _noisy_accuracy(
        state, b, sigma, jax.random.fold_in(key, i), lower, upper, scale))) for sigma in sigmas]
    return {"sigmas": [float(s) for s in sigmas], "accuracy": accuracy}
