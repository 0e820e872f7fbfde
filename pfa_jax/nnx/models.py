"""The models of ``pfa_jax.models`` as Flax NNX modules, behind the same names.

    model = pfa_jax.nnx.models.get("resnet20", rule="pfa", num_classes=10,
                                   input_shape=(32, 32, 3), rngs=nnx.Rngs(0))
    logits = model(images, train=True)

Each has the architecture, the layer and BatchNorm names, the BatchNorm settings and the option
names of its linen twin (``pfa_jax.models``), so its variables map one to one onto the twin's
(``pfa_jax.nnx.to_linen`` / ``from_linen``) and ``model.linen`` is that twin. NNX builds eagerly, so
a model takes its ``input_shape`` (one example, channels last). ``rule`` is a rule, a name or a
per-layer mapping with a ``'default'`` entry, resolved per layer path (``'stage1_block0/conv0'``)
as in linen; DFA layers are told ``num_classes``. Only ``Linear`` / ``Conv`` follow the rule.
"""
from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import Any

import jax.numpy as jnp
from flax import nnx

from pfa_jax import models as linen_models
from pfa_jax import nn as pnn
from pfa_jax.models import base as linen_base
from pfa_jax.nnx import transformer
from pfa_jax.nnx.intercept import with_rule
from pfa_jax.nnx.layers import Conv, Linear, add_taps, rule_layers

__all__ = ["BasicBlock", "CifarResNet", "get", "ImageNetResNet", "LeNet", "MLP", "Model", "ResNet"]


class Model(nnx.Module):
    """What every model shares: per-layer rules, conv + BatchNorm, the classifier head."""

    def __init__(self, name: str, rule, num_classes: int, input_shape: Sequence[int], dtype,
                 axis_name, **options):
        self.linen = linen_models.get(name, rule=rule, num_classes=num_classes, dtype=dtype,
                                      axis_name=axis_name, **options)
        self.input_shape = tuple(input_shape)
        self.dtype, self.axis_name = dtype, axis_name

    def rule_for(self, path: str):
        return pnn.resolve_rule(self.linen.rule, path)

    def conv_bn(self, path: str, in_features: int, features: int, kernel: int, strides: int,
                rngs: nnx.Rngs):
        """``(conv, bn)``: conv without bias, symmetric padding ``kernel // 2``, then BatchNorm
        (PyTorch's defaults, as ``pfa_jax.models.base``)."""
        conv = Conv(in_features, features, kernel, strides=strides, padding=kernel // 2,
                    use_bias=False, rule=self.rule_for(path), dtype=self.dtype, rngs=rngs)
        bn = nnx.BatchNorm(features, momentum=0.9, epsilon=1e-5, axis_name=self.axis_name,
                           dtype=self.dtype, rngs=rngs)
        return conv, bn

    def head(self, in_features: int, widths: Sequence[int], prefix: str, rngs: nnx.Rngs,
             activation: str = "relu"):
        """``Linear`` layers ``{prefix}_{i}``, each followed by ``activation`` (a name of
        ``pfa_jax.models.base.ACTIVATIONS``), and the ``output`` layer."""
        for i, width in enumerate(widths):
            name = f"{prefix}_{i}"
            setattr(self, name, Linear(in_features, width, rule=self.rule_for(name),
                                       dtype=self.dtype, rngs=rngs))
            in_features = width
        self.head_names = tuple(f"{prefix}_{i}" for i in range(len(widths)))
        self.head_activation = activation
        self.output = Linear(in_features, self.linen.num_classes, rule=self.rule_for("output"),
                             dtype=self.dtype, rngs=rngs)

    def classify(self, x):
        """Flatten, the head, the DFA taps added, float32 logits."""
        x = x.reshape(x.shape[0], -1)
        for name in self.head_names:
            x = linen_base.activation(self.head_activation)(getattr(self, name)(x))
        return jnp.asarray(add_taps(self, self.output(x)), jnp.float32)


class MLP(Model):
    def __init__(self, *, rule="bp", num_classes=10, input_shape=(28, 28, 1),
                 widths=(512, 512), activation="relu", dtype=None, axis_name=None,
                 rngs: nnx.Rngs):
        super().__init__("ffn2", rule, num_classes, input_shape, dtype, axis_name,
                         widths=tuple(widths), activation=activation)
        self.head(math.prod(input_shape), widths, "hidden", rngs, activation)

    def __call__(self, x, train: bool = False):
        return self.classify(x)


