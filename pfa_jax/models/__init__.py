"""The models of the papers' experiments, behind a registry.

    model = pfa_jax.models.get("resnet20", rule="pfa", num_classes=10)
    variables = model.init({"params": key}, images)              # images: (N, H, W, C) float32
    logits = model.apply(variables, images)                      # eval mode
    logits, updates = model.apply(variables, images, train=True, mutable=["batch_stats"])

=========  ===================================================================  ==============
name       architecture                                                         params (10 cl.)
=========  ===================================================================  ==============
ffn2       MLP 784-512-512-10, ReLU, bias (options ``widths``, ``activation``)  669,706
lenet      LeNet-5: conv 6@5x5, pool, conv 16@5x5, pool, 120, 84, output        61,706 (28x28x1)
resnet8    CIFAR ResNet, 3 stages x 1 BasicBlock, option-A shortcuts, BN        75,290
resnet20   CIFAR ResNet, 3 stages x 3 BasicBlocks, option-A shortcuts, BN       269,722
resnet56   CIFAR ResNet, 3 stages x 9 BasicBlocks, option-A shortcuts, BN       853,018
resnet18   ImageNet ResNet-18, option-B shortcuts, BN                           11,689,512 (1000)
vit        ViT: 7x7 patches, 2 pre-LN blocks of dim 64, 4 heads, MLP 128, cls   72,074 (28x28x1)
transformer_lm  causal LM: 2 pre-LN blocks of dim 64, 4 heads, context 128      (vocabulary-sized)
=========  ===================================================================  ==============

Every model is a ``flax.linen`` Module with fields ``rule`` (a rule, its name, or a per-layer
mapping, see ``pfa_jax.nn``), ``num_classes`` and ``axis_name`` (the BatchNorm ``axis_name`` for
``pmap``), called as ``model(x, train=False)``. Only ``Dense`` / ``Conv`` layers follow the rule;
BatchNorm, activations, pooling and residual additions use ordinary autodiff. ``vit`` and
``transformer_lm`` (``pfa_jax.models.transformer``) are written with Flax's own layers and come
wrapped by ``pfa_jax.nn.with_rule``; they take ``rule`` and ``num_classes`` the same way.
"""
from __future__ import annotations

import dataclasses
import typing

import flax.linen as nn

from pfa_jax import fields
from pfa_jax import nn as pnn
from pfa_jax.models.base import Model
from pfa_jax.models.lenet import LeNet
from pfa_jax.models.mlp import MLP
from pfa_jax.models.resnet import CifarResNet, ImageNetResNet
from pfa_jax.models.transformer import TransformerLM, ViT

# name -> (class, fields fixed by the name)
_REGISTRY: dict[str, tuple[type[nn.Module], dict]] = {
    "ffn2": (MLP, {}),
    "lenet": (LeNet, {}),
    "resnet8": (CifarResNet, {"blocks_per_stage": 1}),
    "resnet20": (CifarResNet, {"blocks_per_stage": 3}),
    "resnet56": (CifarResNet, {"blocks_per_stage": 9}),
    "resnet18": (ImageNetResNet, {"stage_sizes": (2, 2, 2, 2)}),
    "vit": (ViT, {}),
    "transformer_lm": (TransformerLM, {}),
}


def names() -> tuple[str, ...]:
    """Names of every registered model."""
    return tuple(_REGISTRY)


def options(name: str) -> tuple[str, ...]:
    """The keyword arguments ``get(name, ...)`` accepts."""
    cls, fixed = _entry(name)
    return tuple(sorted(f.name for f in dataclasses.fields(cls)
                        if f.init and f.name not in fixed and f.name not in ("parent", "name")))


def get(name: str, rule="bp", num_classes: int = 10, **kwargs) -> nn.Module:
    """The model ``name`` whose ``Dense`` / ``Conv`` layers follow ``rule``.

    Args:
      name: a registered model (``names()``: ``'ffn2'``, ``'lenet'``, ``'resnet20'``, ``'vit'``, ...).
      rule: a ``Rule``, a rule's name, or a map from layer paths to rules with a ``'default'``
        (``pfa_jax.nn.resolve_rule``).
      num_classes: the size of the output layer.
      **kwargs: the model's options (``options(name)``), e.g. ``widths`` of ``ffn2``. Options of the
        wrong type or non-positive sizes raise ``ValueError`` naming them. Lists
        (``widths=[512, 512]``) become tuples, so the model stays hashable (a static ``jit``
        argument).

    Returns:
      An unbound ``flax.linen`` module: ``model.apply(variables, images, train=...)``.

    Example:
      >>> import jax, jax.numpy as jnp, pfa_jax as pj
      >>> model = pj.models.get("ffn2", rule="fa", widths=(16,))
      >>> variables = model.init(jax.random.key(0), jnp.ones((1, 8, 8, 1)), train=False)
      >>> jax.tree.map(jnp.shape, variables["feedback"])
      {'hidden_0': {'B': (64, 16)}, 'output': {'B': (16, 10)}}
    """
    cls, fixed = _entry(name)
    unknown = sorted(set(kwargs) - set(options(name)))
    if unknown:
        raise ValueError(f"model {name!r} has no option(s) {unknown}; valid options: "
                         f"{list(options(name))}")
    kwargs = {k: tuple(v) if isinstance(v, list) else v for k, v in kwargs.items()}
    _check_sizes(cls, name, {"num_classes": num_classes, **kwargs})
    rule = pnn.bind_classes(rule, num_classes)
    if not issubclass(cls, Model):  # written with Flax's own layers: under the rule by with_rule
        return pnn.with_rule(cls(num_classes=num_classes, **fixed, **kwargs), rule)
    return cls(rule=rule, num_classes=num_classes, **fixed, **kwargs)


def _check_sizes(cls, name: str, options: dict) -> None:
    """Types as annotated (``pfa_jax.fields``); every int option (a count or a width) >= 1."""
    fields.check(cls, options, f"model {name!r}: ")
    hints = typing.get_type_hints(cls)
    for key, value in options.items():
        if hints.get(key) in (int, tuple[int, ...]) and min(
                value if isinstance(value, tuple) else (value,), default=1) < 1:
            raise ValueError(f"model {name!r}: {key}={value!r} must be positive (a count of units "
                             "or blocks)")


def _entry(name: str):
    if name not in _REGISTRY:
        raise ValueError(f"unknown model {name!r}; valid models: {', '.join(names())}")
    return _REGISTRY[name]


# The classes stay importable from here (``pfa_jax.models.MLP``); the API reference documents them
# in their own modules, where their annotations resolve.
__all__ = ["get", "names", "options"]
