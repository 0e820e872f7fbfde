"""Tests of pfa_jax.models: shapes, parameter counts, BP == plain flax, rules and rule mappings.

On CPU the time goes into compiling (eagerly run ops are compiled once per shape), so every test uses
the same input shapes, models are initialised once per rule (``initialised``), shape-only checks use
``jax.eval_shape``, and keys use the ``rbg`` PRNG, whose random draws compile much faster than
threefry's.
"""
from __future__ import annotations

import functools

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import pfa_jax.models as models
from pfa_jax import nn as pnn
from pfa_jax import rules
from pfa_jax.nn import layer_paths

MNIST, CIFAR = (28, 28, 1), (32, 32, 3)
SHAPES = {"ffn2": MNIST, "lenet": MNIST, "resnet8": CIFAR, "resnet20": CIFAR, "resnet56": CIFAR,
          "resnet18": CIFAR}
BATCH = 2


def key(seed):
    return jax.random.key(seed, impl="rbg")


def images(shape, n=BATCH):
    return jax.random.normal(key(0), (n, *shape), jnp.float32)


def init(model, x):
    return model.init({"params": key(0)}, x)


def abstract_init(model, x):
    return jax.eval_shape(functools.partial(init, model), x)


@functools.cache
def initialised(name, rule="bp"):
    """The model's ``params``, ``batch_stats`` and ``feedback`` (those it has) after ``init``."""
    variables = init(models.get(name, rule=rule), images(SHAPES[name]))
    return {k: v for k, v in variables.items() if k in ("params", "batch_stats", "feedback")}


def count(params):
    return sum(a.size for a in jax.tree.leaves(params))


def cross_entropy(logits, n):
    return optax.softmax_cross_entropy_with_integer_labels(logits, jnp.arange(n) % 10).mean()


def assert_trees_close(a, b, rtol):
    """Leafwise, relative to each leaf's largest entry (so near-zero entries do not fail)."""
    assert jax.tree.structure(a) == jax.tree.structure(b)
    for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)):
        x, y = np.asarray(x), np.asarray(y)
        np.testing.assert_allclose(x, y, rtol=rtol, atol=rtol * np.abs(y).max() + 1e-12)


# -- plain flax references, written independently of the library ------------------------------

class RefMLP(nn.Module):
    @nn.compact
    def __call__(self, x, train=False):
        x = x.reshape(x.shape[0], -1)
        for name in ("hidden_0", "hidden_1"):
            x = nn.relu(nn.Dense(512, name=name)(x))
        return nn.Dense(10, name="output")(x)


class RefLeNet(nn.Module):
    @nn.compact
    def __call__(self, x, train=False):
        pool = lambda y: nn.max_pool(nn.relu(y), (2, 2), (2, 2))  # noqa: E731
        x = pool(nn.Conv(6, (5, 5), padding="SAME", name="conv_0")(x))
        x = pool(nn.Conv(16, (5, 5), padding="VALID", name="conv_1")(x)).reshape(x.shape[0], -1)
        x = nn.relu(nn.Dense(120, name="dense_0")(x))
        return nn.Dense(10, name="output")(nn.relu(nn.Dense(84, name="dense_1")(x)))


class RefResNet20(nn.Module):
    """CIFAR ResNet-20 with PyTorch-style padding and option-A (strided, zero-padded) shortcuts."""

    @nn.compact
    def __call__(self, x, train=False):
        bn = functools.partial(nn.BatchNorm, use_running_average=not train, momentum=0.9,
                               epsilon=1e-5)
        conv = functools.partial(nn.Conv, kernel_size=(3, 3), padding=((1, 1), (1, 1)),
                                 use_bias=False)
        x = nn.relu(bn(name="stem_bn")(conv(16, name="stem")(x)))
        for s, width in enumerate((16, 32, 64), start=1):
            for b in range(3):
                name, stride = f"stage{s}_block{b}", 2 if s > 1 and b == 0 else 1
                y = conv(width, strides=stride, name=f"{name}_conv0")(x)
                y = nn.relu(bn(name=f"{name}_bn0")(y))
                y = bn(name=f"{name}_bn1")(conv(width, name=f"{name}_conv1")(y))
                if stride == 2:
                    pad = (width - x.shape[-1]) // 2
                    x = jnp.pad(x[:, ::2, ::2], ((0, 0),) * 3 + ((pad, pad),))
                x = nn.relu(y + x)
        return nn.Dense(10, name="output")(x.mean(axis=(1, 2)))


