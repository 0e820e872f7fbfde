"""The measurement suite (``pfa_jax.metrics``) on tiny models: angles, gradient alignment, sharpness
against the explicit Hessian, FGSM against the analytic worst case, PGD against FGSM, noise."""
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.flatten_util import ravel_pytree

import pfa_jax as pj
from pfa_jax import metrics
from pfa_jax.models.base import Model


class ConvBN(Model):
    """Two conv + BatchNorm + ReLU layers (the second strided), global average pool, output."""

    @nn.compact
    def __call__(self, x, train: bool = False):
        for i, (features, strides) in enumerate(((4, 1), (6, 2))):
            x = nn.relu(self.conv_bn(x, features, 3, strides, train, (f"conv{i}", f"bn{i}")))
        return self.classifier(jnp.mean(x, axis=(1, 2)))


def make_state(model, images, seed=0, learning_rate=0.1):
    return pj.train.create_train_state(jax.random.key(seed), model, images[:1],
                                       {"learning_rate": learning_rate, "momentum": 0.0,
                                        "weight_decay": 0.0})


def random_batch(shape, classes=10, seed=1):
    images_key, labels_key = jax.random.split(jax.random.key(seed))
    return {"image": jax.random.normal(images_key, shape),
            "label": jax.random.randint(labels_key, shape[:1], 0, classes)}


def mlp_state(rule, widths=(16, 16), shape=(32, 4, 4, 1), classes=10, seed=0):
    batch = random_batch(shape, classes)
    model = pj.models.get("ffn2", rule=rule, widths=widths, num_classes=classes)
    return make_state(model, batch["image"], seed), batch


def blobs(n, dim=8, classes=3, seed=0):
    """Gaussian blobs: class ``c`` centred at ``2 e_c``."""
    labels = jax.random.randint(jax.random.key(seed), (n,), 0, classes)
    centres = 2.0 * jnp.eye(classes, dim)
    images = centres[labels] + jax.random.normal(jax.random.key(seed + 1), (n, dim))
    return {"image": images, "label": labels}


@pytest.fixture(scope="module")
def trained_state():
    """``ffn2`` (one hidden layer of 32) trained briefly with BP on Gaussian blobs."""
    data = blobs(512)
    state = make_state(pj.models.get("ffn2", rule="bp", widths=(32,), num_classes=3),
                       data["image"])
    for epoch in range(10):
        state, _ = pj.train.train_epoch(state, data["image"], data["label"],
                                        jax.random.key(epoch), 64)
    return state, blobs(256, seed=7)


# -- angles ---------------------------------------------------------------------------------------
def test_angles_of_identical_opposite_and_orthogonal_tensors():
    a = jax.random.normal(jax.random.key(0), (7, 5))
    b = jax.random.normal(jax.random.key(1), (7, 5))
    orthogonal = b - jnp.vdot(a, b) / jnp.vdot(a, a) * a
    assert float(metrics.angle(a, a)) == 0.0
    assert float(metrics.angle(a, 3.0 * a)) == pytest.approx(0.0, abs=1e-5)
    assert float(metrics.angle(a, -a)) == 180.0
    assert float(metrics.angle(a, orthogonal)) == pytest.approx(90.0, abs=1e-4)
    assert float(metrics.angle(jnp.array([1.0, 0.0]), jnp.array([1.0, 1.0]))) == pytest.approx(45.0)


