"""An unchanged Flax (linen) model under a rule: ``pfa_jax.nn.with_rule(module, rule)``.

    model = pj.nn.with_rule(MyViT(), {"default": "pfa", "head": "bp"})
    variables = model.init(key, images)          # params exactly as MyViT's; feedback beside them

The model's own linear layers follow the rule chosen for their path (the rule-map syntax of
``pfa_jax.nn``, paths as in the ``params`` tree, which is the plain model's). The route, by layer:

* ``nn.Dense``, ``nn.DenseGeneral`` (so the query, key, value and output projections of
  ``nn.MultiHeadDotProductAttention`` / ``nn.SelfAttention``, and the dense maps of
  ``nn.LSTMCell``, ``nn.GRUCell``, ``nn.SimpleCell``, ``nn.MGUCell``): Flax's own ``__call__`` runs
  (it creates and initialises ``kernel`` and ``bias`` and adds the bias) with its ``dot_general``
  field pointed, for that call, at the rule's product (``nn.intercept_methods``). A kernel of any
  rank is the matrix ``(prod in, prod out)``: its contracted axes first, flattened, then its free
  axes (``pfa_jax.products``); the input is flattened to rows ``(prod other axes, prod in)`` the same
  way, so every layer-wise rule sees ``y = x K`` and its feedback has that matrix's shape.
* ``nn.Conv``: the same through its ``conv_general_dilated`` field (channels-last, any strides,
  padding, kernel dilation, feature groups; input dilation is refused).
* ``nn.Einsum``: its equation is a product of the input with the kernel over the labels they
  share and the output lacks (an equation with a label in both operands and the output, a batch
  of matrices, is refused by name); the same matrix view, then the output's label order.
* ``nn.OptimizedLSTMCell``: its equations are those of ``nn.LSTMCell`` on the same parameters
  (``ii``, ``hi``, ...); it is run as one ``nn.Dense`` a gate and input, each following the rule
  (its fused product, a ``jnp.dot`` of concatenated kernels, has no injection point).

Products of two activations (attention's ``q k^T`` and its weighted sum of values, an LSTM's
gates times its state) keep their exact gradients: no weight is transported there, and the
literature on FA in transformers does the same. Embeddings (``nn.Embed``) receive their true
gradient. A layer that sets its own ``dot_general`` / ``conv_general_dilated`` (AQT's
quantised products, say) is refused by name, since the rule would replace that product.

A kernel the route cannot reach (a module of another class holding a ``kernel``:
``nn.ConvTranspose``, ``nn.ConvLocal``, an own module's ``jnp.dot``) is an error at ``init``,
naming each path, unless the rule map gives that path ``'bp'`` explicitly. An own module
follows a rule when its product goes through ``pfa_jax.nn.rule_product`` (as ``pfa_jax.nn.Dense``
does): that is the public way to declare a rule-following layer.

The wrapper calls the model as it is; a ``train=`` keyword (which ``pfa_jax.train`` passes) is
dropped when the model's ``__call__`` has no such argument. DFA and its variants take their
``classes`` from the plain model's traced outputs when not given; their taps (``pfa_jax.taps``)
keep each dense layer's positions and are added to the outputs by ``WithRule.apply``, so the
output error at each position reaches every DFA layer's units at that position, and a pooled
head's error reaches every position; an ``nn.RNN`` stacks its cells' taps on its time axis.
"""
from __future__ import annotations

import contextlib
import dataclasses
import inspect
from collections.abc import Mapping

import flax.linen as nn
import jax
import jax.numpy as jnp
from flax import traverse_util
from flax.core import FrozenDict

from pfa_jax import nn as pnn
from pfa_jax import products, rules, taps
from pfa_jax.rules import forms

__all__ = ["UnreachedLayerError", "with_rule", "WithRule"]


class UnreachedLayerError(ValueError):
    """A model's kernel that no rule can reach (``with_rule``)."""


def _product(module, spec, x, kernel, x_axes, kernel_axes):
    """``x`` contracted with ``kernel`` under the rule of ``module``'s path (``products``)."""
    stored = module.get_variable("params", "kernel")
    return products.matrix_product(x, kernel, x_axes, kernel_axes, lambda product, view:
                                   pnn.rule_product(module, spec, stored, kernel.dtype, product, view))


