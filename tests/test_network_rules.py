"""Network-level rules: direct feedback alignment (one forward, one backward pass) and weight mirrors."""
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from jax import lax

import pfa_jax as pj
from pfa_jax import nn as pnn

CLASSES = 3


def batch(shape, n=5, seed=0):
    rng = np.random.default_rng(seed)
    return (rng.normal(size=(n,) + shape).astype(np.float32),
            rng.integers(0, CLASSES, n).astype(np.int32))


def rule_grads(model, variables, images, labels):
    """Gradients of the mean cross-entropy w.r.t. params as one train step computes them."""
    def loss(params):
        logits, _ = model.apply({**variables, "params": params}, images, train=True,
                                mutable=["batch_stats", pnn.TAPS])
        return optax.softmax_cross_entropy_with_integer_labels(logits, labels).mean()
    return jax.grad(loss)(variables["params"])


def output_error(logits, labels):
    """``e = dL/dlogits`` of the mean cross-entropy, written out."""
    return (jax.nn.softmax(logits) - jax.nn.one_hot(labels, CLASSES)) / logits.shape[0]


def projected(e, labels, signal):
    """What DFA sends down instead of ``e``: ``e``, sDFA's ``sign(e)`` or DRTP's negated one-hot
    target, over the batch rows."""
    if signal == "error":
        return e
    return (np.sign(e) if signal == "sign" else -np.eye(CLASSES)[labels]) / len(e)


@pytest.mark.parametrize("signal", ["error", "sign", "target"])
def test_dfa_mlp_updates_match_a_reference(signal):
    images, labels = batch((2, 2, 1))
    model = pj.models.get("ffn2", rule=pj.rules.get("dfa", signal=signal), num_classes=CLASSES,
                          widths=(6, 5))
    variables = model.init({"params": jax.random.key(0)}, images)
    grads = rule_grads(model, variables, images, labels)

    p, b = variables["params"], variables["feedback"]
    x = images.reshape(len(images), -1)
    a1 = x @ p["hidden_0"]["kernel"] + p["hidden_0"]["bias"]
    a2 = jax.nn.relu(a1) @ p["hidden_1"]["kernel"] + p["hidden_1"]["bias"]
    logits = jax.nn.relu(a2) @ p["output"]["kernel"] + p["output"]["bias"]
    e = output_error(logits, labels)
    s = projected(e, labels, signal)
    d2 = (s @ b["output"]["B"]) * (a2 > 0)       # output layer's B: (classes, 5)
    d1 = (s @ b["hidden_1"]["B"]) * (a1 > 0)     # hidden_1's B: (classes, 6)
    expected = {"output": jax.nn.relu(a2).T @ e, "hidden_1": jax.nn.relu(a1).T @ d2,
                "hidden_0": x.T @ d1}
    for layer, kernel_grad in expected.items():
        np.testing.assert_allclose(grads[layer]["kernel"], kernel_grad, rtol=1e-4, atol=1e-6)
    np.testing.assert_allclose(grads["hidden_0"]["bias"], d1.sum(0), rtol=1e-4, atol=1e-6)


class TwoConvNet(nn.Module):
    rule: object = "dfa"

    @nn.compact
    def __call__(self, x, train=False):
        x = jax.nn.relu(pnn.Conv(4, (3, 3), rule=self.rule, name="conv_0")(x))
        x = jax.nn.relu(pnn.Conv(3, (3, 3), strides=2, rule=self.rule, name="conv_1")(x))
        return pnn.add_taps(self, pnn.Dense(CLASSES, rule=self.rule, name="output")(
            x.reshape(x.shape[0], -1)))


@pytest.mark.parametrize("grid, signal", [("input", "error"), ("output", "error"),
                                          ("output", "sign"), ("input", "target")])