# -- gradient alignment ---------------------------------------------------------------------------
@pytest.mark.parametrize("rule", pj.rules.names())
def test_gradient_alignment_of_every_rule(rule):
    """BP: exactly the true gradients. Every other rule: the true error at the output layer (DFA's
    output layer is ordinary too), different ones below. Weight alignment: every layer with a
    kernel-shaped feedback (none under DFA), 0 degrees for BP."""
    state, batch = mlp_state(rule)
    weights = jax.device_get(metrics.alignment(state))
    assert set(weights) == (set() if rule == "dfa" else {"hidden_0", "hidden_1", "output"})
    if rule == "bp":
        for w in weights.values():
            assert w["weight_angle"] == 0.0 and w["norm_ratio"] == pytest.approx(1.0)
    result = jax.device_get(metrics.gradient_alignment(state, batch))
    assert set(result) == {"hidden_0", "hidden_1", "output"}
    assert all(np.isfinite(v) for layer in result.values() for v in layer.values())
    hidden = ("hidden_0", "hidden_1") if rule != "bp" else ()
    for name, layer in result.items():
        assert layer["delta_norm_bp"] > 0
        if name in hidden:
            assert layer["grad_angle"] > 0.5 and layer["delta_angle"] > 0.5
            assert layer["delta_norm_rule"] != pytest.approx(layer["delta_norm_bp"])
        else:
            assert layer["grad_angle"] == pytest.approx(0.0, abs=1e-3)
            assert layer["delta_angle"] == pytest.approx(0.0, abs=1e-3)
            assert layer["delta_norm_rule"] == pytest.approx(layer["delta_norm_bp"], rel=1e-6)


def test_gradient_alignment_of_a_conv_model():
    batch = random_batch((8, 12, 12, 1))
    state = make_state(pj.models.get("lenet", rule="usf"), batch["image"])
    result = jax.device_get(metrics.gradient_alignment(state, batch))
    assert set(result) == {"conv_0", "conv_1", "dense_0", "dense_1", "output"}
    assert 0.0 < result["conv_0"]["grad_angle"] < 90.0  # sign-concordant feedback: better than random
    assert result["output"]["grad_angle"] == pytest.approx(0.0, abs=1e-3)


@pytest.fixture(scope="module")
def conv_bn_state():
    """``ConvBN`` with PFA (3 classes) and two batches of different sizes."""
    batches = [random_batch((6, 4, 4, 1), 3, seed=1), random_batch((5, 4, 4, 1), 3, seed=2)]
    return make_state(ConvBN(rule="pfa", num_classes=3), batches[0]["image"]), batches


def test_gradient_alignment_with_batchnorm_uses_batch_statistics(conv_bn_state):
    """Both passes normalise with the batch's statistics: the output layer's error is the same under
    the rule and BP, and is that of the training-mode logits (at init the running statistics are
    0 and 1, not the batch's)."""
    state, (batch, _) = conv_bn_state
    result = jax.device_get(metrics.gradient_alignment(state, batch))
    assert set(result) == {"conv0", "conv1", "output"}
    logits, _ = state.model.apply(state.variables(), batch["image"], train=True,
                                  mutable=["batch_stats"])
    error = jax.grad(lambda z: pj.train.cross_entropy(z, batch["label"]).mean())(logits)
    assert result["output"]["delta_norm_bp"] == pytest.approx(float(jnp.linalg.norm(error)), rel=1e-5)
    assert result["output"]["delta_norm_rule"] == pytest.approx(result["output"]["delta_norm_bp"])
    assert result["output"]["grad_angle"] == pytest.approx(0.0, abs=1e-3)
    assert result["conv0"]["grad_angle"] > 5.0 and result["conv0"]["delta_angle"] > 5.0


def test_a_model_without_a_rule_field_is_measured():
    class Plain(nn.Module):  # layers with their own rules, no model-level rule field
        @nn.compact
        def __call__(self, x, train=False):
            x = nn.relu(pj.nn.Dense(5, rule="bp", name="hidden")(x.reshape(x.shape[0], -1)))
            return pj.nn.Dense(3, rule="fa", name="output")(x)

    batch = random_batch((4, 2, 2, 1), classes=3)
    state = make_state(Plain(), batch["image"])
    angles = metrics.gradient_alignment(state, batch)
    assert set(angles) == {"hidden", "output"}
    assert float(angles["output"]["grad_angle"]) == pytest.approx(0.0, abs=1e-3)
    assert float(angles["hidden"]["grad_angle"]) > 1.0  # the error came down through FA's B
    assert float(metrics.alignment(state)["output"]["weight_angle"]) > 1.0


# -- sharpness ------------------------------------------------------------------------------------
def explicit_hessian(state, batches):
    """Hessian of the eval-mode mean loss over all examples w.r.t. the flattened params, by plain
    autodiff (a BP clone of the model: ``jax.hessian`` through a rule's custom VJP would not be a Hessian)."""
    flat, unravel = ravel_pytree(state.params)
    images = jnp.concatenate([b["image"] for b in batches])
    labels = jnp.concatenate([b["label"] for b in batches])
    model = state.model.clone(rule="bp")

    def loss(vector):
        logits = model.apply({**state.variables(), "params": unravel(vector)}, images)
        return pj.train.cross_entropy(logits, labels).mean()

    return jax.jit(jax.hessian(loss))(flat)


