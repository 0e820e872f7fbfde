"""The linear maps that rules wrap, and the three products every backward pass is made of.

A layer's forward map is linear in its input and in its kernel: ``y = op(x, K)``. Dense layers use
``y = x @ K`` with ``x: (..., in)``, ``K: (in, out)``; conv layers use ``lax.conv_general_dilated`` on
channels-last inputs (``NHWC`` in 2-D) with flax-layout kernels (``HWIO``), any number of spatial
dimensions, strides, SAME / VALID / explicit padding, kernel dilation and feature groups.

For such a map the backward pass is made of two transposes:

* ``input_grad(op, x, F, g)  = (d op(x, F) / dx)^T g``: the error sent down through a kernel ``F``
  (``g F^T`` for dense). With ``F = K`` this is backprop; a rule passes its feedback ``F`` instead.
* ``kernel_grad(op, x, K, g) = (d op(x, K) / dK)^T g``: the local kernel update (``x^T g`` for dense).

Both are ``jax.linear_transpose`` of the (linear) map, so no forward product is recomputed.
"""
from __future__ import annotations

import dataclasses
from collections.abc import Sequence

import jax
import jax.numpy as jnp
from jax import lax

__all__ = ["conv_op", "ConvOp", "DenseOp", "flax_kernel", "input_grad", "kernel_grad",
           "KERNEL_LAYOUTS", "PADDING_CHOICES", "window_size"]

PADDING_CHOICES = "'SAME', 'VALID', an int, or one (low, high) pair per spatial dimension"
# name -> what the name means, for any number of spatial dims (H, W stand for all of them).
KERNEL_LAYOUTS = {"HWIO": "(*window, in, out): flax's and lax's channels-last layout",
                  "OIHW": "(out, in, *window): PyTorch's layout"}


def flax_kernel(kernel, layout: str = "HWIO"):
    """``kernel`` in the library's layout ``(*window, in, out)``, from ``layout`` (``KERNEL_LAYOUTS``).

    A layout cannot be told from shapes (a ``(3, 3, 3, 3)`` kernel fits both), so it is never
    guessed: a PyTorch kernel must be named ``'OIHW'``. The transpose is differentiable, so the
    gradient with respect to the given kernel comes back in its own layout.
    """
    if layout not in KERNEL_LAYOUTS:
        raise ValueError(f"kernel_layout={layout!r} is unknown; valid layouts: " + "; ".join(
            f"{name!r} {meaning}" for name, meaning in KERNEL_LAYOUTS.items()))
    if layout == "HWIO":
        return kernel
    return jnp.transpose(kernel, tuple(range(2, kernel.ndim)) + (1, 0))


@dataclasses.dataclass(frozen=True)
class DenseOp:
    """``y = x @ K`` over the last axis of ``x``."""

    groups: int = 1

    def __call__(self, x, kernel):
        return jnp.matmul(x, kernel)

    def check(self, x, kernel):
        if kernel.ndim != 2 or x.shape[-1] != kernel.shape[0]:
            raise ValueError(
                f"dense: input of shape {x.shape} does not match kernel of shape {kernel.shape}; "
                "expected x: (..., in) and kernel: (in, out)")


@dataclasses.dataclass(frozen=True)
class ConvOp:
    """Channels-last convolution with a flax-layout kernel ``(*window, in // groups, out)``."""

    strides: tuple[int, ...]
    padding: str | tuple[tuple[int, int], ...]
    dilation: tuple[int, ...]
    groups: int = 1

    def __call__(self, x, kernel):
        n = x.ndim
        spec = (0, n - 1) + tuple(range(1, n - 1))
        kernel_spec = (n - 1, n - 2) + tuple(range(n - 2))
        return lax.conv_general_dilated(
            x, kernel, window_strides=self.strides, padding=self.padding,
            rhs_dilation=self.dilation, feature_group_count=self.groups,
            dimension_numbers=lax.ConvDimensionNumbers(spec, kernel_spec, spec))

    def check(self, x, kernel):
        spatial = kernel.ndim - 2
        if x.ndim != kernel.ndim or x.shape[-1] != kernel.shape[-2] * self.groups:
            torch = x.ndim == kernel.ndim and x.shape[-1] == kernel.shape[1] * self.groups
            raise ValueError(
                f"conv: input of shape {x.shape} does not match kernel of shape {kernel.shape} with "
                f"feature_group_count={self.groups}; expected input (batch, *spatial, channels) with "
                f"{spatial} spatial dims, a kernel (*window, in, out) and channels == in * "
                "feature_group_count" + ("; this kernel fits PyTorch's (out, in, *window): pass "
                                         "kernel_layout='OIHW'" if torch else ""))
        if kernel.shape[-1] % self.groups:
            raise ValueError(f"conv: {kernel.shape[-1]} output features are not divisible by "
                             f"feature_group_count={self.groups}")


def _tuple(value, spatial: int, what: str) -> tuple[int, ...]:
    values = (value,) * spatial if isinstance(value, int) else tuple(value)
    if len(values) != spatial or not all(isinstance(v, int) and v >= 1 for v in values):
        raise ValueError(f"conv: {what}={value!r} is invalid; expected a positive int or "
                         f"{spatial} positive ints")
    return values


def conv_op(spatial: int, strides=1, padding="SAME", dilation=1, groups: int = 1) -> ConvOp:
    """Validates conv options and returns the hashable op (usable as a static argument)."""
    if isinstance(padding, str):
        if padding.upper() not in ("SAME", "VALID"):
            raise ValueError(f"conv: padding={padding!r} is not supported; use {PADDING_CHOICES}")
        padding = padding.upper()
    elif isinstance(padding, int):
        padding = ((padding, padding),) * spatial
    else:
        try:
            padding = tuple((int(lo), int(hi)) for lo, hi in padding)
        except (TypeError, ValueError):
            raise ValueError(f"conv: padding={padding!r} is invalid; use {PADDING_CHOICES}") from None
        if len(padding) != spatial:
            raise ValueError(f"conv: padding={padding!r} has {len(padding)} pairs for {spatial} "
                             f"spatial dims; use {PADDING_CHOICES}")
    if not isinstance(groups, int) or groups < 1:
        raise ValueError(f"conv: feature_group_count={groups!r} must be a positive int")
    return ConvOp(_tuple(strides, spatial, "strides"), padding,
                  _tuple(dilation, spatial, "kernel_dilation"), groups)


def input_grad(op, x, kernel, g):
    """``(d op(x, kernel) / dx)^T g``: the error sent down through ``kernel``."""
    return jax.linear_transpose(lambda x_: op(x_, kernel), x)(g)[0]


def kernel_grad(op, x, kernel, g):
    """``(d op(x, kernel) / dkernel)^T g``: the kernel update, local to the layer."""
    return jax.linear_transpose(lambda k: op(x, k), kernel)(g)[0]


def window_size(kernel_shape: Sequence[int]) -> int:
    """Inputs one output unit sees: ``prod(kernel_shape[:-1])`` (``in`` for dense)."""
    size = 1
    for d in kernel_shape[:-1]:
        size *= d
    return size
