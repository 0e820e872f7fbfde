"""Product Feedback Alignment (Li & Benna 2024, "Deep Learning without Weight Symmetry").

The error goes down through an expanded "mid" population of ``mid = r * out`` units: a fixed map
``Bp: (out, mid)`` and a plastic map ``R: (*window, in, mid)`` (kernel-like layout; the paper's
``R_paper = R^T``):

    dx = (g Bp) R^T                 (conv: the input-transpose of a conv through R)
    dR = x^T (g Bp) = dK Bp          (the feedback-learning signal: local, no weight transport)
    F  = R Bp^T                      (effective feedback, kernel layout; conv: einsum hwim,om->hwio)

With coupled weight decay on both ``K`` and ``R`` stepped by the same optimizer, ``R - K Bp`` decays,
so ``R -> K Bp`` and ``F -> K Bp Bp^T ~ K``: the path aligns with the forward weights.

Init (from the authors' code): ``R`` from the kernel's init distribution (xavier-uniform by default)
independently of ``K``; ``Bp`` uniform with ``Var(Bp_ij) = 1 / (density * mid)`` (xavier-uniform with
gain ``sqrt((1 + 1/r) / 2 / density)``). ``density = p < 1`` draws fixed Bernoulli(p) masks for ``Bp``
(applied once) and for ``R`` (kept as feedback ``R_mask``; the gradient of ``R`` is masked, so ``R``
stays sparse under any optimizer whose update of a zero gradient and zero weight is zero: SGD with
momentum and coupled weight decay, Adam, AdamW). ``pfa_o``: ``r = 1`` and ``Bp`` a random orthogonal
matrix.

Cost. The backward pass has two equal associations (equal up to float rounding):

* ``"mid"``: ``h = g Bp`` (mid-population errors), then ``dx`` and ``dR`` through ``R`` and ``h``;
* ``"product"``: ``F = R Bp^T`` formed once, ``dx = g F^T`` (backprop's cost), ``dR = dK Bp``.

With ``P`` output positions (batch x output pixels), ``k`` inputs per output unit and ``n`` feature
groups, "mid" costs ``P mid (out + 2 n k)`` multiply-adds and "product" ``2 k out mid + P k out``.
``route="auto"`` (default) picks the cheaper at trace time from the static shapes; the forward pass
never touches ``R``. With feature groups the mid population is kept per group (``n * mid`` channels),
which is what ``F = R Bp^T`` means for a grouped conv.

Storage forms (``form``). With ``F = R Bp^T`` and the fixed ``C = Bp Bp^T`` (``out x out``), PFA's
signals give ``dR Bp^T = x^T (g Bp) Bp^T = dK C``. An optimizer that is linear in (gradient,
parameter) - SGD, momentum, Nesterov, coupled weight decay, any learning-rate and weight-decay
schedule - commutes with right-multiplication by ``Bp^T``, so under it ``F`` evolves on its own:

    u_F = dK C + wd F,   m_F <- mu m_F + u_F,   F <- F - lr m_F,   F_0 = R_0 Bp^T, m_F,0 = 0

(``m_F = m_R Bp^T`` at every step). So PFA is Kolen-Pollack whose feedback update is ``dK C``
instead of ``dK``, and ``pfa_o`` (``C = I``) is Kolen-Pollack started from ``B_0 = R_0 Bp^T``.
Where ``C`` is invertible the same holds one step further: ``G = F C^-1`` evolves by
``u_G = dK + wd G`` (``u_F = u_G C``), which is exactly Kolen-Pollack's update of its feedback.

* ``form="R"`` stores ``Bp`` (fixed) and ``R`` (plastic), the authors' form; it is needed for sparse
  ``R`` (``density < 1``: the mask lives on ``R``) and for optimizers that are not linear (Adam,
  AdamW, clipping by a norm that includes the feedback), under which the forms differ.
* ``form="F"`` stores ``F`` (plastic) and ``C`` (fixed), drawn from the same ``R_0`` and ``Bp`` as
  the ``"R"`` form; ``dx = g F^T`` (backprop's cost) and ``dF = dK C``, computed as ``dK C``
  (``k out^2`` multiply-adds) or, for ungrouped layers where it is cheaper, ``x^T (g C)``
  (``P out (out + k)``); nothing scales with ``r``.
* ``form="G"`` stores ``G = F_0 C^-1`` (plastic) and ``C`` (fixed): ``dG = dK`` (free: backprop's
  kernel gradient) and ``dx = g (G C)^T``, computed as ``(g C) G^T`` (``P out^2`` beyond backprop)
  or, where cheaper or the layer has feature groups, through ``G C`` formed once (``k out^2``).
  Rounding in ``G`` is amplified by ``C``'s condition number, about
  ``((1 + r^-1/2) / (1 - r^-1/2))^2`` for PFA's ``Bp`` (34 at r = 2, 3.7 at r = 10, 1 for
  ``pfa_o``) and unbounded at r = 1 (3e6 for a 512-unit layer), so ``"G"`` needs
  ``expansion >= G_MIN_EXPANSION`` (2) or ``pfa_o``.
* ``form="auto"`` (default) stores ``"R"`` on its own, where the optimizer is unknown;
  ``pfa_jax.rules.for_optimizer`` (which ``create_train_state`` and the command apply) turns it
  into ``"G"`` (or ``"F"`` where ``C`` is ill-conditioned, ``pfa`` with ``expansion < 2``)
  exactly where the forms are equivalent (``density = 1`` and a feedback optimizer that commutes
  with right products) and ``"R"`` otherwise.

The identity and the forms' costs are in the repository's ``docs/rules.md``.
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
from pfa_jax.rules.base import Rule, check_density

__all__ = ["choose_route", "FORMS", "G_MIN_EXPANSION", "PFA", "pfa_factored_linear", "pfa_linear",
           "pfa_product_linear", "PFAOrthogonal", "route_costs", "ROUTES"]

ROUTES = ("auto", "mid", "product")
FORMS = ("auto", "R", "F", "G")
G_MIN_EXPANSION = 2


def _sizes(g_shape, kernel_shape) -> tuple[int, int, int]:
    """``(P, k, out)``: output positions (batch x output pixels), inputs per output unit, units."""
    out = kernel_shape[-1]
    return math.prod(g_shape) // out, ops.window_size(kernel_shape), out


def _times_c(a, c):
    """``a C``: ``C: (out, out)`` applied to the output axis of a kernel-layout ``a``."""
    return jnp.einsum("...io,op->...ip", a, c)


def route_costs(g_shape, kernel_shape, mid: int, groups: int) -> dict[str, int]:
    """Multiply-adds of each backward association beyond the shared ``dK`` (see module docstring)."""
    positions, k, out = _sizes(g_shape, kernel_shape)
    return {"mid": positions * mid * (out + 2 * groups * k),
            "product": 2 * k * out * mid + positions * k * out}


def choose_route(route: str, g_shape, kernel_shape, mid: int, groups: int) -> str:
    if route != "auto":
        return route
    costs = route_costs(g_shape, kernel_shape, mid, groups)
    return min(costs, key=costs.get)


def _mid_errors(g, bp, groups: int):
    """``h = g Bp`` per feature group: ``(..., out) -> (..., groups * mid)``."""
    out, mid = bp.shape
    h = jnp.einsum("...gc,gcm->...gm", g.reshape(g.shape[:-1] + (groups, out // groups)),
                   bp.reshape(groups, out // groups, mid))
    return h.reshape(g.shape[:-1] + (groups * mid,))


@functools.partial(jax.custom_vjp, nondiff_argnums=(0, 1))
def pfa_linear(op, route, x, kernel, bp, r):
    """``op(x, kernel)`` with PFA's backward through ``Bp`` (fixed) and ``R`` (plastic)."""
    return op(x, kernel)