@pytest.fixture(scope="module")
def mlp_fa_state():
    """``ffn2`` with one hidden layer of 4 and FA (3 classes), two batches of different sizes."""
    batches = [random_batch((12, 2, 2, 1), 3, seed=1), random_batch((5, 2, 2, 1), 3, seed=2)]
    model = pj.models.get("ffn2", rule="fa", widths=(4,), num_classes=3)
    return make_state(model, batches[0]["image"]), batches


@pytest.mark.parametrize("fixture", ["mlp_fa_state", "conv_bn_state"])
def test_sharpness_matches_the_explicit_hessian(fixture, request):
    """The Hessian of the loss (BatchNorm in eval mode) over all examples of both batches."""
    state, batches = request.getfixturevalue(fixture)
    eigenvalues = np.linalg.eigvalsh(np.asarray(explicit_hessian(state, batches), np.float64))
    result = metrics.sharpness(state, batches, jax.random.key(3), iterations=1000, tolerance=1e-7,
                               probes=1000)
    top = eigenvalues[np.argmax(np.abs(eigenvalues))]
    assert result["converged"] and result["relative_change"] < 1e-7
    assert result["top_eigenvalue"] == pytest.approx(top, rel=1e-3)
    assert abs(result["trace"] - eigenvalues.sum()) < 4 * result["trace_std_error"]
    assert result["trace_std_error"] < 0.1 * abs(eigenvalues.sum())
    assert result["probes"] == 1000


def test_sharpness_reports_no_convergence_when_out_of_iterations(mlp_fa_state):
    state, (batch, _) = mlp_fa_state
    result = metrics.sharpness(state, batch, iterations=2, tolerance=0.0, probes=2)
    assert result["iterations"] == 2 and not result["converged"]
    with pytest.raises(ValueError, match="probes"):
        metrics.sharpness(state, batch, probes=1)


# -- adversarial robustness -----------------------------------------------------------------------
def test_fgsm_on_a_linear_model_is_the_analytic_worst_case():
    """Binary logistic regression: the loss depends on the input only through the margin
    ``m = x.w + b`` (``w, b`` the differences of the true and the other class), and over the L-inf
    ball of radius ``eps`` its minimum is ``m - eps ||w||_1`` (Hoelder), attained by
    ``x - eps sign(w)``, which FGSM must return exactly."""
    batch = random_batch((64, 6), classes=2)
    state = make_state(pj.models.get("ffn2", rule="bp", widths=(), num_classes=2), batch["image"])
    kernel, bias = state.params["output"]["kernel"], state.params["output"]["bias"]
    sign = jnp.where(batch["label"] == 1, 1.0, -1.0)[:, None]
    w = sign * (kernel[:, 1] - kernel[:, 0])
    margins = jnp.sum(batch["image"] * w, axis=1) + sign[:, 0] * (bias[1] - bias[0])
    eps = 0.3
    images = metrics.attack_images(state, batch, eps, attack="fgsm")
    np.testing.assert_allclose(images, batch["image"] - eps * jnp.sign(w), rtol=1e-6)
    worst = margins - eps * jnp.sum(jnp.abs(w), axis=1)
    logits = state.model.apply(state.variables(), images)
    np.testing.assert_allclose(sign[:, 0] * (logits[:, 1] - logits[:, 0]), worst, atol=1e-5)
    result = metrics.adversarial(state, batch, [0.0, eps], attack="fgsm")
    assert result["clean_accuracy"] == pytest.approx(float(jnp.mean(margins > 0)))
    assert result["robust_accuracy"] == pytest.approx([float(jnp.mean(margins > 0)),
                                                       float(jnp.mean(worst > 0))])
    assert result["attack"] == "fgsm" and result["gradient"] == "true" and not result["diagnostic"]
    scaled = metrics.attack_images(state, batch, eps / 2, attack="fgsm", scale=2.0)
    np.testing.assert_allclose(scaled, images, rtol=1e-6)


