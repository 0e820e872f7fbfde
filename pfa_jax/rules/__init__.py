"""Credit-assignment rules, one module per family, behind a registry.

    rule = pfa_jax.rules.get("pfa", expansion=10, density=1.0)
    pfa_jax.rules.names()

A new rule is one new module and one line in ``_REGISTRY``. The math of every rule and its
options are in the repository's ``docs/rules.md``.
"""
from __future__ import annotations

import dataclasses

from pfa_jax import fields
from pfa_jax.rules import ops
from pfa_jax.rules.alignment import AA, IA, SA, Alignment
from pfa_jax.rules.base import INITS, Rule, soft_align
from pfa_jax.rules.bp import BP
from pfa_jax.rules.direct_feedback import DFA
from pfa_jax.rules.feedback_alignment import FA, KP
from pfa_jax.rules.product_feedback import PFA, PFAOrthogonal
from pfa_jax.rules.sign_symmetry import BRSF, FRSF, USF
from pfa_jax.rules.weight_mirror import WM

_REGISTRY: dict[str, type[Rule]] = {
    "bp": BP, "fa": FA, "usf": USF, "brsf": BRSF, "frsf": FRSF, "kp": KP, "wm": WM,
    "pfa": PFA, "pfa_o": PFAOrthogonal, "dfa": DFA, "sa": SA, "aa": AA, "ia": IA,
    "alignment": Alignment,
}


def names() -> tuple[str, ...]:
    """Names of every registered rule."""
    return tuple(_REGISTRY)


def get(name: str | Rule, **options) -> Rule:
    """The credit-assignment rule ``name`` with ``options``.

    Args:
      name: a rule's name (``names()``: ``'bp'``, ``'fa'``, ``'pfa'``, ``'kp'``, ...), or a ``Rule``
        instance, returned as it is or with ``options`` replaced.
      **options: the rule's fields (``pfa_jax.fields``), e.g. ``expansion`` and ``form`` of PFA,
        ``rho`` of FA. Unknown options and options of the wrong type raise ``ValueError`` naming
        them; each rule then checks its values' ranges.

    Returns:
      The frozen, hashable ``Rule`` (a static ``jit`` argument) to give a model or a layer.

    Example:
      >>> import pfa_jax as pj
      >>> pj.rules.get("pfa", expansion=10)
      PFA(init='xavier_uniform', expansion=10, density=1.0, route='auto', form='auto')
      >>> pj.rules.get("fa", rho=0.5).rho
      0.5
      >>> pj.rules.get("fa", width=3)
      Traceback (most recent call last):
      ...
      ValueError: rule 'fa' has no option(s) ['width']; valid options: ['density', 'init', 'rho']
    """
    if isinstance(name, Rule):
        cls = type(name)
    elif name in _REGISTRY:
        cls = _REGISTRY[name]
    else:
        raise ValueError(f"unknown rule {name!r}; valid rules: {', '.join(names())}")
    valid = sorted(f.name for f in dataclasses.fields(cls))
    unknown = sorted(set(options) - set(valid))
    if unknown:
        raise ValueError(f"rule {cls.name!r} has no option(s) {unknown}; valid options: {valid}")
    fields.check(cls, options, f"{cls.name}: ")
    if isinstance(name, Rule):
        return dataclasses.replace(name, **options) if options else name
    return cls(**options)


from pfa_jax.rules.forms import for_optimizer  # noqa: E402 - it looks rules up in the registry

__all__ = ["for_optimizer", "get", "names", "Rule"]
