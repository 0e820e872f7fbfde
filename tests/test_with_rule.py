"""``pfa_jax.nn.with_rule``: an unchanged Flax model (flax's own Conv, DenseGeneral attention,
Einsum, Dense, LSTM cells) under a rule, against a reference written here with explicit feedback
matrices in float64, and against ``jax.grad`` of the plain model under bp."""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import pfa_jax as pj
import reference_vit
from reference_vit import (CLASSES, RULES, ViT, explicit_feedback, matmul, reference_linear,
                           reference_feedback_signal, reference_logits)

@pytest.mark.parametrize("rule", RULES)
def test_vit_of_flax_layers_follows_the_rule_in_every_projection(rule):
    with jax.enable_x64(True):
        images = jax.random.normal(jax.random.key(1), (3, 8, 8, 1), jnp.float64)
        labels = jnp.array([0, 3, 4])
        model, variables = reference_vit.init(rule, images)
        params, feedback = variables["params"], variables.get("feedback", {})
        plastic = pj.layers.select(feedback, pj.layers.feedback_labels(
            pj.layers.table(model, images), feedback), pj.layers.PLASTIC)

        def loss(params, plastic, images):
            fb = pj.layers.merge(feedback, plastic)
            return reference_vit.loss(model.apply({"params": params, "feedback": fb}, images), labels)

        got = jax.grad(loss, argnums=(0, 1, 2))(params, plastic, images)
        want = jax.grad(lambda p, x: reference_vit.loss(reference_logits(rule, p, feedback, x), labels),
                        argnums=(0, 1))(params, images)
        np.testing.assert_allclose(model.apply(variables, images),
                                   reference_logits(rule, params, feedback, images), atol=1e-12)
        np.testing.assert_allclose(got[2], want[1], atol=1e-12, err_msg="error sent to the input")
        jax.tree.map(lambda g, w: np.testing.assert_allclose(g, w, atol=1e-12), got[0], want[0])
        # the plastic feedback's signal, per layer, against the rule's own formula
        table = pj.layers.table(model, images)
        rows = reference_vit.layer_inputs(params, images)
        for layer in table:
            fb = reference_vit.at(feedback, layer.path)
            kernel = layer.matrix(reference_vit.at(params, layer.path)["kernel"])
            dk = layer.matrix(reference_vit.at(want[0], layer.path)["kernel"])
            if layer.path == "patch":
                continue  # conv: its signal is checked by tests/test_rules.py
            signal = reference_feedback_signal(rule, dk, kernel, fb, rows[layer.path])
            assert set(reference_vit.at(got[1], layer.path)) == set(signal)
            for name, value in signal.items():
                np.testing.assert_allclose(reference_vit.at(got[1], layer.path)[name], value, atol=1e-10,
                                           err_msg=f"{layer.path}/{name}")


def test_bp_under_with_rule_equals_jax_grad_of_the_plain_model():
    images = jax.random.normal(jax.random.key(1), (3, 8, 8, 1))
    labels = jnp.array([0, 3, 4])
    model = pj.nn.with_rule(ViT(), "bp")
    variables = model.init(jax.random.key(0), images)
    plain = ViT().init(jax.random.key(0), images)
    jax.tree.map(np.testing.assert_array_equal, variables["params"], plain["params"])
    got = jax.grad(lambda p: reference_vit.loss(model.apply({"params": p}, images), labels))(plain["params"])
    want = jax.grad(lambda p: reference_vit.loss(ViT().apply({"params": p}, images), labels))(plain["params"])
    jax.tree.map(lambda g, w: np.testing.assert_allclose(g, w, rtol=1e-6, atol=1e-7), got, want)


def test_the_metrics_give_one_angle_per_projection_kernel():
    images = jax.random.normal(jax.random.key(1), (4, 8, 8, 1))
    model = pj.nn.with_rule(ViT(), "fa")
    state = pj.train.create_train_state(jax.random.key(0), model, images, optax.sgd(0.1))
    batch = {"image": images, "label": jnp.array([0, 1, 2, 3])}
    kernels = ["attention/key", "attention/out", "attention/query", "attention/value", "head",
               "mlp_in", "mlp_out", "patch"]
    assert sorted(pj.metrics.alignment(state)) == kernels
    assert sorted(pj.metrics.gradient_alignment(state, batch)) == kernels
    for name, (k, f) in pj.metrics.kernels_and_feedback(state).items():
        assert k.ndim in (2, 4) and k.shape == f.shape, name
    losses = []
    for _ in range(5):
        state, metrics = jax.jit(pj.train.train_step)(state, batch)
        losses.append(float(metrics["loss"]))
    assert losses[-1] < losses[0]


class Unreached(nn.Module):
    @nn.compact
    def __call__(self, x):
        x = nn.ConvTranspose(3, (3, 3), name="up")(x)
        return nn.Dense(2, name="head")(x.reshape(x.shape[0], -1))


