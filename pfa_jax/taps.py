"""DFA's output-error taps: how the output error ``e = dL/dlogits`` reaches every DFA layer.

Every DFA op (``pfa_jax.rules.direct_feedback``) returns, beside its output, a zero tap; the layer
sows it into the ``error_taps`` collection as a ``Tap``, and the model adds every tap to its
logits (``add``), so in the backward pass each tap's cotangent is the output error at the
positions it was added to. A dense layer's tap has its input's leading axes, ``(batch,
positions..., classes)``; a conv layer's is ``(batch, classes)`` (the conv projects the error
over its own grid).

How a tap of shape ``(batch, P..., classes)`` meets logits of shape ``(batch, Q..., classes)``:

* the same positions (``P == Q``, a per-token head): added as it is, so the error at position
  ``t`` reaches the layer's units at position ``t`` (Launay et al. 2020's transformer DFA);
* logits without positions (``Q`` empty: a pooled head or a class token): the tap is summed over
  its positions, so the error is broadcast to every position of the layer;
* a tap without positions under logits with them (a layer before the positions appear): the tap
  is broadcast, so the layer receives the error summed over the output positions;
* anything else is an error naming both shapes.

A layer inside a lifted transform (``nn.scan``, ``nn.vmap``, ``nn.RNN``) sows one tap a slice,
stacked by the transform on the axis its ``variable_axes`` give ``error_taps``. ``Tap.shape``
keeps the shape the layer saw, so that axis is found, not assumed: where the stacked tap has the
logits' shape (an RNN's per-step taps stacked on the logits' time axis), it is added as it is;
where the logits have no positions (a scan over depth), the slices are summed, every slice
receiving ``e``; a stacked tap that lines up with neither, or whose stacked axis cannot be told
from its batch axis (equal sizes), is an error naming the axes.
"""
from __future__ import annotations

import itertools

import jax
import jax.numpy as jnp
from flax import struct

__all__ = ["add", "Tap"]


class Tap(struct.PyTreeNode):
    """A zero tap ``value`` and ``shape``, the shape the layer gave it (lifted transforms stack
    ``value`` and keep ``shape``)."""

    value: jax.Array
    shape: tuple[int, ...] = struct.field(pytree_node=False)

    @classmethod
    def of(cls, value) -> Tap:
        return cls(value, tuple(value.shape))


def _stacked_axes(tap: Tap) -> tuple[int, ...]:
    """The axes a lifted transform stacked ``tap.value`` on, or an error where they are not unique."""
    outer, inner = tap.value.shape, tap.shape
    lifted = len(outer) - len(inner)
    candidates = [axes for axes in itertools.combinations(range(len(outer)), lifted)
                  if tuple(s for i, s in enumerate(outer) if i not in axes) == inner]
    if len(candidates) != 1:
        raise ValueError(f"a DFA tap of shape {inner} was stacked by a lifted transform into shape "
                         f"{outer}, and the stacked axes cannot be told apart (they could be any "
                         f"of {candidates}): give the lifted axis a length different from the "
                         "batch's and the positions'")
    return candidates[0]


def _fit(value, logits_shape: tuple[int, ...]):
    """An unstacked tap ``(batch, P..., classes)`` brought to the logits' shape (module docstring)."""
    shape = value.shape
    if shape == logits_shape:
        return value
    if shape[:1] != logits_shape[:1] or shape[-1:] != logits_shape[-1:]:
        raise ValueError(f"a DFA tap of shape {shape} cannot reach logits of shape {logits_shape}: "
                         "both need (batch, ..., classes) with the same batch and classes")
    if len(logits_shape) == 2:
        return value.sum(tuple(range(1, value.ndim - 1)))
    if value.ndim == 2:
        return jnp.expand_dims(value, tuple(range(1, len(logits_shape) - 1)))
    raise ValueError(f"a DFA tap of positions {shape[1:-1]} cannot reach logits of positions "
                     f"{logits_shape[1:-1]}: a layer's positions must be the logits', or the "
                     "logits must have none (a pooled head)")


def _placed(tap: Tap, logits_shape: tuple[int, ...]):
    if tap.value.shape == tap.shape:
        return _fit(tap.value, logits_shape)
    axes = _stacked_axes(tap)
    if tap.value.shape == logits_shape:
        return tap.value
    if len(logits_shape) != 2:
        raise ValueError(f"a DFA tap of shape {tap.shape} stacked on axes {axes} into shape "
                         f"{tap.value.shape} does not line up with logits of shape "
                         f"{logits_shape}: stack 'error_taps' on the logits' position axis "
                         "(variable_axes={'error_taps': axis}) or pool the positions")
    return _fit(tap.value.sum(axes), logits_shape)


def add(logits, taps):
    """``logits`` plus every tap of the pytree ``taps`` (``Tap`` nodes), each placed as the module
    docstring says."""
    for tap in jax.tree.leaves(taps, is_leaf=lambda t: isinstance(t, Tap)):
        logits = logits + _placed(tap, tuple(logits.shape))
    return logits
