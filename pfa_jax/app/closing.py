"""The measurements a run makes once, after its last epoch, as far as its spec asks for them:
sharpness on the first ``sharpness.examples`` training examples; adversarial and noise robustness
on the first ``robustness.examples`` test examples, with epsilons and sigmas in pixel units (the
images' [0, 1] scale): the perturbation of channel ``c`` is scaled by ``1 / std_c`` of the
standardisation and adversarial images are clipped to the standardised images of pixel values 0
and 1 (``pixel_units``). They run replicated on the run's devices."""
from __future__ import annotations

import os

import jax
import numpy as np

from pfa_jax import metrics
from pfa_jax.app import data, placement

__all__ = ["batches", "machine", "measure", "pixel_units"]


def batches(images, labels, count: int, batch_size: int, where: placement.Placement) -> list[dict]:
    """The first ``count`` examples as batches of at most ``batch_size``, replicated on the
    devices of ``where``."""
    return where.whole([{"image": images[i:i + batch_size], "label": labels[i:i + batch_size]}
                        for i in range(0, min(count, len(labels)), batch_size)])


def pixel_units(dataset: data.Dataset) -> dict:
    """``scale``, ``lower``, ``upper`` for ``pfa_jax.metrics``' attacks and noise on standardised
    images: radii in pixel units, results kept within the pixel range [0, 1]."""
    mean, std = np.asarray(dataset.mean, np.float32), np.asarray(dataset.std, np.float32)
    return {"scale": 1.0 / std, "lower": -mean / std, "upper": (1.0 - mean) / std}


def measure(state, dataset: data.Dataset, spec, key, where: placement.Placement) -> dict:
    """``sharpness``, ``adversarial`` (per attack) and ``noise``, as far as ``spec`` asks."""
    results, sharp, robust = {}, spec.sharpness, spec.robustness
    batch_size = spec.data.eval_batch_size
    if sharp is not None:
        train = batches(dataset.train_images, dataset.train_labels, sharp.examples, batch_size,
                        where)
        results["sharpness"] = metrics.sharpness(
            state, train, jax.random.fold_in(key, 0), iterations=sharp.iterations,
            tolerance=sharp.tolerance, probes=sharp.probes)
    test = batches(dataset.test_images, dataset.test_labels, robust.examples, batch_size, where)
    pixels = pixel_units(dataset)
    if robust.adversarial_epsilons:
        results["adversarial"] = {attack: metrics.adversarial(
            state, test, robust.adversarial_epsilons, attack, jax.random.fold_in(key, 1),
            steps=robust.pgd_steps, **pixels) for attack in robust.attacks}
    if robust.noise_sigmas:
        results["noise"] = metrics.corruption(state, test, robust.noise_sigmas,
                                              jax.random.fold_in(key, 2), **pixels)
    return results


def machine() -> str:
    """The hardware this process trains on, in a few words: the accelerator's kind and count
    (``'NVIDIA H100 80GB HBM3'``, ``'4 x TPU v4'``), or ``'CPU, N cores'``."""
    devices = jax.devices()
    if devices[0].platform == "cpu":
        return f"CPU, {os.cpu_count()} cores"
    kind = devices[0].device_kind
    return kind if len(devices) == 1 else f"{len(devices)} x {kind}"