def test_a_kernel_no_rule_reaches_is_an_error_naming_it_unless_mapped_to_bp():
    x = jnp.ones((1, 4, 4, 1))
    with pytest.raises(pj.nn.UnreachedLayerError, match=r"\['up/kernel'\]"):
        pj.nn.with_rule(Unreached(), "fa").init(jax.random.key(0), x)
    variables = pj.nn.with_rule(Unreached(), {"default": "fa", "up": "bp"}).init(jax.random.key(0), x)
    assert set(variables["feedback"]) == {"head"}


def test_a_layer_with_its_own_product_is_refused_by_name():
    model = pj.nn.with_rule(nn.Sequential([nn.Dense(3, dot_general=jax.lax.dot_general,
                                                     name="q")]), "fa")
    with pytest.raises(ValueError, match="'layers_0'.*sets dot_general"):
        model.init(jax.random.key(0), jnp.ones((1, 4)))


class LSTM(nn.Module):
    cell: type = nn.OptimizedLSTMCell

    @nn.compact
    def __call__(self, x):
        h = nn.RNN(self.cell(6, param_dtype=x.dtype, name="cell"))(x)  # stock nn.RNN
        return nn.Dense(CLASSES, name="head")(h[:, -1])


@pytest.mark.parametrize("rule", ["fa", "pfa"])
def test_an_lstm_over_time_follows_the_rule_through_every_gate_and_step(rule):
    with jax.enable_x64(True):
        x = jax.random.normal(jax.random.key(1), (2, 5, 3), jnp.float64)
        labels = jnp.array([1, 4])
        optimized = pj.nn.with_rule(LSTM(), rule)
        variables = jax.tree.map(lambda a: jnp.asarray(a, jnp.float64),
                                 optimized.init(jax.random.key(0), x))
        params, feedback = variables["params"], variables["feedback"]
        assert sorted(feedback["cell"]) == sorted(f"{s}{g}" for g in "ifgo" for s in "ih")
        got = jax.grad(lambda p: reference_vit.loss(optimized.apply({"params": p, "feedback": feedback}, x),
                                       labels))(params)

        def reference(p):  # the LSTM written out, each gate map through its explicit feedback
            cell, fb = p["cell"], feedback["cell"]

            def lin(v, name):
                k = cell[name]["kernel"]
                y = reference_linear(matmul, v, k, explicit_feedback(rule, k, fb[name]))
                return y + cell[name]["bias"] if "bias" in cell[name] else y

            c = h = jnp.zeros((2, 6))
            for t in range(5):
                pre = {g: lin(x[:, t], f"i{g}") + lin(h, f"h{g}") for g in "ifgo"}
                c = jax.nn.sigmoid(pre["f"]) * c + jax.nn.sigmoid(pre["i"]) * jnp.tanh(pre["g"])
                h = jax.nn.sigmoid(pre["o"]) * jnp.tanh(c)
            head = p["head"]
            logits = reference_linear(matmul, h, head["kernel"],
                                      explicit_feedback(rule, head["kernel"], feedback["head"]))
            return reference_vit.loss(logits + head["bias"], labels)

        want = jax.grad(reference)(params)
        jax.tree.map(lambda g, w: np.testing.assert_allclose(g, w, atol=1e-12), got, want)
        # nn.LSTMCell (one nn.Dense a gate) gives the same network and the same gradients
        plain_cell = pj.nn.with_rule(LSTM(cell=nn.LSTMCell), rule)
        again = jax.grad(lambda p: reference_vit.loss(
            plain_cell.apply({"params": p, "feedback": feedback}, x), labels))(params)
        jax.tree.map(lambda g, w: np.testing.assert_allclose(g, w, atol=1e-12), again, want)


def test_a_layer_with_its_own_product_named_bp_runs_unchanged():
    dense = nn.Dense(3, dot_general=jax.lax.dot_general)
    model = pj.nn.with_rule(nn.Sequential([dense, nn.Dense(2)]), {"default": "fa", "layers_0": "bp"})
    variables = model.init(jax.random.key(0), jnp.ones((1, 4)))
    assert set(variables["feedback"]) == {"layers_1"}


def test_an_lstm_trains_and_reports_every_gate():
    x = jax.random.normal(jax.random.key(1), (8, 5, 3))
    batch = {"image": x, "label": jnp.arange(8) % CLASSES}
    state = pj.train.create_train_state(jax.random.key(0), pj.nn.with_rule(LSTM(), "kp"), x,
                                        optax.sgd(0.3))
    assert len(pj.metrics.alignment(state)) == 9
    losses = []
    for _ in range(8):
        state, metrics = jax.jit(pj.train.train_step)(state, batch)
        losses.append(float(metrics["loss"]))
    assert losses[-1] < losses[0]
