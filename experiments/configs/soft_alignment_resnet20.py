"""Soft alignment on ResNet-20, Fashion-MNIST zero-padded to 32x32 (offline): see ``_soft_alignment``
for the settings compared and the measurements.

Sized for 2 CPU cores (its wall times are in the README), so far shorter than the deep-conv
schedule of ``resnet20_fashion_mnist``: the first 8,000 training and the first 8,000 test images,
3 epochs of batch 128 (186 steps) with SGD momentum 0.9, lr 0.1 then 0.01 from epoch 2, wd 1e-4, no
augmentation; noise pretraining 200 steps (about as many as the data training); sharpness on 256
training images with at most 20 power iterations and 10 Hutchinson probes; robustness on 500 test
images. On a machine with the time, ``--set limit=0 --set epochs=15 --set
"optimizer.lr_milestones=(8, 12)"`` gives the deep-conv schedule (noise pretraining stays 200
steps)."""
from experiments.configs import _soft_alignment, common, resnet20_fashion_mnist

NOISE_PRETRAIN_STEPS = 200


def get_config():
    config = resnet20_fashion_mnist.get_config()
    common.set_values(config, {"limit": 8_000, "epochs": 3, **_soft_alignment.MEASUREMENTS,
                               "sharpness.examples": 256, "sharpness.iterations": 20,
                               "sharpness.probes": 10, "robustness.examples": 500})
    config.optimizer.lr_milestones = (2,)
    return config


def runs():
    return _soft_alignment.runs(seeds=(0,), noise_pretrain_steps=NOISE_PRETRAIN_STEPS)