def flatten_blocks(tree):
    """The library's nested ``{block: {layer: ...}}`` as the reference's flat ``block_layer`` keys."""
    flat = {}
    for name, value in tree.items():
        if name.startswith("stage"):
            flat.update({f"{name}_{layer}": leaves for layer, leaves in value.items()})
        else:
            flat[name] = value
    return flat


# -- registry -----------------------------------------------------------------------------

def test_names():
    assert models.names() == ("ffn2", "lenet", "resnet8", "resnet20", "resnet56", "resnet18",
                              "vit", "transformer_lm")


def test_unknown_name_and_option_raise():
    with pytest.raises(ValueError, match=r"'resnet19'.*ffn2, lenet, resnet8, resnet20"):
        models.get("resnet19")
    with pytest.raises(ValueError, match=r"\['depth'\].*axis_name.*widths"):
        models.get("ffn2", depth=3)
    with pytest.raises(ValueError, match=r"\['widths'\]"):
        models.get("resnet20", widths=(8,))
    with pytest.raises(ValueError, match=r"\['blocks_per_stage'\]"):
        models.get("resnet20", blocks_per_stage=5)


def test_common_fields():
    for name in models.names():
        model = models.get(name, rule="fa", num_classes=7, axis_name="batch")
        if name in ("vit", "transformer_lm"):  # Flax's own layers, wrapped by with_rule
            assert isinstance(model, pnn.WithRule) and isinstance(model.module, nn.Module)
            assert (model.num_classes, model.axis_name) == (7, "batch")
            continue
        assert isinstance(model, nn.Module)
        assert (model.rule, model.num_classes, model.axis_name) == ("fa", 7, "batch")


def test_rule_mapping_with_unknown_layer_raises_at_init():
    model = models.get("ffn2", rule={"default": "fa", "hiden_0": "bp"})
    with pytest.raises(ValueError, match="hiden_0"):
        abstract_init(model, images(MNIST))


# -- shapes and parameter counts --------------------------------------------------------------

@pytest.mark.parametrize("name", ["ffn2", "lenet", "resnet20"])
def test_output_shapes_and_batch_stats(name):
    model, x = models.get(name), images(SHAPES[name])
    assert model.apply(initialised(name), x).shape == (BATCH, 10)
    logits, updates = model.apply(initialised(name), x, train=True, mutable=["batch_stats"])
    assert logits.shape == (BATCH, 10)
    if name == "resnet20":
        stats = initialised(name)["batch_stats"]
        assert jax.tree.structure(updates["batch_stats"]) == jax.tree.structure(stats)
        changed = jax.tree.map(lambda a, b: bool(np.any(a != b)), updates["batch_stats"], stats)
        assert all(jax.tree.leaves(changed))


@pytest.mark.parametrize("name, classes", [("resnet18", 1000), ("resnet56", 10), ("lenet", 7)])
def test_output_shapes_abstract(name, classes):
    model, x = models.get(name, num_classes=classes), images(SHAPES[name])
    variables = abstract_init(model, x)
    assert jax.eval_shape(model.apply, variables, x).shape == (BATCH, classes)
    logits, updates = jax.eval_shape(
        functools.partial(model.apply, train=True, mutable=["batch_stats"]), variables, x)
    assert logits.shape == (BATCH, classes)
    assert jax.tree.structure(updates) == jax.tree.structure(
        {k: v for k, v in variables.items() if k == "batch_stats"})


def test_lenet_on_cifar_shapes():
    model, x = models.get("lenet"), images(CIFAR)
    variables = abstract_init(model, x)
    assert variables["params"]["dense_0"]["kernel"].shape == (16 * 6 * 6, 120)
    assert jax.eval_shape(model.apply, variables, x).shape == (BATCH, 10)


