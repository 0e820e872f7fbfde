"""Two Routes' alignment family (Kunin, Nayebi, Sagastuy-Brena et al., ICML 2020, "Two Routes to
Scalable Credit Assignment without Weight Symmetry"): feedback learned by local alignment losses.

Errors go down through a plastic kernel-shaped ``F`` (feedback ``B``), ``dx = g F^T`` as in FA.
``F`` learns by the gradient of a scalar alignment loss of the layer alone, stepped by the same
optimizer as everything else. With ``u`` the probe batch (the layer's own input ``x``, or noise:
option ``inputs``), ``n`` its batch rows, the forward projection ``y = op(u, K)`` (dense ``u K``)
and the backward projection ``z = op(u, F)``, the primitives and their gradients with respect to
``F`` (``K`` and ``u`` held constant; ``A_u^T v = kernel_grad(op, u, ., v)``, ``u^T v`` for dense;
the reconstruction ``y F^T`` is ``input_grad(op, u, F, y)``, the transposed conv for convs):

    decay  = ||K||^2 + ||F||^2                   dF = 2 F
    self   = -<K, F>                              dF = -K
    amp    = -(1/n) <y, z>                        dF = -(1/n) A_u^T y
    sparse = (1/n) (||y||^2 + ||z||^2)            dF = (2/n) A_u^T z
    null   = (1/n) ||y F^T||^2,  r = y F^T        dF = (2/n) A_r^T y
    null_reversed = (1/n) ||z K^T||^2,  s = z K^T dF = (2/n) A_u^T op(s, K)

(the sums run over every non-batch axis, the means over the batch rows, as in the authors' code).
The rules are weighted sums of them; ``F``'s signal is the weighted sum of the gradients:

* ``sa`` (Symmetric Alignment) = alpha decay + beta self:  dF = 2 alpha F - beta K. Defaults
  alpha = 1/2, beta = 1: ``dF = F - K``, so ``F`` relaxes to ``K`` at the learning rate. Uses
  ``K`` itself ("weight estimation"), not local.
* ``aa`` (Activation Alignment) = alpha sparse + beta amp:  dF = (1/n) A_u^T A_u (2 alpha F - beta K),
  whose fixed point is ``F = (beta / 2 alpha) K`` where the inputs span the layer's input space.
  Defaults alpha = 1/2, beta = 1 (fixed point ``F = K``), scaled by ``scale``.
* ``ia`` (Information Alignment) = alpha amp + beta null + gamma decay (``null_reversed`` in place
  of ``null`` with ``reversed=True``). Dense, inputs with covariance ``S = u^T u / n``:
  ``dF = -alpha S K + 2 beta F K^T S K + 2 gamma F``. Defaults alpha = 1, beta = 1/2, gamma = 0:
  for white inputs (``S = I``) and an orthogonal ``K`` the fixed point is ``F = K``.
* ``alignment``: every primitive's coefficient an option (``decay``, ``self``, ``amp``,
  ``sparse``, ``null``, ``null_reversed``, default 0) and ``tie``: ``F``'s signal also receives
  ``dK`` (Kolen-Pollack's tied gradient); with every coefficient 0 and no tie, ``B`` feels only
  the optimizer's weight decay (which every rule's plastic feedback shares). So ``kp`` is
  ``alignment(tie=True)``, its feedback weight decay ``wd`` being ``decay = wd / 2``; weight mirrors
  are ``alignment(decay=a, amp=b, inputs='noise')``: one plain SGD step at learning rate ``lr`` gives
  ``F <- (1 - 2 lr a) F + lr b xi^T (xi K) / n``, the mirror step with ``decay = 2 lr a``,
  ``rate = lr b`` (for dense layers; ``wm``'s conv noise is one patch per sample instead of a noise
  image).

The gradients of ``amp``, ``sparse`` and ``null`` carry the probe's covariance
``S = A_u^T A_u / n``, so the step that keeps ``aa`` and ``ia`` stable depends on the inputs' scale
(``aa`` under momentum ``mu``: ``lr 2 alpha lambda_max(S) < 2 (1 + mu)``); ``aa`` and ``ia``
therefore default to ``normalize=True`` (unit-norm probe samples: ``trace(S) = 1`` for dense
layers, ``lambda_max(S) <= kh kw`` for convs). Their coefficients are placed by the fixed points,
not tuned; ``scale`` (default 1) multiplies every coefficient of ``sa``, ``aa`` and ``ia``. The
bounds on ``lr * scale``, and how the family trains under momentum, are in the repository's
docs/rules.md (Two Routes' alignment family).

Options shared by the family: ``inputs`` (``'data'``: the layer's own input batch, no second pass
through the network; ``'noise'``: ``u = sigma N(0, 1)`` of ``x``'s shape, drawn each step from the
``feedback`` RNG stream, from ``fold_in(key, 0)`` as a weight mirror's first step draws), ``sigma``,
``normalize`` (each probe sample centred and scaled to unit norm over its non-batch axes, the
authors' ``normalize_input``) and ``probe_batch`` (default 0: the whole batch; ``m > 0``: the first
``m`` rows of the layer's input, or ``m`` noise samples, so ``n = m``; more rows than the batch
holds is an error): the batch-mean losses estimated on a subsample, and the probe's products cost
``m / N`` of the full batch's, plus a
forward product for ``y`` on the ``m`` rows; under a sharded batch the first rows sit on the first
devices). Not provided: the authors' options of activations on the
projections, biases in the projections, and centring or normalising the projections.

One backward pass: the probe quantities are computed in the layer's custom VJP from what the forward
pass kept (``x``, and ``y`` itself with ``inputs='data'`` and ``normalize=False``). Extra cost per
layer, in products of the layer's size: ``amp`` one kernel gradient; ``sparse`` a forward product
and a kernel gradient; ``null`` a transposed product and a kernel gradient; ``null_reversed`` a
forward product, a transposed product, another forward product and a kernel gradient; ``decay``
and ``self`` none; ``sparse`` with ``amp`` (``aa``) a forward product and a kernel gradient in all.
Noise inputs add a forward product for ``y``.
"""
from __future__ import annotations

