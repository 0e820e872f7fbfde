"""The transfer attack (perturbations from one model's true input gradient applied to another)
and the PGD convergence check, against references written here."""
import jax
import jax.numpy as jnp
import optax

import pfa_jax as pj


def _trained(rule, seed, images, labels):
    model = pj.models.get("ffn2", rule=rule, num_classes=4, widths=(16,))
    state = pj.train.create_train_state(jax.random.key(seed), model, images[:1], optax.sgd(0.1))
    for epoch in range(5):
        state, _ = pj.train.train_epoch(state, images, labels, jax.random.key(epoch), 16)
    return state


def _data():
    images = jax.random.uniform(jax.random.key(7), (64, 6, 6, 1))
    labels = (images.reshape(64, -1)[:, :4].argmax(-1)).astype(jnp.int32)
    return images, labels


def test_transfer_fgsm_applies_the_source_models_perturbation_to_the_target():
    images, labels = _data()
    source, target = _trained("bp", 0, images, labels), _trained("fa", 1, images, labels)
    eps = 0.1

    def source_loss(x):  # the source model written out: plain flax, no rule
        logits = source.model.apply(source.variables(), x, train=False)
        return optax.softmax_cross_entropy_with_integer_labels(logits, labels).sum()

    perturbed = images + eps * jnp.sign(jax.grad(source_loss)(images))
    target_logits = target.model.apply(target.variables(), perturbed, train=False)
    want = float(jnp.mean(jnp.argmax(target_logits, -1) == labels))
    got = pj.metrics.adversarial(target, {"image": images, "label": labels}, [eps], "fgsm",
                                 source=source)
    assert got["transfer"] and got["robust_accuracy"] == [want]
    own = pj.metrics.adversarial(target, {"image": images, "label": labels}, [eps], "fgsm")
    assert not own["transfer"] and own["clean_accuracy"] == got["clean_accuracy"]


def test_pgd_convergence_compares_with_twice_the_steps():
    images, labels = _data()
    state = _trained("bp", 0, images, labels)
    batch = {"image": images, "label": labels}
    check = pj.metrics.attack_convergence(state, batch, 0.2, 2, tolerance=0.0)
    for steps, name in ((2, "accuracy"), (4, "accuracy_doubled")):
        want = pj.metrics.adversarial(state, batch, [0.2], "pgd", steps=steps)["robust_accuracy"][0]
        assert check[name] == want
    assert check["converged"] == (check["accuracy"] - check["accuracy_doubled"] <= 0.0)
    many = pj.metrics.attack_convergence(state, batch, 0.2, 40, tolerance=0.02)
    assert many["converged"] and many["accuracy"] <= check["accuracy"]