# Counts derived by hand (weights + biases; BatchNorm scale + bias, running stats excluded):
#   ffn2:     784*512+512 + 512*512+512 + 512*10+10                               = 669,706
#   lenet:    5*5*1*6+6 + 5*5*6*16+16 + 400*120+120 + 120*84+84 + 84*10+10          = 61,706
#   resnet20: stem 3*3*3*16 + 32 = 464; stage1 3 * (2*2304 + 64) = 14,016;
#             stage2 (4608 + 9216 + 128) + 2 * (2*9216 + 128) = 51,072;
#             stage3 (18432 + 36864 + 256) + 2 * (2*36864 + 256) = 203,520; output 650 -> 269,722
#   resnet8:  464 + 4672 + 13,952 + 55,552 + 650 (one block per stage)                = 75,290
#   resnet56: 464 + 9*4672 + (13,952 + 8*18,560) + (55,552 + 8*73,984) + 650         = 853,018
#   resnet18 (1000 classes): torchvision's                                            = 11,689,512
@pytest.mark.parametrize("name, classes, expected", [
    ("ffn2", 10, 669_706), ("lenet", 10, 61_706), ("resnet8", 10, 75_290),
    ("resnet20", 10, 269_722),
    ("resnet56", 10, 853_018), ("resnet18", 1000, 11_689_512)])
def test_param_counts(name, classes, expected):
    model = models.get(name, num_classes=classes)
    assert count(abstract_init(model, images(SHAPES[name]))["params"]) == expected


def test_ffn2_widths():
    model = models.get("ffn2", widths=[32, 16, 8])
    assert model.widths == (32, 16, 8)  # lists become tuples: the model stays hashable
    params = abstract_init(model, images(MNIST))["params"]
    assert {k: v["kernel"].shape for k, v in params.items()} == {
        "hidden_0": (784, 32), "hidden_1": (32, 16), "hidden_2": (16, 8), "output": (8, 10)}


def test_ffn2_tanh_activation():
    x = images(MNIST)
    model = models.get("ffn2", widths=(8, 4), activation="tanh")
    params = init(model, x)["params"]
    h = x.reshape(BATCH, -1)
    for name in ("hidden_0", "hidden_1"):
        h = np.tanh(h @ params[name]["kernel"] + params[name]["bias"])
    expected = h @ params["output"]["kernel"] + params["output"]["bias"]
    np.testing.assert_allclose(model.apply({"params": params}, x), expected, rtol=1e-5, atol=1e-6)
    with pytest.raises(ValueError, match=r"'gelu'.*relu, tanh"):
        models.get("ffn2", activation="gelu")


def test_resnet20_option_a_shortcuts_have_no_params():
    params = initialised("resnet20")["params"]
    blocks = {f"stage{s}_block{b}" for s in (1, 2, 3) for b in range(3)}
    assert set(params) == {"stem", "stem_bn", "output"} | blocks
    for block in blocks:
        assert set(params[block]) == {"conv0", "bn0", "conv1", "bn1"}
    assert set(params["stem"]) == {"kernel"}  # convs have no bias


