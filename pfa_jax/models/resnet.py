"""Residual networks (He et al. 2016) built from ``BasicBlock``s.

``BasicBlock``: conv3x3(stride)-BN-ReLU-conv3x3-BN (``conv0``, ``bn0``, ``conv1``, ``bn1``), plus the
shortcut, then ReLU. Convs have no bias and symmetric padding ``kernel // 2`` (PyTorch's convention;
the same output sizes as SAME, which pads stride-2 convs on the high side only).

* ``resnet8`` / ``resnet20`` / ``resnet56`` (``CifarResNet``, depth ``6n + 2`` with ``n = 1`` / ``3``
  / ``9`` blocks per stage): stem conv3x3 16 + BN + ReLU (``stem``, ``stem_bn``); stages of
  16/32/64 channels, the
  first block of stages 2 and 3 with stride 2; global average pool; ``output`` Dense. Option-A
  shortcuts: where the shape changes, the shortcut is ``x[:, ::2, ::2, :]`` zero-padded in channels
  on both sides (as the widely used PyTorch CIFAR ResNets do), with no parameters.
* ``resnet18`` (``ImageNetResNet``): stem conv7x7/2 64 + BN + ReLU (``stem``, ``stem_bn``) and a
  3x3/2 max-pool (padding 1, as torchvision); stages of 64/128/256/512 channels with 2 blocks each;
  option-B shortcuts where the shape changes: conv1x1/2 + BN (``shortcut``, ``shortcut_bn``); global
  average pool; ``output`` Dense.

Blocks are named ``stage{s}_block{b}`` (``s`` from 1, ``b`` from 0). Only the convs and the output
layer follow the rule; BatchNorm, ReLU, pooling, zero padding and the residual additions use ordinary
autodiff.
"""
from __future__ import annotations

from collections.abc import Sequence

import flax.linen as nn
import jax.numpy as jnp

from pfa_jax.models.base import Layers, Model

__all__ = ["BasicBlock", "CifarResNet", "ImageNetResNet", "ResNet"]


class BasicBlock(Layers):
    features: int = 16
    strides: int = 1
    shortcut: str = "A"  # on a change of shape: 'A' strided, zero-padded identity; 'B' conv1x1 + BN

    @nn.compact
    def __call__(self, x, train: bool = False):
        y = nn.relu(self.conv_bn(x, self.features, 3, self.strides, train, ("conv0", "bn0")))
        y = self.conv_bn(y, self.features, 3, 1, train, ("conv1", "bn1"))
        return nn.relu(y + self.project(x, train))

    def project(self, x, train: bool):
        if self.strides == 1 and x.shape[-1] == self.features:
            return x
        if self.shortcut == "B":
            names = ("shortcut", "shortcut_bn")
            return self.conv_bn(x, self.features, 1, self.strides, train, names)
        if self.shortcut != "A":
            raise ValueError(f"BasicBlock: shortcut={self.shortcut!r}; valid: 'A', 'B'")
        x = x[:, ::self.strides, ::self.strides, :]
        pad = self.features - x.shape[-1]
        return jnp.pad(x, ((0, 0), (0, 0), (0, 0), (pad // 2, pad - pad // 2)))


class ResNet(Model):
    """Stem, stages of ``BasicBlock``s, global average pool, ``output``."""

    def stages_and_head(self, x, widths: Sequence[int], blocks: Sequence[int], shortcut: str,
                        train: bool):
        """Stages of ``blocks[s]`` blocks of ``widths[s]`` channels (stride 2 entering stages 2+),
        then global average pooling and the ``output`` layer."""
        for s, (features, count) in enumerate(zip(widths, blocks), start=1):
            for b in range(count):
                x = BasicBlock(features=features, strides=2 if s > 1 and b == 0 else 1,
                               shortcut=shortcut, rule=self.rule, axis_name=self.axis_name,
                               dtype=self.dtype, name=f"stage{s}_block{b}")(x, train)
        return self.classifier(jnp.mean(x, axis=(1, 2)))


class CifarResNet(ResNet):
    blocks_per_stage: int = 3

    @nn.compact
    def __call__(self, x, train: bool = False):
        x = nn.relu(self.conv_bn(self.inputs(x), 16, 3, 1, train, ("stem", "stem_bn")))
        return self.stages_and_head(x, (16, 32, 64), (self.blocks_per_stage,) * 3, "A", train)


class ImageNetResNet(ResNet):
    stage_sizes: tuple[int, ...] = (2, 2, 2, 2)

    @nn.compact
    def __call__(self, x, train: bool = False):
        x = nn.relu(self.conv_bn(self.inputs(x), 64, 7, 2, train, ("stem", "stem_bn")))
        x = nn.max_pool(x, (3, 3), strides=(2, 2), padding=((1, 1), (1, 1)))
        return self.stages_and_head(x, (64, 128, 256, 512), self.stage_sizes, "B", train)
