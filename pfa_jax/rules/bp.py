"""Backpropagation (BP): the error goes down through the forward kernel itself, ``dx = g K^T``.

Plain autodiff of the forward map; no feedback state. ``effective_feedback`` is ``K``.
"""
from __future__ import annotations

import dataclasses

from pfa_jax.rules.base import Rule

__all__ = ["BP"]


@dataclasses.dataclass(frozen=True)
class BP(Rule):
    name = "bp"

    def apply(self, op, x, kernel, feedback, key):
        return op(x, kernel)

    def effective_feedback(self, kernel, feedback):
        return kernel