def _pfa_fwd(op, route, x, kernel, bp, r):
    return op(x, kernel), (x, kernel, bp, r)


def _pfa_bwd(op, route, residuals, g):
    x, kernel, bp, r = residuals
    dkernel = ops.kernel_grad(op, x, kernel, g)
    mid, groups = bp.shape[1], op.groups
    if choose_route(route, g.shape, kernel.shape, mid, groups) == "product":
        feedback = jnp.einsum("...im,om->...io", r, bp)
        dx = ops.input_grad(op, x, feedback, g)
        dr = jnp.einsum("...io,om->...im", dkernel, bp)
    else:
        h = _mid_errors(g, bp, groups)
        r_groups = jnp.tile(r, (1,) * (r.ndim - 1) + (groups,))
        dx = ops.input_grad(op, x, r_groups, h)
        dr = ops.kernel_grad(op, x, r_groups, h)
        dr = dr.reshape(r.shape[:-1] + (groups, mid)).sum(-2)
    return dx, dkernel, jnp.zeros_like(bp), dr


pfa_linear.defvjp(_pfa_fwd, _pfa_bwd)


@functools.partial(jax.custom_vjp, nondiff_argnums=(0,))
def pfa_product_linear(op, x, kernel, c, f):
    """``op(x, kernel)`` with PFA's backward in the ``"F"`` form: ``dx = g F^T``, ``dF = dK C``."""
    return op(x, kernel)


