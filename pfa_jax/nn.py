"""Flax (linen) layers whose backward pass follows a credit-assignment rule.

``Dense`` and ``Conv`` hold ``kernel`` and ``bias`` in ``params`` and the rule's feedback arrays in the
``feedback`` collection (e.g. ``{'B': ...}`` for FA, ``{'Bp': ..., 'R': ...}`` for PFA). The forward
pass is exactly ``flax.linen.Dense`` / ``flax.linen.Conv``; only the error sent to the layer below and
the feedback-learning signal differ (see ``pfa_jax.rules``). Rules that redraw feedback every step
(``brsf``) take keys from the ``feedback`` RNG stream. The bias always learns ``db = sum(g)``.

Everything else in a model (activations, BatchNorm, pooling, residual additions) uses ordinary
autodiff: the rule changes only how errors cross the linear maps of ``Dense`` and ``Conv``.

A layer's ``rule`` is a ``Rule``, a rule name, or a mapping from layer paths to rules (names or
``Rule``s) with a ``'default'`` entry, e.g. ``{'default': 'pfa', 'output': 'bp'}``. A layer's path is
its module path in the model joined by ``/`` (``'stage1_block0/conv0'``), the same as its key path in
the ``params`` tree. ``check_rule_map`` verifies every path in a mapping names a real layer.

``dtype`` and ``param_dtype`` have Flax's meaning: ``kernel``, ``bias`` and the feedback arrays are
stored in ``param_dtype`` (default float32); the layer's computation, and the rule's backward pass,
run in ``dtype`` (default: inferred from the input and the parameters, as ``flax.linen.Dense``). The
gradients of the stored arrays come back in ``param_dtype``.

``model.init`` returns only what a user carries between steps: ``params``, ``feedback`` (and the
model's own collections, e.g. ``batch_stats``). How each feedback array learns (plastic, fixed,
mirrored) is a property of the layer's rule and is derived from the layer paths (``pfa_jax.layers``),
never stored in the variables.

DFA layers (``pfa_jax.rules.direct_feedback``) sow a zero "tap" ``(n, classes)`` into the
``error_taps`` collection when it is mutable; the model adds the taps to its logits (``add_taps``), so
the output error reaches every DFA layer in the one backward pass. Differentiating a DFA layer whose
tap was not added to the logits is an error (not a zero gradient). Each layer's output passes through
``self.perturb('output', y)`` (not at init): gradients w.r.t. a ``perturbations`` collection given to
``apply`` are the errors ``dL/dy`` reaching every layer under the rule (``pfa_jax.metrics``).

Lifted transforms work as for ``flax.linen.Dense``: ``nn.remat`` as it is; ``nn.scan`` / ``nn.vmap``
need ``'feedback'`` among their ``variable_axes`` (and ``'perturbations'`` for
``pfa_jax.metrics.gradient_alignment``), and split the ``params`` RNG so that every slice draws its
own kernel and feedback. Each slice is then a layer of its own for the optimizer labels, the
mirror steps and the metrics (``pfa_jax.layers``).

Inside ``with backprop():`` every layer follows plain autodiff (rule ``'bp'``): the same forward
function with the true gradients, which the metrics compare the rule with.
"""
from __future__ import annotations

import contextlib
import contextvars
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
from flax.linen.dtypes import promote_dtype

from pfa_jax import rules, taps
from pfa_jax.rules import forms

__all__ = ["add_taps", "backprop", "Conv", "Dense", "RuleSpec", "with_rule"]

RuleSpec = Any  # Rule | str | Mapping[str, Rule | str]
DEFAULT = "default"
TAPS = "error_taps"  # output-error taps of DFA layers, sown when this collection is mutable
PERTURBATIONS = "perturbations"  # flax's collection for ``Module.perturb``
PERTURBATION = "output"  # name of each layer's zero perturbation (flax ``perturb``) on its output

_BACKPROP = contextvars.ContextVar("pfa_jax_backprop", default=False)
_RECORDER = contextvars.ContextVar("pfa_jax_layer_recorder", default=None)


@contextlib.contextmanager
def _setting(variable: contextvars.ContextVar, value):
    """``variable`` set to ``value`` inside the context, restored after it."""
    token = variable.set(value)
    try:
        yield
    finally:
        variable.reset(token)


def backprop():
    """Inside this context every pfa_jax layer follows plain autodiff (rule ``'bp'``): the same
    forward function as under any rule, with the true gradients. Enter it inside the traced function
    (as ``pfa_jax.metrics`` does)."""
    return _setting(_BACKPROP, True)


def layer_rule(rule: rules.Rule) -> rules.Rule:
    """``rule``, or backprop inside ``backprop()``: the rule a layer follows now."""
    return rules.get("bp") if _BACKPROP.get() else rule


def recording(records: dict):
    """Inside this context every pfa_jax layer that runs records ``records[path] = (rule, kernel
    rank at the call, view)`` (``record``): how ``pfa_jax.layers.table`` finds a model's layers
    (under ``nn.scan`` or
    ``nn.vmap`` the stored kernel has more axes than the call sees)."""
    return _setting(_RECORDER, records)


