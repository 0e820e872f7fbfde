"""Property-based tests (hypothesis) of every rule's dense and conv ops (SPEC.md: "Layouts and notation",
"Layer-wise rules", "PFA details", "Initialisation of feedback").

Random layers (dense, or 2-D NHWC convs with random strides, paddings, dilations and feature groups), random
rule options and float32 / float64 data are checked against references written here from the SPEC:

1. the forward pass of every rule equals a plain ``x @ K`` / ``lax.conv_general_dilated``;
2. the three cotangents equal references: ``dx`` is ``jax.vjp`` of the plain op at the hand-computed
   effective feedback ``F`` (DFA: the fixed projection of the tap's cotangent), ``dK`` plain autodiff at
   ``K``, and the feedback cotangents ``dB = dK`` (kp), ``dR = dK Bp`` masked (PFA), zero otherwise;
3. PFA's "mid" and "product" routes agree;
4. one-time soft alignment sets ``cos(B, K) = rho`` and keeps the norm of the independent draw;
5. invalid options and mismatched shapes raise ``ValueError``.

Speed: every new shape is a new XLA compile on CPU, so shapes are tiny, data comes from NumPy, keys are
"rbg" keys, every example runs every rule on one set of shapes, and examples are few and derandomized.
"""
from __future__ import annotations

import contextlib
import dataclasses
import functools
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from jax import lax

import pfa_jax.rules as R


def examples(n):
    return settings(max_examples=n, deadline=None, derandomize=True, database=None,
                    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])


TOLERANCES = {"float32": dict(rtol=2e-4, atol=2e-5), "float64": dict(rtol=1e-9, atol=1e-11)}
PFA_NAMES = ("pfa", "pfa_o")
ALIGNED = {"fa": "B", "frsf": "M", "kp": "B", "wm": "B"}  # rules with option rho -> the aligned array
SEEDS = st.integers(0, 2**16)


def prng(seed):
    """A PRNG key ("rbg": its draws of new shapes compile fast; rules draw feedback with the key given)."""
    return jax.random.key(seed, impl="rbg")


def normal(seed, shape, dtype="float32"):
    """Test data from NumPy (no per-shape compile)."""
    return jnp.asarray(np.random.default_rng(seed).standard_normal(shape).astype(dtype))


def precision(dtype):
    """float64 inside a scoped ``jax.enable_x64`` (the global config is never flipped)."""
    return jax.enable_x64(True) if dtype == "float64" else contextlib.nullcontext()


# --------------------------------------------------------------------------------------------------
# Layers: shapes and conv options, and the plain ops they stand for
# --------------------------------------------------------------------------------------------------

@dataclasses.dataclass(frozen=True)
class Layer:
    x_shape: tuple[int, ...]
    kernel_shape: tuple[int, ...]
    conv: dict | None = None  # keyword arguments of rule.conv; None for a dense layer

    @property
    def groups(self):
        return (self.conv or {}).get("feature_group_count", 1)

    def apply(self, rule):
        """``rule.dense`` or ``rule.conv`` with this layer's options."""
        return rule.dense if self.conv is None else functools.partial(rule.conv, **self.conv)

    def plain(self):
        """The plain op, no custom VJP."""
        return jnp.matmul if self.conv is None else functools.partial(plain_conv, **self.conv)


def _pair(value):
    return (value, value) if isinstance(value, int) else tuple(value)


def plain_conv(x, kernel, strides=1, padding="SAME", kernel_dilation=1, feature_group_count=1):
    if isinstance(padding, int):
        padding = (_pair(padding),) * 2
    elif not isinstance(padding, str):
        padding = tuple(_pair(p) for p in padding)
    return lax.conv_general_dilated(x, kernel, _pair(strides), padding, rhs_dilation=_pair(kernel_dilation),
                                    feature_group_count=feature_group_count,
                                    dimension_numbers=("NHWC", "HWIO", "NHWC"))


ONE_TWO = st.integers(1, 2)
INT_OR_PAIR = st.one_of(ONE_TWO, st.tuples(ONE_TWO, ONE_TWO))
PAD_PAIR = st.tuples(st.integers(0, 2), st.integers(0, 2))
PADDINGS = st.one_of(st.sampled_from(["SAME", "VALID"]), st.integers(0, 2), st.tuples(PAD_PAIR, PAD_PAIR),
                     st.lists(st.lists(st.integers(0, 2), min_size=2, max_size=2), min_size=2, max_size=2))


def padded_extra(padding, axis):
    """Padding added along spatial ``axis`` (SAME: enough that any input size gives an output)."""
    if padding == "SAME":
        return math.inf
    if padding == "VALID":
        return 0
    return 2 * padding if isinstance(padding, int) else sum(padding[axis])


