"""pfa_jax from research code: own optax optimizers, own linen models (Dropout, BatchNorm, nn.scan,
nn.remat, nn.vmap), mixed precision, the plain Flax functional pattern and its public helpers."""
import chex
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import pfa_jax as pj
from pfa_jax import layers, metrics, train
from pfa_jax.rules.direct_feedback import MissingTapError


def batch(n=32, shape=(6, 6, 1), classes=4, seed=0):
    rng = np.random.default_rng(seed)
    images = rng.normal(size=(n, *shape)).astype(np.float32)
    labels = np.argmax(images.reshape(n, -1)[:, :classes], axis=1).astype(np.int32)
    return {"image": jnp.asarray(images), "label": jnp.asarray(labels)}


class DropoutNet(nn.Module):
    """conv (pfa) - BN - ReLU - dense (fa) - Dropout - output (kp): three rules, BN and Dropout."""

    rate: float = 0.5

    @nn.compact
    def __call__(self, x, train=False):
        x = pj.nn.Conv(4, (3, 3), strides=2, rule=pj.rules.get("pfa", expansion=2), name="conv")(x)
        x = nn.relu(nn.BatchNorm(use_running_average=not train)(x))
        x = nn.relu(pj.nn.Dense(8, rule="fa", name="hidden")(x.reshape(x.shape[0], -1)))
        x = nn.Dropout(self.rate, deterministic=not train)(x)
        return pj.nn.Dense(4, rule="kp", name="output")(x)


SCHEDULE = optax.warmup_cosine_decay_schedule(0.0, 0.01, 3, 20)


def own_optimizer():
    return optax.chain(optax.clip_by_global_norm(1.0),
                       optax.inject_hyperparams(optax.adamw)(learning_rate=SCHEDULE))


def dropout_state(tx=None, rate=0.5):
    return train.create_train_state(jax.random.key(0), DropoutNet(rate), batch()["image"][:1],
                                    own_optimizer() if tx is None else tx)


# -- own optimizers -------------------------------------------------------------------------------
def test_own_optax_chain_keeps_fixed_feedback_and_moves_the_rest():
    state = dropout_state()
    assert state.rng_streams == ("dropout",)
    before = jax.device_get(state)
    step = jax.jit(train.train_step)
    for i in range(5):
        state, logged = step(state, batch(seed=i))
        # the logged learning rate is the schedule's value at this step, read from the opt state
        assert float(logged["learning_rate"]) == pytest.approx(float(SCHEDULE(i)), rel=1e-6)
    np.testing.assert_array_equal(before.feedback["conv"]["Bp"], state.feedback["conv"]["Bp"])
    np.testing.assert_array_equal(before.feedback["hidden"]["B"], state.feedback["hidden"]["B"])
    assert not np.array_equal(before.feedback["conv"]["R"], state.feedback["conv"]["R"])
    assert not np.array_equal(before.feedback["output"]["B"], state.feedback["output"]["B"])
    for name in ("conv", "hidden", "output"):
        assert not np.array_equal(before.params[name]["kernel"], state.params[name]["kernel"])


def test_hyperparameters_unknown_to_the_optimizer_state_are_not_logged():
    state = dropout_state(optax.adamw(SCHEDULE))  # schedule not injected: lr unknown
    _, logged = jax.jit(train.train_step)(state, batch())
    assert set(logged) == {"loss", "accuracy", "nonfinite"}  # nonfinite: the guard, every step


def test_a_schedule_callable_and_a_separate_feedback_optimizer():
    tx = optax.inject_hyperparams(optax.sgd)(learning_rate=optax.linear_schedule(0.1, 0.0, 10))
    feedback_tx = optax.inject_hyperparams(optax.sgd)(learning_rate=0.5)
    state = train.create_train_state(jax.random.key(0), DropoutNet(), batch()["image"][:1], tx,
                                     feedback_tx=feedback_tx)
    state, logged = jax.jit(train.train_step)(state, batch())
    state, logged = jax.jit(train.train_step)(state, batch(seed=1))
    assert float(logged["learning_rate"]) == pytest.approx(0.09)
    assert float(logged["feedback/learning_rate"]) == pytest.approx(0.5)


def test_optimizer_options_do_not_apply_to_an_optax_transformation():
    with pytest.raises(ValueError, match="apply to an OptimizerConfig"):
        pj.optim.build(optax.sgd(0.1), learning_rate=0.2)


