"""What every rule shares: the ``Rule`` interface, feedback initialisation, and the custom VJP for
kernel-shaped feedback.

A rule leaves the forward pass identical to backprop, ``y = op(x, K)``, and the kernel update local,
``dK = (d op / dK)^T g`` (``x^T g`` for dense layers). It changes only the error sent down, ``dx``,
and how its feedback state learns. Gradients taken with respect to the feedback arrays are the rule's
feedback-learning signals, so one ``jax.value_and_grad`` over ``(params, feedback)`` trains both.

Initialisation of feedback (as in the papers' code):

* every feedback array is drawn independently of ``K`` from ``K``'s own init distribution, named by the
  rule option ``init`` (default ``'xavier_uniform'``, as in the papers' code); the layers in
  ``pfa_jax.nn`` also draw their kernels from ``rule.kernel_init()`` unless told otherwise;
* one-time soft alignment (Cheon, Bae & Paik 2025), option ``rho`` of the rules with a fixed
  kernel-shaped draw: with ``R`` an independent draw and ``K^ = K / ||K||``,
  ``B = ||R|| (rho K^ + sqrt(1 - rho^2) Rperp / ||Rperp||)``, ``Rperp = R - <R, K^> K^``,
  so ``cos(B, K) = rho`` exactly and ``||B|| = ||R||``.

Sparse fixed feedback (option ``density = p`` of ``fa``, ``usf`` and ``dfa``, via ``SparseFeedback``;
PFA has its own, see product_feedback.py): a fixed mask ``m ~ Bernoulli(p)`` per entry, drawn once at
init from the layer's feedback key, multiplies the fixed feedback matrix ``B0``, and the kept entries
are scaled by ``1 / sqrt(p)``:

    B = m * B0 / sqrt(p),      E[B_ij^2] = p * E[B0_ij^2] / p = E[B0_ij^2]

so the feedback's variance per entry and its expected squared norm ``E||B||^2`` match the dense case
(a plain mask without the scale would shrink both by ``p``, and the error sent down by about
``sqrt(p)``; PFA's ``Bp`` is scaled the same way). ``B0`` is the dense draw from the same key (the mask
comes from ``fold_in(key, 1)``), so only the mask depends on ``p``. ``density = 1`` (the default) draws
no mask: the feedback arrays are exactly those of the dense rule.
"""
from __future__ import annotations

import dataclasses
import functools
import math
import numbers
from typing import ClassVar

import jax
import jax.numpy as jnp

from pfa_jax.rules import ops

__all__ = ["check_density", "DrawnFeedbackRule", "fans", "Feedback", "feedback_linear", "INITS",
           "KernelFeedbackRule", "keyless", "Rule", "soft_align", "SparseFeedback"]

# name -> (scale, fan mode, distribution) of jax.nn.initializers.variance_scaling; std = sqrt(scale/fan).
INITS = {
    "xavier_uniform": (1.0, "fan_avg", "uniform"),
    "xavier_normal": (1.0, "fan_avg", "truncated_normal"),
    "he_uniform": (2.0, "fan_in", "uniform"),
    "he_normal": (2.0, "fan_in", "truncated_normal"),
    "lecun_uniform": (1.0, "fan_in", "uniform"),
    "lecun_normal": (1.0, "fan_in", "truncated_normal"),
}
# E|w| / std(w) for each distribution. JAX's normal is truncated at two standard deviations before
# rescaling: with Z = P(|X| < 2) = erf(sqrt 2) and phi the normal density, E|X| = 2 (phi(0) - phi(2)) / Z
# and Var X = 1 - 4 phi(2) / Z for the standard normal truncated to [-2, 2].
_PHI0, _PHI2, _Z = 1 / math.sqrt(2 * math.pi), math.exp(-2.0) / math.sqrt(2 * math.pi), math.erf(math.sqrt(2))
_MEAN_ABS_OVER_STD = {
    "uniform": math.sqrt(3.0) / 2.0,
    "truncated_normal": 2 * (_PHI0 - _PHI2) / _Z / math.sqrt(1 - 4 * _PHI2 / _Z),
}