def _pfa_stored_fwd(op, x, kernel, c, plastic):
    return op(x, kernel), (x, kernel, c, plastic)


def _pfa_product_bwd(op, residuals, g):
    x, kernel, c, f = residuals
    positions, k, out = _sizes(g.shape, kernel.shape)
    if op.groups == 1 and positions * out * (out + k) < k * out * out:
        # [dK, dF] = x^T [g, g C], one product
        both = ops.kernel_grad(op, x, jnp.concatenate([kernel, kernel], -1),
                               jnp.concatenate([g, g @ c], -1))
        dkernel, df = both[..., :out], both[..., out:]
    else:
        dkernel = ops.kernel_grad(op, x, kernel, g)
        df = _times_c(dkernel, c)  # dK C
    return ops.input_grad(op, x, f, g), dkernel, jnp.zeros_like(c), df


pfa_product_linear.defvjp(_pfa_stored_fwd, _pfa_product_bwd)


@functools.partial(jax.custom_vjp, nondiff_argnums=(0,))
def pfa_factored_linear(op, x, kernel, c, factor):
    """``op(x, kernel)`` with PFA's backward in the ``"G"`` form: ``dx = g (G C)^T``, ``dG = dK``."""
    return op(x, kernel)


def _pfa_factored_bwd(op, residuals, g):
    x, kernel, c, factor = residuals
    positions, k, _ = _sizes(g.shape, kernel.shape)
    if op.groups == 1 and positions < k:
        dx = ops.input_grad(op, x, factor, g @ c)  # (g C) G^T
    else:
        dx = ops.input_grad(op, x, _times_c(factor, c), g)  # g (G C)^T
    dkernel = ops.kernel_grad(op, x, kernel, g)
    return dx, dkernel, jnp.zeros_like(c), dkernel


pfa_factored_linear.defvjp(_pfa_stored_fwd, _pfa_factored_bwd)


