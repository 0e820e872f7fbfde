"""``pfa_jax.nnx.with_rule``: an unchanged NNX model (nnx.Conv, nnx.MultiHeadAttention's
LinearGeneral projections, nnx.Einsum, nnx.Linear, NNX's LSTM cell) under a rule, against the
float64 reference with explicit feedback matrices of ``tests/test_with_rule.py``, and against
``nnx.grad`` of the plain model under bp."""
import doctest

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx
import reference_vit
from reference_vit import CLASSES, DIM, HEADS, HIDDEN, RULES, reference_feedback_signal, reference_logits

import pfa_jax as pj
from pfa_jax import intercept
from pfa_jax.nnx import intercept as nnx_intercept


def exact_attention(query, key, value, **_):
    """Softmax attention in the inputs' dtype (flax's default, ``jax.nn.dot_product_attention``,
    which computes in float32, which the float64 reference would see)."""
    scores = jnp.einsum("...qhd,...khd->...hqk", query / jnp.sqrt(query.shape[-1]), key)
    weights = jax.nn.softmax(scores)
    return jnp.einsum("...hqk,...khd->...qhd", weights, value)


class ViT(nnx.Module):
    """test_with_rule's one-block ViT written with NNX's own layers, attributes named as the linen
    model's params."""

    def __init__(self, rngs: nnx.Rngs):
        self.patch = nnx.Conv(1, DIM, (4, 4), strides=4, padding="VALID", rngs=rngs)
        self.pos = nnx.Param(0.1 * jax.random.normal(rngs.params(), (4, DIM)))
        self.LayerNorm_0 = nnx.LayerNorm(DIM, rngs=rngs)
        self.attention = nnx.MultiHeadAttention(HEADS, DIM, decode=False,
                                                attention_fn=exact_attention, rngs=rngs)
        self.LayerNorm_1 = nnx.LayerNorm(DIM, rngs=rngs)
        self.mlp_in = nnx.Einsum("btd,dh->bth", (DIM, HIDDEN), (HIDDEN,), rngs=rngs)
        self.mlp_out = nnx.Linear(HIDDEN, DIM, rngs=rngs)
        self.LayerNorm_2 = nnx.LayerNorm(DIM, rngs=rngs)
        self.head = nnx.Linear(DIM, CLASSES, rngs=rngs)

    def __call__(self, images):
        x = self.patch(images)
        x = x.reshape(x.shape[0], -1, DIM) + self.pos
        x = x + self.attention(self.LayerNorm_0(x))
        x = x + self.mlp_out(nnx.gelu(self.mlp_in(self.LayerNorm_1(x))))
        return self.head(self.LayerNorm_2(x.mean(1)))


def _float64(model):
    state = nnx.state(model, nnx.Any(nnx.Param, pj.nnx.Feedback))
    nnx.update(model, jax.tree.map(lambda a: jnp.asarray(a, jnp.float64), state))
    return model


def _pure(model, kind):
    return nnx.to_pure_dict(nnx.state(model, kind))


@pytest.mark.parametrize("rule", RULES)
def test_vit_of_nnx_layers_follows_the_rule_in_every_projection(rule):
    with jax.enable_x64(True):
        images = jax.random.normal(jax.random.key(1), (3, 8, 8, 1), jnp.float64)
        labels = jnp.array([0, 3, 4])
        model = _float64(pj.nnx.with_rule(ViT(nnx.Rngs(0)), rule, rngs=nnx.Rngs(1)))
        params, feedback = _pure(model, nnx.Param), _pure(model, pj.nnx.Feedback)
        graphdef, trained, rest = nnx.split(model, nnx.Any(nnx.Param, pj.nnx.PlasticFeedback), ...)

        def loss(trained, images):
            return reference_vit.loss(nnx.merge(graphdef, trained, rest)(images), labels)

        got_trained, got_images = jax.grad(loss, argnums=(0, 1))(trained, images)
        got_params = nnx.to_pure_dict(nnx.filter_state(got_trained, nnx.Param))
        got_feedback = nnx.to_pure_dict(nnx.filter_state(got_trained, pj.nnx.PlasticFeedback))
        want = jax.grad(lambda p, x: reference_vit.loss(reference_logits(rule, p, feedback, x), labels),
                        argnums=(0, 1))(params, images)
        np.testing.assert_allclose(model(images), reference_logits(rule, params, feedback, images),
                                   atol=1e-12)
        np.testing.assert_allclose(got_images, want[1], atol=1e-12, err_msg="error sent down")
        jax.tree.map(lambda g, w: np.testing.assert_allclose(g, w, atol=1e-12), got_params, want[0])
        rows = reference_vit.layer_inputs(params, images)
        paths = []
        for path, layer in pj.nnx.rule_layers(model):
            paths.append(path)
            matrix = layer.view or (lambda k: k)
            fb = _at(feedback, path)
            kernel, dk = matrix(_at(params, path)["kernel"]), matrix(_at(want[0], path)["kernel"])
            if path == "patch":
                continue  # conv: its signal is checked by tests/test_rules.py
            signal = reference_feedback_signal(rule, dk, kernel, fb, rows[path])
            assert set(_at(got_feedback, path)) == set(signal), path
            for name, value in signal.items():
                np.testing.assert_allclose(_at(got_feedback, path)[name], value, atol=1e-10,
                                           err_msg=f"{path}/{name}")
        assert sorted(paths) == ["attention/key", "attention/out", "attention/query",
                                 "attention/value", "head", "mlp_in", "mlp_out", "patch"]