def _own_product(module, spec, *fields) -> bool:
    """Whether ``module`` sets its own product in one of ``fields`` and the rule map gives it
    ``'bp'`` explicitly (it then runs unchanged); raises where it sets one under another rule."""
    for field in fields:
        if getattr(module, field, None) is not None:
            if _path(module) in pnn.explicit_bp(spec):
                return True
            raise ValueError(f"with_rule: layer {_path(module)!r} ({type(module).__name__}) sets "
                             f"{field}={getattr(module, field)!r}; a rule replaces that product, so "
                             "give this layer 'bp' in the rule map or drop the field")
    return False


def _path(module) -> str:
    return "/".join(module.scope.path)


@contextlib.contextmanager
def _fields_set(module, **values):
    """``module``'s dataclass fields set to ``values`` for the duration (Flax modules are frozen;
    the method interceptor is the only caller)."""
    old = {name: getattr(module, name) for name in values}
    for name, value in values.items():
        object.__setattr__(module, name, value)
    try:
        yield
    finally:
        for name, value in old.items():
            object.__setattr__(module, name, value)


def _dense(module, spec, call):
    if _own_product(module, spec, "dot_general", "dot_general_cls"):
        return call()

    def dot_general(x, kernel, dimension_numbers, precision=None, **_):
        (x_axes, kernel_axes), batch = dimension_numbers
        if any(batch):
            raise ValueError(f"with_rule: layer {_path(module)!r} has batch_dims={batch[0]}: a "
                             "batch of matrices, not one kernel matrix; give it 'bp' in the rule map")
        return _product(module, spec, x, kernel, list(x_axes), list(kernel_axes))

    with _fields_set(module, dot_general=dot_general):
        return pnn.perturbed(module, call())


def _conv(module, spec, call):
    if _own_product(module, spec, "conv_general_dilated", "conv_general_dilated_cls"):
        return call()
    if not module.shared_weights:
        raise UnreachedLayerError(f"with_rule: layer {_path(module)!r} is a locally connected "
                                  "conv (shared_weights=False), which no rule reaches")

    def conv(x, kernel, strides, padding, *, lhs_dilation=None, rhs_dilation=None,
             dimension_numbers=None, feature_group_count=1, **_):
        products.check_conv(_path(module), x, kernel, lhs_dilation, dimension_numbers)
        stored = module.get_variable("params", "kernel")
        return pnn.rule_product(module, spec, stored, kernel.dtype, lambda rule, fb, key: rule.conv(
            x, kernel, fb, key, strides=tuple(strides), padding=padding,
            kernel_dilation=tuple(rhs_dilation or (1,) * (kernel.ndim - 2)),
            feature_group_count=feature_group_count))

    with _fields_set(module, conv_general_dilated=conv):
        return pnn.perturbed(module, call())


def _einsum(module, spec, x, equation=None):
    equation = nn.merge_param("einsum_str", module.einsum_str, equation)
    kernel = module.param("kernel", module.kernel_init, module.shape, module.param_dtype)
    x_axes, kernel_axes, order = products.einsum_axes(_path(module), equation, x.ndim)
    bias = None
    if module.use_bias:
        shape, broadcast = module._get_bias_shape(equation.replace(" ", ""), x, kernel)
        bias = module.param("bias", module.bias_init, shape, module.param_dtype)
    x, kernel, bias = module.promote_dtype(x, kernel, bias, dtype=module.dtype)
    y = jnp.transpose(_product(module, spec, x, kernel, x_axes, kernel_axes), order)
    if bias is not None:
        y = y + jnp.reshape(bias, broadcast)
    return pnn.perturbed(module, y)


def _optimized_lstm(cell, carry, inputs):
    """``nn.LSTMCell``'s equations on ``nn.OptimizedLSTMCell``'s parameters, one rule-following
    ``nn.Dense`` per gate and input (``i`` without bias, ``h`` with)."""
    c, h = carry
    dense = {f"{src}{gate}": nn.Dense(
        h.shape[-1], use_bias=src == "h", dtype=cell.dtype, param_dtype=cell.param_dtype,
        kernel_init=cell.kernel_init if src == "i" else cell.recurrent_kernel_init,
        bias_init=cell.bias_init, name=f"{src}{gate}", parent=cell)
        for gate in "ifgo" for src in "ih"}
    pre = {gate: dense[f"i{gate}"](inputs) + dense[f"h{gate}"](h) for gate in "ifgo"}
    i, f, o = (cell.gate_fn(pre[gate]) for gate in "ifo")
    c = f * c + i * cell.activation_fn(pre["g"])
    h = o * cell.activation_fn(c)
    return (c, h), h