# -- own models: RNG streams, lifted layers ----------------------------------------------------------
def test_dropout_masks_change_per_step_and_match_between_the_rule_and_true_pass():
    state = train.create_train_state(jax.random.key(0), pj.models.get("ffn2", rule="bp"),
                                     jnp.zeros((1, 28, 28, 1)))
    assert state.rng_streams == ()

    class BPDropout(nn.Module):
        @nn.compact
        def __call__(self, x, train=False):
            x = nn.relu(pj.nn.Dense(16, name="hidden")(x.reshape(x.shape[0], -1)))
            return pj.nn.Dense(4, name="output")(nn.Dropout(0.5, deterministic=not train)(x))

    state = train.create_train_state(jax.random.key(0), BPDropout(), batch()["image"][:1])
    rngs0, rngs1 = train.step_rngs(state), train.step_rngs(state.replace(step=state.step + 1))
    assert not np.array_equal(jax.random.key_data(rngs0["dropout"]),
                              jax.random.key_data(rngs1["dropout"]))
    # with backprop layers the rule's pass is the true pass: the same dropout mask makes it exact
    angles = metrics.gradient_alignment(state, batch())
    for layer in ("hidden", "output"):
        assert float(angles[layer]["grad_angle"]) == pytest.approx(0.0, abs=0.05)
        assert float(angles[layer]["delta_norm_rule"]) == pytest.approx(
            float(angles[layer]["delta_norm_bp"]), rel=1e-6)


def test_an_own_rng_stream_is_found_and_drawn_per_step():
    class Noisy(nn.Module):
        @nn.compact
        def __call__(self, x, train=False):
            if train:
                x = x + 0.1 * jax.random.normal(self.make_rng("noise"), x.shape)
            return pj.nn.Dense(4, rule="fa", name="output")(x.reshape(x.shape[0], -1))

    state = train.create_train_state(jax.random.key(0), Noisy(), batch()["image"][:1])
    assert state.rng_streams == ("noise",)
    state, logged = jax.jit(train.train_step)(state, batch())
    assert np.isfinite(float(logged["loss"]))


class ScanBlock(nn.Module):
    @nn.compact
    def __call__(self, x, _):
        return nn.relu(pj.nn.Dense(8, rule="pfa", name="dense")(x)), None


class ScannedPFA(nn.Module):
    """Four PFA Dense layers as one ``nn.scan``, between an input and an output layer."""

    @nn.compact
    def __call__(self, x, train=False):
        x = pj.nn.Dense(8, rule="pfa", name="input")(x.reshape(x.shape[0], -1))
        scan = nn.scan(ScanBlock, variable_axes={"params": 0, "feedback": 0, "perturbations": 0},
                       split_rngs={"params": True}, length=4)
        x, _ = scan(name="blocks")(x, None)
        return pj.nn.Dense(4, rule="pfa", name="output")(x)


def test_nn_scan_over_four_pfa_layers_reports_four_alignments():
    state = train.create_train_state(jax.random.key(0), ScannedPFA(), batch()["image"][:1],
                                     {"learning_rate": 0.05})
    [scanned] = [layer for layer in state.layers if layer.path == "blocks/dense"]
    assert scanned.lifted == 1
    for _ in range(3):
        state, _ = jax.jit(train.train_step)(state, batch())
    angles = metrics.alignment(state)
    names = [f"blocks/dense[{i}]" for i in range(4)]
    assert sorted(angles) == sorted(["input", "output", *names])
    fb, kernel = state.feedback["blocks"]["dense"], state.params["blocks"]["dense"]["kernel"]
    for i, name in enumerate(names):  # each slice against its own explicit F = R_i Bp_i^T
        f = fb["R"][i] @ fb["Bp"][i].T
        cos = np.vdot(f, kernel[i]) / np.linalg.norm(f) / np.linalg.norm(kernel[i])
        assert float(angles[name]["weight_angle"]) == pytest.approx(
            np.degrees(np.arccos(cos)), abs=0.01)
    gradients = metrics.gradient_alignment(state, batch())
    assert sorted(gradients) == sorted(angles)
    assert len({float(gradients[n]["grad_angle"]) for n in names}) == 4


def test_remat_and_vmap_lifted_layers_train():
    class Lifted(nn.Module):
        @nn.compact
        def __call__(self, x, train=False):
            x = x.reshape(x.shape[0], -1)
            x = nn.remat(pj.nn.Dense)(8, rule="kp", name="remat")(x)
            heads = nn.vmap(pj.nn.Dense, in_axes=None, out_axes=1, axis_size=2,
                            variable_axes={"params": 0, "feedback": 0},
                            split_rngs={"params": True})(4, rule="fa", name="heads")(x)
            return heads.sum(1)

    state = train.create_train_state(jax.random.key(0), Lifted(), batch()["image"][:1],
                                     {"learning_rate": 0.1})
    b0 = state.feedback["remat"]["B"]
    state, logged = jax.jit(train.train_step)(state, batch())
    assert np.isfinite(float(logged["loss"]))
    assert not np.array_equal(b0, state.feedback["remat"]["B"])  # KP's B is plastic
    assert sorted(metrics.alignment(state)) == ["heads[0]", "heads[1]", "remat"]


