"""Feedback alignment (Lillicrap et al. 2016) and Kolen-Pollack (Akrout et al. 2019).

Both send the error down through a kernel-shaped matrix ``B`` drawn from the kernel's init
distribution (optionally soft-aligned to it, option ``rho``): ``dx = g B^T``.

* ``fa``: ``B`` is fixed; it never changes. Option ``density = p`` (sparse feedback; base.py): with
  ``B0`` the dense draw and a fixed mask ``m ~ Bernoulli(p)`` drawn once at init,

      B = m * B0 / sqrt(p),      dx = g B^T

  stored as ``B`` (no mask is stored: ``B`` is fixed); ``E[B_ij^2]`` equals the dense draw's.
  ``density = 1`` (default) is the dense rule. ``rho`` and ``density < 1`` cannot be combined.
* ``kp``: ``B`` is plastic and receives the kernel's own local update, ``dB = dK = x^T g``. Stepped by
  the same optimizer with weight decay ``lam``, ``B - K`` shrinks by ``(1 - lr lam)`` every step, so
  ``B -> K``.
"""
from __future__ import annotations

import dataclasses

from jax import lax

from pfa_jax.rules.base import DrawnFeedbackRule, SparseFeedback

__all__ = ["FA", "KP"]


@dataclasses.dataclass(frozen=True)
class FA(SparseFeedback, DrawnFeedbackRule):
    name = "fa"

    def draw_feedback(self, key, kernel):
        return {"B": self.sparsify(key, super().draw_feedback(key, kernel)["B"])}

    def feedback_kernel(self, kernel, feedback, key):
        return lax.stop_gradient(feedback["B"])


@dataclasses.dataclass(frozen=True)
class KP(DrawnFeedbackRule):
    name = "kp"
    plastic = ("B",)

    def feedback_kernel(self, kernel, feedback, key):
        return feedback["B"]