def _at(tree, path):
    for part in path.split("/"):
        tree = tree.get(part, {})
    return tree


def test_bp_under_with_rule_equals_nnx_grad_of_the_plain_model():
    images = jax.random.normal(jax.random.key(1), (3, 8, 8, 1))
    labels = jnp.array([0, 3, 4])
    plain, ruled = ViT(nnx.Rngs(0)), pj.nnx.with_rule(ViT(nnx.Rngs(0)), "bp", rngs=nnx.Rngs(1))
    jax.tree.map(np.testing.assert_array_equal, _pure(plain, nnx.Param), _pure(ruled, nnx.Param))
    grad = lambda model: nnx.grad(lambda m: reference_vit.loss(m(images), labels))(model)  # noqa: E731
    jax.tree.map(lambda g, w: np.testing.assert_allclose(g, w, rtol=1e-6, atol=1e-7),
                 nnx.to_pure_dict(grad(ruled)), nnx.to_pure_dict(grad(plain)))


def test_it_trains_under_nnx_jit_with_the_library_optimizer():
    images = jax.random.normal(jax.random.key(1), (4, 8, 8, 1))
    labels = jnp.array([0, 1, 2, 3])
    model = pj.nnx.with_rule(ViT(nnx.Rngs(0)), {"default": "kp", "head": "bp"}, rngs=nnx.Rngs(1))
    optimizer = pj.nnx.optimizer(model, optax.sgd(0.1))
    before = _pure(model, pj.nnx.PlasticFeedback)

    @nnx.jit
    def step(model, optimizer):
        loss, grads = nnx.value_and_grad(lambda m: reference_vit.loss(m(images), labels),
                                         argnums=nnx.DiffState(0, pj.nnx.TRAINED))(model)
        optimizer.update(model, grads)
        return loss

    losses = [float(step(model, optimizer)) for _ in range(5)]
    assert losses[-1] < losses[0]
    after = _pure(model, pj.nnx.PlasticFeedback)
    assert "head" not in after and not np.allclose(after["mlp_in"]["B"], before["mlp_in"]["B"])


class LSTM(nnx.Module):
    def __init__(self, rngs):
        self.rnn = nnx.RNN(nnx.OptimizedLSTMCell(3, 6, rngs=rngs))
        self.head = nnx.Linear(6, CLASSES, rngs=rngs)

    def __call__(self, x):
        return self.head(self.rnn(x)[:, -1])


@pytest.mark.parametrize("rule", ["fa", "pfa"])
def test_an_lstm_over_time_sends_its_errors_through_the_feedback(rule):
    """NNX's fused LSTM maps ``dense_i`` / ``dense_h`` follow the rule at every step: the gradient
    equals the one of the same net whose kernels are, in the backward pass only, the feedback."""
    x = jax.random.normal(jax.random.key(2), (2, 4, 3))
    labels = jnp.array([1, 2])
    model = pj.nnx.with_rule(LSTM(nnx.Rngs(0)), rule, rngs=nnx.Rngs(1))
    fb = {path: layer.feedback() for path, layer in pj.nnx.rule_layers(model)}
    assert sorted(fb) == ["head", "rnn/cell/dense_h", "rnn/cell/dense_i"]
    got = nnx.grad(lambda m: reference_vit.loss(m(x), labels))(model)

    def feedback_matrix(f):
        return f["R"] @ f["Bp"].T if rule == "pfa" else f["B"]

    def reference(params):
        def linear(path, h):
            k, b = params[path]["kernel"], params[path].get("bias", 0.0)
            f = jax.lax.stop_gradient(feedback_matrix(fb[path]))
            # value h @ k; gradient to h through f, to k exactly
            return h @ (k - jax.lax.stop_gradient(k)) + jax.lax.stop_gradient(h @ k) + (
                h - jax.lax.stop_gradient(h)) @ f + b
        c = h = jnp.zeros((2, 6))
        for t in range(4):
            z = linear("rnn/cell/dense_i", x[:, t]) + linear("rnn/cell/dense_h", h)
            i, f, g, o = jnp.split(z, 4, axis=-1)
            c = jax.nn.sigmoid(f) * c + jax.nn.sigmoid(i) * jnp.tanh(g)
            h = jax.nn.sigmoid(o) * jnp.tanh(c)
        return reference_vit.loss(linear("head", h), labels)

    params = {path: _at(_pure(model, nnx.Param), path) for path in fb}
    want = jax.grad(reference)(params)
    for path in fb:
        np.testing.assert_allclose(_at(nnx.to_pure_dict(got), path)["kernel"],
                                   want[path]["kernel"], rtol=1e-5, atol=1e-6, err_msg=path)