Feedback = dict[str, jax.Array]


def fans(shape) -> tuple[int, int]:
    """(fan_in, fan_out) of a flax-layout kernel ``(*window, in, out)``."""
    receptive = math.prod(shape[:-2])
    return shape[-2] * receptive, shape[-1] * receptive


def _unit(x):
    """``x / ||x||``, and zeros for ``x == 0``."""
    norm = jnp.linalg.norm(x)
    return jnp.where(norm > 0, x / jnp.where(norm > 0, norm, 1.0), 0.0)


def soft_align(kernel: jax.Array, draw: jax.Array, rho: float) -> jax.Array:
    """``B`` with ``cos(B, kernel) == rho`` and ``||B|| == ||draw||`` (Cheon, Bae & Paik 2025)."""
    k_hat = _unit(kernel)
    # No orthogonal direction exists for a one-entry kernel (or a draw parallel to it), and no
    # direction at all for an all-zero kernel: the unit vectors are then taken as zero, so B stays
    # finite (cos(B, K) can only be +-1 there), never NaN.
    unit_perp = _unit(draw - jnp.vdot(draw, k_hat) * k_hat)
    direction = rho * k_hat + math.sqrt(1.0 - rho * rho) * unit_perp
    return jnp.linalg.norm(draw) * direction


def check_density(rule_name: str, density) -> None:
    """Raises ``ValueError`` unless ``density`` is a real number in ``(0, 1]`` (NaN and infinities are
    not)."""
    if not isinstance(density, numbers.Real) or not 0.0 < density <= 1.0:
        raise ValueError(f"{rule_name}: density={density!r} must be a finite number in (0, 1] "
                         "(the fraction of feedback entries kept)")


@functools.partial(jax.custom_vjp, nondiff_argnums=(0,))
def feedback_linear(op, x, kernel, feedback_kernel):
    """``op(x, kernel)`` whose backward sends the error down through ``feedback_kernel``.

    Cotangents: ``dx = (d op(x, F)/dx)^T g`` (``g F^T``), ``dK = (d op(x, K)/dK)^T g`` (``x^T g``), and
    for ``F`` the same local signal ``dK`` (Kolen-Pollack's update). Rules with fixed feedback pass
    ``lax.stop_gradient(F)``, so that signal is dropped.
    """
    return op(x, kernel)


def _feedback_linear_fwd(op, x, kernel, feedback_kernel):
    return op(x, kernel), (x, kernel, feedback_kernel)


def _feedback_linear_bwd(op, residuals, g):
    x, kernel, feedback_kernel = residuals
    dkernel = ops.kernel_grad(op, x, kernel, g)
    return ops.input_grad(op, x, feedback_kernel, g), dkernel, dkernel


feedback_linear.defvjp(_feedback_linear_fwd, _feedback_linear_bwd)


@functools.partial(jax.custom_vjp, nondiff_argnums=(0,))
def keyless(rule_name: str, y):
    """``y``, for a rule that draws random numbers every step but was given no key: the forward pass
    works, differentiating it raises ``ValueError`` (instead of silently reusing one draw)."""
    return y


def _keyless_fwd(rule_name, y):
    return y, None


def _keyless_bwd(rule_name, residuals, g):
    raise ValueError(f"{rule_name} draws random numbers every step and needs a key to "
                     "differentiate: call rule.dense/conv with key=..., or "
                     "model.apply(..., rngs={'feedback': key})")


keyless.defvjp(_keyless_fwd, _keyless_bwd)