import dataclasses
import functools
import math
import numbers

import jax
import jax.numpy as jnp
from jax import lax

from pfa_jax.rules import ops
from pfa_jax.rules.base import DrawnFeedbackRule, keyless

__all__ = ["AA", "Alignment", "alignment_signal", "aligned_linear", "GRADIENTS", "IA", "INPUTS",
           "Probe", "SA"]

INPUTS = ("data", "noise")


@dataclasses.dataclass
class Probe:
    """A layer's alignment quantities on the probe batch ``u``: ``y = op(u, K)`` (given, or computed
    once when first needed) and ``z = op(u, F)``."""

    op: object
    u: jax.Array
    kernel: jax.Array
    feedback: jax.Array
    forward: jax.Array | None = None

    @functools.cached_property
    def y(self):
        return self.op(self.u, self.kernel) if self.forward is None else self.forward

    @functools.cached_property
    def z(self):
        return self.op(self.u, self.feedback)

    @property
    def n(self) -> int:
        return self.u.shape[0]

    def kernel_grad(self, inputs, g):
        """``A_inputs^T g``, shaped like ``F``."""
        return ops.kernel_grad(self.op, inputs, self.feedback, g)


def decay(p: Probe):
    """``d/dF (||K||^2 + ||F||^2) = 2 F``."""
    return 2 * p.feedback


def self_(p: Probe):
    """``d/dF (-<K, F>) = -K``."""
    return -p.kernel


def amp(p: Probe):
    """``d/dF (-(1/n) <y, z>) = -(1/n) A_u^T y``."""
    return -p.kernel_grad(p.u, p.y) / p.n