class OwnMatmul(nnx.Module):
    def __init__(self, rngs):
        self.up = nnx.ConvTranspose(1, 2, (3, 3), rngs=rngs)
        self.head = nnx.Linear(32, 2, rngs=rngs)


def test_a_kernel_no_rule_reaches_is_an_error_naming_it_unless_mapped_to_bp():
    with pytest.raises(pj.nn.UnreachedLayerError, match=r"\['up/kernel'\]"):
        pj.nnx.with_rule(OwnMatmul(nnx.Rngs(0)), "fa", rngs=nnx.Rngs(1))
    model = pj.nnx.with_rule(OwnMatmul(nnx.Rngs(0)), {"default": "fa", "up": "bp"},
                             rngs=nnx.Rngs(1))
    assert [path for path, _ in pj.nnx.rule_layers(model)] == ["head"]
    with pytest.raises(pj.nn.RuleMapError, match="'ouput'"):
        pj.nnx.with_rule(OwnMatmul(nnx.Rngs(0)), {"default": "fa", "up": "bp", "ouput": "bp"},
                         rngs=nnx.Rngs(1))


def test_dfa_needs_the_classes_and_then_reaches_every_layer():
    with pytest.raises(ValueError, match="num_classes="):
        pj.nnx.with_rule(ViT(nnx.Rngs(0)), "dfa", rngs=nnx.Rngs(1))
    images = jax.random.normal(jax.random.key(1), (3, 8, 8, 1))
    model = pj.nnx.with_rule(ViT(nnx.Rngs(0)), {"default": "dfa", "patch": "bp"},
                             rngs=nnx.Rngs(1), num_classes=CLASSES)
    grads = nnx.grad(lambda m: reference_vit.loss(m(images), jnp.array([0, 1, 2])))(model)
    mlp_in = nnx.to_pure_dict(grads)["mlp_in"]["kernel"]
    assert np.abs(mlp_in).sum() > 0  # the output error reached it through its tap
    assert not hasattr(model.mlp_in, "tap")  # taps are removed after each call


def test_the_with_rule_examples_run():
    for module in (intercept, nnx_intercept):
        assert doctest.testmod(module).failed == 0


@pytest.mark.parametrize("cell, maps", [
    (lambda r: nnx.LSTMCell(3, 4, rngs=r), ["hf", "hg", "hi", "ho", "if_", "ig", "ii", "io"]),
    (lambda r: nnx.OptimizedLSTMCell(3, 4, rngs=r), ["dense_h", "dense_i"]),
    (lambda r: nnx.GRUCell(3, 4, rngs=r), ["dense_h", "dense_i"]),
    (lambda r: nnx.SimpleCell(3, 4, rngs=r), ["dense_h", "dense_i"]),
])
def test_every_map_of_nnx_rnn_cells_follows_the_rule(cell, maps):
    """No kernel of NNX's cells is left on backprop: each is routed, each gets FA's feedback, and
    the error reaching the inputs goes through it (it differs from backprop's)."""
    rnn = pj.nnx.with_rule(nnx.RNN(cell(nnx.Rngs(0))), "fa", rngs=nnx.Rngs(1))
    assert sorted(p.removeprefix("cell/") for p, _ in pj.nnx.rule_layers(rnn)) == maps
    x = jax.random.normal(jax.random.key(0), (2, 5, 3))

    def input_error(model):
        return nnx.grad(lambda m, x: jnp.sum(m(x)[:, -1] ** 2), argnums=1)(model, x)

    rule = input_error(rnn)
    with pj.nn.backprop():
        bp = input_error(rnn)
    assert float(pj.metrics.angle(rule, bp)) > 5.0


class Scaled(pj.nnx.RuleFollowing):
    """An own NNX layer declared rule-following: ``y = x (s K)``, its product through the rule."""

    def __init__(self, rule, rngs):
        self.kernel = nnx.Param(jax.random.normal(rngs.params(), (4, 3)))
        self.add_feedback(rule, self.kernel[...], rngs)

    def __call__(self, x):
        kernel = 2.0 * self.kernel[...]
        return self.rule_product(lambda rule, fb, key: rule.dense(x, kernel, fb, key), x.dtype)


def test_an_own_nnx_layer_declared_rule_following_sends_its_error_through_the_feedback():
    layer = Scaled("fa", nnx.Rngs(0))
    x, g = jnp.ones((2, 4)), jnp.arange(6.0).reshape(2, 3)
    dx = nnx.grad(lambda m, x: jnp.sum(m(x) * g), argnums=1)(layer, x)
    np.testing.assert_allclose(dx, g @ layer.B[...].T, rtol=1e-6)
    assert [path for path, _ in pj.nnx.rule_layers(nnx.Sequential(layer))] == ["layers/0"]
    assert sorted(pj.metrics.alignment(nnx.Sequential(layer))) == ["layers/0"]