class LeNet(Model):
    def __init__(self, *, rule="bp", num_classes=10, input_shape=(28, 28, 1), dtype=None,
                 axis_name=None, rngs: nnx.Rngs):
        super().__init__("lenet", rule, num_classes, input_shape, dtype, axis_name)
        h, w, c = input_shape
        self.conv_0 = Conv(c, 6, 5, padding="SAME", rule=self.rule_for("conv_0"), dtype=dtype,
                           rngs=rngs)
        self.conv_1 = Conv(6, 16, 5, padding="VALID", rule=self.rule_for("conv_1"), dtype=dtype,
                           rngs=rngs)
        self.head(16 * ((h // 2 - 4) // 2) * ((w // 2 - 4) // 2), (120, 84), "dense", rngs)

    def __call__(self, x, train: bool = False):
        for conv in (self.conv_0, self.conv_1):
            x = nnx.max_pool(nnx.relu(conv(x)), (2, 2), strides=(2, 2))
        return self.classify(x)


class BasicBlock(nnx.Module):
    """conv3x3(stride)-BN-ReLU-conv3x3-BN plus the shortcut ('A' or 'B'), then ReLU."""

    def __init__(self, model: Model, path: str, in_features: int, features: int, strides: int,
                 shortcut: str, rngs: nnx.Rngs):
        self.conv0, self.bn0 = model.conv_bn(f"{path}/conv0", in_features, features, 3, strides,
                                             rngs)
        self.conv1, self.bn1 = model.conv_bn(f"{path}/conv1", features, features, 3, 1, rngs)
        self.strides, self.mode, self.pad = strides, None, 0
        if strides != 1 or in_features != features:
            self.mode = shortcut
            if shortcut == "B":
                self.shortcut, self.shortcut_bn = model.conv_bn(
                    f"{path}/shortcut", in_features, features, 1, strides, rngs)
            else:
                self.pad = features - in_features

    def __call__(self, x, train: bool):
        bn = {"use_running_average": not train}
        y = nnx.relu(self.bn0(self.conv0(x), **bn))
        y = self.bn1(self.conv1(y), **bn)
        if self.mode == "B":
            x = self.shortcut_bn(self.shortcut(x), **bn)
        elif self.mode == "A":
            x = x[:, ::self.strides, ::self.strides, :]
            x = jnp.pad(x, ((0, 0),) * 3 + ((self.pad // 2, self.pad - self.pad // 2),))
        return nnx.relu(y + x)


class ResNet(Model):
    def stages(self, in_features: int, widths: Sequence[int], blocks: Sequence[int], shortcut: str,
               rngs: nnx.Rngs):
        names = []
        for s, (features, count) in enumerate(zip(widths, blocks), start=1):
            for b in range(count):
                name = f"stage{s}_block{b}"
                setattr(self, name, BasicBlock(self, name, in_features, features,
                                               2 if s > 1 and b == 0 else 1, shortcut, rngs))
                names.append(name)
                in_features = features
        self.block_names = tuple(names)
        self.head(in_features, (), "dense", rngs)

    def blocks_and_head(self, x, train: bool):
        for name in self.block_names:
            x = getattr(self, name)(x, train)
        return self.classify(jnp.mean(x, axis=(1, 2)))


class CifarResNet(ResNet):
    def __init__(self, *, rule="bp", num_classes=10, input_shape=(32, 32, 3), blocks_per_stage=3,
                 dtype=None, axis_name=None, rngs: nnx.Rngs, name: str = "resnet20"):
        super().__init__(name, rule, num_classes, input_shape, dtype, axis_name)
        if blocks_per_stage != self.linen.blocks_per_stage:
            self.linen = self.linen.clone(blocks_per_stage=blocks_per_stage)
        self.stem, self.stem_bn = self.conv_bn("stem", input_shape[-1], 16, 3, 1, rngs)
        self.stages(16, (16, 32, 64), (blocks_per_stage,) * 3, "A", rngs)

    def __call__(self, x, train: bool = False):
        x = nnx.relu(self.stem_bn(self.stem(x), use_running_average=not train))
        return self.blocks_and_head(x, train)


class ImageNetResNet(ResNet):
    def __init__(self, *, rule="bp", num_classes=1000, input_shape=(224, 224, 3), dtype=None,
                 axis_name=None, rngs: nnx.Rngs):
        super().__init__("resnet18", rule, num_classes, input_shape, dtype, axis_name)
        self.stem, self.stem_bn = self.conv_bn("stem", input_shape[-1], 64, 7, 2, rngs)
        self.stages(64, (64, 128, 256, 512), self.linen.stage_sizes, "B", rngs)

    def __call__(self, x, train: bool = False):
        x = nnx.relu(self.stem_bn(self.stem(x), use_running_average=not train))
        x = nnx.max_pool(x, (3, 3), strides=(2, 2), padding=((1, 1), (1, 1)))
        return self.blocks_and_head(x, train)


def _resnet8(**kwargs):
    return CifarResNet(blocks_per_stage=1, name="resnet8", **kwargs)


def _resnet56(**kwargs):
    return CifarResNet(blocks_per_stage=9, name="resnet56", **kwargs)


def _with_flax_layers(cls, name: str):
    """A model written with NNX's own layers, under the rule by ``with_rule``, with its twin."""
    def build(*, rule, num_classes, input_shape, rngs, **options):
        linen = linen_models.get(name, rule=rule, num_classes=num_classes, **options)
        model = with_rule(cls(input_shape=input_shape, num_classes=num_classes, rngs=rngs,
                              **options), rule, rngs=rngs, num_classes=num_classes)
        model.linen, model.input_shape = linen, tuple(input_shape)
        return model
    return build


_REGISTRY: dict[str, Any] = {"ffn2": MLP, "lenet": LeNet, "resnet8": _resnet8,
                             "resnet20": CifarResNet, "resnet56": _resnet56,
                             "resnet18": ImageNetResNet,
                             "vit": _with_flax_layers(transformer.ViT, "vit"),
                             "transformer_lm": _with_flax_layers(transformer.TransformerLM,
                                                                 "transformer_lm")}


def get(name: str, *, rngs: nnx.Rngs, input_shape: Sequence[int], rule="bp",
        num_classes: int = 10, **options) -> Model:
    """The NNX model ``name`` (``pfa_jax.models.names()``) for inputs of ``input_shape``."""
    if name not in _REGISTRY:
        raise ValueError(f"unknown model {name!r}; valid models: {', '.join(_REGISTRY)}")
    model = _REGISTRY[name](rule=rule, num_classes=num_classes, input_shape=tuple(input_shape),
                            rngs=rngs, **options)
    if isinstance(rule, Mapping):  # a misspelt path would silently train with the default rule
        pnn.refuse_unknown_layers(rule, {path for path, _ in rule_layers(model)})
    return model
