"""Flax NNX layers whose backward pass follows a credit-assignment rule: ``Linear`` and ``Conv``.

The same rules and semantics as the linen layers of ``pfa_jax.nn``: the forward pass is exactly
``nnx.Linear`` / ``nnx.Conv`` (channels-last inputs, kernels ``(in, out)`` and ``(*window, in //
groups, out)``), only the error sent down and the feedback-learning signal follow the rule. ``kernel``
and ``bias`` are ``nnx.Param``; each feedback array of the rule is an attribute of its own name
(``B``; ``Bp`` and ``R``; ...) held in a variable type saying how it learns:

* ``PlasticFeedback``: stepped by the optimizer (KP's ``B``, PFA's ``R``): train it with
  ``nnx.Optimizer(model, tx, wrt=nnx.Any(nnx.Param, PlasticFeedback))``;
* ``FixedFeedback``: never changed (FA's ``B``, PFA's ``Bp``): ``nnx.state(model, FixedFeedback)`` is
  exactly the fixed feedback;
* ``MirroredFeedback``: stepped by ``mirror`` (weight-mirror ``B``).

All three derive from ``Feedback``. ``dtype`` / ``param_dtype`` have Flax's meaning (parameters and
feedback stored in ``param_dtype``, computation and the rule's backward in ``dtype``). A ``rule`` is a
``Rule`` or a rule name (models resolve per-layer mappings, see ``pfa_jax.nnx.models``). Rules that
redraw feedback every step (``brsf``) draw a key per call from the layer's own ``feedback`` RNG
stream, or take ``key=``. A weight-mirror layer takes its mirroring phase (``warmup_steps``) when it
is built, as ``pfa_jax.train.create_train_state`` does for linen, with keys from its own ``mirror``
stream; ``mirror(model)`` then takes every layer's mirror steps.

DFA layers keep their zero error tap ``(n, classes)`` as an ``nnx.Intermediate`` attribute ``tap``
after each call; the model adds the taps to its logits with ``add_taps(self, logits)`` (which
removes them), so the output error reaches every DFA layer in the one backward pass. Inside
``pfa_jax.nn.backprop()`` every layer follows backprop.
"""
from __future__ import annotations

import contextlib
import contextvars
from collections.abc import Callable, Sequence
from typing import Any

import jax.numpy as jnp
from flax import nnx
from flax.linen.dtypes import promote_dtype

from pfa_jax import layers as player
from pfa_jax import nn as pnn
from pfa_jax import rules, taps

__all__ = ["add_taps", "Conv", "Feedback", "FixedFeedback", "Linear", "mirror", "MirroredFeedback",
           "PlasticFeedback", "rule_layers", "RuleFollowing", "RuleLayer", "VARIABLE_TYPES"]


class Feedback(nnx.Variable):
    """A feedback array of a rule layer."""


class FixedFeedback(Feedback):
    """Feedback that never changes."""


class PlasticFeedback(Feedback):
    """Feedback stepped by the optimizer with the rule's feedback-learning signal."""


class MirroredFeedback(Feedback):
    """Weight-mirror feedback, stepped by ``mirror``."""


VARIABLE_TYPES = {player.FIXED: FixedFeedback, player.PLASTIC: PlasticFeedback,
                  player.MIRRORED: MirroredFeedback}


