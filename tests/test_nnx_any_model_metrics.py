"""``pfa_jax.metrics`` on any NNX model (not only ``pfa_jax.nnx.models``'): its own layers under
``pfa_jax.nnx.with_rule`` or ``pfa_jax.nnx.Linear``, Dropout included, against angles computed here
from ``nnx.grad``."""
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

import pfa_jax as pj


class Net(nnx.Module):
    """An own NNX model: no ``input_shape``, no linen twin, list-indexed layers, no ``train``."""

    def __init__(self, rngs, rate=0.0, own="kp"):
        self.layers = nnx.List([nnx.Linear(12, 16, rngs=rngs), nnx.Linear(16, 16, rngs=rngs)])
        self.own = pj.nnx.Linear(16, 8, rule=own, rngs=rngs)
        self.drop = nnx.Dropout(rate, rngs=rngs)
        self.head = nnx.Linear(8, 4, rngs=rngs)

    def __call__(self, x):
        for layer in self.layers:
            x = self.drop(nnx.relu(layer(x)))
        return self.head(nnx.relu(self.own(x)))


BATCH = {"image": jax.random.normal(jax.random.key(3), (6, 12)), "label": jnp.arange(6) % 4}
PATHS = ["head", "layers/0", "layers/1", "own"]


def _loss(model):
    return optax.softmax_cross_entropy_with_integer_labels(model(BATCH["image"]),
                                                           BATCH["label"]).mean()


def _kernel_grads(model):
    grads = nnx.to_pure_dict(nnx.grad(_loss)(model))
    return {"head": grads["head"]["kernel"], "own": grads["own"]["kernel"],
            **{f"layers/{i}": grads["layers"][i]["kernel"] for i in (0, 1)}}


def test_alignment_and_gradient_alignment_equal_the_angles_computed_by_hand():
    model = pj.nnx.with_rule(Net(nnx.Rngs(0)), {"default": "fa", "head": "bp"}, rngs=nnx.Rngs(1))
    alignment = pj.metrics.alignment(model)
    assert sorted(alignment) == PATHS
    assert alignment["head"]["weight_angle"] < 1e-3  # bp's head: its feedback is its kernel
    np.testing.assert_allclose(alignment["layers/1"]["weight_angle"],
                               pj.metrics.angle(model.layers[1].B[...], model.layers[1].kernel[...]),
                               rtol=1e-6)
    got = pj.metrics.gradient_alignment(model, BATCH)
    assert sorted(got) == PATHS
    rule = _kernel_grads(model)
    with pj.nn.backprop():
        bp = _kernel_grads(model)
    for path in PATHS:
        np.testing.assert_allclose(got[path]["grad_angle"], pj.metrics.angle(rule[path], bp[path]),
                                   atol=1e-3, err_msg=path)
    assert got["head"]["grad_angle"] < 1e-3 and got["layers/0"]["grad_angle"] > 1.0


def test_with_dropout_both_passes_of_a_measurement_draw_the_same_masks():
    bp = pj.nnx.with_rule(Net(nnx.Rngs(0), rate=0.5, own="bp"), "bp", rngs=nnx.Rngs(1))
    angles = pj.metrics.gradient_alignment(bp, BATCH)
    assert all(a["grad_angle"] < 1e-2 and a["delta_angle"] < 1e-2 for a in angles.values())
    fa = pj.nnx.with_rule(Net(nnx.Rngs(0), rate=0.5), "fa", rngs=nnx.Rngs(1))
    # the training-mode pass drops units: the error norms differ from the eval-mode model's
    dropped = pj.metrics.gradient_alignment(fa, BATCH)
    kept = pj.metrics.gradient_alignment(
        pj.nnx.with_rule(Net(nnx.Rngs(0), rate=0.0), "fa", rngs=nnx.Rngs(1)), BATCH)
    assert not np.isclose(dropped["head"]["delta_norm_bp"], kept["head"]["delta_norm_bp"])


def test_the_closing_measurements_run_on_an_own_nnx_model():
    model = pj.nnx.with_rule(Net(nnx.Rngs(0)), "fa", rngs=nnx.Rngs(1))
    sharp = pj.metrics.sharpness(model, [BATCH], iterations=5, probes=2)
    assert np.isfinite(sharp["top_eigenvalue"]) and np.isfinite(sharp["trace"])
    robust = pj.metrics.adversarial(model, [BATCH], (1.0,), lower=-5.0, upper=5.0)
    clean = robust["clean_accuracy"]
    assert clean == pytest.approx(float(jnp.mean(jnp.argmax(model(BATCH["image"]), -1)
                                                 == BATCH["label"])))
    assert robust["robust_accuracy"][0] <= clean
    noise = pj.metrics.corruption(model, [BATCH], (0.5,), lower=-5.0, upper=5.0)
    assert 0.0 <= noise["accuracy"][0] <= 1.0
    assert sorted(layer.path for layer in pj.nnx.linen_state(model).layers) == PATHS
