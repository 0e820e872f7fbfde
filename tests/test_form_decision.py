"""PFA's ``form="auto"`` decided by the library for the optimizer that steps the feedback
(``pfa_jax.rules.forms``): the probe of an optimizer, the decision in ``create_train_state`` for a
model's ``rule`` field and for ``with_rule``, and the decided state trained against the authors'
``"R"`` form, written here as its own state."""
import flax.linen as nn
import jax
import numpy as np
import optax
import pytest

import pfa_jax as pj
from pfa_jax.rules import forms

COMMUTING = {
    "sgd": optax.sgd(0.1),
    "momentum": optax.sgd(0.1, momentum=0.9),
    "nesterov": optax.sgd(0.1, momentum=0.9, nesterov=True),
    "coupled decay": optax.chain(optax.add_decayed_weights(1e-4), optax.sgd(0.1, momentum=0.9)),
    "schedule": optax.sgd(optax.cosine_decay_schedule(0.1, 100), momentum=0.9),
    "injected": optax.inject_hyperparams(optax.sgd)(learning_rate=0.1, momentum=0.9),
    "papers' sgd": pj.optim.coupled_sgd(0.1, 0.9, 5e-3),
}
NOT_COMMUTING = {
    "adam": optax.adam(1e-3),
    "adamw": optax.adamw(1e-3),
    "lion": optax.lion(1e-4),
    "rmsprop": optax.rmsprop(1e-3),
    "clip 1": optax.chain(optax.clip_by_global_norm(1.0), optax.sgd(0.1)),
    "clip 1e5": optax.chain(optax.clip_by_global_norm(1e5), optax.sgd(0.1)),
    "elementwise clip": optax.chain(optax.clip(1.0), optax.sgd(0.1)),
    "lars": optax.lars(0.1),
    "noise": optax.chain(optax.add_noise(0.1, 0.5, 0), optax.sgd(0.1)),
    "shape mask": optax.masked(optax.sgd(0.1), {"only": True}),  # cannot run on the probe
}


@pytest.mark.parametrize("name", COMMUTING)
def test_sgd_family_commutes_with_right_products(name):
    assert forms.commutes(COMMUTING[name])


@pytest.mark.parametrize("name", NOT_COMMUTING)
def test_other_optimizers_do_not(name):
    assert not forms.commutes(NOT_COMMUTING[name])


def state_of(rule, tx, model="ffn2", **options):
    sample = jax.random.uniform(jax.random.key(1), (2, 28, 28, 1))
    return pj.train.create_train_state(jax.random.key(0),
                                       pj.models.get(model, rule=rule, **options), sample, tx)


def test_create_train_state_decides_auto_for_its_optimizer():
    sgd, adam = COMMUTING["momentum"], NOT_COMMUTING["adam"]
    state = state_of("pfa", sgd)
    assert state.model.rule.form == "G" and set(state.feedback["hidden_0"]) == {"C", "G"}
    assert state_of(pj.rules.get("pfa", expansion=1), sgd).model.rule.form == "F"
    assert state_of(pj.rules.get("pfa", density=0.5), sgd).model.rule.form == "R"
    adam_state = state_of("pfa", adam)
    assert adam_state.model.rule.form == "R" and set(adam_state.feedback["hidden_0"]) == {"Bp", "R"}
    # the feedback's own optimizer is what counts, and a rule map's PFA entries are decided
    sample = jax.random.uniform(jax.random.key(1), (2, 28, 28, 1))
    model = pj.models.get("ffn2", rule={"default": "pfa", "output": "bp"})
    mapped = pj.train.create_train_state(jax.random.key(0), model, sample, sgd, feedback_tx=adam)
    assert mapped.model.rule["default"].form == "R" and mapped.model.rule["output"] == "bp"
    assert state_of("kp", sgd).model.rule == "kp"


def test_with_rule_decides_auto_for_a_flax_model():
    class Plain(nn.Module):
        @nn.compact
        def __call__(self, x, train=False):
            x = nn.relu(nn.Dense(16, name="hidden")(x.reshape(x.shape[0], -1)))
            return nn.Dense(10, name="head")(x)

    state = pj.train.create_train_state(jax.random.key(0), pj.nn.with_rule(Plain(), "pfa"),
                                        jax.numpy.ones((2, 8)), COMMUTING["momentum"])
    assert state.model.rule.form == "G" and set(state.feedback["hidden"]) == {"C", "G"}


def test_an_explicit_form_under_adam_is_kept_with_a_warning():
    with pytest.warns(UserWarning, match=r"pfa: form='F' under a feedback optimizer that does not "
                      r"commute.*trains another algorithm than the authors' form='R'"):
        state = state_of(pj.rules.get("pfa", form="F"), NOT_COMMUTING["adam"])
    assert state.model.rule.form == "F"


def test_the_decided_form_trains_as_the_authors_form():
    """Three SGD-momentum steps: the decided "G" state and an "R" state from the same draws give
    the same parameters and the same effective feedback ``F = R Bp^T`` (float32 rounding)."""
    tx = optax.chain(optax.add_decayed_weights(1e-3), optax.sgd(0.05, momentum=0.9))
    decided = state_of(pj.rules.get("pfa", expansion=3), tx)
    authors = state_of(pj.rules.get("pfa", expansion=3, form="R"), tx)
    assert decided.model.rule.form == "G"
    keys = jax.random.split(jax.random.key(2), 3)
    step = jax.jit(pj.train.train_step)
    for key in keys:
        batch = {"image": jax.random.uniform(key, (16, 28, 28, 1)),
                 "label": jax.random.randint(key, (16,), 0, 10)}
        decided, _ = step(decided, batch)
        authors, _ = step(authors, batch)
    for a, b in zip(jax.tree.leaves(decided.params), jax.tree.leaves(authors.params)):
        np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-6)
    for layer, fb in authors.feedback.items():
        effective = np.einsum("...im,om->...io", fb["R"], fb["Bp"])
        g, c = decided.feedback[layer]["G"], decided.feedback[layer]["C"]
        np.testing.assert_allclose(g @ c, effective, rtol=1e-3, atol=1e-5)


def test_an_optimizer_of_traced_values_is_refused_with_the_fix():
    def decide(lr):
        return pj.rules.for_optimizer("pfa", optax.sgd(lr, momentum=0.9)).expansion

    with pytest.raises(ValueError, match=r"cannot be decided for an optimizer built from traced "
                       r"values.*pj.rules.for_optimizer\(rule, tx\), or pass form='G' or 'R'"):
        jax.jit(decide)(0.1)
