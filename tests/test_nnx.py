"""Flax NNX: the layers equal the linen layers for every rule, NNX training equals linen training,
fixed feedback stays fixed through nnx.Optimizer, the metrics and the conversions agree."""
import chex
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

import pfa_jax as pj
from pfa_jax import layers, metrics, train

CLASSES = 3


def random(shape, seed):
    return jax.random.normal(jax.random.key(seed), shape)


def layer_pair(rule_name: str, conv: bool):
    """(linen layer, its variables, NNX layer holding the same arrays, input)."""
    rule = pj.rules.get(rule_name).for_classes(CLASSES)
    groups = 1 if rule_name == "dfa" else 2
    if conv:
        x = random((2, 7, 7, 4), 1)
        options = dict(strides=2, padding=((1, 0), (0, 1)), feature_group_count=groups)
        linen = pj.nn.Conv(6, (3, 3), rule=rule, **options)
        layer = pj.nnx.Conv(4, 6, 3, rule=rule, rngs=nnx.Rngs(1), **options)
    else:
        x = random((5, 4), 1)
        linen = pj.nn.Dense(6, rule=rule)
        layer = pj.nnx.Linear(4, 6, rule=rule, rngs=nnx.Rngs(1))
    variables = linen.init({"params": jax.random.key(0)}, x)
    pj.nnx.from_linen(layer, variables)
    return linen, variables, layer, x


@pytest.mark.parametrize("conv", [False, True], ids=["dense", "conv"])
@pytest.mark.parametrize("rule_name", pj.rules.names())
def test_nnx_layer_equals_linen_layer(rule_name, conv):
    linen, variables, layer, x = layer_pair(rule_name, conv)
    rngs = {"feedback": jax.random.key(7)}
    # the key the linen layer draws from its feedback stream (brsf redraws M with it)
    key = linen.apply(variables, rngs=rngs, method=lambda m: m.make_rng("feedback"))
    graphdef, state = nnx.split(layer)

    def run_linen(params, feedback, x):
        y, taps = linen.apply({"params": params, "feedback": feedback}, x, rngs=rngs,
                              mutable=["error_taps"])
        return y, jax.tree.leaves(taps)

    def run_nnx(params, feedback, x):
        module = nnx.merge(graphdef, state, copy=True)
        pj.nnx.from_linen(module, {"params": params, "feedback": feedback})
        y = module(x, key=key)
        return y, [module.tap[...]] if hasattr(module, "tap") else []

    args = (variables["params"], variables.get("feedback", {}), x)
    (y_linen, taps_linen), vjp_linen = jax.vjp(run_linen, *args)
    (y_nnx, taps_nnx), vjp_nnx = jax.vjp(run_nnx, *args)
    np.testing.assert_allclose(y_nnx, y_linen, rtol=1e-6, atol=1e-6)
    assert len(taps_nnx) == len(taps_linen) == (1 if rule_name == "dfa" else 0)
    cotangents = (random(y_linen.shape, 2), [random(t.shape, 3) for t in taps_linen])
    chex.assert_trees_all_close(vjp_nnx(cotangents), vjp_linen(cotangents), rtol=1e-5, atol=1e-6)


def test_feedback_variable_types_say_how_each_array_learns():
    model = pj.nnx.models.get("ffn2", rule={"default": "pfa", "hidden_1": "kp", "output": "wm"},
                              widths=(8, 8), input_shape=(2, 2, 1), rngs=nnx.Rngs(0))
    assert nnx.to_pure_dict(nnx.state(model, pj.nnx.FixedFeedback)).keys() == {"hidden_0"}
    assert set(nnx.to_pure_dict(nnx.state(model, pj.nnx.FixedFeedback))["hidden_0"]) == {"Bp"}
    plastic = nnx.to_pure_dict(nnx.state(model, pj.nnx.PlasticFeedback))
    assert {k: set(v) for k, v in plastic.items()} == {"hidden_0": {"R"}, "hidden_1": {"B"}}
    assert set(nnx.to_pure_dict(nnx.state(model, pj.nnx.MirroredFeedback))) == {"output"}
    labels = layers.feedback_labels(layers.table(model.linen, jnp.zeros((1, 2, 2, 1))),
                                    pj.nnx.to_linen(model)["feedback"])
    assert labels["hidden_0"] == {"Bp": "fixed", "R": "plastic"} and labels["output"] == {
        "B": "mirrored"}


def data(shape, n=8, seed=0):
    images = random((n, *shape), seed)
    return {"image": images, "label": jnp.argmax(images.reshape(n, -1)[:, :CLASSES], -1)}