@st.composite
def dense_layers(draw):
    batch, n_in, n_out = (draw(st.integers(1, 4)) for _ in range(3))
    return Layer((batch, n_in), (n_in, n_out))


@st.composite
def conv_layers(draw, groups=ONE_TWO):
    """NHWC / HWIO; channels 1-4 divisible by the group count; spatial 3-7 and large enough for an output."""
    g = draw(groups)
    n_in, n_out = (g * draw(st.integers(1, 4 // g)) for _ in range(2))
    window = draw(st.tuples(st.integers(1, 3), st.integers(1, 3)))
    strides, dilation, padding = draw(INT_OR_PAIR), draw(INT_OR_PAIR), draw(PADDINGS)
    spatial = tuple(
        draw(st.integers(max(3, (k - 1) * d + 1 - padded_extra(padding, axis)), 7))
        for axis, (k, d) in enumerate(zip(window, _pair(dilation))))
    conv = {"strides": strides, "padding": padding, "kernel_dilation": dilation}
    if g > 1 or draw(st.booleans()):
        conv["feature_group_count"] = g
    return Layer((draw(st.integers(1, 4)),) + spatial + (n_in,), window + (n_in // g, n_out), conv)


LAYERS = st.one_of(dense_layers(), conv_layers())


@st.composite
def rule_cases(draw):
    """One instance of every registered rule, with random options where it has them."""
    options = {
        "pfa": {"expansion": draw(st.sampled_from([1, 1.5, 2, 3])), "density": draw(st.sampled_from([1.0, 0.5])),
                "route": draw(st.sampled_from(["mid", "product"]))},
        "pfa_o": {"route": draw(st.sampled_from(["mid", "product"]))},
        "dfa": {"classes": draw(st.integers(1, 3))},
    }
    return [R.get(name, **options.get(name, {})) for name in R.names()]


# --------------------------------------------------------------------------------------------------
# References from the SPEC
# --------------------------------------------------------------------------------------------------

def masked_r(fb):
    return fb["R"] * fb["R_mask"] if "R_mask" in fb else fb["R"]


def reference_feedback(rule, kernel, fb, key):
    """The SPEC's effective feedback ``F`` in kernel layout, by hand (xavier-uniform init)."""
    fan_in, fan_out = (kernel.shape[-2] * math.prod(kernel.shape[:-2]),
                       kernel.shape[-1] * math.prod(kernel.shape[:-2]))
    magnitude = {
        "bp": lambda: kernel, "fa": lambda: fb["B"], "kp": lambda: fb["B"], "wm": lambda: fb["B"],
        "usf": lambda: math.sqrt(2.0 / (fan_in + fan_out)) * jnp.sign(kernel),
        "brsf": lambda: jnp.abs(rule.kernel_init()(key, kernel.shape, kernel.dtype)) * jnp.sign(kernel),
        "frsf": lambda: jnp.abs(fb["M"]) * jnp.sign(kernel),
        "pfa": lambda: jnp.einsum("...im,om->...io", masked_r(fb), fb["Bp"]),
    }
    magnitude["pfa_o"] = magnitude["pfa"]
    return magnitude[rule.name]()


def dfa_projection(e, b, x_shape):
    """DFA's ``dx``: ``e B`` (dense) or a stride-1 SAME conv of ``e`` broadcast over ``x``'s grid."""
    if b.ndim == 2:
        return e @ b
    return plain_conv(jnp.broadcast_to(e[:, None, None, :], x_shape[:-1] + e.shape[-1:]), b)


def reference(rule, layer, x, kernel, fb, key, cotangent):
    """``(y, (dx, dK, dfb))`` from the SPEC; ``cotangent`` is ``g`` (DFA: ``(g, e)``)."""
    op = layer.plain()
    g = cotangent[0] if rule.name == "dfa" else cotangent
    y, kernel_pullback = jax.vjp(lambda k: op(x, k), kernel)
    dkernel = kernel_pullback(g)[0]
    if rule.name == "dfa":
        dx = dfa_projection(cotangent[1], fb["B"], x.shape)
    else:
        f = reference_feedback(rule, kernel, fb, key)
        dx = jax.vjp(lambda x_: op(x_, f), x)[1](g)[0]
    dfb = {k: jnp.zeros_like(v) for k, v in fb.items()}
    if rule.name == "kp":
        dfb["B"] = dkernel
    if rule.name in PFA_NAMES:
        dfb["R"] = jnp.einsum("...io,om->...im", dkernel, fb["Bp"]) * fb.get("R_mask", 1.0)
    return y, (dx, dkernel, dfb)


def rule_vjp(rule, layer, x, kernel, fb, key, cotangent):
    """The rule's output and its three cotangents ``(dx, dK, dfb)``."""
    apply = layer.apply(rule)
    y, pullback = jax.vjp(lambda x_, k_, fb_: apply(x_, k_, fb_, key), x, kernel, fb)
    return y, pullback(cotangent)


def assert_trees_close(actual, expected, what, **tolerance):
    leaves, structure = jax.tree_util.tree_flatten_with_path(expected)
    assert jax.tree_util.tree_structure(actual) == jax.tree_util.tree_structure(expected), (
        f"{what}: structure {jax.tree_util.tree_structure(actual)} != {structure}")
    for (path, want), got in zip(leaves, jax.tree_util.tree_leaves(actual)):
        name = f"{what}{jax.tree_util.keystr(path)}"
        assert got.shape == want.shape and got.dtype == want.dtype, (
            f"{name}: {got.shape} {got.dtype} != {want.shape} {want.dtype}")
        np.testing.assert_allclose(np.asarray(got, np.float64), np.asarray(want, np.float64),
                                   err_msg=name, **tolerance)


def check_all(rules, check):
    """Runs ``check(rule)`` for every rule and reports every failing rule at once."""
    failures = []
    for rule in rules:
        try:
            check(rule)
        except AssertionError as error:
            failures.append(f"--- {rule}:\n{error}")
    assert not failures, "\n".join(failures)


# --------------------------------------------------------------------------------------------------
# 1-2. Forward and cotangents of every rule against the references
# --------------------------------------------------------------------------------------------------

@examples(20)
@given(layer=LAYERS, rules=rule_cases(), dtype=st.sampled_from(["float32", "float32", "float64"]),
       seed=SEEDS)
def test_every_rule_matches_reference(layer, rules, dtype, seed):
    with precision(dtype):
        x, kernel = normal(seed, layer.x_shape, dtype), normal(seed + 1, layer.kernel_shape, dtype)
        key = prng(seed + 2)
        want_y = layer.plain()(x, kernel)
        g = normal(seed + 3, want_y.shape, dtype)

        def check(rule):
            fb = rule.init_feedback(prng(seed + 4), kernel)
            cotangent = (g, normal(seed + 5, (x.shape[0], rule.classes), dtype)) if rule.name == "dfa" else g
            if rule.name == "dfa" and (layer.groups > 1):
                with pytest.raises(ValueError, match="feature_group_count"):
                    layer.apply(rule)(x, kernel, fb, key)
                return
            y, cotangents = rule_vjp(rule, layer, x, kernel, fb, key, cotangent)
            np.testing.assert_array_equal(y[0] if rule.name == "dfa" else y, want_y, err_msg="forward")
            if rule.name == "dfa":
                np.testing.assert_array_equal(y[1], np.zeros((x.shape[0], rule.classes), dtype), err_msg="tap")
            assert_trees_close(cotangents, reference(rule, layer, x, kernel, fb, key, cotangent)[1],
                               "(dx, dK, dfb)", **TOLERANCES[dtype])
            if rule.name not in ("brsf", "dfa"):  # brsf reports E|M| sign K; DFA has no kernel-shaped F
                assert_trees_close(rule.effective_feedback(kernel, fb),
                                   reference_feedback(rule, kernel, fb, None), "F", **TOLERANCES[dtype])

        check_all(rules, check)


# --------------------------------------------------------------------------------------------------
# 3. PFA's two routes agree
# --------------------------------------------------------------------------------------------------

@examples(15)
@given(layer=st.one_of(dense_layers(), conv_layers(groups=st.just(2)), conv_layers()),
       name_options=st.one_of(
           st.tuples(st.just("pfa"), st.fixed_dictionaries({"expansion": st.sampled_from([1, 1.5, 2, 3]),
                                                             "density": st.sampled_from([1.0, 0.5])})),
           st.tuples(st.just("pfa_o"), st.just({}))),
       seed=SEEDS)
def test_pfa_routes_agree(layer, name_options, seed):
    name, options = name_options
    x, kernel = normal(seed, layer.x_shape), normal(seed + 1, layer.kernel_shape)
    g = normal(seed + 2, layer.plain()(x, kernel).shape)
    results = {}
    for route in ("mid", "product", "auto"):
        rule = R.get(name, route=route, **options)
        results[route] = rule_vjp(rule, layer, x, kernel, rule.init_feedback(prng(seed + 3), kernel), None, g)
    for route in ("product", "auto"):
        assert_trees_close(results[route], results["mid"], f"{route} vs mid", **TOLERANCES["float32"])
