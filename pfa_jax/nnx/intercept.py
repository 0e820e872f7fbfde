"""An unchanged Flax NNX model under a rule: ``pfa_jax.nnx.with_rule(model, rule, rngs=...)``.

    model = pj.nnx.with_rule(MyViT(rngs=nnx.Rngs(0)), {"default": "pfa", "head": "bp"},
                             rngs=nnx.Rngs(1))

Graph surgery, in place: every ``nnx.Linear``, ``nnx.LinearGeneral`` (so the projections of
``nnx.MultiHeadAttention``), ``nnx.Einsum`` and ``nnx.Conv`` of the model (and the ``nnx.Linear``
maps inside NNX's RNN cells: ``LSTMCell``, ``OptimizedLSTMCell``'s fused ``dense_i`` / ``dense_h``,
``GRUCell``, ``SimpleCell``) becomes a subclass of its own class that also holds the rule's
feedback, as ``Feedback`` variables beside its ``kernel`` (``FixedFeedback``, ``PlasticFeedback``,
``MirroredFeedback``, as for ``pfa_jax.nnx.Linear``), and whose injection point (``dot_general``,
``einsum_op``, ``conv_general_dilated``, the fields Flax provides for swapping the product) is the
rule's product. Flax's own ``__call__`` still runs: promotion, bias, padding and reshapes are
exactly the plain layer's. The module tree, its paths and its parameters are unchanged, so a rule
map's paths are those of ``nnx.state(model, nnx.Param)`` (``'attention/query'``). A kernel of any
rank is the matrix ``(prod in, prod out)`` of ``pfa_jax.products``.

Products of two activations (attention's ``q k^T`` and weighted sum of values, an LSTM's gates
times its state) keep their exact gradients, as in ``pfa_jax.nn.with_rule``. A ``kernel`` in any
other module (an own ``x @ w``, ``nnx.ConvTranspose``) is an error naming its path, unless the rule
map gives that path ``'bp'``; so is a layer with its own ``dot_general`` / ``einsum_op`` /
``conv_general_dilated`` (AQT's, say) or with batch axes (``LinearGeneral(batch_axis=...)``), a
masked conv, or an ``Einsum`` whose equation is set only at call time.

DFA and its variants need ``num_classes=`` (NNX builds feedback eagerly, before any call); the
model's class then becomes a subclass whose ``__call__`` adds the DFA taps to its outputs
(``pfa_jax.nnx.add_taps``), so one backward pass delivers the output error to every layer.
"""
from __future__ import annotations

import functools
from collections.abc import Mapping

import jax
import jax.numpy as jnp
from flax import nnx

from pfa_jax import nn as pnn
from pfa_jax import products
from pfa_jax.nnx.layers import RuleFollowing, add_taps, rule_layers

__all__ = ["with_rule"]


def _routed_dot_general(layer, x, kernel, dimension_numbers, precision=None, **_):
    (x_axes, kernel_axes), (batch, _b) = dimension_numbers
    if batch:
        raise ValueError(f"with_rule: layer {layer.path!r} has batch axes {tuple(batch)}: a batch "
                         "of matrices, not one kernel matrix; give it 'bp' in the rule map")
    return products.matrix_product(x, kernel, x_axes, kernel_axes, lambda product, view:
                                   layer.rule_product(product, kernel.dtype))


def _routed_einsum(layer, equation, x, kernel, precision=None, **_):
    x_axes, kernel_axes, order = products.einsum_axes(layer.path, equation, x.ndim)
    return jnp.transpose(_routed_dot_general(layer, x, kernel, ((x_axes, kernel_axes), ((), ()))),
                         order)


def _routed_conv(layer, x, kernel, strides, padding, lhs_dilation=None, rhs_dilation=None,
                 dimension_numbers=None, feature_group_count=1, precision=None, **_):
    products.check_conv(layer.path, x, kernel, lhs_dilation, dimension_numbers)
    return layer.rule_product(lambda rule, fb, key: rule.conv(
        x, kernel, fb, key, strides=tuple(strides), padding=padding,
        kernel_dilation=tuple(rhs_dilation or (1,) * (kernel.ndim - 2)),
        feature_group_count=feature_group_count), kernel.dtype)


def _injection(name: str, routed):
    """A property that gives the rule's product where Flax's layer reads its ``name`` field (the
    stored value stays in the instance, for the graph)."""
    return property(lambda self: functools.partial(routed, self),
                    lambda self, value: self.__dict__.__setitem__(name, value))


def _routed_class(cls, field: str, routed):
    return type(f"Routed{cls.__name__}", (cls, RuleFollowing),
                {field: _injection(field, routed), "__module__": __name__,
                 "__doc__": f"``nnx.{cls.__name__}`` whose ``{field}`` is the rule's product."})


ROUTED = {
    nnx.Linear: _routed_class(nnx.Linear, "dot_general", _routed_dot_general),
    nnx.LinearGeneral: _routed_class(nnx.LinearGeneral, "dot_general", _routed_dot_general),
    nnx.Einsum: _routed_class(nnx.Einsum, "einsum_op", _routed_einsum),
    nnx.Conv: _routed_class(nnx.Conv, "conv_general_dilated", _routed_conv),
}
_DEFAULT_PRODUCT = {nnx.Linear: ("dot_general", jax.lax.dot_general),
                    nnx.LinearGeneral: ("dot_general", None),
                    nnx.Einsum: ("einsum_op", jnp.einsum),
                    nnx.Conv: ("conv_general_dilated", jax.lax.conv_general_dilated)}