def _rnn(rnn, call):
    """``nn.RNN`` with ``feedback`` broadcast over time as ``params`` are (one feedback matrix per
    weight map, shared by every step: the error crossing time goes through it too), and the
    layers' output perturbations stacked over time (``pfa_jax.metrics`` compares the errors of
    every step)."""
    broadcast = rnn.variable_broadcast
    if isinstance(broadcast, str):
        broadcast = (broadcast,)
    if not isinstance(broadcast, (tuple, list)) or "params" not in broadcast:
        raise ValueError(f"with_rule: nn.RNN {_path(rnn)!r} has variable_broadcast={broadcast!r}; "
                         "the feedback is broadcast over time with the params, so give a tuple of "
                         "collection names including 'params'")
    time = 0 if rnn.time_major else 1  # each step's error for the metrics, its tap on the time axis
    axes = {pnn.PERTURBATIONS: 0, pnn.TAPS: time, **rnn.variable_axes}
    with _fields_set(rnn, variable_broadcast=tuple({*broadcast, "feedback"}), variable_axes=axes):
        return call()


def _interceptor(spec):
    def intercept(next_fun, args, kwargs, context):
        module, kind = context.module, type(context.module)
        if context.method_name != "__call__":
            return next_fun(*args, **kwargs)
        call = lambda: next_fun(*args, **kwargs)  # noqa: E731
        if kind in (nn.Dense, nn.DenseGeneral):
            return _dense(module, spec, call)
        if kind is nn.Conv:
            return _conv(module, spec, call)
        if kind is nn.Einsum:
            return _einsum(module, spec, *args, **kwargs)
        if kind is nn.RNN:
            return _rnn(module, call)
        if kind is nn.OptimizedLSTMCell:
            return _optimized_lstm(module, *args, **kwargs)
        return call()
    return intercept


def _check_reached(spec, params, records: dict) -> None:
    """Raises ``UnreachedLayerError`` naming every kernel of ``params`` that no rule reached and
    the rule map does not give ``'bp'`` explicitly."""
    kernels = {"/".join(key[:-1]) for key in traverse_util.flatten_dict(dict(params))
               if key[-1] == "kernel"}
    unreached = sorted(kernels - set(records) - pnn.explicit_bp(spec))
    if unreached:
        raise UnreachedLayerError(
            "with_rule: no rule reaches the kernel(s) "
            f"{[f'{path}/kernel' if path else 'kernel (of the top-level module)' for path in unreached]}"
            " (modules of a class that "
            "with_rule does not route: nn.Dense, nn.DenseGeneral, nn.Einsum, nn.Conv, "
            "nn.OptimizedLSTMCell and the flax layers built on them are routed); give each "
            "'bp' in the rule map to train it by backprop, or route its product through "
            "pfa_jax.nn.rule_product")


