"""Property-based tests (hypothesis) of every rule's dense and conv ops (the rules' layouts and equations,
"Layer-wise rules", "PFA details", "Initialisation of feedback").

Random layers (dense, or 2-D NHWC convs with random strides, paddings, dilations and feature groups), random
rule options and float32 / float64 data are checked against references written here from the
papers' equations:

1. the forward pass of every rule equals a plain ``x @ K`` / ``lax.conv_general_dilated``;
2. the three cotangents equal references: ``dx`` is ``jax.vjp`` of the plain op at the hand-computed
   effective feedback ``F`` (DFA: the fixed projection of the tap's cotangent), ``dK`` plain autodiff at
   ``K``, and the feedback cotangents ``dB = dK`` (kp), ``dR = dK Bp`` masked (PFA), zero otherwise;
3. PFA's "mid" and "product" routes agree;
4. one-time soft alignment sets ``cos(B, K) = rho`` and keeps the norm of the independent draw;
5. invalid options and mismatched shapes raise ``ValueError``.

Speed: every new shape is a new XLA compile on CPU (ops run eagerly, op by op), so shapes are tiny, data
and feedback contents come from NumPy, the references are NumPy except for the conv transposes (the same
compiled ops as the rules'), keys are "rbg" keys, the rules of an example share its shapes, and examples are
few and derandomized.
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
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st
from jax import lax

import pfa_jax.rules as R


def examples(n):
    return settings(max_examples=n, deadline=None, derandomize=True, database=None,
                    suppress_health_check=[HealthCheck.too_slow])


TOLERANCES = {"float32": dict(rtol=2e-4, atol=2e-5), "float64": dict(rtol=1e-9, atol=1e-11)}
PFA_NAMES = ("pfa", "pfa_o")
ROUTES = ("mid", "product", "auto")
ALIGNED = {"fa": "B", "frsf": "M", "kp": "B", "wm": "B"}  # rules with option rho -> the aligned array
SPARSE = ("fa", "usf", "dfa")  # rules besides PFA with option density (sparse fixed feedback)
SEEDS = st.integers(0, 2**16)


def prng(seed):
    """A PRNG key ("rbg": its draws of new shapes compile fast; rules draw feedback with the key given)."""
    return jax.random.key(seed, impl="rbg")


def normal(seed, shape, dtype="float32"):
    """Test data from NumPy (no per-shape compile)."""
    return jnp.asarray(np.random.default_rng(seed).standard_normal(shape).astype(jnp.dtype(dtype)))


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

    def shapes(self):
        return self.x_shape, self.kernel_shape

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
EXPLICIT_PADDING = st.tuples(PAD_PAIR, PAD_PAIR).flatmap(lambda p: st.sampled_from([p, [list(q) for q in p]]))
PADDINGS = st.one_of(st.sampled_from(["SAME", "VALID"]), st.integers(0, 2), EXPLICIT_PADDING)


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


# Two Routes' alignment family is checked against its formulas in test_rules.py and test_alignment.py.
NAMES = tuple(name for name in R.names() if name not in ("sa", "aa", "ia", "alignment"))


def make_rules(names=NAMES, expansion=2, density=1.0, classes=3):
    """The named rules with these options (``density`` for PFA and the SPARSE rules); PFA and PFA-o once
    per route."""
    options = {"pfa": {"expansion": expansion, "density": density}, "fa": {"density": density},
               "usf": {"density": density}, "dfa": {"classes": classes, "density": density, "grid": "input"}}
    return [R.get(name, route=route, **options.get(name, {})) if name in PFA_NAMES
            else R.get(name, **options.get(name, {}))
            for name in names for route in (ROUTES if name in PFA_NAMES else (None,))]


OPTIONS = dict(expansion=st.sampled_from([1, 1.5, 2, 3]), density=st.sampled_from([1.0, 0.5]),
               classes=st.integers(1, 3))
ALL_RULES = st.builds(make_rules, **OPTIONS)


# An example's cost is mostly compiles of each rule's own ops for its shapes, so an example of the main test
# runs one of two halves of the rules, of about equal cost (BP, the baseline, in both).
COSTLY_NAMES = ("brsf", "pfa")
HALVES = (("bp",) + COSTLY_NAMES, tuple(name for name in NAMES if name not in COSTLY_NAMES))
SOME_RULES = st.builds(make_rules, names=st.sampled_from(HALVES), **OPTIONS)


# --------------------------------------------------------------------------------------------------
# References from the papers' equations
# --------------------------------------------------------------------------------------------------

def random_feedback(rule, kernel, seed):
    """Arrays of the structure and shapes ``rule.init_feedback`` gives (traced abstractly: nothing drawn or
    compiled) with random contents, 0/1 for masks (``R_mask``, usf's ``mask``): the op properties hold
    for any feedback state (``R`` nonzero off its mask included)."""
    rng = np.random.default_rng(seed)
    return {name: jnp.asarray((rng.integers(0, 2, s.shape) if name.endswith("mask")
                               else rng.standard_normal(s.shape)).astype(s.dtype))
            for name, s in jax.eval_shape(rule.init_feedback, prng(0), kernel).items()}


def masked_r(fb):
    return fb["R"] * fb["R_mask"] if "R_mask" in fb else fb["R"]


def reference_feedback(rule, kernel, fb, key):
    """The papers' effective feedback ``F`` in kernel layout, by hand in NumPy (xavier-uniform init, so
    ``std = sqrt(2 / (fan_in + fan_out))`` and ``E|M| = limit / 2 = sqrt(3) std / 2``). brsf: ``|M| sign K``
    for the draw ``M`` with ``key``, its expectation ``E|M| sign K`` without one. Sparse usf:
    ``std sign(K) mask / sqrt(density)``."""
    kernel, fb = np.asarray(kernel), {k: np.asarray(v) for k, v in fb.items()}
    receptive = math.prod(kernel.shape[:-2])
    std = math.sqrt(2.0 / (kernel.shape[-2] * receptive + kernel.shape[-1] * receptive))
    magnitude = {
        "bp": lambda: 1, "fa": lambda: fb["B"], "kp": lambda: fb["B"], "wm": lambda: fb["B"],
        "usf": lambda: std * np.sign(kernel) * (fb["mask"] / math.sqrt(rule.density) if "mask" in fb else 1),
        "brsf": lambda: np.sign(kernel) * (math.sqrt(3.0) * std / 2 if key is None else
                                           np.abs(rule.kernel_init()(key, kernel.shape, kernel.dtype))),
        "frsf": lambda: np.abs(fb["M"]) * np.sign(kernel),
        "pfa": lambda: np.einsum("...im,om->...io", masked_r(fb), fb["Bp"]),
    }
    magnitude["pfa_o"] = magnitude["pfa"]
    return kernel if rule.name == "bp" else magnitude[rule.name]()


def transposes(layer, x, kernel, g):
    """``(dx, dK)`` of the plain op at ``(x, kernel)``: ``g K^T`` and ``x^T g`` (dense, NumPy) or
    ``jax.vjp`` of a plain conv. The op is linear in the kernel, so ``dK`` does not depend on it."""
    if layer.conv is None:
        return g @ kernel.T, x.T @ g
    return tuple(np.asarray(d) for d in jax.vjp(layer.plain(), x, kernel)[1](g))


def dfa_projection(e, b, x_shape):
    """DFA's ``dx``: ``e B`` (dense) or a stride-1 SAME conv of ``e`` broadcast over ``x``'s grid."""
    if b.ndim == 2:
        return e @ b
    return np.asarray(plain_conv(np.broadcast_to(e[:, None, None, :], x_shape[:-1] + e.shape[-1:]), b))


def reference_cotangents(rule, layer, x, kernel, fb, key, cotangent):
    """``(dx, dK, dfb)`` from the papers' equations; ``cotangent`` is ``g`` (DFA: ``(g, e)``)."""
    x, kernel, fb, cotangent = jax.tree.map(np.asarray, (x, kernel, fb, cotangent))
    if rule.name == "dfa":
        (g, e), f = cotangent, kernel
    else:
        g, f = cotangent, reference_feedback(rule, kernel, fb, key)
    dx, dkernel = transposes(layer, x, f, g)
    if rule.name == "dfa":
        dx = dfa_projection(e, fb["B"], x.shape)
    dfb = {k: np.zeros_like(v) for k, v in fb.items()}
    if rule.name == "kp":
        dfb["B"] = dkernel
    if rule.name in PFA_NAMES:
        dfb["R"] = np.einsum("...io,om->...im", dkernel, fb["Bp"]) * fb.get("R_mask", 1)
    return dx, dkernel, dfb


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
        except (AssertionError, pytest.fail.Exception) as error:
            failures.append(f"--- {rule}:\n{error}")
    assert not failures, "\n".join(failures)