def _view(layer, path: str):
    """The layer's kernel matrix view (``pfa_jax.products``), or an error naming what no rule takes."""
    kernel = layer.kernel[...]
    if isinstance(layer, nnx.LinearGeneral):
        if layer.batch_axis:
            raise ValueError(f"with_rule: layer {path!r} has batch_axis={dict(layer.batch_axis)}: "
                             "a batch of matrices; give it 'bp' in the rule map")
        return products.view_of(kernel.ndim, range(len(layer.in_features)))
    if isinstance(layer, nnx.Einsum):
        if layer.einsum_str is None:
            raise ValueError(f"with_rule: layer {path!r} sets its einsum equation only when "
                             "called; give it at construction (einsum_str=) or 'bp' in the map")
        x_labels = layer.einsum_str.replace(" ", "").split(",")[0]
        return products.view_of(kernel.ndim,
                                products.einsum_axes(path, layer.einsum_str, len(x_labels))[1])
    if isinstance(layer, nnx.Conv) and layer.mask is not None:
        raise ValueError(f"with_rule: layer {path!r} is a masked conv, which no rule takes; give "
                         "it 'bp' in the rule map")
    return None


def _kernel_paths(model) -> set[str]:
    """Paths of the modules holding a ``kernel`` parameter."""
    return {"/".join(map(str, path[:-1])) for path, _ in nnx.to_flat_state(nnx.state(model, nnx.Param))
            if path[-1] == "kernel"}


def with_rule(model: nnx.Module, rule: pnn.RuleSpec, *, rngs: nnx.Rngs,
              num_classes: int | None = None) -> nnx.Module:
    """``model`` with its linear layers following ``rule`` (a rule, a name, or a map from layer
    paths to rules with a ``'default'``), changed in place (module docstring) and returned.

    Args:
      model: any ``flax.nnx`` module.
      rule: the rule spec, as for ``pfa_jax.nnx.Linear`` and the linen ``with_rule``.
      rngs: the keys of the feedback (its ``params`` stream; ``feedback`` / ``mirror`` streams of
        rules that draw per step are split from it).
      num_classes: the width of the model's outputs, for DFA and its variants.

    Returns:
      ``model`` itself: its ``nnx.Linear`` / ``Einsum`` / ``Conv`` layers now take the rule's
      backward, with their feedback as ``pfa_jax.nnx.Feedback`` variables.

    Example:
      >>> from flax import nnx
      >>> import jax, jax.numpy as jnp
      >>> import pfa_jax as pj
      >>> mlp = nnx.Sequential(nnx.Linear(4, 8, rngs=nnx.Rngs(0)), nnx.relu,
      ...                      nnx.Linear(8, 3, rngs=nnx.Rngs(1)))
      >>> mlp = pj.nnx.with_rule(mlp, "fa", rngs=nnx.Rngs(2))
      >>> jax.tree.map(jnp.shape, nnx.to_pure_dict(nnx.state(mlp, pj.nnx.Feedback)))
      {'layers': {0: {'B': (4, 8)}, 2: {'B': (8, 3)}}}
    """
    found = [("/".join(map(str, path)), layer) for path, layer in nnx.iter_modules(model)
             if type(layer) in ROUTED]
    known = {path for path, _ in found} | {p for p, _ in rule_layers(model)}
    kernels, bp = _kernel_paths(model), pnn.explicit_bp(rule)
    if isinstance(rule, Mapping):
        pnn.refuse_unknown_layers(rule, known | kernels)
    unreached = sorted(kernels - known - bp)
    if unreached:
        raise pnn.UnreachedLayerError(
            f"with_rule: no rule reaches the kernel(s) {[f'{p}/kernel' for p in unreached]} "
            "(modules of a class that with_rule does not route: nnx.Linear, nnx.LinearGeneral, "
            "nnx.Einsum, nnx.Conv and the flax layers built on them are routed); give each 'bp' "
            "in the rule map, or build it from pfa_jax.nnx layers")
    output_error = False
    for path, layer in found:
        field, default = _DEFAULT_PRODUCT[type(layer)]
        if getattr(layer, field) is not default or getattr(layer, "dot_general_cls", None):
            if path in bp:
                continue
            raise ValueError(f"with_rule: layer {path!r} ({type(layer).__name__}) sets its own "
                             f"{field}; a rule replaces that product, so give this layer 'bp' in "
                             "the rule map or drop it")
        chosen = pnn.resolve_rule(rule, path)
        if chosen.output_error:
            if num_classes is None:
                raise ValueError(f"with_rule: layer {path!r} follows {chosen.name!r}, which needs "
                                 "the model's number of classes: pass num_classes=")
            chosen, output_error = chosen.for_classes(num_classes), True
        view = _view(layer, path)
        layer.__class__ = ROUTED[type(layer)]
        layer.path, layer.view = path, view
        layer.add_feedback(chosen, layer.kernel[...] if view is None else view(layer.kernel[...]),
                           rngs)
    if output_error:
        model.__class__ = _tapped(type(model))
    return model


@functools.cache
def _tapped(cls):
    """``cls`` whose ``__call__`` adds the DFA taps to its outputs."""
    def __call__(self, *args, **kwargs):
        return add_taps(self, cls.__call__(self, *args, **kwargs))
    return type(cls.__name__, (cls,), {"__call__": __call__, "__module__": cls.__module__,
                                       "__doc__": cls.__doc__})
