"""The loss hook: ``create_train_state(..., loss=fn)`` trains, evaluates and measures ``fn`` for
models with two heads, a masked per-token loss and a regression (flax's own layers under a rule)."""
import flax.linen as nn
import jax
import jax.flatten_util
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import pfa_jax as pj


class TwoHeads(nn.Module):
    @nn.compact
    def __call__(self, x):
        h = nn.relu(nn.Dense(16, name="trunk")(x))
        return {"digit": nn.Dense(4, name="digit")(h), "parity": nn.Dense(2, name="parity")(h)}


def two_head_loss(outputs, batch):
    digit = pj.losses.cross_entropy(outputs["digit"], batch["label"]["digit"]).mean()
    parity = pj.losses.cross_entropy(outputs["parity"], batch["label"]["parity"]).mean()
    hits = jnp.argmax(outputs["digit"], -1) == batch["label"]["digit"]
    return digit + 0.5 * parity, {"digit_loss": digit, "accuracy": hits.mean()}


class Tagger(nn.Module):
    """Per-token classes: (n, T, d) -> (n, T, 3)."""

    @nn.compact
    def __call__(self, x):
        return nn.Dense(3, name="out")(nn.tanh(nn.Dense(8, name="hidden")(x)))


def masked_token_loss(logits, batch):
    mask = batch["label"]["mask"]
    losses = pj.losses.cross_entropy(logits, batch["label"]["tags"])
    return jnp.sum(losses * mask) / jnp.sum(mask)


class Regressor(nn.Module):
    @nn.compact
    def __call__(self, x):
        return nn.Dense(1, name="out")(nn.relu(nn.Dense(16, name="hidden")(x)))


def mse(outputs, batch):
    return jnp.mean((outputs[:, 0] - batch["label"]) ** 2)


def _data(kind, n=64):
    keys = jax.random.split(jax.random.key(3), 3)
    if kind == "tagger":
        x = jax.random.normal(keys[0], (n, 5, 4))
        tags = (x[..., 0] > 0).astype(jnp.int32) + (x[..., 1] > 1).astype(jnp.int32)
        mask = (jnp.arange(5)[None] < jax.random.randint(keys[1], (n, 1), 1, 6)).astype(jnp.float32)
        return x, {"tags": tags, "mask": mask}
    x = jax.random.normal(keys[0], (n, 6))
    if kind == "two_heads":
        digit = jnp.argmax(x[:, :4], -1)
        return x, {"digit": digit, "parity": digit % 2}
    return x, jnp.sin(x[:, 0]) + x[:, 1] ** 2


CASES = {"two_heads": (TwoHeads, two_head_loss), "tagger": (Tagger, masked_token_loss),
         "regression": (Regressor, mse)}


def _state(kind, rule="fa"):
    module, loss = CASES[kind]
    x, labels = _data(kind)
    model = pj.nn.with_rule(module(), rule)
    batch = {"image": x[:8], "label": jax.tree.map(lambda a: a[:8], labels)}
    return pj.train.create_train_state(jax.random.key(0), model, batch, optax.sgd(0.03, momentum=0.9),
                                       loss=loss), x, labels


@pytest.mark.parametrize("kind", sorted(CASES))
def test_models_with_their_own_loss_train_and_evaluate_it(kind):
    state, x, labels = _state(kind)
    before = pj.train.evaluate(state, x, labels, batch_size=24)
    for epoch in range(10):
        state, per_step = pj.train.train_epoch(state, x, labels, jax.random.key(epoch), 16)
    after = pj.train.evaluate(state, x, labels, batch_size=24)
    assert after["loss"] < 0.8 * before["loss"]
    assert set(per_step) >= set(after) - {"count"}
    # evaluate is the mean over its examples: 64 = 2 batches of 24 and one of 16, equal to one batch
    whole = pj.train.eval_step(state, {"image": x, "label": labels})
    if kind != "tagger":  # a per-token mean weights batches by tokens, not examples
        np.testing.assert_allclose(after["loss"], whole["loss"], rtol=1e-5)


def test_two_heads_report_the_aux_metrics_of_the_loss():
    state, x, labels = _state("two_heads")
    state, metrics = jax.jit(pj.train.train_step)(state, {"image": x, "label": labels})
    assert {"loss", "digit_loss", "accuracy"} <= set(metrics)
    assert metrics["loss"] > metrics["digit_loss"]


@pytest.mark.parametrize("kind", sorted(CASES))
def test_gradient_alignment_measures_the_trained_loss(kind):
    state, x, labels = _state(kind)
    batch = {"image": x[:32], "label": jax.tree.map(lambda a: a[:32], labels)}
    got = pj.metrics.gradient_alignment(state, batch)
    module, loss = CASES[kind]

    def grads(apply):
        return jax.grad(lambda p: pj.losses.value_and_aux(loss, apply(p), batch)[0])(state.params)

    true = grads(lambda p: module().apply({"params": p}, batch["image"]))
    rule = grads(lambda p: state.model.apply({"params": p, "feedback": state.feedback},
                                             batch["image"]))
    for path in ("hidden", "out") if kind != "two_heads" else ("trunk", "digit", "parity"):
        a, b = rule[path]["kernel"].ravel(), true[path]["kernel"].ravel()
        by_hand = np.degrees(np.arccos(np.clip(a @ b / np.linalg.norm(a) / np.linalg.norm(b), -1, 1)))
        np.testing.assert_allclose(got[path]["grad_angle"], by_hand, atol=0.05, err_msg=path)
    assert float(got["trunk" if kind == "two_heads" else "hidden"]["grad_angle"]) > 1.0


def test_sharpness_takes_the_hessian_of_the_trained_loss():
    state, x, labels = _state("regression", rule="bp")
    batch = {"image": x[:16], "label": labels[:16]}
    v = jax.random.normal(jax.random.key(5), (sum(a.size for a in jax.tree.leaves(state.params)),))
    flat, unravel = jax.flatten_util.ravel_pytree(state.params)
    loss = lambda f: mse(Regressor().apply({"params": unravel(f)}, batch["image"]), batch)  # noqa
    want = jax.jvp(jax.grad(loss), (flat,), (v,))[1]
    np.testing.assert_allclose(pj.metrics.hessian_vector_product(state, batch, v), want,
                               rtol=1e-4, atol=1e-5)


def test_a_loss_that_does_not_fit_the_outputs_fails_in_create_train_state():
    x, labels = _data("regression")
    with pytest.raises(ValueError, match="must return a scalar"):
        pj.train.create_train_state(jax.random.key(0), pj.nn.with_rule(Regressor(), "fa"),
                                    {"image": x[:4], "label": labels[:4]},
                                    loss=lambda outputs, batch: outputs - batch["label"])


def test_attacks_need_an_accuracy_from_the_loss():
    state, x, labels = _state("regression")
    with pytest.raises(ValueError, match="gives no 'accuracy'"):
        pj.metrics.adversarial(state, {"image": x[:8], "label": labels[:8]}, [0.1])
