"""One driver for a compiled body run over a sequence of steps: one ``lax.scan``, or one jitted call
per step from Python; and the count-weighted mean over batches.

    epoch = Loop(body, static_argnames=("augment",), donate_carry=True)   # once, at module level
    carry, ys = epoch(carry, xs, *consts, loop="auto" | "scan" | "steps", augment="none")

``body(carry, x, *consts, **static) -> (carry, y)`` is one step: ``x`` the step's slice of ``xs``
(leading axis: the steps), ``consts`` arrays every step shares, ``static`` hashable options. The two
loops run the same steps in the same order and return the same ``(carry, ys)`` (``ys`` stacked on a
leading step axis): ``"scan"`` compiles them all as one ``lax.scan`` (one dispatch); ``"steps"``
calls one compiled step per item, which also takes any iterable of items (``Loop.steps``, e.g.
batches streamed from disk) and reports each step to ``on_step(i, y)``. A ``Loop`` holds its two
jitted functions, so making it once means nothing compiles again from call to call.

``resolve(loop, params)``: ``"auto"`` is ``"steps"`` on CPU for a model with convolutions (a rank-4
kernel among ``params``), where XLA runs convolutions inside a loop body far slower than the same
convolutions outside one (jax-ml/jax#12868; measured in ``benchmarks/epoch_loop.py``), and
``"scan"`` otherwise.
"""
from __future__ import annotations

import functools
from collections.abc import Callable, Iterable, Sequence
from typing import Any

import jax
import jax.numpy as jnp
from jax import lax

__all__ = ["Loop", "LOOPS", "resolve", "stack", "weighted_mean"]

LOOPS = ("auto", "scan", "steps")


def resolve(loop: str, params) -> str:
    """``"scan"`` or ``"steps"`` for ``loop`` (see the module docstring)."""
    if loop not in LOOPS:
        raise ValueError(f"unknown loop {loop!r}; valid loops: {', '.join(LOOPS)}")
    if loop != "auto":
        return loop
    convolutional = any(jnp.ndim(kernel) == 4 for kernel in jax.tree.leaves(params))
    return "steps" if convolutional and jax.default_backend() == "cpu" else "scan"


def stack(per_step: Sequence) -> Any:
    """Per-step pytrees stacked into one with a leading step axis."""
    return jax.tree.map(lambda *values: jnp.stack(values), *per_step)


def _scan(body, carry, xs, *consts, **static):
    return lax.scan(lambda c, x: body(c, x, *consts, **static), carry, xs)


class Loop:
    """``body`` run over the leading axis of ``xs`` as a scan or as steps (module docstring)."""

    def __init__(self, body: Callable, static_argnames: Sequence[str] = (),
                 donate_carry: bool = False):
        donate = (0,) if donate_carry else ()
        self._step = jax.jit(body, static_argnames=static_argnames, donate_argnums=donate)
        self._scan = jax.jit(functools.partial(_scan, body), static_argnames=static_argnames,
                             donate_argnums=donate)

    def __call__(self, carry, xs, *consts, loop: str,
                 on_step: Callable[[int, Any], None] | None = None, **static):
        if loop == "scan":
            return self._scan(carry, xs, *consts, **static)
        count = jax.tree.leaves(xs)[0].shape[0]
        items = (jax.tree.map(lambda a, i=i: a[i], xs) for i in range(count))
        return self.steps(carry, items, *consts, on_step=on_step, **static)

    def steps(self, carry, items: Iterable, *consts,
              on_step: Callable[[int, Any], None] | None = None, **static):
        """One jitted step per item of ``items``; ``on_step(i, y)`` after step ``i``."""
        ys = []
        for i, x in enumerate(items):
            carry, y = self._step(carry, x, *consts, **static)
            ys.append(y)
            if on_step is not None:
                on_step(i, y)
        return carry, stack(ys)


def weighted_mean(values: Sequence, counts: Sequence) -> Any:
    """``sum_b (n_b / N) v_b``: the mean over all examples of per-batch means ``v_b`` (pytrees) of
    ``n_b`` examples each, ``N = sum_b n_b``."""
    total = sum(float(n) for n in counts)
    return jax.tree.map(lambda *vs: sum(v * (float(n) / total) for v, n in zip(vs, counts)),
                        *values)
