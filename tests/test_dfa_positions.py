"""DFA over positions (``pfa_jax.taps``): per-token logits, a pooled head and a batch-major
``nn.RNN``, each against a reference written here in which every DFA map's input receives
``e_t B`` from the output error ``e``, computed first from the plain forward pass."""
import functools

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import pfa_jax as pj

B, T, D, H, C = 3, 4, 5, 6, 7


@functools.partial(jax.custom_vjp, nondiff_argnums=())
def dfa_reference(x, kernel, feedback, e):
    """``x @ kernel``; backward: ``x`` receives ``e @ feedback`` (``e`` given, at the rows of ``x``),
    ``kernel`` its local ``x^T g``."""
    return x @ kernel


def _ref_fwd(x, kernel, feedback, e):
    return x @ kernel, (x, kernel, feedback, e)


def _ref_bwd(residuals, g):
    x, kernel, feedback, e = residuals
    dk = jnp.einsum("...i,...o->io", x, g)
    return e @ feedback, dk, jnp.zeros_like(feedback), jnp.zeros_like(e)


dfa_reference.defvjp(_ref_fwd, _ref_bwd)


def token_loss(logits, batch):
    return pj.losses.cross_entropy(logits, batch["label"]).mean()


class Tokens(nn.Module):
    pooled: bool = False

    @nn.compact
    def __call__(self, x):
        h = nn.tanh(nn.Dense(H, name="hidden")(x))
        return nn.Dense(C, name="out")(h.mean(1) if self.pooled else h)


def _grads(model, variables, x, labels):
    def loss(params, x):
        out, _ = model.apply({**variables, "params": params}, x, mutable=[pj.nn.TAPS])
        return token_loss(out, {"label": labels})
    return jax.grad(loss, argnums=(0, 1))(variables["params"], x)


def _error(plain_logits_fn, labels):
    """``e = dL/dlogits`` of the plain forward pass."""
    logits = plain_logits_fn()
    return jax.grad(lambda z: token_loss(z, {"label": labels}))(logits)


@pytest.mark.parametrize("pooled", [False, True], ids=["per_token", "pooled_head"])
def test_dfa_error_reaches_each_position(pooled):
    x = jax.random.normal(jax.random.key(0), (B, T, D))
    labels = jax.random.randint(jax.random.key(1), (B,) if pooled else (B, T), 0, C)
    model = pj.nn.with_rule(Tokens(pooled), "dfa")
    variables = model.init(jax.random.key(2), x)
    p, fb = variables["params"], variables["feedback"]
    assert fb["hidden"]["B"].shape == (C, D) and fb["out"]["B"].shape == (C, H)  # classes traced
    e = _error(lambda: Tokens(pooled).apply({"params": p}, x), labels)
    # the hidden layer sits at every position: a pooled head's error reaches each of them
    e_hidden = jnp.broadcast_to(e[:, None], (B, T, C)) if pooled else e

    def reference(params, x):
        z = dfa_reference(x, params["hidden"]["kernel"], fb["hidden"]["B"], e_hidden)
        h = jnp.tanh(z + params["hidden"]["bias"])
        h = h.mean(1) if pooled else h
        logits = dfa_reference(h, params["out"]["kernel"], fb["out"]["B"], e)
        return token_loss(logits + params["out"]["bias"], {"label": labels})

    got, want = _grads(model, variables, x, labels), jax.grad(reference, argnums=(0, 1))(p, x)
    jax.tree.map(lambda g, w: np.testing.assert_allclose(g, w, rtol=1e-5, atol=1e-7), got, want)
    np.testing.assert_allclose(got[1], e_hidden @ fb["hidden"]["B"], rtol=1e-5, atol=1e-7)


class Recurrent(nn.Module):
    tap_axis: int | None = None

    @nn.compact
    def __call__(self, x):
        axes = {} if self.tap_axis is None else {pj.nn.TAPS: self.tap_axis}
        h = nn.RNN(nn.SimpleCell(H, name="cell"), variable_axes=axes)(x)   # batch-major
        return nn.Dense(C, name="out")(h)                                   # per-step logits


def test_dfa_in_a_batch_major_rnn_gives_each_step_its_own_error():
    x = jax.random.normal(jax.random.key(0), (B, T, D))
    labels = jax.random.randint(jax.random.key(1), (B, T), 0, C)
    model = pj.nn.with_rule(Recurrent(), "dfa")
    variables = model.init(jax.random.key(2), x)
    p, fb = variables["params"], variables["feedback"]
    e = _error(lambda: Recurrent().apply({"params": p}, x), labels)

    def reference(params):
        cell, cfb = params["cell"], fb["cell"]
        h, outputs = jnp.zeros((B, H)), []
        for t in range(T):  # both maps of step t receive e_t at their inputs
            i = dfa_reference(x[:, t], cell["i"]["kernel"], cfb["i"]["B"], e[:, t])
            r = dfa_reference(h, cell["h"]["kernel"], cfb["h"]["B"], e[:, t])
            h = jnp.tanh(i + cell["i"]["bias"] + r)
            outputs.append(h)
        h = jnp.stack(outputs, 1)
        logits = dfa_reference(h, params["out"]["kernel"], fb["out"]["B"], e)
        return token_loss(logits + params["out"]["bias"], {"label": labels})

    got = _grads(model, variables, x, labels)[0]
    want = jax.grad(reference)(p)
    jax.tree.map(lambda g, w: np.testing.assert_allclose(g, w, rtol=1e-5, atol=1e-7), got, want)


def test_taps_stacked_on_an_axis_that_fits_no_logits_axis_are_refused_naming_it():
    x = jax.random.normal(jax.random.key(0), (B, T, D))
    model = pj.nn.with_rule(Recurrent(tap_axis=0), "dfa")   # time-major taps, batch-major logits
    variables = model.init(jax.random.key(2), x)
    with pytest.raises(ValueError, match=r"stacked on axes \(0,\) into shape \(4, 3, 7\)"):
        _grads(model, variables, x, jnp.zeros((B, T), jnp.int32))


def test_dfa_trains_a_per_token_model_through_the_train_step():
    x = jax.random.normal(jax.random.key(0), (32, T, D))
    labels = (x[..., 0] > 0).astype(jnp.int32)
    state = pj.train.create_train_state(jax.random.key(1), pj.nn.with_rule(Tokens(), "dfa"),
                                        {"image": x, "label": labels}, optax.sgd(0.5),
                                        loss=token_loss)
    first = pj.train.evaluate(state, x, labels)["loss"]
    for epoch in range(10):
        state, _ = pj.train.train_epoch(state, x, labels, jax.random.key(epoch), 8)
    assert pj.train.evaluate(state, x, labels)["loss"] < 0.8 * first