# -- the functional pattern and its helpers -------------------------------------------------------
def test_init_returns_only_what_a_user_carries():
    for name in ("ffn2", "resnet20"):
        for rule in ("pfa", "dfa", "wm"):
            model = pj.models.get(name, rule=rule)
            variables = jax.eval_shape(model.init, {"params": jax.random.key(0)},
                                       jnp.zeros((2, 8, 8, 1)))
            expected = {"params", "feedback"} | ({"batch_stats"} if name == "resnet20" else set())
            assert set(variables) == expected, (name, rule)


def test_feedback_labels_follow_the_rules():
    model = pj.models.get("ffn2", rule={"default": "pfa", "hidden_1": "kp", "output": "wm"},
                          widths=(8, 8))
    images = jnp.zeros((1, 2, 2, 1))
    variables = model.init({"params": jax.random.key(0)}, images)
    labels = layers.feedback_labels(layers.table(model, images), variables["feedback"])
    assert labels == {"hidden_0": {"Bp": "fixed", "R": "plastic"}, "hidden_1": {"B": "plastic"},
                      "output": {"B": "mirrored"}}


class ConvBN(nn.Module):
    """conv (pfa) - BatchNorm - ReLU - dense (dfa) - output (dfa), the taps added."""

    @nn.compact
    def __call__(self, x, train=False):
        x = pj.nn.Conv(4, (3, 3), strides=2, rule=pj.rules.get("pfa", expansion=2), name="conv")(x)
        x = nn.relu(nn.BatchNorm(use_running_average=not train)(x))
        dfa = pj.rules.get("dfa", classes=4)
        x = nn.relu(pj.nn.Dense(8, rule=dfa, name="hidden")(x.reshape(x.shape[0], -1)))
        return pj.nn.add_taps(self, pj.nn.Dense(4, rule=dfa, name="output")(x))


def test_the_functional_pattern_equals_train_step():
    """A plain Flax step (init, apply with mutable batch_stats and error_taps, optax over params
    and the plastic feedback the labels name) gives train_step's numbers."""
    model = ConvBN()
    data = batch(8, (8, 8, 1))
    tx = optax.sgd(0.05, momentum=0.9)
    state = train.create_train_state(jax.random.key(0), model, data["image"][:1], tx)
    labels = layers.feedback_labels(state.layers, state.feedback)
    plastic = layers.select(state.feedback, labels, layers.PLASTIC)
    opt = (tx.init(state.params), tx.init(plastic))

    def loss_fn(params, plastic):
        variables = {"params": params, "feedback": layers.merge(state.feedback, plastic),
                     "batch_stats": state.batch_stats}
        logits, updates = model.apply(variables, data["image"], train=True,
                                      mutable=["batch_stats", "error_taps"])
        return train.cross_entropy(logits, data["label"]).mean(), updates

    (gp, gf), _ = jax.grad(loss_fn, argnums=(0, 1), has_aux=True)(state.params, plastic)
    params = optax.apply_updates(state.params, tx.update(gp, opt[0], state.params)[0])
    plastic = optax.apply_updates(plastic, tx.update(gf, opt[1], plastic)[0])
    stepped, _ = jax.jit(train.train_step)(state, data)
    chex.assert_trees_all_close(params, stepped.params, rtol=1e-5, atol=1e-7)
    chex.assert_trees_all_close(layers.merge(state.feedback, plastic), stepped.feedback,
                                rtol=1e-5, atol=1e-7)


def test_dfa_without_its_error_taps_is_a_clear_error():
    model = pj.models.get("ffn2", rule="dfa", widths=(8,), num_classes=4)
    data = batch()
    variables = model.init({"params": jax.random.key(0)}, data["image"][:1])

    def loss(params):
        logits = model.apply({**variables, "params": params}, data["image"], train=True)
        return train.cross_entropy(logits, data["label"]).mean()

    with pytest.raises(MissingTapError, match="error_taps"):
        jax.grad(loss)(variables["params"])