def test_pgd_is_at_least_as_strong_as_fgsm(trained_state):
    state, test = trained_state
    epsilons = [0.25, 0.5, 1.0]
    fgsm = metrics.adversarial(state, test, epsilons, attack="fgsm")
    pgd = metrics.adversarial(state, test, epsilons, attack="pgd", steps=10)
    assert fgsm["clean_accuracy"] == pgd["clean_accuracy"] > 0.8
    assert fgsm["robust_accuracy"][-1] < fgsm["clean_accuracy"]
    for strong, weak in zip(pgd["robust_accuracy"], fgsm["robust_accuracy"]):
        assert strong <= weak
    assert pgd["robust_accuracy"][-1] < fgsm["robust_accuracy"][-1]
    assert pgd["steps"] == 10


def test_pgd_stays_in_the_ball_and_the_bounds(trained_state):
    state, test = trained_state
    lower, upper = -0.5, 1.5
    test = {**test, "image": jnp.clip(test["image"], lower, upper)}
    images = metrics.attack_images(state, test, 0.5, jax.random.key(0), attack="pgd", steps=5,
                                   step_size=0.2, lower=lower, upper=upper)
    assert float(jnp.max(jnp.abs(images - test["image"]))) <= 0.5 + 1e-6
    assert float(images.min()) >= lower and float(images.max()) <= upper


def test_attacking_through_the_rule_is_a_labelled_diagnostic(trained_state):
    """Through BP's own backward pass the attack is the true one; through FA's it is not."""
    bp_state, test = trained_state
    fa_state = make_state(pj.models.get("ffn2", rule="fa", widths=(32,), num_classes=3),
                          test["image"])
    for state, same in ((bp_state, True), (fa_state, False)):
        true = metrics.attack_images(state, test, 0.3, gradient="true")
        through_rule = metrics.attack_images(state, test, 0.3, gradient="rule")
        assert bool(jnp.all(true == through_rule)) == same
    result = metrics.adversarial(fa_state, [test], [0.3], attack="pgd", gradient="rule", steps=3)
    assert result["gradient"] == "rule" and result["diagnostic"]
    assert 0.0 <= result["robust_accuracy"][0] <= 1.0


@pytest.mark.parametrize("kwargs, message", [
    (dict(attack="cw"), "valid attacks: fgsm, pgd"),
    (dict(gradient="feedback"), "valid: true, rule"),
    (dict(epsilons=[-0.1]), "epsilons must be >= 0"),
])
def test_bad_attack_options_are_rejected(trained_state, kwargs, message):
    state, test = trained_state
    with pytest.raises(ValueError, match=message):
        metrics.adversarial(state, test, **{"epsilons": [0.1], **kwargs})


def test_gaussian_noise_accuracy(trained_state):
    state, test = trained_state
    halves = [jax.tree.map(lambda x: x[:100], test), jax.tree.map(lambda x: x[100:], test)]
    clean = float(pj.train.evaluate(state, test["image"], test["label"])["accuracy"])
    result = metrics.corruption(state, halves, [0.0, 3.0], jax.random.key(0))
    assert result["sigmas"] == [0.0, 3.0]
    assert result["accuracy"][0] == pytest.approx(clean, abs=1e-6)
    assert result["accuracy"][1] < clean
    with pytest.raises(ValueError, match="sigmas must be >= 0"):
        metrics.corruption(state, test, [-1.0])


def test_the_metrics_do_not_import_nnx():
    """The dependency runs one way: pfa_jax.nnx registers its models with ``as_state``."""
    import ast
    import pathlib

    from flax import nnx
    folder = pathlib.Path(pj.metrics.__file__).parent
    imported = [alias.name if isinstance(node, ast.Import) else f"{node.module}.{alias.name}"
                for p in folder.glob("*.py") for node in ast.walk(ast.parse(p.read_text()))
                if isinstance(node, ast.Import | ast.ImportFrom) for alias in node.names]
    assert imported and [name for name in imported if "nnx" in name] == []
    assert pj.metrics.as_state.dispatch(nnx.Module) is pj.nnx.linen_state