def sparse(p: Probe):
    """``d/dF ((1/n) (||y||^2 + ||z||^2)) = (2/n) A_u^T z``."""
    return 2 * p.kernel_grad(p.u, p.z) / p.n


def null(p: Probe):
    """``d/dF ((1/n) ||y F^T||^2) = (2/n) A_r^T y`` with ``r = y F^T``."""
    r = ops.input_grad(p.op, p.u, p.feedback, p.y)
    return 2 * p.kernel_grad(r, p.y) / p.n


def null_reversed(p: Probe):
    """``d/dF ((1/n) ||z K^T||^2) = (2/n) A_u^T op(s, K)`` with ``s = z K^T``."""
    s = ops.input_grad(p.op, p.u, p.kernel, p.z)
    return 2 * p.kernel_grad(p.u, p.op(s, p.kernel)) / p.n


GRADIENTS = {"decay": decay, "self": self_, "amp": amp, "sparse": sparse, "null": null,
             "null_reversed": null_reversed}


def alignment_signal(probe: Probe, terms) -> jax.Array:
    """``sum_p c_p dF_p`` over ``terms = ((primitive, c_p), ...)`` (zero coefficients skipped).

    ``sparse`` and ``amp`` together take one product of each kind instead of two kernel gradients:
    ``c_s (2/n) A_u^T z - c_a (1/n) A_u^T y = (1/n) A_u^T op(u, 2 c_s F - c_a K)``."""
    weights = {name: c for name, c in terms if c}
    signal = jnp.zeros_like(probe.feedback)
    if "sparse" in weights and "amp" in weights:
        mixed = 2 * weights.pop("sparse") * probe.feedback - weights.pop("amp") * probe.kernel
        signal = probe.kernel_grad(probe.u, probe.op(probe.u, mixed)) / probe.n
    for name, coefficient in weights.items():
        signal = signal + coefficient * GRADIENTS[name](probe)
    return signal


@functools.partial(jax.custom_vjp, nondiff_argnums=(0, 1, 2))
def aligned_linear(op, terms, tie, x, kernel, feedback, probe_input):
    """``op(x, kernel)`` whose backward sends ``g F^T`` down and gives ``F`` the alignment signal
    of ``terms`` on ``probe_input`` (``None``: on ``x``, with ``y`` the forward output), plus
    ``dK`` if ``tie``."""
    return op(x, kernel)


def _aligned_fwd(op, terms, tie, x, kernel, feedback, probe_input):
    y = op(x, kernel)
    return y, (x, kernel, feedback, probe_input, y)


def _aligned_bwd(op, terms, tie, residuals, g):
    x, kernel, feedback, probe_input, y = residuals
    dkernel = ops.kernel_grad(op, x, kernel, g)
    probe = (Probe(op, x, kernel, feedback, forward=y) if probe_input is None
             else Probe(op, probe_input, kernel, feedback))
    dfeedback = alignment_signal(probe, terms)
    if tie:
        dfeedback = dfeedback + dkernel
    return (ops.input_grad(op, x, feedback, g), dkernel, dfeedback,
            None if probe_input is None else jnp.zeros_like(probe_input))


aligned_linear.defvjp(_aligned_fwd, _aligned_bwd)


def _normalized(u):
    """Each sample centred and scaled to unit norm over its non-batch axes."""
    axes = tuple(range(1, u.ndim))
    centred = u - jnp.mean(u, axis=axes, keepdims=True)
    norm = jnp.sqrt(jnp.sum(centred * centred, axis=axes, keepdims=True))
    return centred / jnp.where(norm > 0, norm, 1)