# --------------------------------------------------------------------------------------------------
# 1-3. Forward and cotangents of every rule against the references; PFA's routes agree
# --------------------------------------------------------------------------------------------------

@examples(15)
@given(layer=LAYERS, rules=SOME_RULES, dtype=st.sampled_from(["float32", "float32", "float64"]), seed=SEEDS)
@example(layer=Layer((2, 7, 6, 4), (3, 2, 2, 4), {"strides": 2, "padding": "VALID", "kernel_dilation": (2, 1),
                                                  "feature_group_count": 2}),
         rules=make_rules(expansion=1.5, density=0.5), dtype="float32", seed=1)
@example(layer=Layer((3, 5, 4, 3), (2, 3, 3, 2), {"strides": (1, 2), "padding": [[2, 0], [1, 1]],
                                                  "kernel_dilation": 2}),
         rules=make_rules(HALVES[0], expansion=1.5), dtype="float64", seed=2)
def test_every_rule_matches_reference(layer, rules, dtype, seed):
    """Forward identical to the plain op; ``(dx, dK, dfb)`` equal to the references; ``effective_feedback``
    equal to the hand-computed ``F``; PFA's "mid", "product" and "auto" routes agree with each other. DFA
    refuses feature groups. The explicit examples: every rule on a strided, dilated, grouped VALID conv with
    sparse PFA; BP, brsf and PFA on a float64 conv with explicit padding given as lists."""
    tolerance = TOLERANCES[dtype]
    results = {}
    with precision(dtype):
        x, kernel = (normal(seed + i, shape, dtype) for i, shape in enumerate(layer.shapes()))
        key = prng(seed + 2)
        want_y = layer.plain()(x, kernel)
        g = normal(seed + 3, want_y.shape, dtype)

        def check(rule):
            fb = random_feedback(rule, kernel, seed + 4)
            if rule.name == "dfa" and layer.groups > 1:
                with pytest.raises(ValueError, match="feature_group_count"):
                    layer.apply(rule)(x, kernel, fb, key)
                return
            cotangent = (g, normal(seed + 5, (x.shape[0], rule.classes), dtype)) if rule.name == "dfa" else g
            y, results[rule] = rule_vjp(rule, layer, x, kernel, fb, key, cotangent)
            if rule.name == "dfa":
                y, tap = y
                np.testing.assert_array_equal(tap, np.zeros((x.shape[0], rule.classes), dtype), err_msg="tap")
            np.testing.assert_array_equal(y, want_y, err_msg="forward")
            want = reference_cotangents(rule, layer, x, kernel, fb, key, cotangent)
            assert_trees_close(results[rule], want, "(dx, dK, dfb)", **tolerance)
            if rule.name != "dfa":  # DFA has no kernel-shaped F
                assert_trees_close(rule.effective_feedback(kernel, fb),
                                   reference_feedback(rule, kernel, fb, None), "F", **tolerance)

        check_all(rules, check)
        check_all([r for r in rules if r.name in PFA_NAMES and r.route != "mid"],
                  lambda r: assert_trees_close(results[r], results[dataclasses.replace(r, route="mid")],
                                               f"{r.route} route vs mid route", **tolerance))