@dataclasses.dataclass(frozen=True)
class Rule:
    """A credit-assignment rule for dense and conv layers. Frozen and hashable (a static jit argument).

    Subclasses set ``name``, the feedback arrays the optimizer steps (``plastic``), whether they need
    a fresh random key every step (``needs_key``), and implement ``apply`` and
    ``effective_feedback``.
    """

    name: ClassVar[str]
    plastic: ClassVar[tuple[str, ...]] = ()   # feedback arrays the optimizer steps
    mirrored: ClassVar[tuple[str, ...]] = ()  # feedback arrays stepped by ``mirror`` instead
    needs_key: ClassVar[bool] = False
    init_only: ClassVar[tuple[str, ...]] = ()  # options that shape only the feedback drawn at init
    output_error: ClassVar[bool] = False      # ops return ``(y, tap)``; see direct_feedback.py

    init: str = "xavier_uniform"

    def __post_init__(self):
        if self.init not in INITS:
            raise ValueError(f"{self.name}: init={self.init!r} is unknown; valid: {sorted(INITS)}")

    # -- initialisation -------------------------------------------------------------------------
    def kernel_init(self):
        """The init distribution of forward kernels, which feedback draws share."""
        return jax.nn.initializers.variance_scaling(*INITS[self.init])

    def init_std(self, shape) -> float:
        """Standard deviation of ``kernel_init`` for a kernel of this shape."""
        scale, mode, _ = INITS[self.init]
        fan_in, fan_out = fans(shape)
        fan = {"fan_in": fan_in, "fan_out": fan_out, "fan_avg": (fan_in + fan_out) / 2}[mode]
        return math.sqrt(scale / fan)

    def init_mean_abs(self, shape) -> float:
        """``E|w|`` of ``kernel_init`` for a kernel of this shape."""
        return self.init_std(shape) * _MEAN_ABS_OVER_STD[INITS[self.init][2]]

    def stepping(self) -> Rule:
        """This rule with its ``init_only`` options at their defaults: what a training step runs,
        the same for rules that differ only in how their feedback was drawn (``rho``)."""
        return dataclasses.replace(self, **{f.name: f.default for f in dataclasses.fields(self)
                                            if f.name in self.init_only})

    def for_classes(self, num_classes: int) -> Rule:
        """This rule for a network with ``num_classes`` outputs (only DFA needs to know)."""
        del num_classes
        return self

    def mirror(self, key: jax.Array, kernel, feedback: Feedback, warmup: bool) -> Feedback:
        """Feedback after the rule's mirror steps (only weight mirrors have any)."""
        del key, kernel, warmup
        return feedback

    def init_feedback(self, key: jax.Array, kernel: jax.Array, *,
                      kernel_layout: str = "HWIO") -> Feedback:
        """The layer's feedback arrays (a dict, possibly empty) for ``kernel``.

        ``kernel_layout`` (``ops.KERNEL_LAYOUTS``): ``'HWIO'``, flax's ``(*window, in, out)`` (and a
        dense ``(in, out)``), or ``'OIHW'``, PyTorch's ``(out, in, *window)``. The feedback arrays are
        always in the library's layout, whatever the kernel's; pass the same ``kernel_layout`` to
        ``conv``.
        """
        return self.draw_feedback(key, ops.flax_kernel(kernel, kernel_layout))

    def draw_feedback(self, key: jax.Array, kernel: jax.Array) -> Feedback:
        """The rule's feedback arrays for a kernel in the library's layout (what subclasses
        implement; users call ``init_feedback``)."""
        del key, kernel
        return {}

    # -- the ops ------------------------------------------------------------------------------
    def dense(self, x, kernel, feedback: Feedback, key: jax.Array | None = None):
        """``y = x @ kernel``; differentiable w.r.t. ``(x, kernel, feedback)`` with the rule's backward."""
        op = ops.DenseOp()
        op.check(x, kernel)
        return self.apply(op, x, kernel, feedback, key)

    def conv(self, x, kernel, feedback: Feedback, key: jax.Array | None = None, *, strides=1,
             padding="SAME", kernel_dilation=1, feature_group_count: int = 1,
             kernel_layout: str = "HWIO"):
        """Channels-last convolution ``x: (batch, *spatial, channels)`` with the rule's backward.

        The kernel is flax's ``(*window, in, out)`` unless ``kernel_layout='OIHW'`` says it is
        PyTorch's ``(out, in, *window)``: shapes cannot tell the two apart, so nothing is guessed.
        ``feedback`` comes from ``init_feedback`` given the same ``kernel_layout``.
        """
        kernel = ops.flax_kernel(kernel, kernel_layout)
        op = ops.conv_op(kernel.ndim - 2, strides, padding, kernel_dilation, feature_group_count)
        op.check(x, kernel)
        return self.apply(op, x, kernel, feedback, key)

    def apply(self, op, x, kernel, feedback: Feedback, key: jax.Array | None):
        raise NotImplementedError

    def effective_feedback(self, kernel, feedback: Feedback) -> jax.Array | None:
        """The kernel-layout ``F`` through which errors travel down (``F == K`` is backprop);
        ``None`` where no such matrix exists (DFA)."""
        raise NotImplementedError