def test_resnet18_option_b_shortcuts():
    params = abstract_init(models.get("resnet18"), images(CIFAR))["params"]
    for s, width in ((2, 128), (3, 256), (4, 512)):
        block = params[f"stage{s}_block0"]
        assert block["shortcut"]["kernel"].shape == (1, 1, width // 2, width)
        assert set(block["shortcut_bn"]) == {"scale", "bias"}
        assert "shortcut" not in params[f"stage{s}_block1"]
    assert "shortcut" not in params["stage1_block0"]


# -- BP is plain flax ---------------------------------------------------------------------------

@pytest.mark.parametrize("name, reference", [
    ("ffn2", RefMLP()), ("lenet", RefLeNet()), ("resnet20", RefResNet20())])
def test_bp_equals_plain_flax(name, reference):
    model, x, lib_variables = models.get(name), images(SHAPES[name]), initialised(name)
    ref_variables = {k: flatten_blocks(v) for k, v in lib_variables.items()}
    assert jax.tree.structure(ref_variables) == jax.tree.structure(abstract_init(reference, x))

    assert_trees_close(model.apply(lib_variables, x), reference.apply(ref_variables, x), 1e-5)

    def grads(module, variables):
        def loss(params):
            logits, updates = module.apply({**variables, "params": params}, x, train=True,
                                           mutable=["batch_stats"])
            return cross_entropy(logits, len(x)), updates
        return jax.grad(loss, has_aux=True)(variables["params"])

    lib_grads, lib_updates = grads(model, lib_variables)
    ref_grads, ref_updates = grads(reference, ref_variables)
    assert_trees_close(flatten_blocks(lib_grads), ref_grads, 1e-4)
    assert_trees_close({k: flatten_blocks(v) for k, v in lib_updates.items()}, ref_updates, 1e-5)


# -- rules and feedback ---------------------------------------------------------------------

def test_per_layer_rule_mapping():
    model = models.get("ffn2", rule={"default": "pfa", "output": "bp"})
    feedback = abstract_init(model, images(MNIST))["feedback"]
    assert set(feedback) == {"hidden_0", "hidden_1"}
    assert set(feedback["hidden_0"]) == {"Bp", "R"}

    model = models.get("resnet20", rule={"default": "bp", "stage2_block0/conv1": "fa"})
    feedback = abstract_init(model, images(CIFAR))["feedback"]
    assert jax.tree.map(lambda a: a.shape, feedback) == {
        "stage2_block0": {"conv1": {"B": (3, 3, 32, 32)}}}


def layer_leaves(tree):
    """``{(layer path, leaf name): shape}`` of a params or feedback tree."""
    return {("/".join(k.key for k in path[:-1]), path[-1].key): leaf.shape
            for path, leaf in jax.tree_util.tree_leaves_with_path(tree)}


@pytest.mark.parametrize("name", ["lenet", "resnet20"])
def test_fa_feedback_on_every_layer(name):
    fa_variables = initialised(name, "fa")
    kernels = {path: shape for (path, leaf), shape in layer_leaves(fa_variables["params"]).items()
               if leaf == "kernel"}
    assert set(kernels) == layer_paths(fa_variables["params"])
    assert layer_leaves(fa_variables["feedback"]) == {(path, "B"): shape
                                                   for path, shape in kernels.items()}


@pytest.mark.parametrize("rule", rules.names())
@pytest.mark.parametrize("name", ["lenet", pytest.param("resnet20", marks=pytest.mark.slow)])
def test_every_rule_trains(name, rule):
    model, x = models.get(name, rule=rule), images(SHAPES[name])
    rule_variables = initialised(name, rule)
    other = {k: v for k, v in rule_variables.items() if k not in ("params", "feedback")}

    def loss(params, feedback):
        logits, _ = model.apply({**other, "params": params, "feedback": feedback}, x, train=True,
                                mutable=["batch_stats", pnn.TAPS], rngs={"feedback": key(1)})
        return cross_entropy(logits, len(x))

    dparams, dfeedback = jax.grad(loss, argnums=(0, 1))(rule_variables["params"],
                                                        rule_variables.get("feedback", {}))
    assert jax.tree.structure(dparams) == jax.tree.structure(rule_variables["params"])
    assert all(np.isfinite(g).all() for g in jax.tree.leaves((dparams, dfeedback)))
    first = "conv_0" if name == "lenet" else "stem"
    assert np.any(dparams[first]["kernel"])  # the error reaches the first layer


@pytest.mark.parametrize("axis_name, averages", [("batch", 19), (None, 0)])
def test_axis_name_reaches_every_batch_norm(axis_name, averages):
    """With the axis bound (as under pmap), each of ResNet-20's 19 BatchNorms averages over it."""
    model = models.get("resnet20", axis_name=axis_name)

    def train_apply(x):
        return model.apply(initialised("resnet20"), x, train=True, mutable=["batch_stats"])

    jaxpr = jax.make_jaxpr(train_apply, axis_env=[("batch", 2)])(images(CIFAR))
    psums = [eqn for eqn in jaxpr.eqns if eqn.primitive.name == "psum"]
    assert len(psums) == averages
    assert all(eqn.params["axes"] == ("batch",) for eqn in psums)
