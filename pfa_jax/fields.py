"""Type checks of the options given to a rule or a model, against the annotations of its dataclass
fields, so that ``rules.get('fa', rho='abc')`` names the option and the type it needs instead of
failing somewhere inside.

    check(FA, {'rho': 'abc'}, 'fa: ')   # ValueError: fa: rho='abc' must be a number or None

Annotations understood: ``int`` (not ``bool``), ``float`` (any real number, not ``bool``), ``str``,
``bool``, ``None``, unions of these (``float | None``) and ``tuple[T, ...]`` (a tuple or list of
``T``). Any other annotation (``Any``, a module, a callable) accepts every value; the classes' own
checks of ranges and choices come after this one.
"""
from __future__ import annotations

import numbers
import types
import typing

import numpy as np

__all__ = ["check", "describe", "matches"]

_NAMES = {int: "an int", float: "a number", str: "a string", bool: "True or False",
          type(None): "None"}


def _arms(hint) -> tuple:
    if typing.get_origin(hint) in (typing.Union, types.UnionType):
        return typing.get_args(hint)
    return (hint,)


def matches(value, hint) -> bool:
    """Whether ``value`` has the type ``hint`` (module docstring)."""
    for arm in _arms(hint):
        if typing.get_origin(arm) is tuple:
            element, *rest = typing.get_args(arm)
            if rest == [Ellipsis] and isinstance(value, (tuple, list)) and all(
                    matches(v, element) for v in value):
                return True
        elif arm is bool:
            if isinstance(value, (bool, np.bool_)):
                return True
        elif arm is int:
            if isinstance(value, numbers.Integral) and not isinstance(value, (bool, np.bool_)):
                return True
        elif arm is float:
            if isinstance(value, numbers.Real) and not isinstance(value, (bool, np.bool_)):
                return True
        elif arm in (str, type(None)):
            if isinstance(value, arm):
                return True
        else:
            return True
    return False


def describe(hint) -> str:
    """``hint`` in words: ``'a number or None'``, ``'a tuple of ints'``."""
    words = []
    for arm in _arms(hint):
        if typing.get_origin(arm) is tuple:
            words.append(f"a tuple of {describe(typing.get_args(arm)[0]).split(' ', 1)[1]}s")
        else:
            words.append(_NAMES.get(arm, str(arm)))
    return " or ".join(words)


def check(cls: type, options: typing.Mapping, owner: str) -> None:
    """Raises ``ValueError`` naming the option (after the prefix ``owner``, e.g. ``'fa: '``) and its
    value for the first option whose value does not have the type of ``cls``'s field of that name."""
    hints = typing.get_type_hints(cls)
    for name, value in options.items():
        if name in hints and not matches(value, hints[name]):
            raise ValueError(f"{owner}{name}={value!r} must be {describe(hints[name])}")
