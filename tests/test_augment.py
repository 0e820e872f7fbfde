"""Crop-flip augmentation against an explicit per-image reference, and the epoch that applies it."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

import pfa_jax as pj
from pfa_jax import augment


def candidates(image, pad):
    """Every pad-pixel translation (zero fill) of ``image``, flipped or not."""
    h, w, _ = image.shape
    padded = np.pad(image, ((pad, pad), (pad, pad), (0, 0)))
    crops = [padded[i:i + h, j:j + w] for i in range(2 * pad + 1) for j in range(2 * pad + 1)]
    return crops + [c[:, ::-1] for c in crops]


def test_crop_flip_is_a_translation_or_flip_of_each_image():
    images = np.asarray(jax.random.normal(jax.random.key(0), (64, 8, 8, 3)))
    out = np.asarray(augment.crop_flip(jax.random.key(1), jnp.asarray(images), pad=2))
    assert out.shape == images.shape
    matches = []
    for image, result in zip(images, out):
        found = [k for k, c in enumerate(candidates(image, 2)) if np.array_equal(c, result)]
        assert found, "output is no translation / flip of its input"
        matches.append(found[0])
    assert len(set(matches)) > 10  # offsets and flips differ between images
    assert any(k >= 25 for k in matches) and any(k < 25 for k in matches)  # both flipped and not
    again = augment.crop_flip(jax.random.key(1), jnp.asarray(images), pad=2)
    np.testing.assert_array_equal(out, again)


def test_unknown_augmentation_is_refused():
    with pytest.raises(ValueError, match="augment='cutout' is unknown; valid: none, crop_flip"):
        augment.apply("cutout", jax.random.key(0), jnp.zeros((1, 4, 4, 1)))


def test_epoch_with_augmentation_trains_and_differs_from_without():
    images = jax.random.normal(jax.random.key(0), (64, 8, 8, 1))
    labels = jnp.arange(64) % 10
    model = pj.models.get("ffn2", rule="pfa", widths=(16,))
    fresh = lambda: pj.train.create_train_state(jax.random.key(1), model, images[:1],  # noqa: E731
                                                {"learning_rate": 0.05})
    plain, _ = pj.train.train_epoch(fresh(), images, labels, jax.random.key(2), 16)
    augmented, steps = pj.train.train_epoch(fresh(), images, labels, jax.random.key(2), 16,
                                            "crop_flip")
    assert steps["loss"].shape == (4,) and bool(jnp.all(jnp.isfinite(steps["loss"])))
    difference = jax.tree.map(lambda a, b: float(jnp.max(jnp.abs(a - b))), plain.params,
                              augmented.params)
    assert max(jax.tree.leaves(difference)) > 1e-4
