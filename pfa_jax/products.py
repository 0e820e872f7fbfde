"""The linear maps of Flax's own layers as one kernel matrix, shared by ``pfa_jax.nn.with_rule``
(linen) and ``pfa_jax.nnx.with_rule``.

A ``lax.dot_general`` of an input ``x`` with a kernel ``K`` of any rank, contracting ``x_axes`` of
``x`` with ``kernel_axes`` of ``K`` (no batch axes), is the matrix product ``y = X M`` with

* ``M = MatrixView(K)``: ``K``'s contracted axes first, flattened into rows, its free axes into
  columns: ``(prod in, prod out)``;
* ``X``: ``x``'s free axes first, flattened into rows, its contracted axes into columns;

and ``y`` reshaped to ``x``'s free axes followed by ``K``'s free axes, as ``lax.dot_general``
returns it. Every layer-wise rule sees ``y = X M``; its feedback has ``M``'s shape. An
``einsum`` ``'x,k->out'`` is the same product (``einsum_axes``) followed by the output's label
order.
"""
from __future__ import annotations

import dataclasses
import math

import jax.numpy as jnp
from jax import lax

__all__ = ["einsum_axes", "matrix_product", "MatrixView", "check_conv", "view_of"]


@dataclasses.dataclass(frozen=True)
class MatrixView:
    """A kernel of any rank as the matrix ``(prod in, prod out)``: its axes in ``order`` (the
    ``inputs`` contracted ones first), the first ``inputs`` of them flattened into rows."""

    order: tuple[int, ...]
    inputs: int

    def __call__(self, kernel):
        kernel = jnp.transpose(kernel, self.order)
        return kernel.reshape(math.prod(kernel.shape[:self.inputs]), -1)


def view_of(kernel_ndim: int, contracted) -> MatrixView | None:
    """The view of a kernel contracted over the axes ``contracted`` (None: already ``(in, out)``)."""
    order = tuple(contracted) + tuple(a for a in range(kernel_ndim) if a not in contracted)
    return None if order == (0, 1) else MatrixView(order, len(contracted))


def matrix_product(x, kernel, x_axes, kernel_axes, run):
    """``x`` contracted with ``kernel`` (module docstring) through ``run(product, view)``, which
    calls ``product(rule, feedback, key)`` (the rule's ``dense`` on ``X`` and ``M``) with the layer's
    rule and feedback and returns its result. DFA keeps ``x``'s positions in ``X`` (its tap has
    them, ``pfa_jax.taps``); its ``(y, tap)`` is returned as such."""
    x_axes, kernel_axes = list(x_axes), list(kernel_axes)
    free = [a for a in range(x.ndim) if a not in x_axes]
    view = view_of(kernel.ndim, kernel_axes)
    matrix = kernel if view is None else view(kernel)
    lead = [x.shape[a] for a in free]
    rows = jnp.transpose(x, free + x_axes).reshape(-1, matrix.shape[0])

    def product(rule, feedback, key):
        return rule.dense(rows.reshape(lead + [-1]) if rule.output_error else rows, matrix,
                          feedback, key)

    y = run(product, view)
    out = [kernel.shape[a] for a in range(kernel.ndim) if a not in kernel_axes]
    if isinstance(y, tuple):  # (y, tap) of DFA
        return y[0].reshape(lead + out), y[1]
    return y.reshape(lead + out)


def einsum_axes(where: str, equation: str, x_ndim: int):
    """``(x_axes, kernel_axes, output order)`` of an einsum ``'x,k->out'`` of an input with a
    kernel, or an error naming the layer ``where`` and the equation where it is not one kernel
    matrix (a label in both operands and the output, a batch of matrices; a label summed in one
    operand alone)."""
    inputs, out = equation.replace(" ", "").split("->")
    x_labels, k_labels = inputs.split(",")
    if "." in equation or len(x_labels) != x_ndim:
        raise ValueError(f"with_rule: layer {where!r}: einsum {equation!r} must name every "
                         f"axis of the {x_ndim}-d input with a letter")
    shared = [c for c in k_labels if c in x_labels]
    batch = [c for c in shared if c in out]
    summed = [c for c in x_labels + k_labels if c not in out and c not in shared]
    if batch or summed:
        raise ValueError(f"with_rule: layer {where!r}: einsum {equation!r} "
                         + (f"has labels {batch} in both operands and the output (a batch of "
                            "matrices)" if batch else f"sums label(s) {summed} of one operand")
                         + "; a rule needs one kernel matrix: give it 'bp' in the rule map")
    free = [c for c in x_labels if c not in shared] + [c for c in k_labels if c not in shared]
    return ([x_labels.index(c) for c in shared], [k_labels.index(c) for c in shared],
            [free.index(c) for c in out])


def check_conv(where: str, x, kernel, lhs_dilation, dimension_numbers) -> None:
    """Refuses a Flax conv call the rules' conv would read differently: input dilation (the rules'
    conv takes strides, padding, kernel dilation and groups), or a layout other than channels-last
    inputs and outputs with a ``(*window, in, out)`` kernel (Flax's layers always pass that one;
    ``None`` means lax's ``NCHW`` / ``OIHW``)."""
    if lhs_dilation is not None and any(d != 1 for d in lhs_dilation):
        raise ValueError(f"with_rule: layer {where!r} has input_dilation={tuple(lhs_dilation)}, "
                         "which the rules' conv does not take; give it 'bp' in the rule map")
    n = x.ndim
    channels_last = lax.ConvDimensionNumbers((0, n - 1, *range(1, n - 1)),
                                             (n - 1, n - 2, *range(n - 2)),
                                             (0, n - 1, *range(1, n - 1)))
    given = lax.conv_dimension_numbers(x.shape, kernel.shape, dimension_numbers)
    if given != channels_last:
        raise ValueError(f"with_rule: layer {where!r} calls its conv with dimension_numbers="
                         f"{dimension_numbers!r}; the rules' conv takes channels-last inputs and "
                         "outputs with a (*window, in, out) kernel (flax's own layout); give the "
                         "layer that layout, or 'bp' in the rule map")
