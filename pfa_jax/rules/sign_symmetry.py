"""Sign-concordant feedback (Liao, Leibo & Poggio 2016; Xiao et al. 2018): ``dx = g F^T`` with
``F = magnitude * sign(K)``, so feedback shares the kernel's signs but not its magnitudes.

* ``usf`` (uniform sign-concordant): ``F = s sign(K)``, ``s`` the standard deviation of the kernel's
  init distribution. No feedback state. Option ``density = p`` (sparse feedback; base.py): a fixed
  mask ``m ~ Bernoulli(p)`` drawn once at init and stored as feedback ``mask`` (0/1 in the kernel's
  dtype; fixed, so the optimizer never changes it),

      F = s * sign(K) * m / sqrt(p)

  so ``E[F_ij^2] = s^2`` as in the dense rule; ``effective_feedback`` includes the mask.
  ``density = 1`` (default) keeps ``usf`` without feedback state.
* ``brsf`` (batchwise random magnitude): ``F = |M| sign(K)``, ``M`` redrawn from the init distribution
  every step from the ``feedback`` RNG stream (pass ``key``). ``effective_feedback`` reports the
  expectation ``E|M| sign(K)``. Without a key the forward pass still works, but differentiating it
  raises an error instead of silently reusing one draw.
* ``frsf`` (fixed random magnitude): ``F = |M| sign(K)`` with ``M`` drawn once (feedback ``M``,
  fixed; option ``rho`` soft-aligns ``M`` to the kernel at init).

The feedback depends on ``K`` only through its signs and never carries a gradient back into ``K``.
"""
from __future__ import annotations

import dataclasses

import jax.numpy as jnp
from jax import lax

from pfa_jax.rules.base import DrawnFeedbackRule, KernelFeedbackRule, SparseFeedback, keyless

__all__ = ["BRSF", "FRSF", "USF"]


@dataclasses.dataclass(frozen=True)
class USF(SparseFeedback, KernelFeedbackRule):
    name = "usf"

    def draw_feedback(self, key, kernel):
        if self.density == 1.0:
            return {}
        return {"mask": self.feedback_mask(key, kernel.shape).astype(kernel.dtype)}

    def feedback_kernel(self, kernel, feedback, key):
        f = self.init_std(kernel.shape) * jnp.sign(kernel)
        if self.density < 1.0:
            if "mask" not in feedback:
                raise ValueError(f"usf: density={self.density!r} needs the layer's fixed feedback "
                                 f"'mask' (from init_feedback); got feedback {sorted(feedback)}")
            f = self.masked(f, feedback["mask"])
        return lax.stop_gradient(f)


@dataclasses.dataclass(frozen=True)
class BRSF(KernelFeedbackRule):
    name = "brsf"
    needs_key = True

    def apply(self, op, x, kernel, feedback, key):
        if key is None:
            return keyless(self.name, op(x, kernel))
        return super().apply(op, x, kernel, feedback, key)

    def feedback_kernel(self, kernel, feedback, key):
        if key is None:
            magnitude = self.init_mean_abs(kernel.shape)
        else:
            magnitude = jnp.abs(self.kernel_init()(key, kernel.shape, kernel.dtype))
        return lax.stop_gradient(magnitude * jnp.sign(kernel))


@dataclasses.dataclass(frozen=True)
class FRSF(DrawnFeedbackRule):
    name = "frsf"
    feedback_name = "M"

    def feedback_kernel(self, kernel, feedback, key):
        return lax.stop_gradient(jnp.abs(feedback["M"]) * jnp.sign(kernel))
