"""The library never updates from a non-finite loss or gradient without saying so: the linen and
NNX train steps (under ``jit``) and the compiled epoch leave the arrays as they were on such a step
and report it in ``metrics['nonfinite']``."""
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

import pfa_jax as pj

X = jax.random.normal(jax.random.key(0), (8, 28, 28, 1))
Y = jnp.arange(8) % 10


def arrays(state):
    return [np.asarray(a) for a in jax.tree.leaves((state.params, state.feedback, state.opt_state))]


@pytest.fixture(params=["bp", "pfa", "kp", "dfa"])
def state(request):
    model = pj.models.get("ffn2", rule=request.param, num_classes=10, widths=(16,))
    return pj.train.create_train_state(jax.random.key(1), model, X, optax.sgd(0.1, momentum=0.9))


@pytest.mark.parametrize("batch", [{"image": X.at[3, 5, 5, 0].set(jnp.nan), "label": Y},
                                   {"image": X.at[0, 0, 0, 0].set(jnp.inf), "label": Y},
                                   {"image": X, "label": Y.at[2].set(12)}],
                         ids=["nan-image", "inf-image", "label-out-of-range"])
def test_a_non_finite_step_changes_nothing_and_says_so(state, batch):
    after, metrics = jax.jit(pj.train.train_step)(state, batch)
    assert float(metrics["nonfinite"]) == 1.0 and not np.isfinite(float(metrics["loss"]))
    assert int(after.step) == int(state.step) + 1
    for a, b in zip(arrays(after), arrays(state)):
        np.testing.assert_array_equal(a, b)
    taken, metrics = jax.jit(pj.train.train_step)(after, {"image": X, "label": Y})
    assert float(metrics["nonfinite"]) == 0.0
    assert any(not np.array_equal(a, b) for a, b in zip(arrays(taken), arrays(state)))


def test_the_epoch_counts_the_skipped_steps_and_stays_finite(state):
    images = jnp.concatenate([X, X.at[1, 0, 0, 0].set(jnp.nan), X])
    labels = jnp.concatenate([Y, Y, Y])
    after, metrics = pj.train.train_epoch(state, images, labels, jax.random.key(2), 8)
    assert int(np.sum(metrics["nonfinite"])) == 1  # the one batch that holds the NaN image
    assert all(np.isfinite(a).all() for a in arrays(after))
    assert np.isfinite(metrics["loss"]).sum() == 2


def test_the_nnx_step_changes_nothing_on_a_non_finite_step():
    model = pj.nnx.models.get("ffn2", rule="pfa", num_classes=10, widths=(16,),
                              input_shape=(28, 28, 1), rngs=nnx.Rngs(0))
    optimizer = nnx.Optimizer(model, optax.adam(1e-2), wrt=nnx.Param)
    step = nnx.jit(pj.nnx.train_step)
    before = [np.asarray(a) for a in jax.tree.leaves(nnx.state((model, optimizer)))]
    metrics = step(model, optimizer, {"image": X.at[0, 0, 0, 0].set(jnp.nan), "label": Y})
    assert float(metrics["nonfinite"]) == 1.0
    for a, b in zip(jax.tree.leaves(nnx.state((model, optimizer))), before):
        np.testing.assert_array_equal(np.asarray(a), b)
    assert float(step(model, optimizer, {"image": X, "label": Y})["nonfinite"]) == 0.0