def test_mirror_is_a_pure_function_of_kernel_feedback_and_key():
    rule = pj.rules.get("wm", warmup_steps=0, steps=3)
    model = pj.models.get("ffn2", rule=rule, widths=(8,), num_classes=4)
    images = jnp.zeros((1, 2, 2, 1))
    variables = model.init({"params": jax.random.key(0)}, images)
    table = layers.table(model, images)
    key = jax.random.key(5)
    mirrored = layers.mirror(table, variables["params"], variables["feedback"], key)
    for path in ("hidden_0", "output"):
        want = rule.mirror(layers.layer_key(key, path), variables["params"][path]["kernel"],
                           variables["feedback"][path], warmup=False)
        chex.assert_trees_all_equal(mirrored[path], want)
        assert not np.array_equal(mirrored[path]["B"], variables["feedback"][path]["B"])


# -- mixed precision --------------------------------------------------------------------------------
@pytest.mark.parametrize("rule", pj.rules.names())
def test_every_rule_computes_in_bfloat16_and_keeps_float32_parameters(rule):
    x = jnp.asarray(batch(4, (6, 6, 3))["image"], jnp.bfloat16)
    for layer in (pj.nn.Conv(4, (3, 3), strides=2, rule=pj.rules.get(rule).for_classes(4),
                             dtype=jnp.bfloat16),
                  pj.nn.Dense(4, rule=pj.rules.get(rule).for_classes(4), dtype=jnp.bfloat16)):
        inputs = x if isinstance(layer, pj.nn.Conv) else x.reshape(4, -1)
        variables = layer.init({"params": jax.random.key(0)}, inputs)
        assert {a.dtype for a in jax.tree.leaves(variables)} == {jnp.dtype(jnp.float32)}

        def loss(params, feedback):
            y, updates = layer.apply({"params": params, "feedback": feedback}, inputs,
                                     rngs={"feedback": jax.random.key(1)}, mutable=["error_taps"])
            assert y.dtype == jnp.bfloat16
            taps = jax.tree.leaves(updates)
            return (y.astype(jnp.float32) ** 2).sum() + sum(t.sum() for t in taps)

        grads = jax.grad(loss, argnums=(0, 1))(variables["params"], variables.get("feedback", {}))
        assert {g.dtype for g in jax.tree.leaves(grads)} == {jnp.dtype(jnp.float32)}
        assert all(bool(jnp.all(jnp.isfinite(g))) for g in jax.tree.leaves(grads))
        # without dtype, bf16 inputs are promoted with the float32 parameters, as in flax.linen
        y = layer.clone(dtype=None).apply(variables, inputs, rngs={"feedback": jax.random.key(1)})
        y = y[0] if isinstance(y, tuple) else y
        assert y.dtype == jnp.float32


@pytest.mark.parametrize("rule", [
    pytest.param(rule, marks=() if rule == "pfa" else pytest.mark.slow)
    for rule in pj.rules.names()])
@pytest.mark.parametrize("blocks", [pytest.param(1, id="one-block"),
                                    pytest.param(3, id="resnet20", marks=pytest.mark.slow)])
def test_bfloat16_resnet_trains_with_float32_state(rule, blocks):
    model = pj.models.get("resnet20", rule=rule, num_classes=4, dtype=jnp.bfloat16).clone(
        blocks_per_stage=blocks)
    data = batch(8, (8, 8, 1))
    state = train.create_train_state(jax.random.key(0), model, data["image"][:1],
                                     {"learning_rate": 0.05})
    state, logged = jax.jit(train.train_step)(state, data)
    assert np.isfinite(float(logged["loss"]))
    dtypes = {a.dtype for a in jax.tree.leaves((state.params, state.feedback, state.batch_stats,
                                                state.opt_state)) if jnp.issubdtype(a.dtype, jnp.floating)}
    assert dtypes == {jnp.dtype(jnp.float32)}
    assert train.eval_step(state, data)["loss"].dtype == jnp.float32


def test_the_research_example_runs(tmp_path):
    from fashion_files import make_fashion_dir

    from experiments import own_model
    result = own_model.main(["--rule", "pfa", "--epochs", "1", "--steps", "3", "--batch-size", "16",
                             "--data-dir", str(make_fashion_dir(tmp_path, 64, 32))])
    assert result["steps"] == 3
    assert sorted(result["alignment"]) == ["conv0", "conv1", "hidden", "output"]
    assert result["alignment"]["output"] == 0.0 and result["alignment"]["hidden"] > 1.0
    assert result["learning_rate"] == pytest.approx(float(optax.warmup_cosine_decay_schedule(
        0.0, 3e-3, 1, 3)(2)))