def twins(name, rule, shape, **options):
    """An NNX model and a linen TrainState of its twin holding the same arrays (PFA's form decided
    for the optimizer before the NNX model is built, as docs/nnx.md says)."""
    tx = pj.optim.OptimizerConfig(learning_rate=0.05, momentum=0.9, weight_decay=1e-3,
                                  nesterov=True).transformation()
    model = pj.nnx.models.get(name, rule=pj.rules.for_optimizer(rule, tx), num_classes=CLASSES,
                              input_shape=shape, rngs=nnx.Rngs(0), **options)
    state = train.create_train_state(jax.random.key(0), model.linen, jnp.zeros((1, *shape)), tx)
    state = state.replace(**pj.nnx.to_linen(model))
    return model, pj.nnx.optimizer(model, tx), state.replace(opt_state=state.init_opt_state())


@pytest.mark.parametrize("name,rule,shape,options", [
    ("ffn2", "pfa", (4, 4, 1), {"widths": (8, 8)}),
    ("ffn2", "kp", (4, 4, 1), {"widths": (8, 8)}),
    ("ffn2", "dfa", (4, 4, 1), {"widths": (8, 8)}),
    ("ffn2", "fa", (4, 4, 1), {"widths": (8, 8), "activation": "tanh"}),
    pytest.param("resnet20", "pfa", (8, 8, 1), {"blocks_per_stage": 1}, marks=pytest.mark.slow),
    pytest.param("resnet20", "dfa", (8, 8, 1), {"blocks_per_stage": 1}, marks=pytest.mark.slow),
])
def test_nnx_training_steps_equal_linen_steps(name, rule, shape, options):
    model, optimizer, state = twins(name, rule, shape, **options)
    nnx_step, linen_step = nnx.jit(pj.nnx.train_step), jax.jit(train.train_step)
    for i in range(3):
        batch = data(shape, seed=i)
        logged = nnx_step(model, optimizer, batch)
        state, linen_logged = linen_step(state, batch)
        assert float(logged["loss"]) == pytest.approx(float(linen_logged["loss"]), rel=1e-5)
        assert float(logged["learning_rate"]) == pytest.approx(0.05)
    chex.assert_trees_all_close(pj.nnx.to_linen(model), state.variables(), rtol=1e-4, atol=1e-6)


def test_fixed_feedback_stays_bit_identical_through_nnx_optimizer():
    model = pj.nnx.models.get("ffn2", rule={"default": "pfa", "output": "fa"}, widths=(8,),
                              num_classes=CLASSES, input_shape=(4, 4, 1), rngs=nnx.Rngs(0))
    fixed = jax.device_get(nnx.to_pure_dict(nnx.state(model, pj.nnx.FixedFeedback)))
    plastic = jax.device_get(nnx.to_pure_dict(nnx.state(model, pj.nnx.PlasticFeedback)))
    tx = optax.chain(optax.clip_by_global_norm(1.0), optax.adamw(1e-2, weight_decay=0.1))
    optimizer = pj.nnx.optimizer(model, tx)
    step = nnx.jit(pj.nnx.train_step)
    for i in range(3):
        step(model, optimizer, data((4, 4, 1), seed=i))
    chex.assert_trees_all_equal(nnx.to_pure_dict(nnx.state(model, pj.nnx.FixedFeedback)), fixed)
    assert not np.array_equal(nnx.to_pure_dict(nnx.state(model, pj.nnx.PlasticFeedback))[
        "hidden_0"]["R"], plastic["hidden_0"]["R"])


def test_metrics_are_equal_on_the_two_forms_of_one_network():
    model, _, state = twins("ffn2", {"default": "pfa", "output": "kp"}, (4, 4, 1), widths=(8,))
    batch = data((4, 4, 1))
    chex.assert_trees_all_close(metrics.alignment(model), metrics.alignment(state))
    chex.assert_trees_all_close(metrics.gradient_alignment(model, batch),
                                metrics.gradient_alignment(state, batch), rtol=1e-5)
    key = jax.random.key(3)
    assert metrics.corruption(model, [batch], (0.5,), key) == metrics.corruption(
        state, [batch], (0.5,), key)
    assert metrics.adversarial(model, [batch], (0.1,), key=key) == metrics.adversarial(
        state, [batch], (0.1,), key=key)
    sharp = metrics.sharpness(model, [batch], key, iterations=3, probes=2)
    assert sharp == pytest.approx(metrics.sharpness(state, [batch], key, iterations=3, probes=2),
                                  rel=1e-5)