class RuleFollowing(nnx.Module):
    """What every rule-following NNX layer has: ``rule``, its feedback variables (``feedback()``),
    its mirror steps, and ``rule_product``. ``RuleLayer`` builds one; ``pfa_jax.nnx.with_rule``
    makes Flax's own layers into one."""

    def add_feedback(self, rule, matrix, rngs: nnx.Rngs) -> None:
        """Sets ``rule`` and its feedback for the kernel matrix ``matrix`` (as ``attributes``)."""
        self.rule = rules.get(rule)
        feedback = self.rule.init_feedback(rngs.params(), matrix)
        self.feedback_names = tuple(feedback)
        for name, value in feedback.items():
            setattr(self, name, VARIABLE_TYPES[player.label(self.rule, name)](value))
        self.rngs = (nnx.Rngs(feedback=rngs.params(), mirror=rngs.params())
                     if self.rule.needs_key or self.rule.mirrored else None)
        if self.rule.mirrored:
            self.mirror(warmup=True)

    def feedback(self) -> dict:
        """The layer's feedback arrays by name."""
        return {name: getattr(self, name)[...] for name in self.feedback_names}

    def mirror(self, warmup: bool = False) -> None:
        """The rule's mirror steps (weight mirrors; a no-op for other rules)."""
        if self.rule.mirrored:
            matrix = getattr(self, "view", None) or (lambda kernel: kernel)
            mirrored = self.rule.mirror(self.rngs.mirror(), matrix(self.kernel[...]),
                                        self.feedback(), warmup)
            for name in self.rule.mirrored:
                getattr(self, name)[...] = mirrored[name]

    def rule_product(self, product, dtype, key=None):
        """``product(rule, feedback, key)`` with the rule in force (``pfa_jax.nn.backprop``), the
        feedback in ``dtype`` and the rule's key; keeps a DFA tap."""
        rule = pnn.layer_rule(self.rule)
        feedback = {name: jnp.asarray(value, dtype) for name, value in self.feedback().items()}
        if key is None and rule.needs_key:
            key = self.rngs.feedback()
        y = product(rule, feedback, key)
        if rule.output_error:
            y, tap = y
            self.tap = nnx.Intermediate(tap)
        return perturbed(self, y)


_MEASURED = contextvars.ContextVar("pfa_jax_nnx_measured", default=None)  # (twin, {id: path})


@contextlib.contextmanager
def measured(twin, paths: dict):
    """Inside, the rule layers of ``paths`` (``{id(layer): path}``) expose their outputs to the
    linen module ``twin`` (``pfa_jax.nnx.twin``) through ``perturbed``."""
    token = _MEASURED.set((twin, paths))
    try:
        yield
    finally:
        _MEASURED.reset(token)


def perturbed(layer, y):
    """``y`` plus the layer's zero ``perturbations`` entry ``{path...: {'output': 0}}`` of the twin
    being applied (inside ``measured``; ``y`` itself elsewhere): ``dL/dy`` is the gradient with
    respect to it, which is how ``pfa_jax.metrics`` reads each layer's error."""
    call = _MEASURED.get()
    if call is None or not call[1].get(id(layer)):
        return y
    twin, path = call[0], call[1][id(layer)]
    pnn.record(path, layer.rule, layer.kernel[...].ndim, getattr(layer, "view", None))
    if twin.is_initializing():
        return y
    top, *rest = path.split("/")
    if twin.is_mutable_collection(pnn.PERTURBATIONS):  # being created: zeros of y's shape
        tree = twin.get_variable(pnn.PERTURBATIONS, top, {})
        node = tree
        for part in rest:
            node = node.setdefault(part, {})
        node.setdefault(pnn.PERTURBATION, jnp.zeros_like(y))
        twin.put_variable(pnn.PERTURBATIONS, top, tree)
    if not twin.has_variable(pnn.PERTURBATIONS, top):
        return y
    entry = twin.get_variable(pnn.PERTURBATIONS, top)
    for part in rest:
        entry = entry[part]
    return y + entry[pnn.PERTURBATION]


class RuleLayer(RuleFollowing):
    """What ``Linear`` and ``Conv`` share: kernel, bias, feedback variables, the rule's keys."""

    def __init__(self, kernel_shape: tuple[int, ...], rule, *, use_bias: bool,
                 kernel_init: Callable | None, bias_init: Callable, dtype, param_dtype,
                 rngs: nnx.Rngs):
        if any(isinstance(n, bool) or not isinstance(n, int) or n < 1 for n in kernel_shape):
            raise ValueError(f"{type(self).__name__}: every size must be a positive int, got a "
                             f"kernel of shape {tuple(kernel_shape)} (features and kernel size)")
        self.dtype = dtype
        init = kernel_init or rules.get(rule).kernel_init()
        self.kernel = nnx.Param(init(rngs.params(), kernel_shape, param_dtype))
        self.bias = (nnx.Param(bias_init(rngs.params(), (kernel_shape[-1],), param_dtype))
                     if use_bias else None)
        self.add_feedback(rule, self.kernel[...], rngs)

    def linear(self, x, key, apply):
        """``apply(rule, x, kernel, feedback, key)`` plus bias, in ``dtype``; keeps a DFA tap."""
        bias = None if self.bias is None else self.bias[...]
        x, kernel, bias = promote_dtype(x, self.kernel[...], bias, dtype=self.dtype)
        y = self.rule_product(lambda rule, fb, key: apply(rule, x, kernel, fb, key), kernel.dtype,
                              key)
        return y if bias is None else y + bias