@contextlib.contextmanager
def recorded():
    """Records the rule layers that run inside into a fresh dict (yielded), passing each record on
    to an enclosing ``recording`` as well (how ``with_rule`` finds the kernels no rule reached)."""
    outer, records = _RECORDER.get(), {}
    with _setting(_RECORDER, records):
        yield records
    if outer is not None:
        outer.update(records)


def record(path: str, rule: rules.Rule, rank: int, view=None) -> None:
    """Records a rule layer that runs (its path, rule, kernel rank at the call and kernel-matrix
    view) into the enclosing ``recording``, if any: every rule-following layer calls it."""
    records = _RECORDER.get()
    if records is not None:
        records[path] = (rule, rank, view)


def resolve_rule(spec: RuleSpec, path: str) -> rules.Rule:
    """The rule for the layer at ``path`` under ``spec``."""
    if isinstance(spec, Mapping):
        if path in spec:
            return rules.get(spec[path])
        if DEFAULT not in spec:
            raise ValueError(f"no rule for layer {path!r}: the rule mapping has keys {sorted(spec)} "
                             f"and no {DEFAULT!r} entry")
        return rules.get(spec[DEFAULT])
    return rules.get(spec)


def bind_classes(spec: RuleSpec, num_classes: int) -> RuleSpec:
    """``spec`` with every rule that needs the network's number of classes (DFA) told it; other
    entries are kept as given."""
    def bind(rule):
        bound = rules.get(rule).for_classes(num_classes)
        return rule if bound == rules.get(rule) else bound

    return forms.map_entries(spec, bind)


def add_taps(module: nn.Module, logits):
    """``logits`` plus every DFA tap sown below ``module`` (zeros, so the forward value is unchanged;
    in the backward pass each tap receives ``e = dL/dlogits``). Call it on the logits at the end of a
    top-level model's ``__call__``; ``pfa_jax.models`` do. Logits may have positions, ``(batch,
    positions..., classes)``, and taps may come from lifted transforms: ``pfa_jax.taps`` says how
    each tap is placed."""
    if not module.is_mutable_collection(TAPS) or module.is_initializing():
        return logits
    return taps.add(logits, module.variables.get(TAPS, {}))


def layer_paths(params) -> set[str]:
    """Paths of every ``Dense`` / ``Conv`` layer (modules holding a ``kernel``) in a params tree."""
    paths = set()
    for key_path, _ in jax.tree_util.tree_leaves_with_path(params):
        names = [k.key for k in key_path]
        if names[-1] == "kernel":
            paths.add("/".join(names[:-1]))
    return paths


def explicit_bp(spec: RuleSpec) -> set[str]:
    """The layer paths a rule mapping gives ``'bp'`` by name (not through its ``'default'``): the
    layers ``with_rule`` leaves on backprop where it cannot route them."""
    if not isinstance(spec, Mapping):
        return set()
    return {path for path, rule in spec.items() if path != DEFAULT and rules.get(rule).name == "bp"}


class RuleMapError(ValueError):
    """A per-layer rule mapping names a layer the model does not have."""


def check_rule_map(spec: RuleSpec, params) -> None:
    """Raises ``RuleMapError`` if a rule mapping names a layer the model does not have."""
    if isinstance(spec, Mapping):
        refuse_unknown_layers(spec, layer_paths(params))


def refuse_unknown_layers(spec: Mapping, known: set[str]) -> None:
    """Raises ``RuleMapError`` if the rule mapping ``spec`` names a path outside ``known``."""
    unknown = sorted(set(spec) - set(known) - {DEFAULT})
    if unknown:
        raise RuleMapError(f"rule mapping names unknown layer(s) {unknown}; the model's layers are "
                         f"{sorted(known)} (plus {DEFAULT!r})")


class _RuleLayer(nn.Module, kw_only=True):
    """Shared fields (keyword-only) and plumbing: the layer's rule, its feedback variables, its
    dtypes and its per-step key."""

    rule: RuleSpec = "bp"
    use_bias: bool = True
    kernel_init: Callable | None = None
    bias_init: Callable = nn.initializers.zeros
    dtype: Any = None
    param_dtype: Any = jnp.float32

    def linear(self, x, kernel_shape, apply):
        """Creates kernel, feedback and bias; returns ``apply(rule, x, kernel, feedback, key)`` plus
        bias, computed in ``dtype``."""
        rule = layer_rule(resolve_rule(self.rule, "/".join(self.scope.path)))
        kernel = self.param("kernel", self.kernel_init or rule.kernel_init(), kernel_shape,
                            self.param_dtype)
        x, computed = promote_dtype(x, kernel, dtype=self.dtype)
        y = rule_product(self, self.rule, kernel, computed.dtype,
                         lambda rule, feedback, key: apply(rule, x, computed, feedback, key))
        if self.use_bias:  # created after the feedback, whose init key comes first
            y = y + self.param("bias", self.bias_init, (self.features,),
                               self.param_dtype).astype(computed.dtype)
        return perturbed(self, y)