# --------------------------------------------------------------------------------------------------
# Low precision: the forward pass stays the plain op
# --------------------------------------------------------------------------------------------------

@examples(6)
@given(layer=LAYERS, rules=ALL_RULES, dtype=st.sampled_from(["bfloat16", "float16"]), seed=SEEDS)
def test_forward_is_plain_op_in_low_precision(layer, rules, dtype, seed):
    """bfloat16 / float16: every rule's output is the plain op's, bit for bit, in the input dtype."""
    x, kernel = (normal(seed + i, shape, dtype) for i, shape in enumerate(layer.shapes()))
    want = np.asarray(layer.plain()(x, kernel))

    def check(rule):
        if rule.name == "dfa" and layer.groups > 1:
            return
        y = layer.apply(rule)(x, kernel, random_feedback(rule, kernel, seed + 2))
        y = y[0] if rule.name == "dfa" else y
        assert y.dtype == dtype, f"forward dtype {y.dtype} != {dtype}"
        np.testing.assert_array_equal(np.asarray(y), want, err_msg="forward")

    check_all(rules, check)


# --------------------------------------------------------------------------------------------------
# 4. One-time soft alignment
# --------------------------------------------------------------------------------------------------

# Kernel shapes for soft alignment: a fixed handful, because every new shape costs compiles of the draw and of
# soft_align's ops (rho, scale and seed are what the examples explore).
KERNEL_SHAPES = [(1, 2), (4, 3), (3, 1), (1, 1, 2, 1), (2, 2, 1, 3), (3, 3, 4, 4), (1, 3, 2, 2)]


