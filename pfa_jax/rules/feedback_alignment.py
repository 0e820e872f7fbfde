"""Feedback alignment (Lillicrap et al. 2016) and Kolen-Pollack (Akrout et al. 2019).

Both send the error down through a kernel-shaped matrix ``B`` drawn from the kernel's init
distribution (optionally soft-aligned to it, option ``rho``): ``dx = g B^T``.

* ``fa``: ``B`` is fixed; it never changes.
* ``kp``: ``B`` is plastic and receives the kernel's own local update, ``dB = dK = x^T g``. Stepped by
  the same optimizer with weight decay ``lam``, ``B - K`` shrinks by ``(1 - lr lam)`` every step, so
  ``B -> K``.
"""
from __future__ import annotations

import dataclasses

from jax import lax

from pfa_jax.rules.base import DrawnFeedbackRule


@dataclasses.dataclass(frozen=True)
class FA(DrawnFeedbackRule):
    name = "fa"

    def feedback_kernel(self, kernel, feedback, key):
        return lax.stop_gradient(feedback["B"])


@dataclasses.dataclass(frozen=True)
class KP(DrawnFeedbackRule):
    name = "kp"
    plastic = ("B",)

    def feedback_kernel(self, kernel, feedback, key):
        return feedback["B"]
