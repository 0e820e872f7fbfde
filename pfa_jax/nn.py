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

``model.init`` also returns a ``plasticity`` collection mirroring ``feedback`` (``OPTIMIZED`` where the
optimizer steps the array, e.g. KP's ``B`` and PFA's ``R``; ``MIRRORED`` for weight-mirror ``B``;
``FIXED`` otherwise); ``pfa_jax.train.create_train_state`` uses it to keep fixed feedback fixed and
drops it. ``model.apply`` never needs it. Applied with an RNG stream ``mirror`` (or
``mirror_warmup``) and ``feedback`` mutable, weight-mirror layers take their mirror steps.

DFA layers (``pfa_jax.rules.direct_feedback``) sow a zero "tap" ``(n, classes)`` into the
``error_taps`` collection when it is mutable; the model adds the taps to its logits (``add_taps``), so
the output error reaches every DFA layer in the one backward pass. Applied with the
``effective_feedback`` collection mutable, each layer sows ``(kernel, F)`` for the metrics. Each
layer's output passes through ``self.perturb('output', y)``: gradients w.r.t. the ``perturbations``
collection are the errors ``dL/dy`` reaching every layer (under the rule), also for the metrics.
"""
from __future__ import annotations

from collections.abc import Mapping
from typing import Any, Callable, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp

from pfa_jax import rules

RuleSpec = Any  # Rule | str | Mapping[str, Rule | str]
DEFAULT = "default"
PLASTICITY = "plasticity"  # init-only collection: how each feedback array learns (codes below)
FIXED, OPTIMIZED, MIRRORED = 0, 1, 2
TAPS = "error_taps"  # output-error taps of DFA layers, sown when this collection is mutable
MIRROR, MIRROR_WARMUP = "mirror", "mirror_warmup"  # RNG streams that ask for mirror steps
EFFECTIVE_FEEDBACK = "effective_feedback"  # filled only when applied with this collection mutable
PERTURBATION = "output"  # name of each layer's zero perturbation (flax ``perturb``) on its output


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

    if isinstance(spec, Mapping):
        return {path: bind(rule) for path, rule in spec.items()}
    return bind(spec)


def add_taps(module: nn.Module, logits):
    """``logits`` plus every DFA tap sown below ``module`` (zeros, so the forward value is unchanged;
    in the backward pass each tap receives ``e = dL/dlogits``). Call it on the logits at the end of a
    top-level model's ``__call__``; ``pfa_jax.models`` do."""
    if not module.is_mutable_collection(TAPS):
        return logits
    for tap in jax.tree.leaves(module.variables.get(TAPS, {})):
        logits = logits + tap
    module.sow(TAPS, "consumed", True)
    return logits


def layer_paths(params) -> set[str]:
    """Paths of every ``Dense`` / ``Conv`` layer (modules holding a ``kernel``) in a params tree."""
    paths = set()
    for key_path, _ in jax.tree_util.tree_leaves_with_path(params):
        names = [k.key for k in key_path]
        if names[-1] == "kernel":
            paths.add("/".join(names[:-1]))
    return paths


def check_rule_map(spec: RuleSpec, params) -> None:
    """Raises if a rule mapping names a layer the model does not have."""
    if not isinstance(spec, Mapping):
        return
    known = layer_paths(params)
    unknown = sorted(set(spec) - known - {DEFAULT})
    if unknown:
        raise ValueError(f"rule mapping names unknown layer(s) {unknown}; the model's layers are "
                         f"{sorted(known)} (plus {DEFAULT!r})")


class _RuleLayer(nn.Module, kw_only=True):
    """Shared fields (keyword-only) and plumbing: the layer's rule, its feedback variables and its
    per-step key."""

    rule: RuleSpec = "bp"
    use_bias: bool = True
    kernel_init: Callable | None = None
    bias_init: Callable = nn.initializers.zeros

    def layer_rule(self) -> rules.Rule:
        return resolve_rule(self.rule, "/".join(self.scope.path))

    def feedback(self, rule: rules.Rule, kernel) -> dict:
        if self.is_initializing():
            for name, value in rule.init_feedback(self.make_rng("params"), kernel).items():
                code = OPTIMIZED if name in rule.plastic else MIRRORED if name in rule.mirrored else FIXED
                self.variable("feedback", name, lambda v=value: v)
                self.variable(PLASTICITY, name, lambda c=code: jnp.asarray(c))
        feedback = dict(self.variables.get("feedback", {}))
        for stream in (MIRROR, MIRROR_WARMUP):
            if rule.mirrored and self.has_rng(stream) and self.is_mutable_collection("feedback"):
                feedback = rule.mirror(self.make_rng(stream), kernel, feedback,
                                       warmup=stream == MIRROR_WARMUP)
                for name in rule.mirrored:
                    self.put_variable("feedback", name, feedback[name])
        return feedback

    def report(self, rule: rules.Rule, kernel, feedback) -> None:
        """Sows ``(K, F)`` when ``effective_feedback`` is mutable (``pfa_jax.metrics`` asks)."""
        if self.is_mutable_collection(EFFECTIVE_FEEDBACK) and not self.is_initializing():
            effective = rule.effective_feedback(kernel, feedback)
            if effective is not None:
                self.sow(EFFECTIVE_FEEDBACK, "pair", (kernel, effective), reduce_fn=lambda _, new: new)

    def feedback_key(self, rule: rules.Rule):
        if rule.needs_key and self.has_rng("feedback"):
            return self.make_rng("feedback")
        return None

    def linear(self, kernel_shape, apply):
        """Creates kernel and feedback, returns ``apply(rule, kernel, feedback, key)`` plus bias."""
        rule = self.layer_rule()
        kernel = self.param("kernel", self.kernel_init or rule.kernel_init(), kernel_shape)
        feedback = self.feedback(rule, kernel)
        self.report(rule, kernel, feedback)
        y = apply(rule, kernel, feedback, self.feedback_key(rule))
        if rule.output_error:
            y, tap = y
            self.sow(TAPS, "tap", tap)
        if self.use_bias:
            y = y + self.param("bias", self.bias_init, (self.features,), y.dtype)
        return self.perturb(PERTURBATION, y)


class Dense(_RuleLayer):
    """``y = x @ kernel + bias`` with the rule's backward. ``kernel_init`` defaults to the rule's."""

    features: int

    @nn.compact
    def __call__(self, x):
        return self.linear((x.shape[-1], self.features),
                           lambda rule, kernel, feedback, key: rule.dense(x, kernel, feedback, key))


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
        return self.linear(shape, lambda rule, kernel, feedback, key: rule.conv(
            x, kernel, feedback, key, strides=self.strides, padding=self.padding,
            kernel_dilation=self.kernel_dilation, feature_group_count=self.feature_group_count))