def rule_product(module: nn.Module, spec: RuleSpec, kernel, dtype, product, view=None):
    """The product of a rule-following layer, from inside ``module``'s method: the rule ``spec``
    gives ``module``'s path (``backprop()`` in force), the layer's feedback (created from the stored
    ``kernel``, read as the matrix ``view(kernel)`` when ``view`` is given, at init; cast to
    ``dtype``), its record for ``recording``, and ``product(rule, feedback, key)``; a DFA layer's tap
    is sown into ``TAPS``. ``pfa_jax.nn.Dense`` / ``Conv`` and the layers of ``with_rule`` all run
    through it."""
    path = "/".join(module.scope.path)
    rule = layer_rule(resolve_rule(spec, path))
    if module.is_initializing():
        matrix = kernel if view is None else view(kernel)
        for name, value in rule.init_feedback(module.make_rng("params"), matrix).items():
            module.variable("feedback", name, lambda v=value: v)
    feedback = {name: jnp.asarray(value, dtype)
                for name, value in module.variables.get("feedback", {}).items()}
    record(path, rule, kernel.ndim, view)
    key = (module.make_rng("feedback") if rule.needs_key and module.has_rng("feedback")
           else None)
    y = product(rule, feedback, key)
    if rule.output_error:
        y, tap = y
        if not module.is_initializing():
            module.sow(TAPS, "tap", taps.Tap.of(tap))
    return y


def perturbed(module: nn.Module, y):
    """``y`` through ``module.perturb(PERTURBATION, y)`` (not at init): the output every rule layer
    exposes to ``pfa_jax.metrics``."""
    return y if module.is_initializing() else module.perturb(PERTURBATION, y)


class Dense(_RuleLayer):
    """``y = x @ kernel + bias`` with the rule's backward: the rule decides the gradient that
    reaches ``x`` (``dx = g B^T`` under FA) and the kernel's (``dW = x^T g`` for most rules).

    Args:
      features: the output size.
      rule: a ``Rule``, a rule's name, or a map from layer paths to rules (``resolve_rule``).
      use_bias, kernel_init, bias_init, dtype, param_dtype: as ``flax.linen.Dense``;
        ``kernel_init`` defaults to the rule's (``Rule.kernel_init``).

    Returns:
      A ``flax.linen`` module: ``y = layer.apply(variables, x)``, ``(..., features)``. Its feedback
      arrays (FA's ``B``) are in the ``feedback`` collection.

    Example:
      >>> import jax, jax.numpy as jnp, pfa_jax as pj
      >>> layer = pj.nn.Dense(3, rule="fa")
      >>> x = jnp.ones((2, 4))
      >>> variables = layer.init(jax.random.key(0), x)
      >>> dx = jax.grad(lambda x: layer.apply(variables, x).sum())(x)
      >>> B = variables["feedback"]["B"]
      >>> bool(jnp.allclose(dx, jnp.ones((2, 3)) @ B.T))  # the feedback, not the kernel
      True
    """

    features: int

    @nn.compact
    def __call__(self, x):
        return self.linear(x, (x.shape[-1], self.features),
                           lambda rule, x, kernel, feedback, key: rule.dense(x, kernel, feedback, key))


class Conv(_RuleLayer):
    """Channels-last convolution (as ``flax.linen.Conv``) with the rule's backward.

    ``padding``: ``'SAME'``, ``'VALID'``, an int, or one ``(low, high)`` pair per spatial dimension.
    """

    features: int
    kernel_size: Sequence[int] | int
    strides: Sequence[int] | int = 1
    padding: Any = "SAME"
    kernel_dilation: Sequence[int] | int = 1
    feature_group_count: int = 1

    @nn.compact
    def __call__(self, x):
        window = ((self.kernel_size,) * (x.ndim - 2) if isinstance(self.kernel_size, int)
                  else tuple(self.kernel_size))
        if len(window) != x.ndim - 2:
            raise ValueError(f"Conv: kernel_size={self.kernel_size!r} does not match an input of "
                             f"shape {x.shape} with {x.ndim - 2} spatial dims")
        if x.shape[-1] % self.feature_group_count:
            raise ValueError(f"Conv: {x.shape[-1]} input channels are not divisible by "
                             f"feature_group_count={self.feature_group_count}")
        shape = window + (x.shape[-1] // self.feature_group_count, self.features)
        return self.linear(x, shape, lambda rule, x, kernel, feedback, key: rule.conv(
            x, kernel, feedback, key, strides=self.strides, padding=self.padding,
            kernel_dilation=self.kernel_dilation, feature_group_count=self.feature_group_count))


from pfa_jax.intercept import UnreachedLayerError as UnreachedLayerError  # noqa: E402
from pfa_jax.intercept import WithRule as WithRule  # noqa: E402  (it builds on the layers above)
from pfa_jax.intercept import with_rule  # noqa: E402
