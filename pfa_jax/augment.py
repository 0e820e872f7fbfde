"""Training-time data augmentation, as pure functions of a key (run inside the compiled epoch).

``crop_flip`` is the CIFAR recipe of the PFA paper's Fig. 4 (He et al. 2016): pad each image by
``pad`` pixels with zeros on every side (zero is the channel mean after standardisation), take a
random ``H x W`` crop, and flip it horizontally with probability 1/2. Each image draws its own offset
and flip.
"""
from __future__ import annotations

import jax
import jax.numpy as jnp
from jax import lax

__all__ = ["apply", "AUGMENTATIONS"]

AUGMENTATIONS = ("none", "crop_flip")


def check(name: str) -> None:
    if name not in AUGMENTATIONS:
        raise ValueError(f"augment={name!r} is unknown; valid: {', '.join(AUGMENTATIONS)}")


def crop_flip(key: jax.Array, images: jax.Array, pad: int = 4) -> jax.Array:
    """Random ``pad``-pixel translation (zero fill) and horizontal flip of NHWC ``images``."""
    n, height, width, _ = images.shape
    padded = jnp.pad(images, ((0, 0), (pad, pad), (pad, pad), (0, 0)))
    offset_key, flip_key = jax.random.split(key)
    offsets = jax.random.randint(offset_key, (n, 2), 0, 2 * pad + 1)
    flips = jax.random.bernoulli(flip_key, 0.5, (n,))

    def one(image, offset, flip):
        crop = lax.dynamic_slice(image, (offset[0], offset[1], 0), (height, width, image.shape[-1]))
        return jnp.where(flip, crop[:, ::-1], crop)

    return jax.vmap(one)(padded, offsets, flips)


def apply(name: str, key: jax.Array, images: jax.Array) -> jax.Array:
    """``images`` augmented by ``name`` (one of ``AUGMENTATIONS``)."""
    check(name)
    return images if name == "none" else crop_flip(key, images)