@dataclasses.dataclass(frozen=True)
class PFA(Rule):
    name = "pfa"

    expansion: float = 10
    density: float = 1.0
    route: str = "auto"
    form: str = "auto"

    def __post_init__(self):
        super().__post_init__()
        if not isinstance(self.expansion, numbers.Real) or not 1 <= self.expansion < math.inf:
            raise ValueError(f"{self.name}: expansion={self.expansion!r} must be a finite number "
                             ">= 1 (mid = expansion * out units)")
        check_density(self.name, self.density)
        if self.route not in ROUTES:
            raise ValueError(f"{self.name}: route={self.route!r} is unknown; valid: {ROUTES}")
        if self.form not in FORMS:
            raise ValueError(f"{self.name}: form={self.form!r} is unknown; valid: {FORMS}")
        if self.stored != "R" and self.density < 1.0:
            raise ValueError(f"{self.name}: form={self.form!r} with density={self.density!r}: "
                             "F = R Bp^T cannot keep R's sparsity mask, so the forms differ; use "
                             "form='R' (or 'auto')")
        if self.form == "G" and not self.factorable:
            raise ValueError(f"{self.name}: form='G' with expansion={self.expansion!r}: C = Bp Bp^T "
                             f"is ill-conditioned below expansion {G_MIN_EXPANSION}, and G = F C^-1 "
                             "would amplify rounding; use form='F' (or 'auto')")

    @property
    def stored(self) -> str:
        """The form whose arrays the feedback holds: ``"F"``, ``"G"``, or ``"R"`` (also for
        ``"auto"``)."""
        return "R" if self.form == "auto" else self.form

    @property
    def factorable(self) -> bool:
        """Whether ``C = Bp Bp^T`` is well enough conditioned for the ``"G"`` form."""
        return self.expansion >= G_MIN_EXPANSION

    @property
    def plastic(self) -> tuple[str, ...]:
        return (self.stored,)

    def mid(self, out: int) -> int:
        return max(1, round(self.expansion * out))

    def draw_bp(self, key, out: int, dtype):
        mid = self.mid(out)
        limit = math.sqrt(3.0 / (self.density * mid))
        return jax.random.uniform(key, (out, mid), dtype, -limit, limit)

    def draw_feedback(self, key, kernel):
        out = kernel.shape[-1]
        mid = self.mid(out)
        k_bp, k_r, k_mask_bp, k_mask_r = jax.random.split(key, 4)
        feedback = {"Bp": self.draw_bp(k_bp, out, kernel.dtype),
                    "R": self.kernel_init()(k_r, kernel.shape[:-1] + (mid,), kernel.dtype)}
        if self.stored != "R":  # the same draws, stored as C = Bp Bp^T and F = R Bp^T or F C^-1
            bp = feedback["Bp"]
            c, f = bp @ bp.T, jnp.einsum("...im,om->...io", feedback["R"], bp)
            if self.stored == "F":
                return {"C": c, "F": f}
            return {"C": c, "G": jnp.linalg.solve(c, f.reshape(-1, out).T).T.reshape(f.shape)}
        if self.density < 1.0:
            feedback["Bp"] *= jax.random.bernoulli(k_mask_bp, self.density, feedback["Bp"].shape)
            feedback["R_mask"] = jax.random.bernoulli(
                k_mask_r, self.density, feedback["R"].shape).astype(kernel.dtype)
            feedback["R"] *= feedback["R_mask"]
        return feedback

    def _fixed_and_plastic(self, feedback):
        r = feedback["R"]
        if "R_mask" in feedback:
            r = r * lax.stop_gradient(feedback["R_mask"])
        return lax.stop_gradient(feedback["Bp"]), r

    def apply(self, op, x, kernel, feedback, key):
        if self.stored != "R":
            linear = pfa_product_linear if self.stored == "F" else pfa_factored_linear
            return linear(op, x, kernel, lax.stop_gradient(feedback["C"]), feedback[self.stored])
        return pfa_linear(op, self.route, x, kernel, *self._fixed_and_plastic(feedback))

    def effective_feedback(self, kernel, feedback):
        if self.stored == "F":
            return feedback["F"]
        if self.stored == "G":
            return _times_c(feedback["G"], lax.stop_gradient(feedback["C"]))
        bp, r = self._fixed_and_plastic(feedback)
        return jnp.einsum("...im,om->...io", r, bp)


@dataclasses.dataclass(frozen=True)
class PFAOrthogonal(PFA):
    """PFA with ``r = 1`` and a random orthogonal ``Bp: (out, out)``."""

    name = "pfa_o"
    expansion: float = 1
    density: float = 1.0

    def __post_init__(self):
        super().__post_init__()
        if self.expansion != 1 or self.density != 1.0:
            raise ValueError(f"pfa_o: expansion={self.expansion!r} and density={self.density!r} are "
                             "fixed at 1; use rule 'pfa' for other values")

    @property
    def factorable(self) -> bool:
        return True  # C = I

    def draw_bp(self, key, out, dtype):
        return jax.nn.initializers.orthogonal()(key, (out, out), dtype)