def test_dfa_conv_updates_match_a_reference(grid, signal):
    images, labels = batch((6, 6, 2))
    model = TwoConvNet(pj.rules.get("dfa", classes=CLASSES, grid=grid, signal=signal))
    variables = model.init({"params": jax.random.key(1)}, images)
    grads = rule_grads(model, variables, images, labels)

    p, b = variables["params"], variables["feedback"]
    conv = lambda x, k, s=1: lax.conv_general_dilated(x, k, (s, s), "SAME",
                                                      dimension_numbers=("NHWC", "HWIO", "NHWC"))
    a0 = conv(images, p["conv_0"]["kernel"]) + p["conv_0"]["bias"]
    a1 = conv(jax.nn.relu(a0), p["conv_1"]["kernel"], 2) + p["conv_1"]["bias"]
    flat = jax.nn.relu(a1).reshape(len(images), -1)
    e = projected(output_error(flat @ p["output"]["kernel"] + p["output"]["bias"], labels), labels,
                  signal)
    d1 = (e @ b["output"]["B"]).reshape(a1.shape) * (a1 > 0)
    if grid == "input":  # conv_1's feedback (3, 3, classes, 4) on e broadcast over its 6x6 input
        spread = jnp.broadcast_to(e[:, None, None, :], a0.shape[:3] + (CLASSES,))
        d0 = conv(spread, b["conv_1"]["B"]) * (a0 > 0)
    else:  # e broadcast over conv_1's 3x3 output, back through the stride-2 conv with B^T
        spread = jnp.broadcast_to(e[:, None, None, :], a1.shape[:3] + (CLASSES,))
        transposed = jnp.transpose(b["conv_1"]["B"], (0, 1, 3, 2))  # (3, 3, 4, classes)
        d0 = jax.vjp(lambda x: conv(x, transposed, 2), jnp.zeros(a0.shape))[1](spread)[0]
        d0 = d0 * (a0 > 0)
    kernel_grad = lambda x, d, shape, s=1: jax.vjp(lambda k: conv(x, k, s), jnp.zeros(shape))[1](d)[0]
    np.testing.assert_allclose(grads["conv_1"]["kernel"],
                               kernel_grad(jax.nn.relu(a0), d1, p["conv_1"]["kernel"].shape, 2),
                               rtol=1e-4, atol=1e-6)
    np.testing.assert_allclose(grads["conv_0"]["kernel"],
                               kernel_grad(images, d0, p["conv_0"]["kernel"].shape),
                               rtol=1e-4, atol=1e-6)


@pytest.mark.parametrize("strides, padding", [(1, "SAME"), (2, "SAME"), (2, "VALID"),
                                               (1, ((1, 2), (0, 1)))])
def test_dfa_output_grid_projection_is_the_transposed_conv(strides, padding):
    """``grid='output'``: ``dx`` = the input gradient of ``conv(x, B^T)`` (the layer's stride and
    padding) at ``e`` broadcast over the output grid, here by ``jax.vjp`` of a plain lax conv."""
    rule = pj.rules.get("dfa", classes=CLASSES, grid="output")
    x = jax.random.normal(jax.random.key(0), (2, 7, 7, 4))
    kernel = jax.random.normal(jax.random.key(1), (3, 3, 4, 5))
    b = rule.init_feedback(jax.random.key(2), kernel)
    (y, tap), vjp = jax.vjp(lambda x: rule.conv(x, kernel, b, strides=strides, padding=padding), x)
    e = jax.random.normal(jax.random.key(3), tap.shape)
    dx, = vjp((jnp.zeros_like(y), e))
    spread = jnp.broadcast_to(e[:, None, None, :], y.shape[:3] + (CLASSES,))
    transposed = jnp.transpose(b["B"], (0, 1, 3, 2))  # (kh, kw, in, classes)
    plain = lambda x: lax.conv_general_dilated(x, transposed, (strides, strides), padding,
                                               dimension_numbers=("NHWC", "HWIO", "NHWC"))
    expected, = jax.vjp(plain, x)[1](spread)
    np.testing.assert_allclose(dx, expected, rtol=1e-4, atol=1e-5)
    if strides == 2:  # differs from the input-grid projection
        other = pj.rules.get("dfa", classes=CLASSES, grid="input")
        dx_input, = jax.vjp(lambda x: other.conv(x, kernel, b, strides=strides,
                                                 padding=padding), x)[1]((jnp.zeros_like(y), e))
        assert float(jnp.linalg.norm(dx_input - dx) / jnp.linalg.norm(dx)) > 0.3
    if strides == 1 and padding == "SAME":  # agrees in distribution with the input grid: a 1x1 check
        one = pj.rules.get("dfa", classes=CLASSES, grid="input")
        b1 = one.init_feedback(jax.random.key(2), kernel[:1, :1])
        outs = [jax.vjp(lambda x, r=r: r.conv(x, kernel[:1, :1], b1), x)[1]((y, e))[0]
                for r in (rule, one)]
        np.testing.assert_allclose(outs[0], outs[1], rtol=1e-5, atol=1e-6)


class CountingMLP(pj.models.MLP):
    """``ffn2`` that counts how often its forward pass is traced."""

    calls = []

    @nn.compact
    def __call__(self, x, train=False):
        self.calls.append(1)
        return super().__call__(x, train)


def test_one_dfa_train_step_traces_one_forward_pass():
    images, labels = batch((2, 2, 1), n=8)
    model = CountingMLP(rule=pnn.bind_classes("dfa", CLASSES), num_classes=CLASSES, widths=(4,))
    state = pj.train.create_train_state(jax.random.key(0), model, images[:1])
    CountingMLP.calls.clear()
    jax.jit(pj.train.train_step).lower(state, {"image": images, "label": labels})
    assert len(CountingMLP.calls) == 1


