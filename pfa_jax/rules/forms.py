"""PFA's storage form chosen for the optimizer that steps the feedback.

PFA's three storage forms (``pfa_jax.rules.product_feedback``) are one algorithm exactly when the
optimizer ``tx`` stepping the plastic feedback commutes with right products: for every fixed
matrix ``M``, ``tx`` fed ``g M`` (parameters ``p M``) returns ``u M`` at every step where fed
``g`` (parameters ``p``) it returns ``u``. SGD, momentum, Nesterov, coupled weight decay and any
schedule of their scalars do; Adam, AdamW, sign methods, per-element scaling and clipping by a
norm do not. ``for_optimizer(rule, tx)`` turns ``form="auto"`` (PFA's default) into

* ``"G"`` (``"F"`` where ``C = Bp Bp^T`` is ill-conditioned: ``pfa`` with ``expansion < 2``)
  where ``R`` is dense (``density = 1``) and ``tx`` commutes: Kolen-Pollack's cost, the same
  numbers as the authors' form to rounding;
* ``"R"`` otherwise, the authors' form, which is PFA under any optimizer;

and keeps an explicit ``"F"`` or ``"G"`` under a ``tx`` that does not commute with a warning
(those forms then train another algorithm; the command refuses them).
``pfa_jax.train.create_train_state`` applies it to a model whose ``rule`` field holds the rule
(every ``pfa_jax.models`` model, ``pfa_jax.nn.with_rule``), and
the command applies it to the run spec's optimizer; a rule fixed inside a module's body, or an NNX
model (built before its optimizer), keeps what it was given: pass
``for_optimizer(rule, tx)`` to it.

Whether ``tx`` commutes is measured, not looked up by name: ``commutes(tx)`` runs five updates of
``tx`` on a small two-leaf tree, with gradients spanning twelve orders of magnitude (so that
clipping at any threshold in that range shows), and on the same tree right-multiplied by a random
rectangular ``M``, and compares ``u M`` with what ``tx`` returned (relative ``1e-4``). A ``tx``
that cannot update that tree (one that depends on the tree's structure, e.g. a mask pytree) counts
as not commuting, which keeps the ``"R"`` form: slower, never wrong.

>>> import optax, pfa_jax as pj
>>> pj.rules.for_optimizer("pfa", optax.sgd(0.1, momentum=0.9)).form
'G'
>>> pj.rules.for_optimizer(pj.rules.get("pfa", expansion=1), optax.sgd(0.1)).form
'F'
>>> pj.rules.for_optimizer("pfa", optax.adam(1e-3)).form
'R'
"""
from __future__ import annotations

import dataclasses
import warnings
from collections.abc import Mapping

import flax.linen as nn
import jax
import numpy as np
import optax

from pfa_jax import rules
from pfa_jax.rules.product_feedback import PFA

PROBE_SHAPES = {"a": (5, 4), "b": (3, 2, 4)}  # the right product maps the last axis 4 -> 3
PROBE_SCALES = (1.0, 1e6, 1e-6, 1e3, 1.0)
TOLERANCE = 1e-4


def _updates(tx, grads, params) -> list:
    state, out = tx.init(params), []
    for g in grads:
        u, state = tx.update(g, state, params)
        params = optax.apply_updates(params, u)
        out.append(u)
    return out


def commutes(tx: optax.GradientTransformation, seed: int = 0) -> bool:
    """Whether ``tx``'s updates commute with right products (module docstring: the probe)."""
    key_p, key_m, *keys = jax.random.split(jax.random.key(seed), 2 + len(PROBE_SCALES))
    right = jax.random.normal(key_m, (4, 3))
    times = lambda tree: jax.tree.map(lambda a: a @ right, tree)
    draw = lambda key, scale: {name: scale * jax.random.normal(k, shape) for (name, shape), k
                               in zip(PROBE_SHAPES.items(), jax.random.split(key, 2))}
    params = draw(key_p, 1.0)
    grads = [draw(k, s) for k, s in zip(keys, PROBE_SCALES)]
    try:
        plain = _updates(tx, grads, params)
        mapped = _updates(tx, [times(g) for g in grads], times(params))
    except Exception:  # noqa: BLE001 - any tx that cannot run the probe keeps the exact "R" form
        return False
    try:
        pairs = [(np.asarray(want), np.asarray(got)) for u, v in zip(plain, mapped)
                 for want, got in zip(jax.tree.leaves(times(u)), jax.tree.leaves(v))]
    except jax.errors.TracerArrayConversionError:
        raise ValueError("PFA's form='auto' cannot be decided for an optimizer built from traced "
                         "values (inside jit or vmap): decide it outside the trace with "
                         "pj.rules.for_optimizer(rule, tx), or pass form='G' or 'R'") from None
    for want, got in pairs:
        if want.shape != got.shape or not np.all(np.isfinite(got)):
            return False
        if np.max(np.abs(want - got)) > TOLERANCE * max(np.max(np.abs(want)), 1e-30):
            return False
    return True


def _one(rule: PFA, linear: bool) -> PFA:
    if rule.stored != "R" and not linear:
        warnings.warn(f"{rule.name}: form={rule.form!r} under a feedback optimizer that does not "
                      "commute with right products (as Adam, clipping or sign methods do not) "
                      "trains another algorithm than the authors' form='R'; the forms are equal "
                      "only under SGD-family optimizers", UserWarning, stacklevel=5)
    if rule.form != "auto":
        return rule
    form = ("G" if rule.factorable else "F") if linear and rule.density == 1 else "R"
    return dataclasses.replace(rule, form=form)


def for_optimizer(spec, tx: optax.GradientTransformation):
    """``spec`` (a rule, a rule name, or a rule mapping ``{path: rule}``) with every PFA rule's
    ``form="auto"`` decided for ``tx``, the transformation that steps the plastic feedback (module
    docstring); entries that are not PFA are kept as given.

    Args:
      spec: a ``Rule``, a registered name, or a mapping of layer paths to either.
      tx: the optax transformation of the plastic feedback.

    Returns:
      ``spec`` in the same shape, PFA entries as ``Rule`` instances with a concrete ``form``.

    An explicit ``form="F"`` or ``"G"`` under a ``tx`` that does not commute is kept (it is the
    user's choice of another algorithm) with a ``UserWarning`` saying so; the command refuses it.
    """
    if not any(isinstance(rules.get(r), PFA) for r in entries(spec)):
        return spec
    linear = commutes(tx)

    def one(entry):
        rule = rules.get(entry)
        return _one(rule, linear) if isinstance(rule, PFA) else entry

    return map_entries(spec, one)


def entries(spec) -> list:
    """The rules of a rule spec: its values for a mapping, else the one rule."""
    return list(spec.values()) if isinstance(spec, Mapping) else [spec]


def map_entries(spec, fn):
    """``spec`` with ``fn`` applied to each of its rules, in the same shape (a mapping stays one)."""
    return {path: fn(rule) for path, rule in spec.items()} if isinstance(spec, Mapping) else fn(spec)


def for_model(model, tx: optax.GradientTransformation):
    """``model`` with its ``rule`` field (where it has one) decided for ``tx`` (``for_optimizer``);
    a model without one is returned as it is."""
    spec = getattr(model, "rule", None)
    if spec is None:
        return model
    decided = for_optimizer(spec, tx)
    if decided is spec:
        return model
    if isinstance(model, nn.Module):
        return model.clone(rule=decided)
    return dataclasses.replace(model, rule=decided)  # with_rule's wrapper, a frozen dataclass


__all__ = ["commutes", "for_optimizer", "for_model"]
