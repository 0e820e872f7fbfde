"""The registry's transformers, ``vit`` and ``transformer_lm`` (Flax's own layers under
``with_rule``), linen and NNX: every rule trains them (a falling loss on a fixed batch), the two
forms give equal outputs and cotangents, and the metrics give one angle per projection kernel."""
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

import pfa_jax as pj

SMALL = {"dim": 16, "depth": 1, "heads": 2, "mlp_dim": 32}
VOCAB, LENGTH = 11, 12
ALL_RULES = pj.rules.names()
QUICK = ("bp", "pfa", "dfa")  # the default tier; every other rule in the slow one


def _vit_batch():
    images = jax.random.uniform(jax.random.key(0), (16, 28, 28, 1))
    return {"image": images, "label": jnp.arange(16) % 10}


def _lm_batch():
    text = jax.random.randint(jax.random.key(0), (8, LENGTH + 1), 0, VOCAB)
    return {"image": text[:, :-1], "label": text[:, 1:]}


CASES = {"vit": (dict(SMALL, patch=7), 10, _vit_batch, pj.losses.classification),
         "transformer_lm": (dict(SMALL, context=LENGTH), VOCAB, _lm_batch, pj.losses.next_token)}


def _falls(rule: str, name: str, nnx_form: bool):
    options, classes, batch_fn, loss = CASES[name]
    batch = batch_fn()
    tx, steps = optax.sgd(0.1), 20
    if nnx_form:
        model = pj.nnx.models.get(name, rule=rule, num_classes=classes, input_shape=(28, 28, 1),
                                  rngs=nnx.Rngs(0), **options)
        optimizer = pj.nnx.optimizer(model, tx)

        @nnx.jit
        def step(model, optimizer):
            def fn(model):
                return pj.losses.value_and_aux(loss, model(batch["image"], train=True), batch)[0]
            value, grads = nnx.value_and_grad(fn, argnums=nnx.DiffState(0, pj.nnx.TRAINED))(model)
            optimizer.update(model, grads)
            pj.nnx.mirror(model)
            return value

        losses = [float(step(model, optimizer)) for _ in range(steps)]
    else:
        model = pj.models.get(name, rule=rule, num_classes=classes, **options)
        state = pj.train.create_train_state(jax.random.key(0), model, batch, tx, loss=loss)
        step = jax.jit(pj.train.train_step)
        losses = []
        for _ in range(steps):
            state, metrics = step(state, batch)
            losses.append(float(metrics["loss"]))
    assert np.all(np.isfinite(losses)) and np.mean(losses[-3:]) < losses[0], (rule, losses)


@pytest.mark.parametrize("nnx_form", [False, True], ids=["linen", "nnx"])
@pytest.mark.parametrize("name", list(CASES))
@pytest.mark.parametrize("rule", QUICK)
def test_the_rules_train_the_transformers(rule, name, nnx_form):
    _falls(rule, name, nnx_form)


@pytest.mark.slow
@pytest.mark.parametrize("nnx_form", [False, True], ids=["linen", "nnx"])
@pytest.mark.parametrize("name", list(CASES))
@pytest.mark.parametrize("rule", [r for r in ALL_RULES if r not in QUICK])
def test_every_other_rule_trains_the_transformers(rule, name, nnx_form):
    _falls(rule, name, nnx_form)


@pytest.mark.parametrize("rule, name", [  # DFA on the language model: the slow tier (14 s)
    ("pfa", "vit"), ("dfa", "vit"), ("pfa", "transformer_lm"),
    pytest.param("dfa", "transformer_lm", marks=pytest.mark.slow)])
def test_the_nnx_and_linen_forms_give_equal_outputs_and_cotangents(name, rule):
    options, classes, batch_fn, loss = CASES[name]
    batch = batch_fn()
    rule = pj.rules.for_optimizer(rule, optax.sgd(0.1))  # one form for both (NNX cannot decide)
    linen = pj.models.get(name, rule=rule, num_classes=classes, **options)
    state = pj.train.create_train_state(jax.random.key(1), linen, batch, optax.sgd(0.1), loss=loss)
    model = pj.nnx.models.get(name, rule=rule, num_classes=classes, input_shape=(28, 28, 1),
                              rngs=nnx.Rngs(0), **options)
    pj.nnx.from_linen(model, state.variables())

    def linen_loss(params, x):
        outputs, _ = pj.train.apply_with_rule(linen, {**state.variables(), "params": params}, x,
                                              False, {})
        return pj.losses.value_and_aux(loss, outputs, batch)[0]

    def nnx_loss(model, x):
        return pj.losses.value_and_aux(loss, model(x), batch)[0]

    x = batch["image"]
    np.testing.assert_allclose(model(x), linen.apply(state.variables(), x), atol=2e-5)
    want_params, want_x = jax.grad(linen_loss, argnums=(0, 1), allow_int=True)(state.params, x)
    got_model, got_x = nnx.grad(nnx_loss, argnums=(0, 1), allow_int=True)(model, x)
    got = nnx.to_pure_dict(nnx.filter_state(got_model, nnx.Param))
    jax.tree.map(lambda g, w: np.testing.assert_allclose(g, w, rtol=1e-3, atol=1e-5), got,
                 jax.tree.map(np.asarray, dict(want_params)))
    if name == "vit":
        np.testing.assert_allclose(got_x, want_x, rtol=1e-3, atol=1e-6)


@pytest.mark.parametrize("name", list(CASES))
def test_the_metrics_give_one_angle_per_projection_kernel(name):
    options, classes, batch_fn, loss = CASES[name]
    batch = batch_fn()
    model = pj.models.get(name, rule="fa", num_classes=classes, **dict(options, depth=2))
    state = pj.train.create_train_state(jax.random.key(0), model, batch, optax.sgd(0.1), loss=loss)
    block = [f"block_{i}/{layer}" for i in range(2) for layer in (
        "attention/key", "attention/out", "attention/query", "attention/value", "mlp_in", "mlp_out")]
    kernels = sorted(block + ["output"] + (["patch"] if name == "vit" else []))
    assert sorted(pj.metrics.alignment(state)) == kernels
    assert sorted(pj.metrics.gradient_alignment(state, batch)) == kernels