class Linear(RuleLayer):
    """``y = x @ kernel + bias`` with the rule's backward."""

    def __init__(self, in_features: int, out_features: int, *, rule="bp", use_bias: bool = True,
                 kernel_init: Callable | None = None, bias_init: Callable = nnx.initializers.zeros,
                 dtype=None, param_dtype=jnp.float32, rngs: nnx.Rngs):
        super().__init__((in_features, out_features), rule, use_bias=use_bias,
                         kernel_init=kernel_init, bias_init=bias_init, dtype=dtype,
                         param_dtype=param_dtype, rngs=rngs)

    def __call__(self, x, key=None):
        return self.linear(x, key, lambda rule, x, kernel, fb, key: rule.dense(x, kernel, fb, key))


class Conv(RuleLayer):
    """Channels-last convolution (as ``nnx.Conv``) with the rule's backward. ``kernel_size``: an
    int (2-D) or one size per spatial dimension; ``padding``: ``'SAME'``, ``'VALID'``, an int, or one
    ``(low, high)`` pair per spatial dimension."""

    def __init__(self, in_features: int, out_features: int, kernel_size: int | Sequence[int], *,
                 strides: int | Sequence[int] = 1, padding: Any = "SAME",
                 kernel_dilation: int | Sequence[int] = 1, feature_group_count: int = 1,
                 rule="bp", use_bias: bool = True, kernel_init: Callable | None = None,
                 bias_init: Callable = nnx.initializers.zeros, dtype=None,
                 param_dtype=jnp.float32, rngs: nnx.Rngs):
        window = (kernel_size,) * 2 if isinstance(kernel_size, int) else tuple(kernel_size)
        if in_features % feature_group_count:
            raise ValueError(f"Conv: {in_features} input channels are not divisible by "
                             f"feature_group_count={feature_group_count}")
        self.options = dict(strides=strides, padding=padding, kernel_dilation=kernel_dilation,
                            feature_group_count=feature_group_count)
        super().__init__(window + (in_features // feature_group_count, out_features), rule,
                         use_bias=use_bias, kernel_init=kernel_init, bias_init=bias_init,
                         dtype=dtype, param_dtype=param_dtype, rngs=rngs)

    def __call__(self, x, key=None):
        return self.linear(x, key, lambda rule, x, kernel, fb, key: rule.conv(
            x, kernel, fb, key, **self.options))


def rule_layers(module: nnx.Module) -> list[tuple[str, RuleFollowing]]:
    """``(path, layer)`` of every rule layer in ``module``, paths joined by ``/``."""
    return [("/".join(map(str, path)), m) for path, m in nnx.iter_modules(module)
            if isinstance(m, RuleFollowing)]


def add_taps(module: nnx.Module, logits):
    """``logits`` plus the DFA taps the rule layers of ``module`` keep from this call (zeros, so the
    value is unchanged; in the backward pass each tap receives ``e = dL/dlogits``); the taps are
    removed, so the module's state is as before the call."""
    for _, layer in rule_layers(module):
        if hasattr(layer, "tap"):
            logits = taps.add(logits, [taps.Tap.of(layer.tap[...])])
            del layer.tap
    return logits


def mirror(module: nnx.Module, warmup: bool = False) -> None:
    """Every weight-mirror layer of ``module`` takes its mirror steps."""
    for _, layer in rule_layers(module):
        layer.mirror(warmup)
