"""Soft alignment on ResNet-20, Fashion-MNIST padded to 32x32 (offline), with the shortened deep-conv
schedule of ``resnet20_fashion_mnist``: see ``_soft_alignment`` for the settings compared and the
measurements."""
from experiments.configs import _soft_alignment, resnet20_fashion_mnist


def get_config():
    config = resnet20_fashion_mnist.get_config()
    config.update(_soft_alignment.MEASUREMENTS)
    return config


def runs():
    return _soft_alignment.runs(seeds=(0,))
