"""One-line errors where a new user used to get a ZeroDivisionError, an MLIR dump or a linen fix
for an NNX model: empty batches, NNX layers of zero or negative size, a DFA layer whose error tap
does not reach the loss."""
import jax
import jax.numpy as jnp
import optax
import pytest
from flax import nnx

import pfa_jax as pj


def test_an_empty_batch_is_named():
    state = pj.train.create_train_state(jax.random.key(0), pj.models.get("ffn2", widths=(8,)),
                                        jnp.zeros((1, 28, 28, 1)), optax.sgd(0.1))
    empty = jnp.zeros((0, 28, 28, 1)), jnp.zeros(0, jnp.int32)
    with pytest.raises(ValueError, match=r"train_step: an empty batch \(images of shape \(0, 28"):
        pj.train.train_step(state, {"image": empty[0], "label": empty[1]})
    with pytest.raises(ValueError, match="evaluate: an empty batch"):
        pj.train.evaluate(state, *empty)


@pytest.mark.parametrize("make, shape", [
    (lambda r: pj.nnx.Linear(0, 4, rule="fa", rngs=r), "(0, 4)"),
    (lambda r: pj.nnx.Linear(4, -2, rule="kp", rngs=r), "(4, -2)"),
    (lambda r: pj.nnx.Conv(3, 0, (3, 3), rule="pfa", rngs=r), "(3, 3, 3, 0)"),
])
def test_nnx_layers_of_no_size_are_refused(make, shape):
    with pytest.raises(ValueError, match=f"every size must be a positive int, got a kernel of "
                                         f"shape {__import__('re').escape(shape)}"):
        make(nnx.Rngs(0))


def test_a_dfa_layer_without_its_tap_tells_nnx_users_the_nnx_fix():
    layer = pj.nnx.Linear(4, 3, rule=pj.rules.get("dfa", classes=3), rngs=nnx.Rngs(0))
    with pytest.raises(pj.rules.direct_feedback.MissingTapError,
                       match="(?s)Linen: .*NNX: end the model's __call__ with "
                             r"pfa_jax.nnx.add_taps\(self, logits\)"):
        nnx.grad(lambda m: m(jnp.ones((2, 4))).sum())(layer)
