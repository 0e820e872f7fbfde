"""Direct feedback alignment (Nøkland 2016): every layer's error comes straight from the output.

With ``e = dL/dlogits: (n, classes)``, the error sent to the input ``x`` of every layer (the output of
the layer below, after its nonlinearity) is a fixed random projection of ``e``:

    dense:  dx = e B,               B: (classes, in); with positions, x: (n, T..., in) and
            e: (n, T..., classes), dx_t = e_t B at each position (one B shared by all of them)
    conv:   B: (kh, kw, classes, in), no dense (classes, H*W*C) matrix; option ``grid``:
      "output" (default; the references' construction: BioTorch's conv DFA and the PFA authors'
               fork of it, which made the PFA paper's DFA baselines, are the same code): e
               broadcast over the layer's output grid, then the transposed conv with the layer's
               own stride, padding and dilation through B, i.e. the input gradient of
               conv(x, B^T) with B^T: (kh, kw, in, classes) at that broadcast error;
      "input"  (no reference; run directories written before "output" became the default, in
               December 2026, keep it): dx = conv(e broadcast over x's spatial grid, B), a
               stride-1 SAME conv.
    At stride 1 with SAME padding the two agree, exactly for 1x1 kernels and in distribution for
    larger ones (the spatially flipped kernel is an equally likely draw); at stride 2 they differ.

Autodiff then carries ``dx`` through the layer below's nonlinearity (and BatchNorm), so a hidden
layer's output error is ``(e B) * f'(a)``; its own update stays local, ``dK = x^T g``. The output
layer's ``g`` is ``e`` itself, so it learns exactly as under backprop.

Option ``density = p`` (sparse feedback; base.py): ``B`` (dense or conv layout) is the dense draw
``B0`` times a fixed mask ``m ~ Bernoulli(p)`` drawn once at init, scaled to keep ``E[B_ij^2]``:

    B = m * B0 / sqrt(p),      dx = e B   (conv: the conv through this B)

stored as ``B`` (fixed; no mask is stored). ``density = 1`` (default) is the dense rule.

Option ``signal``, what is projected in place of ``e`` (``n`` the rows of ``e`` at the layer, batch
times positions; the ``1 / n`` keeps the mean loss's scale, so a learning rate means the same under
all three):

* ``"error"`` (default): ``e`` itself;
* ``"sign"`` (sDFA): ``sign(e) / n``;
* ``"target"`` (DRTP, Frenkel, Lefebvre & Bol 2021): ``-t / n`` with ``t`` the one-hot target, so
  no error reaches the hidden layers. ``t`` is read off the output error: under softmax
  cross-entropy with integer labels (``pfa_jax.train``'s loss), ``e = (softmax(z) - t) / n`` has
  exactly one negative entry per row, at the label, so ``t = onehot(argmin_j e_j)`` (no change to
  the model or the train step; a row whose float softmax has saturated to ``t`` itself, logit gaps
  above about 100, has no negative entry and reads its first zero). The sign is ``e``'s own
  target part; DRTP's papers write ``+t`` with a feedback matrix of the opposite sign, which
  ``B``'s symmetric distribution makes the same rule.
  Other losses (soft or smoothed labels) do not determine ``t`` this way: their argmin is then
  only the class the error pushes up most.

One forward and one backward pass. Each DFA op returns ``(y, tap)`` with ``tap`` zeros of shape
``x.shape[:-1] + (classes,)`` (dense) or ``(n, classes)`` (conv); ``pfa_jax.nn`` layers sow the taps
and the model adds them to its logits (``pfa_jax.nn.add_taps``, placed as ``pfa_jax.taps`` says:
per position, summed for a pooled head, along a lifted transform's axis), so the cotangent every tap
receives in the backward pass is exactly ``e`` at its positions. A DFA op differentiated while
its tap reaches no loss (a symbolic-zero cotangent, e.g. a model applied without ``error_taps``
mutable) raises ``MissingTapError`` instead of silently sending zero errors down. The error arriving from the
layer above through ordinary backprop is not used: each DFA op sends ``e B`` down instead. Residual
additions and BatchNorm use ordinary autodiff on these projected errors: a residual block's input
receives the sum of its branch's projected error and whatever reaches its output through the skip
connection.

``effective_feedback`` is not defined for DFA (its feedback does not share the kernel's shape): the
alignment metrics skip DFA layers, and gradient alignment (kernel update against the true gradient)
is the meaningful measurement. Feature groups are not supported. ``classes`` is set by
``pfa_jax.models.get`` from ``num_classes``.
"""
from __future__ import annotations

import dataclasses
import functools
import math

import jax
import jax.numpy as jnp
from jax import lax
from jax.custom_derivatives import SymbolicZero

from pfa_jax.rules import ops
from pfa_jax.rules.base import Rule, SparseFeedback

__all__ = ["DFA", "dfa_linear", "GRIDS", "MissingTapError", "project_error", "SIGNALS"]


GRIDS = ("input", "output")
SIGNALS = ("error", "sign", "target")


