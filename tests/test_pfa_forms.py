"""PFA's storage forms (pfa_jax.rules.product_feedback): ``"F"`` (``F = R Bp^T`` plastic, ``C =
Bp Bp^T`` fixed, ``dF = dK C``) and ``"G"`` (``G = F C^-1`` plastic, ``dG = dK``) against ``"R"``
(the authors' ``R`` and ``Bp``), and how a run spec picks the form. References are written here
from the formulas, independently of the rule's code."""
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from pfa_jax import nn as pnn
from pfa_jax import rules, train
from pfa_jax.app import spec
from pfa_jax.app.config import default_config, set_value
from pfa_jax.optim import OptimizerConfig


def plain_conv(x, kernel, strides, groups=1):
    return jax.lax.conv_general_dilated(x, kernel, (strides, strides), "SAME",
                                        dimension_numbers=("NHWC", "HWIO", "NHWC"),
                                        feature_group_count=groups)


@pytest.mark.parametrize("layer, x_shape, kernel_shape, strides, groups", [
    ("dense", (6, 5), (5, 4), 1, 1),      # few rows: dF as x^T (g C), dx as (g C) G^T
    ("dense", (64, 3), (3, 8), 1, 1),     # many rows: dF as dK C, dx through G C formed
    ("conv", (2, 8, 8, 3), (3, 3, 3, 4), 1, 1),
    ("conv", (2, 8, 8, 3), (3, 3, 3, 4), 2, 1),
    ("conv", (1, 4, 4, 40), (1, 1, 40, 6), 2, 1),  # few positions: x^T (g C), (g C) G^T
    ("conv", (1, 4, 4, 40), (1, 1, 20, 6), 2, 2),  # feature groups: dK C, G C formed
])
@pytest.mark.parametrize("form", ["F", "G"])
def test_stored_forms_backward_matches_their_formulas(form, layer, x_shape, kernel_shape, strides,
                                                      groups):
    keys = jax.random.split(jax.random.key(0), 4)
    x = jax.random.normal(keys[0], x_shape)
    rule = rules.get("pfa", expansion=3, form=form)
    kernel = jax.random.normal(keys[1], kernel_shape)
    feedback = rule.init_feedback(keys[2], kernel)
    assert set(feedback) == {"C", form} and feedback[form].shape == kernel.shape
    c = np.asarray(feedback["C"])
    effective = feedback["F"] if form == "F" else np.einsum("...io,op->...ip", feedback["G"], c)
    if layer == "dense":
        apply = lambda x, k, fb: rule.dense(x, k, fb)
        plain = lambda x, k: x @ k
    else:
        apply = lambda x, k, fb: rule.conv(x, k, fb, strides=strides, feature_group_count=groups)
        plain = lambda x, k: plain_conv(x, k, strides, groups)
    y, vjp = jax.vjp(apply, x, kernel, feedback)
    g = jax.random.normal(keys[3], y.shape)
    dx, dkernel, dfeedback = vjp(g)
    # dx: the error through F (= G C) as if it were the kernel; dK: backprop's; dF = dK C and
    # dG = dK; C gets nothing.
    _, plain_vjp = jax.vjp(plain, x, jnp.asarray(effective))
    expected_dx, _ = plain_vjp(g)
    _, kernel_vjp = jax.vjp(plain, x, kernel)
    _, expected_dk = kernel_vjp(g)
    np.testing.assert_allclose(y, plain(x, kernel), rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(dx, expected_dx, rtol=1e-4, atol=1e-4)
    np.testing.assert_allclose(dkernel, expected_dk, rtol=1e-5, atol=1e-5)
    expected_dfeedback = (np.einsum("...io,op->...ip", np.asarray(expected_dk), c) if form == "F"
                          else expected_dk)
    np.testing.assert_allclose(dfeedback[form], expected_dfeedback, rtol=1e-4, atol=1e-4)
    np.testing.assert_array_equal(dfeedback["C"], 0)


def test_stored_forms_start_from_the_r_forms_feedback():
    kernel = jnp.zeros((3, 3, 4, 6))
    key = jax.random.key(3)
    r_form = rules.get("pfa", expansion=2, form="R").init_feedback(key, kernel)
    f_form = rules.get("pfa", expansion=2, form="F").init_feedback(key, kernel)
    g_rule = rules.get("pfa", expansion=2, form="G")
    g_form = g_rule.init_feedback(key, kernel)
    bp = np.asarray(r_form["Bp"], np.float64)
    expected = np.einsum("hwim,om->hwio", r_form["R"], bp)
    for form in (f_form, g_form):
        np.testing.assert_allclose(form["C"], bp @ bp.T, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(f_form["F"], expected, rtol=1e-5, atol=1e-6)
    # G C = F: G solves G (Bp Bp^T) = R Bp^T, i.e. G = R pinv(Bp)
    np.testing.assert_allclose(g_form["G"], np.einsum("hwim,mo->hwio", r_form["R"],
                                                      np.linalg.pinv(bp)), rtol=1e-4, atol=1e-5)
    np.testing.assert_allclose(g_rule.effective_feedback(kernel, g_form), expected, rtol=1e-4,
                               atol=1e-5)
    assert rules.get("pfa", form="F").plastic == ("F",)
    assert rules.get("pfa", form="G").plastic == ("G",)
    assert rules.get("pfa").plastic == ("R",)  # "auto" stores R where the optimizer is unknown


class DenseConv(nn.Module):
    """A stride-2 conv and two dense layers under one rule, in float64."""

    rule: rules.Rule

    @nn.compact
    def __call__(self, x, train: bool = True):
        f64 = {"rule": self.rule, "param_dtype": jnp.float64}
        x = nn.relu(pnn.Conv(6, (3, 3), strides=2, name="conv", **f64)(x))
        x = nn.relu(pnn.Dense(12, name="hidden", **f64)(x.reshape(len(x), -1)))
        return pnn.Dense(3, name="output", **f64)(x)


def train_steps(rule, optimizer, steps=50):
    """``steps`` train steps of ``DenseConv`` in float64 from the same draws; the final state."""
    keys = jax.random.split(jax.random.key(1), steps + 1)
    images = jax.random.normal(keys[0], (max(steps, 1), 8, 8, 8, 2), jnp.float64)
    labels = jax.random.randint(keys[0], (max(steps, 1), 8), 0, 3)
    state = train.create_train_state(jax.random.key(2), DenseConv(rule), images[0], optimizer)
    step = jax.jit(train.train_step)
    for i in range(steps):
        state, _ = step(state, {"image": images[i], "label": labels[i]})
    return state


def relative(a, b):
    return float(jnp.linalg.norm(a - b) / jnp.linalg.norm(b))


@pytest.mark.parametrize("optimizer", [
    OptimizerConfig(learning_rate=0.05, momentum=0.9, weight_decay=(5e-4, 1e-4),
                    wd_milestones=(1,), steps_per_epoch=10),
    OptimizerConfig(learning_rate=(0.05, 0.01), lr_milestones=(2,), momentum=0.9, nesterov=True,
                    weight_decay=1e-3, steps_per_epoch=10),
], ids=["momentum-pfa-first-epoch-wd", "nesterov-lr-steps"])
@pytest.mark.parametrize("form", ["F", "G"])
def test_stored_forms_train_as_the_r_form_under_sgd(form, optimizer):
    """50 SGD steps in float64: the kernels and the effective feedback of the forms agree to
    1e-10 (the identity's rounding), on a stride-2 conv and dense layers."""
    with jax.enable_x64(True):
        start = train_steps(rules.get("pfa", expansion=3, form="R"), optimizer, steps=0)
        r_state = train_steps(rules.get("pfa", expansion=3, form="R"), optimizer)
        stored = train_steps(rules.get("pfa", expansion=3, form=form), optimizer)
        effective_feedback = lambda fb: jnp.einsum("...im,om->...io", fb["R"], fb["Bp"])
        for layer in ("conv", "hidden", "output"):
            kernel_r, kernel_stored = (s.params[layer]["kernel"] for s in (r_state, stored))
            assert kernel_r.dtype == jnp.float64
            assert relative(kernel_stored, kernel_r) < 1e-10
            effective = effective_feedback(r_state.feedback[layer])
            fb = stored.feedback[layer]
            stored_effective = fb["F"] if form == "F" else fb["G"] @ fb["C"]
            assert relative(stored_effective, effective) < 1e-10
            # the feedback moved: the check is not of the initial draws
            assert relative(effective, effective_feedback(start.feedback[layer])) > 1e-3


def test_f_form_differs_under_adam():
    """Adam is not linear in the gradient: the forms part (why "auto" keeps "R" there)."""
    adam = OptimizerConfig(name="adam", learning_rate=1e-2, weight_decay=0.0, steps_per_epoch=10)
    with jax.enable_x64(True):
        r_state = train_steps(rules.get("pfa", expansion=3, form="R"), adam, steps=10)
        f_state = train_steps(rules.get("pfa", expansion=3, form="F"), adam, steps=10)
        fb = r_state.feedback["hidden"]
        effective = jnp.einsum("...im,om->...io", fb["R"], fb["Bp"])
        assert relative(f_state.feedback["hidden"]["F"], effective) > 1e-3


@pytest.mark.parametrize("form", ["F", "G"])
def test_pfa_o_in_a_stored_form_is_kolen_pollack_from_the_same_start(form):
    """``pfa_o``: C = I, so dF = dK (and G = F) and the form is Kolen-Pollack started from
    B_0 = R_0 Bp^T."""
    optimizer = OptimizerConfig(learning_rate=0.05, momentum=0.9, weight_decay=1e-3,
                                steps_per_epoch=10)
    with jax.enable_x64(True):
        pfa_o = train_steps(rules.get("pfa_o", form=form), optimizer)
        start = train_steps(rules.get("pfa_o", form=form), optimizer, steps=0)
        kp_start = train_steps(rules.get("kp"), optimizer, steps=0)
        np.testing.assert_allclose(start.feedback["hidden"]["C"], np.eye(12), atol=1e-12)
        kp_start = kp_start.replace(feedback={layer: {"B": fb[form]}
                                              for layer, fb in start.feedback.items()},
                                    params=start.params)
        keys = jax.random.split(jax.random.key(1), 51)
        images = jax.random.normal(keys[0], (50, 8, 8, 8, 2), jnp.float64)
        labels = jax.random.randint(keys[0], (50, 8), 0, 3)
        step, kp = jax.jit(train.train_step), kp_start  # zero momentum: the start's optimizer state
        for i in range(50):
            kp, _ = step(kp, {"image": images[i], "label": labels[i]})
        for layer in ("conv", "hidden", "output"):
            assert relative(kp.params[layer]["kernel"], pfa_o.params[layer]["kernel"]) < 1e-10
            assert relative(kp.feedback[layer]["B"], pfa_o.feedback[layer][form]) < 1e-10


def resolved(**values):
    config = default_config()
    for key, value in {"rule.name": "pfa", **values}.items():
        set_value(config, key, value)
    return spec.resolve(config)


def test_a_run_spec_stores_g_or_f_exactly_where_it_is_equivalent():
    assert resolved().rule.form == "G"  # SGD, density 1: the paper configs' case
    assert resolved(**{"rule.name": "pfa_o"}).rule.form == "G"  # C = I
    assert resolved(**{"rule.options.expansion": 2}).rule.form == "G"
    assert resolved(**{"rule.options.expansion": 1.5}).rule.form == "F"  # C ill-conditioned
    assert resolved(**{"rule.options.form": "F"}).rule.form == "F"
    assert resolved(**{"optimizer.name": "adam"}).rule.form == "R"
    assert resolved(**{"optimizer.name": "adamw"}).rule.form == "R"
    assert resolved(**{"rule.options.density": 0.5}).rule.form == "R"
    assert resolved(**{"rule.options.form": "R"}).rule.form == "R"
    # The feedback's own optimizer is what matters.
    assert resolved(**{"optimizer.feedback": {"name": "adam"}}).rule.form == "R"
    mapped = resolved(**{"rule.layers": {"output": "bp"}}).rule
    assert mapped["default"].form == "G"
    # The resolved form is written into the config, so config.json says what was stored.
    assert resolved().config.rule.options.form == "G"


def test_invalid_forms_are_refused_with_the_reason():
    for form in ("F", "G"):
        with pytest.raises(ValueError, match=rf"pfa: form='{form}' with density=0.5: F = R Bp\^T "
                           r"cannot keep R's sparsity mask"):
            rules.get("pfa", form=form, density=0.5)
        with pytest.raises(ValueError, match=rf"rule.options.form='{form}' needs an optimizer "
                           r"linear in the gradient for the feedback \(sgd\); optimizer 'adam' "
                           r"is not"):
            resolved(**{"rule.options.form": form, "optimizer.name": "adam"})
    with pytest.raises(ValueError, match=r"form='H' is unknown; valid: \('auto', 'R', 'F', 'G'\)"):
        rules.get("pfa", form="H")
    with pytest.raises(ValueError, match=r"pfa: form='G' with expansion=1.5: C = Bp Bp\^T is "
                       r"ill-conditioned below expansion 2.*use form='F'"):
        rules.get("pfa", form="G", expansion=1.5)
    assert rules.get("pfa_o", form="G").factorable