def test_resnet_dfa_step_under_jit_and_pmap():
    images, labels = batch((8, 8, 3), n=8)
    # The CIFAR ResNet with one block per stage (ResNet-8): the same stem, option-A shortcuts,
    # BatchNorm and taps as ResNet-20, at a third of the compile time.
    model = pj.models.get("resnet20", rule="dfa", num_classes=CLASSES).clone(blocks_per_stage=1)
    make = lambda: pj.train.create_train_state(jax.random.key(0), model, images[:1],
                                               {"learning_rate": 0.01})
    data = {"image": images, "label": labels}
    single, metrics = jax.jit(pj.train.train_step)(make(), data)
    parallel, _ = jax.pmap(pj.train.train_step, axis_name=pj.train.AXIS)(
        pj.train.replicate(make()), pj.train.split_batch(data))
    parallel = pj.train.unreplicate(parallel)
    assert np.isfinite(float(metrics["loss"]))
    for a, b in zip(jax.tree.leaves(single.params), jax.tree.leaves(parallel.params)):
        np.testing.assert_allclose(a, b, atol=1e-5)
    moved = jax.tree.map(lambda a, b: float(jnp.abs(a - b).max()), single.params, make().params)
    assert moved["stem"]["kernel"] > 0  # the first layer learns from the projected output error


def test_dfa_needs_classes_and_a_model_that_adds_taps():
    images, _ = batch((2, 2, 1))
    with pytest.raises(ValueError, match="number of classes"):
        pj.models.MLP(rule="dfa", widths=(4,)).init({"params": jax.random.key(0)}, images)

    class NoTaps(nn.Module):
        @nn.compact
        def __call__(self, x, train=False):
            return pnn.Dense(CLASSES, rule=pj.rules.get("dfa", classes=CLASSES))(
                x.reshape(x.shape[0], -1))

    state = pj.train.create_train_state(jax.random.key(0), NoTaps(), images[:1])
    with pytest.raises(ValueError, match="add_taps"):
        pj.train.train_step(state, {"image": images, "label": np.zeros(5, np.int32)})
    with pytest.raises(ValueError, match="feature_group_count=2"):
        pj.rules.get("dfa", classes=3).conv(images.repeat(2, -1), jnp.ones((3, 3, 1, 2)),
                                            {"B": jnp.ones((3, 3, 3, 2))}, feature_group_count=2)


def test_weight_mirror_aligns_feedback_and_leaves_forward_params_alone():
    images, _ = batch((4, 4, 1), n=2)

    def state(warmup_steps):
        rule = pj.rules.get("wm", warmup_steps=warmup_steps, noise_batch=128, rate=0.1, decay=0.1)
        model = pj.models.get("ffn2", rule=rule, num_classes=CLASSES, widths=(8,))
        return pj.train.create_train_state(jax.random.key(0), model, images[:1])

    plain, mirrored = state(0), state(100)
    for layer in ("hidden_0", "output"):
        kernel = plain.params[layer]["kernel"]
        assert float(pj.metrics.angle(plain.feedback[layer]["B"], kernel)) > 45
        assert float(pj.metrics.angle(mirrored.feedback[layer]["B"], kernel)) < 10
    jax.tree.map(np.testing.assert_array_equal, plain.params, mirrored.params)


def test_weight_mirror_warmup_and_mirror_steps_during_training():
    images, labels = batch((4, 4, 1), n=16)
    rule = pj.rules.get("wm", warmup_steps=300, rate=0.05, decay=0.05)
    state = pj.train.create_train_state(
        jax.random.key(0), pj.models.get("lenet", rule=rule, num_classes=CLASSES),
        np.zeros((1, 28, 28, 1), np.float32))
    for layer in ("conv_0", "conv_1", "output"):
        assert float(pj.metrics.angle(state.feedback[layer]["B"], state.params[layer]["kernel"])) < 10
    b = np.array(state.feedback["output"]["B"])
    step = jax.jit(pj.train.train_step)
    state, _ = step(state, {"image": np.zeros((16, 28, 28, 1), np.float32), "label": labels})
    assert not np.array_equal(b, state.feedback["output"]["B"])  # one mirror step after the step


def test_dfa_default_grid_is_the_references_and_old_run_directories_keep_theirs(tmp_path):
    """The default is ``'output'`` (BioTorch and the PFA authors' fork); a new run's config.json
    records the grid; a config.json without one (written under the old default) resumes with
    ``'input'``."""
    from pfa_jax.app import config as config_lib
    from pfa_jax.app import resume, spec
    assert pj.rules.get("dfa").grid == "output"
    config = config_lib.default_config()
    config.rule.name = "dfa"
    assert spec.resolve(config).config.rule.options.grid == "output"
    (tmp_path / "config.json").write_text(config.to_json())
    assert resume.load_config(tmp_path).rule.options.grid == "input"
    config.rule.options.grid = "output"
    (tmp_path / "config.json").write_text(config.to_json())
    assert resume.load_config(tmp_path).rule.options.grid == "output"