@dataclasses.dataclass(frozen=True)
class KernelFeedbackRule(Rule):
    """A rule whose error travels down through one kernel-shaped matrix ``F``: ``dx = g F^T``."""

    def feedback_kernel(self, kernel, feedback: Feedback, key: jax.Array | None) -> jax.Array:
        """``F`` for this step; wrap it in ``lax.stop_gradient`` where the feedback is fixed."""
        raise NotImplementedError

    def apply(self, op, x, kernel, feedback, key):
        return feedback_linear(op, x, kernel, self.feedback_kernel(kernel, feedback, key))

    def effective_feedback(self, kernel, feedback):
        return self.feedback_kernel(kernel, feedback, None)


@dataclasses.dataclass(frozen=True)
class DrawnFeedbackRule(KernelFeedbackRule):
    """Kernel-shaped feedback drawn once at init, optionally soft-aligned to the kernel (``rho``)."""

    feedback_name: ClassVar[str] = "B"
    init_only: ClassVar[tuple[str, ...]] = ("rho",)
    rho: float | None = None

    def __post_init__(self):
        super().__post_init__()
        if self.rho is not None and not -1.0 <= self.rho <= 1.0:
            raise ValueError(f"{self.name}: rho={self.rho!r} must lie in [-1, 1] (or be None for an "
                             "independent draw)")

    def draw_feedback(self, key, kernel):
        draw = self.kernel_init()(key, kernel.shape, kernel.dtype)
        if self.rho is not None:
            draw = soft_align(kernel, draw, self.rho)
        return {self.feedback_name: draw}


_MASK_STREAM = 1  # the mask is drawn from fold_in(feedback key, _MASK_STREAM)


@dataclasses.dataclass(frozen=True)
class SparseFeedback:
    """Option ``density = p`` for a rule with fixed random feedback (a mixin listed before the rule's
    ``Rule`` base): ``B = m * B0 / sqrt(p)``, ``m ~ Bernoulli(p)`` fixed (module docstring).

    Not combined with one-time soft alignment: ``rho`` sets ``cos(B0, K)``, which a mask would then
    change, so a rule given both ``rho`` and ``density < 1`` raises ``ValueError``.
    """

    density: float = 1.0

    def __post_init__(self):
        super().__post_init__()
        check_density(self.name, self.density)
        if getattr(self, "rho", None) is not None and self.density < 1.0:
            raise ValueError(f"{self.name}: rho={self.rho!r} and density={self.density!r} cannot be "
                             "combined (soft alignment sets the cosine of the dense feedback, which a "
                             "sparse mask would change); use density=1 or rho=None")

    def feedback_mask(self, key: jax.Array, shape) -> jax.Array:
        """The fixed boolean mask ``m ~ Bernoulli(density)`` of a layer whose feedback draws use
        ``key`` (it is drawn from ``fold_in(key, 1)``, so it is independent of those draws)."""
        return jax.random.bernoulli(jax.random.fold_in(key, _MASK_STREAM), self.density, shape)

    def masked(self, array: jax.Array, mask: jax.Array) -> jax.Array:
        """``m * array / sqrt(density)`` for a 0/1 (or boolean) ``mask``; exactly ``+0.0`` off it."""
        return jnp.where(mask.astype(bool), array / math.sqrt(self.density), jnp.zeros((), array.dtype))

    def sparsify(self, key: jax.Array, array: jax.Array) -> jax.Array:
        """``array`` masked and scaled with the layer's mask (``key``: the layer's feedback key);
        ``array`` itself when ``density == 1``."""
        if self.density == 1.0:
            return array
        return self.masked(array, self.feedback_mask(key, array.shape))