def test_linen_variables_convert_to_nnx_and_back():
    linen_model = pj.models.get("lenet", rule="pfa", num_classes=CLASSES)
    variables = linen_model.init({"params": jax.random.key(5)}, jnp.zeros((1, 28, 28, 1)))
    model = pj.nnx.models.get("lenet", rule="pfa", num_classes=CLASSES, input_shape=(28, 28, 1),
                              rngs=nnx.Rngs(0))
    pj.nnx.from_linen(model, variables)
    back = pj.nnx.to_linen(model)
    chex.assert_trees_all_equal({k: v for k, v in back.items() if v}, dict(variables))
    images = random((2, 28, 28, 1), 4)
    np.testing.assert_allclose(model(images), linen_model.apply(variables, images), rtol=1e-5,
                               atol=1e-6)


def test_every_registry_model_has_an_nnx_twin():
    shapes = {"ffn2": (28, 28, 1), "lenet": (28, 28, 1), "resnet8": (32, 32, 3), "resnet20": (32, 32, 3),
              "resnet56": (32, 32, 3), "resnet18": (64, 64, 3), "vit": (28, 28, 1),
              "transformer_lm": (16,)}  # tokens
    for name in pj.models.names():
        model = nnx.eval_shape(lambda n=name: pj.nnx.models.get(
            n, rule="pfa", input_shape=shapes[n], rngs=nnx.Rngs(0)))
        linen = jax.eval_shape(model.linen.init, {"params": jax.random.key(0)},
                               jnp.zeros((1, *shapes[name]),
                                         jnp.int32 if name == "transformer_lm" else jnp.float32))
        nnx_shapes = pj.nnx.to_linen(model)
        for collection in ("params", "feedback", "batch_stats"):
            assert jax.tree.map(jnp.shape, nnx_shapes[collection]) == jax.tree.map(
                jnp.shape, dict(linen.get(collection, {}))), (name, collection)


def test_sharded_jit_over_four_devices_equals_one_device():
    model, optimizer, _ = twins("ffn2", "pfa", (4, 4, 1), widths=(8,))
    single = nnx.clone((model, optimizer))
    batch = data((4, 4, 1), n=16)
    mesh = train.batch_mesh(jax.devices()[:4])
    graphdef, state = nnx.split((model, optimizer))
    state = train.replicate_on(state, mesh)

    @jax.jit
    def step(state, batch):
        model, optimizer = nnx.merge(graphdef, state)
        logged = pj.nnx.train_step(model, optimizer, batch)
        return nnx.state((model, optimizer)), logged

    state, logged = step(state, train.shard_batch(batch, mesh))
    single_logged = nnx.jit(pj.nnx.train_step)(*single, batch)
    assert float(logged["loss"]) == pytest.approx(float(single_logged["loss"]), rel=1e-5)
    sharded_model, _ = nnx.merge(graphdef, state)
    chex.assert_trees_all_close(pj.nnx.to_linen(sharded_model), pj.nnx.to_linen(single[0]),
                                rtol=1e-5, atol=1e-6)


def test_bfloat16_nnx_layers_keep_float32_variables():
    layer = pj.nnx.Conv(3, 4, 3, rule="pfa", dtype=jnp.bfloat16, rngs=nnx.Rngs(0))
    y = layer(jnp.ones((2, 5, 5, 3), jnp.bfloat16))
    assert y.dtype == jnp.bfloat16
    assert {v.dtype for v in jax.tree.leaves(nnx.state(layer, nnx.Any(nnx.Param, pj.nnx.Feedback)))
            } == {jnp.dtype(jnp.float32)}


def test_an_own_nnx_model_trains_with_dfa_taps():
    dfa = pj.rules.get("dfa", classes=CLASSES)

    class Own(nnx.Module):
        def __init__(self, rngs):
            self.hidden = pj.nnx.Linear(16, 8, rule=dfa, rngs=rngs)
            self.output = pj.nnx.Linear(8, CLASSES, rule=dfa, rngs=rngs)

        def __call__(self, x, train=False):
            x = nnx.relu(self.hidden(x.reshape(x.shape[0], -1)))
            return pj.nnx.add_taps(self, self.output(x))

    model = Own(nnx.Rngs(0))
    kernel = np.asarray(model.hidden.kernel[...])
    optimizer = pj.nnx.optimizer(model, optax.sgd(0.1))
    nnx.jit(pj.nnx.train_step)(model, optimizer, data((4, 4, 1)))
    assert not np.array_equal(kernel, model.hidden.kernel[...])  # the projected error arrived
    assert not hasattr(model.hidden, "tap")  # taps are consumed
