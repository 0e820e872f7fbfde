"""Two Routes' alignment family: each primitive's gradient against ``jax.grad`` of its formula, noise
probes, and Kolen-Pollack and weight mirrors expressed in the family. The rules' full backward
(``dx``, ``dK``, ``dF``) against the formulas on every layer layout is in test_rules.py."""
import functools
import re

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from reference_ops import alignment_loss, plain_conv

import pfa_jax as pj
from pfa_jax.rules import alignment, ops

LAYERS = [pytest.param((6, 5), (5, 4), None, id="dense"),
          pytest.param((3, 7, 7, 3), (3, 3, 3, 4), {"strides": 2, "padding": "SAME"}, id="conv-s2")]


def normal(seed, shape, dtype=jnp.float64):
    return jnp.asarray(np.random.default_rng(seed).standard_normal(shape), dtype)


def layer(conv_kwargs):
    """(the pfa_jax op, the plain forward map) of a layer case."""
    if conv_kwargs is None:
        return ops.DenseOp(), jnp.matmul
    return (ops.conv_op(2, conv_kwargs["strides"], conv_kwargs["padding"]),
            functools.partial(plain_conv, **conv_kwargs))


@pytest.mark.parametrize("primitive", list(alignment.GRADIENTS))
@pytest.mark.parametrize("x_shape, kernel_shape, conv_kwargs", LAYERS)
def test_primitive_gradient_matches_its_formula(primitive, x_shape, kernel_shape, conv_kwargs):
    with jax.enable_x64(True):
        u, kernel, f = normal(0, x_shape), normal(1, kernel_shape), normal(2, kernel_shape)
        op, forward = layer(conv_kwargs)
        only = pj.rules.get("alignment", **{primitive: 1.0})
        want = jax.grad(lambda b: alignment_loss(only, u, kernel, b, forward))(f)
        got = alignment.GRADIENTS[primitive](alignment.Probe(op, u, kernel, f))
        assert float(jnp.linalg.norm(want)) > 0
        np.testing.assert_allclose(got, want, rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("name, options", [("aa", {}), ("ia", {"normalize": False, "gamma": 0.1})])
def test_noise_probe(name, options):
    """With ``inputs='noise'`` the alignment loss is taken on ``sigma N(0, 1)`` drawn from
    ``fold_in(key, 0)``, whatever the data; the error sent down is still ``g F^T``."""
    rule = pj.rules.get(name, inputs="noise", sigma=0.5, **options)
    assert rule.needs_key
    x, kernel, key = normal(0, (6, 5), jnp.float32), normal(1, (5, 4), jnp.float32), jax.random.key(3)
    f = rule.init_feedback(jax.random.key(4), kernel)["B"]
    g = normal(5, (6, 4), jnp.float32)

    def cotangents(x):
        return jax.vjp(lambda x_, k_, b_: rule.dense(x_, k_, {"B": b_}, key), x, kernel, f)[1](g)

    dx, dkernel, df = cotangents(x)
    noise = 0.5 * jax.random.normal(jax.random.fold_in(key, 0), x.shape)
    want = jax.grad(lambda b: alignment_loss(rule, noise, kernel, b, jnp.matmul))(f)
    np.testing.assert_allclose(df, want, rtol=1e-4, atol=1e-6)
    np.testing.assert_allclose(dx, g @ f.T, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(dkernel, x.T @ g, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(cotangents(2 * x + 1)[2], df, rtol=1e-6)  # the data plays no part
    with pytest.raises(ValueError, match="needs a key"):
        jax.grad(lambda k_: jnp.sum(rule.dense(x, k_, {"B": f})))(kernel)


@pytest.mark.parametrize("x_shape, kernel_shape, conv_kwargs", LAYERS)
@pytest.mark.parametrize("name, options", [("aa", {}), ("ia", {"normalize": False, "gamma": 0.1})])
def test_probe_batch_takes_the_first_rows(name, options, x_shape, kernel_shape, conv_kwargs):
    """``probe_batch=m`` takes the alignment loss on the first ``m`` rows of the layer's input
    (means over those ``m``), or on ``m`` noise samples; ``dx`` and ``dK`` still use the whole
    batch. More rows than the batch has means all of them."""
    op, forward = layer(conv_kwargs)
    x, kernel, f = (normal(i, shape, jnp.float32) for i, shape in
                    enumerate((x_shape, kernel_shape, kernel_shape)))
    g, key = normal(5, forward(x, kernel).shape, jnp.float32), jax.random.key(3)
    close = functools.partial(np.testing.assert_allclose, rtol=1e-4, atol=1e-5)

    def cotangents(rule):
        return jax.vjp(lambda x_, k_, b_: rule.apply(op, x_, k_, {"B": b_}, key), x, kernel, f)[1](g)

    def loss_grad(rule, u):
        return jax.grad(lambda b: alignment_loss(rule, u, kernel, b, forward))(f)

    noise = jax.random.normal(jax.random.fold_in(key, 0), (2, *x.shape[1:]))
    for inputs, probe in (("data", x[:2]), ("noise", noise)):
        rule = pj.rules.get(name, probe_batch=2, inputs=inputs, **options)
        dx, dkernel, df = cotangents(rule)
        close(dx, jax.vjp(lambda u: forward(u, f), x)[1](g)[0])
        close(dkernel, jax.vjp(lambda k: forward(x, k), kernel)[1](g)[0])
        close(df, loss_grad(rule, probe))
        if inputs == "data":
            assert not np.allclose(df, loss_grad(rule, x), atol=1e-3)  # not the whole batch's
    close(cotangents(pj.rules.get(name, probe_batch=x_shape[0], **options))[2],
          cotangents(pj.rules.get(name, **options))[2])  # the whole batch, as probe_batch=0
    with pytest.raises(ValueError, match=f"probe_batch={x_shape[0] + 1} exceeds"):
        cotangents(pj.rules.get(name, probe_batch=x_shape[0] + 1, **options))


def small_state(rule, tx, feedback_tx):
    model = pj.models.get("ffn2", rule=rule, num_classes=3, widths=(8,))
    images = normal(0, (4, 3, 3, 1), jnp.float32)
    return pj.train.create_train_state(jax.random.key(0), model, images, tx,
                                       feedback_tx=feedback_tx), images


def test_kolen_pollack_is_the_tied_rule_with_decay():
    """``alignment(tie=True, decay=wd / 2)`` stepped by plain SGD equals ``kp`` whose feedback has
    weight decay ``wd``: both give ``B`` the update ``dK + wd B``."""
    wd, sgd = 0.1, optax.sgd(0.2, momentum=0.9)
    kp, images = small_state(pj.rules.get("kp"), sgd, optax.chain(optax.add_decayed_weights(wd), sgd))
    tied, _ = small_state(pj.rules.get("alignment", tie=True, decay=wd / 2), sgd, sgd)
    chex_close = functools.partial(np.testing.assert_allclose, rtol=1e-5, atol=1e-6)
    jax.tree.map(chex_close, kp.feedback, tied.feedback)
    labels = jnp.arange(4) % 3
    step = jax.jit(pj.train.train_step)
    for i in range(6):
        batch = {"image": images + 0.1 * i, "label": labels}
        (kp, _), (tied, _) = step(kp, batch), step(tied, batch)
    jax.tree.map(chex_close, (kp.params, kp.feedback), (tied.params, tied.feedback))
    assert not np.allclose(kp.feedback["hidden_0"]["B"], small_state(
        pj.rules.get("kp"), sgd, sgd)[0].feedback["hidden_0"]["B"])  # B did move


def test_weight_mirror_is_decay_plus_amp_on_noise():
    """One SGD step (learning rate ``lr``) of ``alignment(decay=a, amp=b, inputs='noise')`` on a dense
    layer is ``wm``'s mirror step with ``decay = 2 lr a`` and ``rate = lr b`` on the same noise."""
    lr, decay, rate, sigma = 0.5, 0.05, 0.08, 0.7
    x, kernel = normal(0, (16, 5), jnp.float32), normal(1, (5, 4), jnp.float32)
    f, key = normal(2, (5, 4), jnp.float32), jax.random.key(7)
    wm = pj.rules.get("wm", sigma=sigma, rate=rate, decay=decay, noise_batch=16, steps=1)
    mirrored = wm.mirror(key, kernel, {"B": f}, warmup=False)["B"]
    rule = pj.rules.get("alignment", decay=decay / (2 * lr), amp=rate / lr, inputs="noise",
                        sigma=sigma)
    df = jax.grad(lambda b: jnp.sum(rule.dense(x, kernel, {"B": b}, key)))(f)
    np.testing.assert_allclose(f - lr * df, mirrored, rtol=1e-5, atol=1e-6)
    assert not np.allclose(mirrored, f)


def test_symmetric_alignment_aligns_the_feedback():
    """SA's default loss has the fixed point ``B = K``: training brings each layer's feedback within
    15 degrees of its kernel (it chases a moving K), from the 90 degrees of an independent draw."""
    state, _ = small_state(pj.rules.get("sa"), optax.sgd(0.1, momentum=0.9), None)
    rng = np.random.default_rng(0)
    images = jnp.asarray(rng.normal(size=(64, 3, 3, 1)), jnp.float32)
    labels = jnp.asarray(rng.integers(0, 3, 64), jnp.int32)
    angles = lambda s: pj.metrics.alignment(s)  # noqa: E731
    before = angles(state)
    for epoch in range(12):
        state, _ = pj.train.train_epoch(state, images, labels, jax.random.key(epoch), batch_size=8)
    after = angles(state)
    for name in ("hidden_0", "output"):
        assert before[name]["weight_angle"] > 60 and after[name]["weight_angle"] < 15, (before, after)


def test_symmetric_alignment_relaxes_at_lr_times_scale():
    """Stepped by plain SGD (no momentum), SA moves ``B`` by ``lr scale (K - B)``
    (docs/rules.md): at ``lr scale = 1`` one step sets every layer's feedback to the kernel it
    saw, at ``lr scale = 0.3`` 30 % of the way."""
    lr, labels = 0.05, jnp.arange(4) % 3
    for rate in (1.0, 0.3):
        state, images = small_state(pj.rules.get("sa", scale=rate / lr),
                                    optax.sgd(lr, momentum=0.9), optax.sgd(lr))
        for i in range(3):
            before = state
            state, _ = pj.train.train_step(state, {"image": images + 0.1 * i, "label": labels})
            for name, fb in state.feedback.items():
                kernel, old = before.params[name]["kernel"], before.feedback[name]["B"]
                np.testing.assert_allclose(fb["B"], old + rate * (kernel - old), rtol=1e-5, atol=1e-6)
                assert not np.allclose(state.params[name]["kernel"], kernel)  # K moved on


def feedback_signal(apply, feedback):
    """``B``'s gradient through the layer ``apply(B)`` under a zero output cotangent: the rule's
    alignment signal alone."""
    out, pullback = jax.vjp(apply, feedback)
    return pullback(jnp.zeros_like(out))[0]


def test_information_alignment_is_stable_below_its_null_bound():
    """IA under plain SGD with ``K`` held (dense, gamma = 0): ``dF = scale (2 beta F K^T S K -
    alpha S K)``, so ``F - F*`` is multiplied by ``I - 2 lr beta scale K^T S K`` each step, with
    ``F* = (alpha / 2 beta) S K (K^T S K)^-1`` (docs/rules.md). Below the bound ``2 lr beta scale
    lambda_max(K^T S K) < 2`` F converges to ``F*``; above it, it grows without bound."""
    with jax.enable_x64(True):
        _check_null_bound()


def _check_null_bound():
    x, kernel = normal(0, (64, 8)), normal(1, (8, 4))
    rule = pj.rules.get("ia", normalize=False, alpha=1.0, beta=0.5, scale=3.0)
    covariance = x.T @ x / x.shape[0]
    curvature = kernel.T @ covariance @ kernel
    fixed_point = covariance @ kernel @ jnp.linalg.inv(curvature)  # alpha / 2 beta = 1
    top = float(jnp.linalg.eigvalsh(curvature)[-1])

    @jax.jit
    def step(feedback, lr):
        return feedback - lr * feedback_signal(lambda b: rule.dense(x, kernel, {"B": b}), feedback)

    for factor, stable in ((1.9, True), (2.1, False)):
        lr = factor / (2 * rule.beta * rule.scale * top)
        feedback = normal(2, kernel.shape)
        for _ in range(3000):
            feedback = step(feedback, lr)
        if stable:
            np.testing.assert_allclose(feedback, fixed_point, rtol=1e-6, atol=1e-8)
        else:
            assert float(jnp.linalg.norm(feedback - fixed_point)) > 1e6


def test_activation_alignment_curvature_is_at_most_the_window_size_on_normalised_probes():
    """AA's signal is ``scale S (2 alpha F - beta K)``; with ``normalize`` every probe sample has
    unit norm, so ``lambda_max(S) <= kh kw`` for a conv (each input entry lies in at most
    ``kh kw`` windows) and plain SGD on ``F`` is stable below ``lr scale < 2 / (2 alpha kh kw)``
    (docs/rules.md). Smooth inputs come close to the bound at stride 1; a stride of 2 stays
    below it (each entry lies in fewer windows)."""
    with jax.enable_x64(True):
        _check_window_bound()


def _check_window_bound():
    rule = pj.rules.get("aa")
    ramp = jnp.linspace(0.0, 1.0, 16)
    smooth = ramp[None, :, None, None] * ramp[None, None, :, None] + 0.05 * normal(0, (8, 16, 16, 2))
    kernel = normal(1, (3, 3, 2, 4))
    for strides, least in ((1, 0.5), (2, 0.1)):
        def signal(feedback):
            return feedback_signal(lambda b: rule.conv(smooth, kernel, {"B": b}, None,
                                                       strides=strides, padding="SAME"), feedback)

        linear = jax.jit(lambda v: signal(v) - signal(jnp.zeros_like(v)))
        v = normal(2, kernel.shape)
        for _ in range(100):
            w = linear(v)
            top, v = float(jnp.vdot(v, w) / jnp.vdot(v, v)), w / jnp.linalg.norm(w)
        assert 2 * rule.alpha * 9 * least < top <= 2 * rule.alpha * 9 * (1 + 1e-5), (strides, top)


@pytest.mark.parametrize("name, options, message", [
    ("sa", {"inputs": "images"}, "sa: inputs='images' is unknown; valid: ('data', 'noise')"),
    ("aa", {"sigma": 0.0}, "aa: sigma=0.0 must be a positive number"),
    ("ia", {"beta": -1.0}, "ia: beta=-1.0 must be a finite number >= 0"),
    ("sa", {"scale": float("inf")}, "sa: scale=inf must be a finite number >= 0"),
    ("alignment", {"null": "big"}, "alignment: null='big' must be a number"),
    ("alignment", {"tie": 1.0}, "alignment: tie=1.0 must be True or False"),
    ("aa", {"gamma": 1.0}, "rule 'aa' has no option(s) ['gamma']"),
    ("ia", {"probe_batch": -1}, "ia: probe_batch=-1 must be >= 0 (0: the whole batch)"),
    ("aa", {"probe_batch": 2.5}, "aa: probe_batch=2.5 must be an int"),
])
def test_bad_options(name, options, message):
    with pytest.raises(ValueError, match=re.escape(message)):
        pj.rules.get(name, **options)