def cosine(a, b):
    a, b = np.asarray(a, np.float64).ravel(), np.asarray(b, np.float64).ravel()
    return a @ b / (np.linalg.norm(a) * np.linalg.norm(b))


@examples(20)
@given(rho=st.floats(-1.0, 1.0), shape=st.sampled_from(KERNEL_SHAPES), scale=st.floats(1e-2, 1e2), seed=SEEDS)
def test_soft_alignment_sets_cosine_and_keeps_norm(rho, shape, scale, seed):
    """``cos(B, K) == rho`` exactly and ``||B|| == ||rule.kernel_init()(key, shape)||`` for the key that
    ``init_feedback`` is given (base.py draws with it directly), for every rule with option ``rho``."""
    kernel = jnp.asarray(np.random.default_rng(seed).standard_normal(shape).astype(np.float32) * scale)

    def check(rule):
        fb = rule.init_feedback(prng(seed + 1), kernel)
        draw = rule.kernel_init()(prng(seed + 1), shape, kernel.dtype)
        field = ALIGNED[rule.name]
        assert set(fb) == {field} and fb[field].shape == shape, f"feedback {jax.tree.map(jnp.shape, fb)}"
        b = np.asarray(fb[field])
        assert abs(cosine(b, kernel) - rho) <= 1e-4, f"cos(B, K) = {cosine(b, kernel)} != rho = {rho}"
        np.testing.assert_allclose(np.linalg.norm(b.astype(np.float64)),
                                   np.linalg.norm(np.asarray(draw, np.float64)), rtol=1e-5,
                                   err_msg="||B|| != ||independent draw||")

    check_all([R.get(name, rho=rho) for name in ALIGNED], check)


@pytest.mark.parametrize("kernel", [np.full((1, 1), 0.7), np.full((1, 1, 1, 1), -0.7), np.zeros((3, 2))],
                         ids=["one-entry-dense", "one-entry-conv", "zero"])
def test_soft_alignment_of_degenerate_kernels_is_never_nan(kernel):
    """Where ``cos(B, K) = rho`` cannot be met (a one-entry kernel, for which only rho = +-1 can; an all-zero
    kernel) soft alignment must not hand back NaN feedback, which silently turns every error sent down into
    NaN: it raises ValueError, or returns finite feedback, with ``cos(B, K) = rho`` where attainable."""
    kernel = jnp.asarray(kernel, jnp.float32)
    attainable = (-1.0, 1.0) if kernel.size == 1 else ()

    def check(rule):
        try:
            b = np.asarray(rule.init_feedback(prng(0), kernel)[ALIGNED[rule.name]])
        except ValueError:
            assert rule.rho not in attainable, f"rho = {rule.rho} is attainable for a one-entry kernel"
            return
        assert np.all(np.isfinite(b)), (
            f"soft_align (pfa_jax/rules/base.py): init_feedback(key, K) with K of shape {kernel.shape} and "
            f"norm {float(jnp.linalg.norm(kernel))} returned {b.ravel()}: the draw's component orthogonal to "
            "K is exactly zero for a one-entry K (and K / ||K|| is 0/0 for a zero K); normalising it must "
            "not give 0/0 = NaN, even for rho = +-1 where its weight sqrt(1 - rho^2) is 0")
        if rule.rho in attainable:
            assert cosine(b, kernel) == pytest.approx(rule.rho)

    check_all([R.get(name, rho=rho) for name in ALIGNED for rho in (-1.0, 0.0, 0.5, 1.0)], check)


# --------------------------------------------------------------------------------------------------
# 5. Invalid options and mismatched shapes raise ValueError
# --------------------------------------------------------------------------------------------------

def outside(low, high):
    """Finite floats and ints below ``low`` or above ``high`` (either bound may be None)."""
    parts = []
    if low is not None:
        parts += [st.floats(max_value=low, exclude_max=True, allow_infinity=False),
                  st.integers(max_value=math.ceil(low) - 1)]
    if high is not None:
        parts += [st.floats(min_value=high, exclude_min=True, allow_infinity=False),
                  st.integers(min_value=math.floor(high) + 1)]
    return st.one_of(parts)


