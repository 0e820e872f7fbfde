"""Robustness: accuracy under L-inf attacks (FGSM, PGD, transfer) and under Gaussian noise."""
from __future__ import annotations

import functools
from collections.abc import Sequence

import jax
import jax.numpy as jnp

from pfa_jax import losses
from pfa_jax import nn as pnn
from pfa_jax.metrics._inputs import accuracy_of, as_state, batch_list, default_key, mean_over
from pfa_jax.train import apply_with_rule

ATTACKS = ("fgsm", "pgd")
GRADIENTS = ("true", "rule")


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
    start_key, key = jax.random.split(default_key(state, key, 2))
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

    Args:
      state: a ``TrainState`` or an NNX model (``as_state``).
      batches: a batch ``{'image', 'label'}`` or a sequence of them.
      epsilons: the L-inf radii (times ``scale``).
      attack: ``'fgsm'`` or ``'pgd'`` (``ATTACKS``).
      key: PGD's random start (default: one derived from ``state.rng``).
      steps, step_size, gradient, lower, upper, scale: as for ``attack_images``.
      source: the model the perturbations are computed on (above; default: ``state``).

    Returns:
      ``{'attack', 'gradient', 'diagnostic', 'transfer', 'epsilons', 'clean_accuracy',
      'robust_accuracy'}`` (``robust_accuracy[i]`` at ``epsilons[i]``; PGD also ``steps``).

    Example:
      >>> import jax, jax.numpy as jnp, pfa_jax as pj
      >>> images = jax.random.uniform(jax.random.key(1), (8, 8, 8, 1))
      >>> state = pj.train.create_train_state(
      ...     jax.random.key(0), pj.models.get("ffn2", rule="usf", widths=(16,)), images[:1])
      >>> result = pj.metrics.adversarial(state, {"image": images, "label": jnp.arange(8)},
      ...                                 [0.0, 0.1], "pgd", steps=3, lower=0, upper=1)
      >>> result["robust_accuracy"][0] == result["clean_accuracy"], result["steps"]
      (True, 3)
    """
    check_attack(attack, gradient, *epsilons)
    state = as_state(state)
    batches = batch_list(state, batches, "adversarial")
    attacker = state if source is None else as_state(source)
    key = default_key(state, key, 2)
    options = dict(attack=attack, steps=steps, step_size=step_size, gradient=gradient, lower=lower,
                   upper=upper, scale=scale)

    def robust(epsilon):
        return float(mean_over(batches, lambda b, i: accuracy_of(state, attack_images(
            attacker, b, epsilon, jax.random.fold_in(key, i), **options), b["label"])))

    result = {"attack": attack, "gradient": gradient, "diagnostic": gradient == "rule",
              "transfer": source is not None,
              "epsilons": [float(e) for e in epsilons],
              "clean_accuracy": float(mean_over(batches, lambda b, _: accuracy_of(state, b["image"],
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
    return accuracy_of(state, _clip(batch["image"] + sigma * scale * noise, lower, upper), batch["label"])


def corruption(state, batches, sigmas: Sequence[float], key=None, *, lower=None, upper=None,
               scale=None) -> dict:
    """Accuracy under additive Gaussian noise, ``x + sigma * scale * N(0, 1)``, for each ``sigma``.

    Args:
      state: a ``TrainState`` or an NNX model (``as_state``).
      batches: a batch ``{'image', 'label'}`` or a sequence of them.
      sigmas: the noise's standard deviations (times ``scale``), each ``>= 0``.
      key: the noise's key (default: one derived from ``state.rng``).
      lower, upper, scale: as in ``attack_images`` (default: no scaling, no clipping).

    Returns:
      ``{'sigmas', 'accuracy'}``, ``accuracy[i]`` at ``sigmas[i]``; ``sigma = 0`` is the clean
      accuracy.

    Example:
      >>> import jax, jax.numpy as jnp, pfa_jax as pj
      >>> model = pj.models.get("ffn2", rule="kp", widths=(16,))
      >>> batch = {"image": jax.random.uniform(jax.random.key(1), (8, 8, 8, 1)),
      ...          "label": jnp.arange(8)}
      >>> state = pj.train.create_train_state(jax.random.key(0), model, batch)
      >>> result = pj.metrics.corruption(state, batch, [0.0, 0.5])
      >>> result["sigmas"], len(result["accuracy"])
      ([0.0, 0.5], 2)
    """
    if any(not s >= 0 for s in sigmas):
        raise ValueError(f"noise sigmas must be >= 0, got {list(sigmas)}")
    state = as_state(state)
    batches = batch_list(state, batches, "corruption")
    key = default_key(state, key, 3)
    scale = 1.0 if scale is None else scale
    accuracy = [float(mean_over(batches, lambda b, i: _noisy_accuracy(
        state, b, sigma, jax.random.fold_in(key, i), lower, upper, scale))) for sigma in sigmas]
    return {"sigmas": [float(s) for s in sigmas], "accuracy": accuracy}