@dataclasses.dataclass(frozen=True)
class _AlignmentRule(DrawnFeedbackRule):
    """A rule of the family: plastic ``B``, ``dx = g B^T``, ``B`` learning by ``terms()``."""

    plastic = ("B",)

    inputs: str = "data"
    sigma: float = 1.0
    normalize: bool = False
    probe_batch: int = 0

    def __post_init__(self):
        super().__post_init__()
        if self.inputs not in INPUTS:
            raise ValueError(f"{self.name}: inputs={self.inputs!r} is unknown; valid: {INPUTS}")
        if not self.sigma > 0 or not math.isfinite(self.sigma):
            raise ValueError(f"{self.name}: sigma={self.sigma!r} must be a positive number")
        if self.probe_batch < 0:
            raise ValueError(f"{self.name}: probe_batch={self.probe_batch!r} must be >= 0 (0: the "
                             "whole batch)")
        for name, value in self.coefficients():
            if not isinstance(value, numbers.Real) or not 0 <= value < math.inf:
                raise ValueError(f"{self.name}: {name}={value!r} must be a finite number >= 0")

    @property
    def needs_key(self) -> bool:
        return self.inputs == "noise"

    @property
    def tie(self) -> bool:
        return False

    def coefficients(self) -> tuple[tuple[str, float], ...]:
        """``(option, value)`` of each coefficient."""
        raise NotImplementedError

    def terms(self) -> tuple[tuple[str, float], ...]:
        """``(primitive, coefficient)`` of the rule's alignment loss."""
        raise NotImplementedError

    def feedback_kernel(self, kernel, feedback, key):
        return feedback["B"]

    def apply(self, op, x, kernel, feedback, key):
        if self.probe_batch > x.shape[0]:
            raise ValueError(f"{self.name}: probe_batch={self.probe_batch} exceeds the {x.shape[0]} "
                             f"rows of the batch at this layer: use probe_batch <= {x.shape[0]} "
                             "(0: the whole batch)")
        rows = self.probe_batch or x.shape[0]
        if self.inputs == "noise":
            if key is None:
                return keyless(self.name, op(x, kernel))
            probe = self.sigma * jax.random.normal(jax.random.fold_in(key, 0),
                                                   (rows, *x.shape[1:]), x.dtype)
        else:
            probe = x if rows == x.shape[0] else x[:rows]
        if self.normalize:
            probe = _normalized(probe)
        probe = None if probe is x else lax.stop_gradient(probe)
        return aligned_linear(op, self.terms(), self.tie, x, kernel, feedback["B"], probe)


@dataclasses.dataclass(frozen=True)
class _Scaled(_AlignmentRule):
    scale: float = 1.0

    def coefficients(self):
        return tuple((f.name, getattr(self, f.name)) for f in dataclasses.fields(self)
                     if f.name in ("alpha", "beta", "gamma", "scale"))

    def terms(self):
        return tuple((name, self.scale * c) for name, c in self.weighted())

    def weighted(self) -> tuple[tuple[str, float], ...]:
        raise NotImplementedError


@dataclasses.dataclass(frozen=True)
class SA(_Scaled):
    name = "sa"
    alpha: float = 0.5
    beta: float = 1.0

    def weighted(self):
        return (("decay", self.alpha), ("self", self.beta))


@dataclasses.dataclass(frozen=True)
class AA(_Scaled):
    name = "aa"
    normalize: bool = True
    alpha: float = 0.5
    beta: float = 1.0

    def weighted(self):
        return (("sparse", self.alpha), ("amp", self.beta))


@dataclasses.dataclass(frozen=True)
class IA(_Scaled):
    name = "ia"
    normalize: bool = True
    alpha: float = 1.0
    beta: float = 0.5
    gamma: float = 0.0
    reversed: bool = False

    def weighted(self):
        return (("amp", self.alpha), ("null_reversed" if self.reversed else "null", self.beta),
                ("decay", self.gamma))


@dataclasses.dataclass(frozen=True)
class Alignment(_AlignmentRule):
    name = "alignment"
    decay: float = 0.0
    self: float = 0.0
    amp: float = 0.0
    sparse: float = 0.0
    null: float = 0.0
    null_reversed: float = 0.0
    tie: bool = False

    def coefficients(self):
        return tuple((name, getattr(self, name)) for name in GRADIENTS)

    def terms(self):
        return self.coefficients()