def _projected(e, signal: str):
    """What DFA projects of the output error ``e: (n, classes)`` (module docstring)."""
    if signal == "error":
        return e
    rows = math.prod(e.shape[:-1])
    if signal == "sign":
        return jnp.sign(e) / rows
    target = jax.nn.one_hot(jnp.argmin(e, axis=-1), e.shape[-1], dtype=e.dtype)
    return -target / rows


def project_error(e, b, x_shape, op=None, y_shape=None, grid: str = "output"):
    """The fixed projection of the output error ``e: (n, classes)`` onto an input of ``x_shape``
    (conv, ``grid="output"``: through the transposed ``op`` from an output of ``y_shape``)."""
    if b.ndim == 2:
        return e @ b
    if grid == "output":
        spread = jnp.broadcast_to(e[:, None, None, :], tuple(y_shape[:-1]) + e.shape[-1:])
        return ops.input_grad(op, jnp.zeros(x_shape, e.dtype), jnp.swapaxes(b, -1, -2), spread)
    spread = jnp.broadcast_to(e[:, None, None, :], x_shape[:-1] + e.shape[-1:])
    return ops.conv_op(2)(spread, b)


def _with_tap(op, x, kernel, b):
    rows = x.shape[:-1] if isinstance(op, ops.DenseOp) else x.shape[:1]
    return op(x, kernel), jnp.zeros(rows + b.shape[-2:-1], x.dtype)


@functools.partial(jax.custom_vjp, nondiff_argnums=(0, 1, 2))
def dfa_linear(op, grid, signal, x, kernel, b):
    """``(op(x, kernel), zeros(n, classes))``; backward sends ``e B`` down (``project_error`` on
    ``grid``; in place of ``e``, ``signal="sign"``: ``sign(e) / n``, ``signal="target"``:
    ``-t / n``), ``e`` = the tap's cotangent."""
    return _with_tap(op, x, kernel, b)


class MissingTapError(ValueError):
    """A DFA layer was differentiated without its error tap reaching the loss."""


def _dfa_fwd(op, grid, signal, x, kernel, b):
    x, kernel, b = x.value, kernel.value, b.value  # symbolic_zeros: primals come wrapped
    return _with_tap(op, x, kernel, b), (x, kernel, b)


def _dfa_bwd(op, grid, signal, residuals, cotangents):
    x, kernel, b = residuals
    g, e = cotangents
    if isinstance(e, SymbolicZero):
        raise MissingTapError(
            "a DFA layer was differentiated but its error tap does not reach the loss, so no output "
            "error would reach it (its gradients would be zero). Linen: apply the model with "
            "'error_taps' mutable (mutable=['error_taps', ...]) and end its __call__ with "
            "pfa_jax.nn.add_taps(self, logits), as every pfa_jax.models model does. NNX: end the "
            "model's __call__ with pfa_jax.nnx.add_taps(self, logits), or wrap an unchanged model "
            "with pfa_jax.nnx.with_rule(model, rule, num_classes=..., rngs=...)")
    if isinstance(g, SymbolicZero):
        g = jnp.zeros(g.shape, g.dtype)
    return (project_error(_projected(e, signal), b, x.shape, op, g.shape, grid),
            ops.kernel_grad(op, x, kernel, g), jnp.zeros_like(b))


dfa_linear.defvjp(_dfa_fwd, _dfa_bwd, symbolic_zeros=True)


@dataclasses.dataclass(frozen=True)
class DFA(SparseFeedback, Rule):
    name = "dfa"
    output_error = True

    classes: int | None = None
    grid: str = "output"
    signal: str = "error"

    def __post_init__(self):
        super().__post_init__()
        if self.classes is not None and (not isinstance(self.classes, int) or self.classes < 1):
            raise ValueError(f"dfa: classes={self.classes!r} must be a positive int")
        if self.grid not in GRIDS:
            raise ValueError(f"dfa: grid={self.grid!r} is unknown; valid: {GRIDS}")
        if self.signal not in SIGNALS:
            raise ValueError(f"dfa: signal={self.signal!r} is unknown; valid: {SIGNALS}")

    def for_classes(self, num_classes: int) -> Rule:
        if self.classes is None:
            return dataclasses.replace(self, classes=num_classes)
        if self.classes != num_classes:
            raise ValueError(f"dfa: classes={self.classes!r} but the network has {num_classes} "
                             "outputs; leave classes unset (the model sets it) or make them equal")
        return self

    def draw_feedback(self, key, kernel):
        if self.classes is None:
            raise ValueError("dfa needs the number of classes: pfa_jax.rules.get('dfa', classes=N) "
                             "(pfa_jax.models.get sets it from num_classes)")
        if kernel.ndim not in (2, 4):
            raise ValueError(f"dfa supports dense and 2-D conv kernels, not shape {kernel.shape}")
        shape = (self.classes, kernel.shape[0]) if kernel.ndim == 2 else (
            kernel.shape[:2] + (self.classes, kernel.shape[2]))
        return {"B": self.sparsify(key, self.kernel_init()(key, shape, kernel.dtype))}

    def apply(self, op, x, kernel, feedback, key):
        if op.groups != 1:
            raise ValueError(f"dfa does not support feature_group_count={op.groups}")
        return dfa_linear(op, self.grid, self.signal, x, kernel, lax.stop_gradient(feedback["B"]))

    def effective_feedback(self, kernel, feedback):
        return None