@dataclasses.dataclass(frozen=True)
class WithRule:
    """``module`` (any linen module), its linear layers following ``rule`` (see the module
    docstring): ``init``, ``init_with_output`` and ``apply`` are ``module``'s, run with the rule's
    layers intercepted, so the variables are ``module``'s plus the ``feedback`` collection and the
    paths are ``module``'s own. Hashable (a static field of a jitted state); not itself a linen
    module: put the whole model under the rule, not a part of another module."""

    module: nn.Module
    rule: pnn.RuleSpec = "bp"

    def __post_init__(self):
        if isinstance(self.rule, Mapping):
            object.__setattr__(self, "rule", FrozenDict(self.rule))
        for rule in forms.entries(self.rule):
            rules.get(rule)  # an unknown name or option fails here

    def __getattr__(self, name):  # the model's own fields (``axis_name``, ...)
        if name.startswith("__") or name in ("module", "rule"):
            raise AttributeError(name)
        return getattr(self.module, name)

    def clone(self, **fields) -> WithRule:
        return WithRule(self.module.clone(**fields), self.rule)

    def _call(self, run, kwargs):
        if "train" in kwargs and not _takes(self.module, kwargs.get("method"), "train"):
            kwargs = {k: v for k, v in kwargs.items() if k != "train"}
        with nn.intercept_methods(_interceptor(self.rule)), pnn.recorded() as records:
            return run(**kwargs), records

    def init_with_output(self, rngs, *args, **kwargs):
        model = self._with_classes(rngs, args, kwargs)
        (out, variables), records = model._call(
            lambda **kw: self.module.init_with_output(rngs, *args, **kw), kwargs)
        _check_reached(self.rule, variables.get("params", {}), records)
        return out, variables

    def _with_classes(self, rngs, args, kwargs) -> WithRule:
        """This model with DFA's ``classes`` read off the plain model's traced outputs where a
        rule needs them and was not told."""
        if not any(rules.get(r).output_error and rules.get(r).classes is None
                   for r in forms.entries(self.rule)):
            return self
        kwargs = {k: v for k, v in kwargs.items()
                  if k != "train" or _takes(self.module, kwargs.get("method"), "train")}
        out, _ = jax.eval_shape(lambda: self.module.init_with_output(rngs, *args, **kwargs))
        logits, _ = _one_array(out, "read the number of classes off")
        return WithRule(self.module, pnn.bind_classes(self.rule, logits.shape[-1]))

    def init(self, rngs, *args, **kwargs):
        return self.init_with_output(rngs, *args, **kwargs)[1]

    def apply(self, variables, *args, **kwargs):
        """``module.apply``; with ``error_taps`` mutable, the DFA taps are added to the outputs
        (``pfa_jax.taps``), so a train step's output error reaches every DFA layer."""
        result = self._call(lambda **kw: self.module.apply(variables, *args, **kw), kwargs)[0]
        if not kwargs.get("mutable") or not result[1].get(pnn.TAPS):
            return result
        out, updates = result
        logits, tree = _one_array(out, "add the output error's taps to")
        return jax.tree.unflatten(tree, [taps.add(logits, updates[pnn.TAPS])]), updates


def _one_array(out, why: str):
    """The one array of the outputs ``out`` and their treedef, for DFA (which needs logits)."""
    leaves, tree = jax.tree.flatten(out)
    if len(leaves) != 1:
        raise ValueError(f"with_rule: DFA needs the model to return one logits array, to {why}; "
                         f"it returns {len(leaves)} arrays ({tree})")
    return leaves[0], tree


def _takes(module: nn.Module, method, name: str) -> bool:
    """Whether ``module``'s ``method`` (default ``__call__``) takes a keyword ``name``."""
    method = method or "__call__"
    function = getattr(type(module), method) if isinstance(method, str) else method
    parameters = inspect.signature(function).parameters
    return name in parameters or any(p.kind is p.VAR_KEYWORD for p in parameters.values())


def with_rule(module: nn.Module, rule: pnn.RuleSpec) -> WithRule:
    """``module``, unchanged, with its linear layers following ``rule`` (a rule, a name, or a map
    from layer paths to rules with a ``'default'``).

    Args:
      module: any ``flax.linen`` module.
      rule: the rule spec, as for ``pfa_jax.nn.Dense`` (``pfa_jax.nn.resolve_rule``).

    Returns:
      A ``WithRule`` whose ``init`` / ``apply`` take ``module``'s arguments and give its outputs
      and its ``params`` tree, with each layer's feedback in the ``feedback`` collection.

    Example:
      >>> import flax.linen as nn, jax, jax.numpy as jnp
      >>> import pfa_jax as pj
      >>> mlp = nn.Sequential([nn.Dense(8), nn.relu, nn.Dense(3)])
      >>> model = pj.nn.with_rule(mlp, "fa")
      >>> variables = model.init(jax.random.key(0), jnp.ones((2, 4)))
      >>> jax.tree.map(jnp.shape, variables["feedback"])
      {'layers_0': {'B': (4, 8)}, 'layers_2': {'B': (8, 3)}}
    """
    return WithRule(module, rule)