BAD_OPTIONS = st.one_of(
    st.tuples(st.sampled_from(PFA_NAMES), st.just("expansion"), outside(1, None)),
    st.tuples(st.sampled_from(PFA_NAMES + SPARSE), st.just("density"),
              st.one_of(outside(0, 1), st.sampled_from([0, 0.0, -0.0]))),
    st.tuples(st.sampled_from(sorted(ALIGNED)), st.just("rho"), outside(-1, 1)),
    st.tuples(st.just("dfa"), st.just("classes"), st.integers(max_value=0)),
)


@examples(50)
@given(bad=BAD_OPTIONS)
def test_bad_options_raise(bad):
    name, option, value = bad
    with pytest.raises(ValueError, match=option):
        R.get(name, **{option: value})


@pytest.mark.parametrize("name,option", [("pfa", "expansion"), ("pfa_o", "expansion"), ("pfa", "density"),
                                         ("fa", "rho"), ("frsf", "rho"), ("kp", "rho"), ("wm", "rho"),
                                         ("fa", "density"), ("usf", "density"), ("dfa", "density")])
@pytest.mark.parametrize("value", [math.nan, math.inf, -math.inf], ids=["nan", "inf", "-inf"])
def test_non_finite_options_raise(name, option, value):
    """NaN and infinities are invalid values of every numeric option (a check written ``expansion < 1`` is
    False for both and let them through, to fail later in ``PFA.mid`` with "cannot convert float NaN to
    integer" or an OverflowError)."""
    try:
        rule = R.get(name, **{option: value})
    except ValueError as error:
        assert option in str(error)
    else:
        pytest.fail(f"R.get({name!r}, {option}={value}) is accepted as {rule}; a non-finite {option} must "
                    "raise ValueError")


BAD_CONV_OPTIONS = st.one_of(
    st.fixed_dictionaries({"strides": st.one_of(st.integers(max_value=0),
                                                st.tuples(ONE_TWO, st.integers(max_value=0)),
                                                st.lists(ONE_TWO, min_size=3, max_size=3))}),
    st.fixed_dictionaries({"kernel_dilation": st.one_of(st.integers(max_value=0),
                                                        st.tuples(st.integers(max_value=0), ONE_TWO))}),
    st.fixed_dictionaries({"padding": st.one_of(st.sampled_from(["FULL", "CIRCULAR", ""]),
                                                st.lists(PAD_PAIR, min_size=1, max_size=1),
                                                st.lists(PAD_PAIR, min_size=3, max_size=3))}),
    st.fixed_dictionaries({"feature_group_count": st.integers(max_value=0)}),
)


@st.composite
def mismatched_layers(draw):
    """A layer whose input shape does not match its kernel, or whose conv options are invalid."""
    layer = draw(LAYERS)
    x_shape, kernel_shape = layer.shapes()
    kind = draw(st.sampled_from(["channels", "rank", "groups", "options"] if layer.conv else ["channels"]))
    if kind == "channels":  # x's channels do not match the kernel's input features (times groups)
        x_shape = x_shape[:-1] + (x_shape[-1] + draw(st.sampled_from([1, 2] + [-1] * (x_shape[-1] > 1))),)
    elif kind == "rank":  # no batch axis, or an extra spatial axis
        x_shape = x_shape[1:] if draw(st.booleans()) else x_shape[:1] + (3,) + x_shape[1:]
    elif kind == "groups":  # output features not divisible by the group count
        kernel_shape = kernel_shape[:-1] + (2 * draw(st.integers(0, 1)) + 1,)
        x_shape = x_shape[:-1] + (2 * kernel_shape[-2],)
        layer = dataclasses.replace(layer, conv={**layer.conv, "feature_group_count": 2})
    else:
        layer = dataclasses.replace(layer, conv={**layer.conv, **draw(BAD_CONV_OPTIONS)})
    return dataclasses.replace(layer, x_shape=x_shape, kernel_shape=kernel_shape)


@examples(20)
@given(layer=mismatched_layers(), rules=ALL_RULES, seed=SEEDS)
def test_mismatched_shapes_raise(layer, rules, seed):
    x, kernel = normal(seed, layer.x_shape), normal(seed + 1, layer.kernel_shape)

    def check(rule):
        with pytest.raises(ValueError):
            layer.apply(rule)(x, kernel, random_feedback(rule, kernel, seed + 2), prng(seed + 3))

    check_all(rules, check)
