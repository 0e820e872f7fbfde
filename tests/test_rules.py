"""Every rule's custom backward against independent reference computations (the rules' equations,
as each rule module's docstring states them, PFA's details and the initialisation of feedback).

The references are written here from the papers' formulas: explicit ``g F^T`` / ``x^T g`` products for dense
layers, and ``jax.vjp`` of a plain ``lax.conv_general_dilated`` evaluated at the hand-computed effective
feedback ``F`` for conv layers. No expected value is built with ``pfa_jax.rules.ops`` or a rule's own
helpers, except where the papers define it through the rule's init distribution (``rule.kernel_init()``).

Speed: test data comes from NumPy and keys are "rbg" keys, and a small set of shapes is reused, because on
CPU every new shape is a new XLA compile (seconds for a default-threefry draw of a 4-D shape).
"""
from __future__ import annotations

import functools
import math
import re

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest

import pfa_jax.rules as R
from pfa_jax import models, train
from pfa_jax.rules import product_feedback
from reference_ops import alignment_loss, plain_conv

RTOL, ATOL = 1e-4, 1e-5
ALL_NAMES = tuple(n for n in R.names() if n not in ("wm", "dfa"))  # wm, dfa: tests of their own
PFA_NAMES = ("pfa", "pfa_o")


def prng(seed):
    """A PRNG key ("rbg": fast to compile; ``test_default_threefry_keys`` covers the default keys)."""
    return jax.random.key(seed, impl="rbg")


def normal(seed, shape, scale=1.0):
    """Test data from NumPy (no per-shape compile)."""
    return jnp.asarray(np.random.default_rng(seed).standard_normal(shape).astype(np.float32) * scale)


# --------------------------------------------------------------------------------------------------
# Cases (few distinct kernel shapes on purpose: dense (5, 3), (4, 6); conv (3, 3, 4, 6), (3, 3, 2, 6))
# --------------------------------------------------------------------------------------------------

# id -> (registry name, options)
RULE_CASES = {
    "bp": ("bp", {}),
    "fa": ("fa", {}),
    "fa-sparse": ("fa", {"density": 0.5}),
    "usf": ("usf", {}),
    "usf-sparse": ("usf", {"density": 0.5}),
    "usf-he_normal": ("usf", {"init": "he_normal"}),
    "brsf": ("brsf", {}),
    "frsf": ("frsf", {}),
    "kp": ("kp", {}),
    "pfa-auto": ("pfa", {"expansion": 2}),
    "pfa-mid": ("pfa", {"expansion": 2, "route": "mid"}),
    "pfa-product": ("pfa", {"expansion": 2, "route": "product"}),
    "pfa-sparse-mid": ("pfa", {"expansion": 2, "density": 0.5, "route": "mid"}),
    "pfa-sparse-product": ("pfa", {"expansion": 2, "density": 0.5, "route": "product"}),
    "pfa_o": ("pfa_o", {}),
    "sa": ("sa", {}),
    "aa": ("aa", {"scale": 0.3}),
    "ia": ("ia", {"gamma": 0.2}),
    "ia-reversed": ("ia", {"reversed": True}),
    "alignment-tie": ("alignment", {"decay": 0.1, "self": 0.2, "amp": 0.3, "sparse": 0.4,
                                    "null": 0.5, "null_reversed": 0.6, "tie": True}),
}
ALIGNMENT_NAMES = ("sa", "aa", "ia", "alignment")

# id -> (x shape, kernel shape)
DENSE_CASES = {
    "batch1": ((1, 5), (5, 3)),
    "batch7": ((7, 4), (4, 6)),
    "batch64": ((64, 5), (5, 3)),
    "leading-dims": ((2, 3, 4), (4, 6)),
}

# id -> (x shape, kernel shape, keyword arguments of rule.conv)
CONV_CASES = {
    "same": ((2, 6, 6, 4), (3, 3, 4, 6), {}),
    "valid-stride22": ((1, 7, 7, 4), (3, 3, 4, 6), {"strides": (2, 2), "padding": "VALID"}),
    "explicit-stride21": ((2, 7, 6, 4), (3, 3, 4, 6), {"strides": (2, 1), "padding": ((1, 2), (0, 1))}),
    "int-padding": ((2, 5, 5, 4), (3, 3, 4, 6), {"padding": 1}),
    "dilation2": ((2, 8, 8, 4), (3, 3, 4, 6), {"kernel_dilation": 2}),
    "groups2": ((2, 6, 6, 4), (3, 3, 2, 6), {"feature_group_count": 2}),
    "groups3-stride2-valid": ((2, 7, 7, 6), (3, 3, 2, 6),
                              {"strides": 2, "padding": "VALID", "feature_group_count": 3}),
    "1d": ((2, 9, 4), (3, 4, 6), {"strides": 2, "padding": "VALID"}),
}

# Independent versions of the init distributions used below: std and a draw.
INIT_STD = {
    "xavier_uniform": lambda fan_in, fan_out: math.sqrt(2.0 / (fan_in + fan_out)),
    "he_normal": lambda fan_in, fan_out: math.sqrt(2.0 / fan_in),
}
INIT_DRAW = {
    "xavier_uniform": jax.nn.initializers.glorot_uniform(),
    "he_normal": jax.nn.initializers.he_normal(),
    "xavier_normal": jax.nn.initializers.glorot_normal(),
}


# --------------------------------------------------------------------------------------------------
# Helpers
# --------------------------------------------------------------------------------------------------

def fans(shape):
    receptive = math.prod(shape[:-2])
    return shape[-2] * receptive, shape[-1] * receptive


def make_case(name, options, x_shape, kernel_shape, seed=0, key_fn=prng):
    """(rule, x, kernel, feedback, step key) with test data from NumPy."""
    rule = R.get(name, **options)
    x = normal(seed, x_shape)
    kernel = normal(seed + 1, kernel_shape, 0.5)
    return rule, x, kernel, rule.init_feedback(key_fn(seed + 2), kernel), key_fn(seed + 3)


def apply_fn(rule, conv_kwargs=None):
    """``rule.dense`` (``conv_kwargs`` None) or ``rule.conv`` with the given options."""
    return rule.dense if conv_kwargs is None else functools.partial(rule.conv, **conv_kwargs)


def rule_vjp(apply, x, kernel, fb, key, seed=7):
    """Output, cotangent ``g`` and the three cotangents ``(dx, dK, dfb)`` of ``apply``."""
    y, pullback = jax.vjp(lambda x_, k_, fb_: apply(x_, k_, fb_, key), x, kernel, fb)
    g = normal(seed, y.shape)
    return y, g, pullback(g)


def masked_r(fb):
    return fb["R"] * fb["R_mask"] if "R_mask" in fb else fb["R"]


def reference_feedback(rule, kernel, fb, key):
    """The papers' effective feedback ``F`` (kernel layout), computed by hand."""
    if rule.name == "bp":
        return kernel
    if rule.name in ("fa", "kp") + ALIGNMENT_NAMES:
        return fb["B"]
    if rule.name == "usf":  # sparse: F = s sign(K) m / sqrt(p)
        mask = fb["mask"] / math.sqrt(rule.density) if "mask" in fb else 1.0
        return INIT_STD[rule.init](*fans(kernel.shape)) * jnp.sign(kernel) * mask
    if rule.name == "brsf":
        return jnp.abs(INIT_DRAW[rule.init](key, kernel.shape, kernel.dtype)) * jnp.sign(kernel)
    if rule.name == "frsf":
        return jnp.abs(fb["M"]) * jnp.sign(kernel)
    assert rule.name in PFA_NAMES, rule.name
    if kernel.ndim == 2:
        return masked_r(fb) @ fb["Bp"].T
    return jnp.einsum("...im,om->...io", masked_r(fb), fb["Bp"])


def reference_feedback_cotangent(rule, fb, dkernel, pfa_dr, alignment_grad):
    """Zeros for fixed arrays; ``dK`` for KP's ``B``; ``pfa_dr(Bp)`` (masked) for PFA's ``R``; the
    alignment loss's gradient ``alignment_grad(B)`` (plus ``dK`` if tied) for Two Routes' ``B``."""
    expected = {k: jnp.zeros_like(v) for k, v in fb.items()}
    if rule.name == "kp":
        expected["B"] = dkernel
    if rule.name in PFA_NAMES:
        expected["R"] = pfa_dr(fb["Bp"]) * fb.get("R_mask", 1.0)
    if rule.name in ALIGNMENT_NAMES:
        expected["B"] = alignment_grad(fb["B"]) + (dkernel if getattr(rule, "tie", False) else 0)
    return expected


def dense_reference(rule, x, kernel, fb, key, g):
    """(y, (dx, dK, dfb)) from the papers' dense formulas: ``g F^T``, ``x^T g``, ``x^T (g Bp)``."""
    x2, g2 = x.reshape(-1, x.shape[-1]), g.reshape(-1, g.shape[-1])
    f = reference_feedback(rule, kernel, fb, key)
    dkernel = x2.T @ g2
    dfb = reference_feedback_cotangent(
        rule, fb, dkernel, lambda bp: x2.T @ (g2 @ bp),
        jax.grad(lambda b: alignment_loss(rule, x, kernel, b, jnp.matmul)))
    return x @ kernel, ((g2 @ f.T).reshape(x.shape), dkernel, dfb)


def conv_reference(conv_kwargs):
    """Like ``dense_reference`` for ``rule.conv(..., **conv_kwargs)``: autodiff of a plain conv, the input
    cotangent at the hand-computed ``F``, the kernel cotangent at ``K``; PFA ``dR = dK Bp`` (hwio,om)."""
    conv = functools.partial(plain_conv, **conv_kwargs)

    def reference(rule, x, kernel, fb, key, g):
        f = reference_feedback(rule, kernel, fb, key)
        dx = jax.vjp(lambda x_: conv(x_, f), x)[1](g)[0]
        y, pullback = jax.vjp(lambda k_: conv(x, k_), kernel)
        dkernel = pullback(g)[0]
        dfb = reference_feedback_cotangent(
            rule, fb, dkernel, lambda bp: jnp.einsum("...io,om->...im", dkernel, bp),
            jax.grad(lambda b: alignment_loss(rule, x, kernel, b, conv)))
        return y, (dx, dkernel, dfb)

    return reference


def assert_close(actual, expected, rtol=RTOL, atol=ATOL):
    """Leafwise, ``atol`` scaled by the leaf's largest entry where that exceeds 1: float32 sums
    round relative to their size (the family's ``dF`` reaches about 200, where one ulp is 1.5e-5)."""
    chex.assert_trees_all_equal_structs(actual, expected)
    jax.tree.map(lambda a, w: np.testing.assert_allclose(
        a, w, rtol=rtol, atol=atol * max(1.0, float(np.max(np.abs(w), initial=0.0)))),
        actual, expected)


def check_against_reference(rule, apply, reference, x, kernel, fb, key):
    """Forward identical to BP's and all three cotangents equal to the reference."""
    y, g, cotangents = rule_vjp(apply, x, kernel, fb, key)
    want_y, want = reference(rule, x, kernel, fb, key, g)
    np.testing.assert_array_equal(y, want_y)
    assert_close(cotangents, want)


def layer_params():
    """pytest params (x shape, kernel shape, conv kwargs or None, reference) of every layer case."""
    params = [pytest.param(xs, ks, None, dense_reference, id=f"dense-{i}")
              for i, (xs, ks) in DENSE_CASES.items()]
    params += [pytest.param(xs, ks, kw, conv_reference(kw), id=f"conv-{i}")
               for i, (xs, ks, kw) in CONV_CASES.items()]
    return params


LAYER_CASES = layer_params()
SMALL_LAYERS = [pytest.param((7, 4), (4, 6), None, id="dense"),
                pytest.param((2, 6, 6, 4), (3, 3, 4, 6), {}, id="conv")]


def cos(a, b):
    return float(jnp.vdot(a, b) / (jnp.linalg.norm(a) * jnp.linalg.norm(b)))


def jaxpr_shapes(closed_jaxpr):
    """Shapes of every intermediate (eqn output) in a jaxpr, sub-jaxprs included."""
    def sub_jaxprs(value):
        if hasattr(value, "eqns"):
            yield value
        elif hasattr(value, "jaxpr") and hasattr(value.jaxpr, "eqns"):
            yield value.jaxpr
        elif isinstance(value, (tuple, list)):
            for v in value:
                yield from sub_jaxprs(v)

    shapes, stack = set(), [closed_jaxpr.jaxpr]
    while stack:
        jaxpr = stack.pop()
        for eqn in jaxpr.eqns:
            shapes.update(tuple(v.aval.shape) for v in eqn.outvars if hasattr(v.aval, "shape"))
            for param in eqn.params.values():
                stack.extend(sub_jaxprs(param))
    return shapes


def vjp_jaxpr_shapes(route, x_shape, kernel_shape, conv):
    """Intermediate shapes of PFA's (r = 10) forward + backward, traced abstractly (nothing allocated)."""
    rule = R.get("pfa", expansion=10, route=route)
    spec = lambda shape: jax.ShapeDtypeStruct(shape, jnp.float32)  # noqa: E731
    mid = 10 * kernel_shape[-1]
    fb = {"Bp": spec((kernel_shape[-1], mid)), "R": spec(kernel_shape[:-1] + (mid,))}
    apply = rule.conv if conv else rule.dense

    def f(x, kernel, fb, g):
        return jax.vjp(lambda a, b, c: apply(a, b, c), x, kernel, fb)[1](g)

    g = spec(x_shape[:-1] + kernel_shape[-1:])
    return jaxpr_shapes(jax.make_jaxpr(f)(spec(x_shape), spec(kernel_shape), fb, g))


# --------------------------------------------------------------------------------------------------
# Custom backward against the references; forward identical to BP
# --------------------------------------------------------------------------------------------------

# Every layer case for BP, the kernel-feedback custom VJP (fa; kp with its plastic B) and both PFA routes;
# a subset of layer cases (dense, leading dims, strided explicit padding, grouped) for the other variants,
# which differ from those only in F or in Bp (the full cross product is slow to compile on CPU).
FULL_RULES = ("bp", "fa", "kp", "pfa-mid", "pfa-product", "pfa-sparse-mid", "alignment-tie")
SUBSET_LAYERS = ("dense-batch7", "dense-leading-dims", "conv-explicit-stride21", "conv-groups3-stride2-valid")
BACKWARD_CASES = [pytest.param(case, *layer.values, id=f"{layer.id}-{case}")
                  for layer in LAYER_CASES for case in RULE_CASES
                  if case in FULL_RULES or layer.id in SUBSET_LAYERS]


@pytest.mark.parametrize("case,x_shape,kernel_shape,conv_kwargs,reference", BACKWARD_CASES)
def test_backward_matches_reference(case, x_shape, kernel_shape, conv_kwargs, reference):
    rule, x, kernel, fb, key = make_case(*RULE_CASES[case], x_shape, kernel_shape)
    check_against_reference(rule, apply_fn(rule, conv_kwargs), reference, x, kernel, fb, key)


@pytest.mark.parametrize("name", ALL_NAMES)
def test_default_threefry_keys(name):
    """The same check with the default key implementation (dense, where its draws compile quickly)."""
    options = {"expansion": 2} if name == "pfa" else {}
    rule, x, kernel, fb, key = make_case(name, options, (7, 5), (5, 3), key_fn=jax.random.key)
    check_against_reference(rule, rule.dense, dense_reference, x, kernel, fb, key)


@pytest.mark.parametrize("x_shape,kernel_shape,conv_kwargs,reference", LAYER_CASES)
def test_bp_equals_plain_autodiff(x_shape, kernel_shape, conv_kwargs, reference):
    rule, x, kernel, fb, key = make_case("bp", {}, x_shape, kernel_shape)
    plain = jnp.matmul if conv_kwargs is None else functools.partial(plain_conv, **conv_kwargs)
    y, g, (dx, dkernel, dfb) = rule_vjp(apply_fn(rule, conv_kwargs), x, kernel, fb, key)
    want_y, pullback = jax.vjp(plain, x, kernel)
    np.testing.assert_array_equal(y, want_y)
    assert_close((dx, dkernel), pullback(g))
    assert fb == {} and dfb == {}
    np.testing.assert_array_equal(rule.effective_feedback(kernel, fb), kernel)


@pytest.mark.parametrize("case", [c for c in RULE_CASES if RULE_CASES[c][0] != "brsf"])
@pytest.mark.parametrize("kernel_shape", [(5, 3), (3, 3, 4, 6)], ids=["dense", "conv"])
def test_effective_feedback_matches_spec(case, kernel_shape):
    """``effective_feedback`` is the papers' ``F`` (brsf reports an expectation: tested below)."""
    rule, _, kernel, fb, _ = make_case(*RULE_CASES[case], (1, kernel_shape[-2]), kernel_shape)
    f = rule.effective_feedback(kernel, fb)
    assert f.shape == kernel.shape
    assert_close(f, reference_feedback(rule, kernel, fb, None))


# --------------------------------------------------------------------------------------------------
# PFA: routes and their cost model
# --------------------------------------------------------------------------------------------------

PFA_ROUTE_CASES = [
    pytest.param((7, 4), (4, 6), None, 1.0, id="dense"),
    pytest.param((64, 5), (5, 3), None, 0.5, id="dense-sparse"),
    pytest.param((2, 7, 6, 4), (3, 3, 4, 6), {"strides": (2, 1), "padding": ((1, 2), (0, 1))}, 1.0,
                 id="conv"),
    pytest.param((2, 6, 6, 4), (3, 3, 2, 6), {"feature_group_count": 2}, 1.0, id="conv-groups2"),
    pytest.param((2, 7, 7, 6), (3, 3, 2, 6), {"feature_group_count": 3, "kernel_dilation": 2}, 0.5,
                 id="conv-groups3-sparse"),
]


@pytest.mark.parametrize("x_shape,kernel_shape,conv_kwargs,density", PFA_ROUTE_CASES)
def test_pfa_routes_agree(x_shape, kernel_shape, conv_kwargs, density):
    results = []
    for route in ("mid", "product", "auto"):
        options = {"expansion": 2, "density": density, "route": route}
        rule, x, kernel, fb, _ = make_case("pfa", options, x_shape, kernel_shape)
        results.append(rule_vjp(apply_fn(rule, conv_kwargs), x, kernel, fb, None)[1:])
    assert_close(results[0], results[1])
    assert_close(results[2], results[0])


DENSE_MID_CHEAPER = dict(g_shape=(8, 512), kernel_shape=(784, 512), mid=5120, groups=1)
CONV_PRODUCT_CHEAPER = dict(g_shape=(128, 32, 32, 16), kernel_shape=(3, 3, 16, 16), mid=160, groups=1)


@pytest.mark.parametrize("case,cheaper,other", [(DENSE_MID_CHEAPER, "mid", "product"),
                                                (CONV_PRODUCT_CHEAPER, "product", "mid")],
                         ids=["dense-mid", "conv-product"])
def test_choose_route_picks_cheaper(case, cheaper, other):
    costs = product_feedback.route_costs(**case)
    assert set(costs) == {"mid", "product"}
    assert costs[cheaper] < costs[other]
    assert product_feedback.choose_route("auto", **case) == cheaper
    for forced in ("mid", "product"):
        assert product_feedback.choose_route(forced, **case) == forced


def test_product_route_does_not_materialise_mid_feature_maps():
    """Conv batch 128, 32x32, 16 -> 16, 3x3, r = 10: the product route, which 'auto' picks, never forms the
    160-channel mid-population feature maps; the mid route does (so the inspection can see them)."""
    mid_maps = (128, 32, 32, 160)
    shapes = {route: vjp_jaxpr_shapes(route, (128, 32, 32, 16), (3, 3, 16, 16), conv=True)
              for route in ("mid", "product", "auto")}
    assert mid_maps in shapes["mid"]
    for route in ("product", "auto"):
        assert not [s for s in shapes[route] if len(s) == 4 and s[0] == 128 and s[-1] == 160], route


def test_auto_route_forms_mid_errors_when_cheaper():
    """Dense batch 8, 784 -> 512, r = 10: 'auto' takes the mid route (``h = g Bp`` of shape (8, 5120))."""
    shapes = {route: vjp_jaxpr_shapes(route, (8, 784), (784, 512), conv=False)
              for route in ("mid", "product", "auto")}
    assert (8, 5120) in shapes["mid"]
    assert (8, 5120) not in shapes["product"]
    assert (8, 5120) in shapes["auto"]


# --------------------------------------------------------------------------------------------------
# PFA: initialisation and sparsity
# --------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("density", [1.0, 0.3])
def test_pfa_bp_variance(density):
    """``Var(Bp_ij) = 1 / (density * mid)`` for the draw (the nonzeros, when masked)."""
    rule = R.get("pfa", expansion=10, density=density)
    bp = np.asarray(rule.init_feedback(prng(0), jnp.zeros((16, 256)))["Bp"])
    mid = 2560
    assert bp.shape == (256, mid)
    nonzero = bp[bp != 0]
    assert abs(nonzero.size / bp.size - density) < 4 * math.sqrt(density * (1 - density) / bp.size) + 1e-9
    np.testing.assert_allclose(nonzero.var(), 1.0 / (density * mid), rtol=0.05)
    assert abs(nonzero.mean()) < 0.05 * nonzero.std()
    assert np.abs(bp).max() <= math.sqrt(3.0 / (density * mid)) * (1 + 1e-6)


def test_pfa_r_is_xavier_uniform_of_its_shape():
    """``R: (in, mid)`` xavier-uniform (gain 1): ``Var = 2 / (in + mid)``, bounded by the xavier limit."""
    r = np.asarray(R.get("pfa", expansion=10).init_feedback(prng(1), jnp.zeros((64, 256)))["R"])
    assert r.shape == (64, 2560)
    np.testing.assert_allclose(r.var(), 2.0 / (64 + 2560), rtol=0.05)
    assert np.abs(r).max() <= math.sqrt(6.0 / (64 + 2560)) * (1 + 1e-6)


@pytest.mark.parametrize("kernel_shape", [(5, 3), (3, 3, 4, 6)], ids=["dense", "conv"])
@pytest.mark.parametrize("name,options,r", [("pfa", {"expansion": 2}, 2), ("pfa", {}, 10),
                                            ("pfa_o", {}, 1)])
def test_pfa_feedback_shapes(kernel_shape, name, options, r):
    rule = R.get(name, **options)
    kernel = normal(0, kernel_shape)
    fb = rule.init_feedback(prng(1), kernel)
    mid = r * kernel_shape[-1]
    assert set(fb) == {"Bp", "R"}
    assert fb["Bp"].shape == (kernel_shape[-1], mid)
    assert fb["R"].shape == kernel_shape[:-1] + (mid,)
    assert rule.effective_feedback(kernel, fb).shape == kernel_shape


def test_pfa_init_independent_of_kernel():
    """``R`` and ``Bp`` do not depend on ``K``: the same key gives the same feedback for any kernel."""
    rule = R.get("pfa", expansion=2)
    a = rule.init_feedback(prng(2), jnp.ones((3, 3, 4, 6)))
    b = rule.init_feedback(prng(2), normal(0, (3, 3, 4, 6)))
    chex.assert_trees_all_equal(a, b)


@pytest.mark.parametrize("x_shape,kernel_shape,conv_kwargs", [
    pytest.param((6, 32), (32, 256), None, id="dense"),
    pytest.param((2, 5, 5, 8), (3, 3, 8, 32), {}, id="conv"),
])
@pytest.mark.parametrize("route", ["mid", "product"])
def test_pfa_sparse_masks(x_shape, kernel_shape, conv_kwargs, route):
    """density 0.3: ~30% of ``R_mask`` ones and of ``Bp`` nonzeros; ``R`` and ``dR`` zero off the mask."""
    rule, x, kernel, fb, _ = make_case("pfa", {"expansion": 10, "density": 0.3, "route": route},
                                       x_shape, kernel_shape)
    assert set(fb) == {"Bp", "R", "R_mask"}
    mask, r, bp = (np.asarray(fb[k]) for k in ("R_mask", "R", "Bp"))
    assert mask.shape == r.shape and set(np.unique(mask)) <= {0.0, 1.0}
    for fraction, size in [(mask.mean(), mask.size), (np.mean(bp != 0), bp.size)]:
        assert abs(fraction - 0.3) < 4 * math.sqrt(0.21 / size)
    assert np.all(r[mask == 0] == 0)
    assert np.count_nonzero(r) == np.count_nonzero(mask)
    _, _, (_, _, dfb) = rule_vjp(apply_fn(rule, conv_kwargs), x, kernel, fb, None)
    dr = np.asarray(dfb["R"])
    assert np.all(dr[mask == 0] == 0)
    assert np.count_nonzero(dr) > 0.9 * np.count_nonzero(mask)
    np.testing.assert_array_equal(dfb["R_mask"], 0)
    np.testing.assert_array_equal(dfb["Bp"], 0)


@pytest.mark.parametrize("out", [3, 6, 64])
def test_pfa_o_bp_orthogonal(out):
    fb = R.get("pfa_o").init_feedback(prng(out), jnp.ones((4, out)))
    bp = fb["Bp"]
    assert bp.shape == (out, out) and fb["R"].shape == (4, out)
    np.testing.assert_allclose(bp @ bp.T, np.eye(out), atol=1e-5)
    np.testing.assert_allclose(bp.T @ bp, np.eye(out), atol=1e-5)


# --------------------------------------------------------------------------------------------------
# Feedback initialisation: independent draws and one-time soft alignment
# --------------------------------------------------------------------------------------------------

DRAWN = [("fa", "B"), ("kp", "B"), ("frsf", "M")]
KERNEL_SHAPES = [pytest.param((4, 6), id="dense"), pytest.param((3, 3, 4, 6), id="conv")]


@pytest.mark.parametrize("kernel_shape", KERNEL_SHAPES)
@pytest.mark.parametrize("name,field", DRAWN)
def test_default_feedback_is_independent_draw(kernel_shape, name, field):
    rule = R.get(name)
    fb = rule.init_feedback(prng(7), normal(8, kernel_shape))
    assert set(fb) == {field}
    np.testing.assert_array_equal(fb[field], INIT_DRAW["xavier_uniform"](prng(7), kernel_shape))
    np.testing.assert_array_equal(fb[field], rule.kernel_init()(prng(7), kernel_shape, jnp.float32))


@pytest.mark.parametrize("rho", [-1.0, -0.5, 0.0, 0.25, 0.9, 1.0])
@pytest.mark.parametrize("kernel_shape", KERNEL_SHAPES)
@pytest.mark.parametrize("name,field", DRAWN)
def test_soft_alignment(rho, kernel_shape, name, field):
    """``cos(B, K) == rho`` and ``||B|| == ||independent draw||`` (the draw ``rule.kernel_init()(key)``)."""
    rule = R.get(name, rho=rho)
    kernel = normal(12, kernel_shape)
    b = rule.init_feedback(prng(11), kernel)[field]
    assert b.shape == kernel.shape
    assert abs(cos(b, kernel) - rho) < 1e-5
    draw = rule.kernel_init()(prng(11), kernel_shape, kernel.dtype)
    np.testing.assert_allclose(jnp.linalg.norm(b), jnp.linalg.norm(draw), rtol=1e-6)
    if abs(rho) < 1:  # the rest of B points along the draw's component orthogonal to K
        k_hat = kernel / jnp.linalg.norm(kernel)
        perp = lambda v: v - jnp.vdot(v, k_hat) * k_hat  # noqa: E731
        assert cos(perp(b), perp(draw)) > 1 - 1e-5


# --------------------------------------------------------------------------------------------------
# Fixed and plastic feedback
# --------------------------------------------------------------------------------------------------

FIXED = [("fa", {}, ("B",)), ("frsf", {}, ("M",)), ("pfa", {"expansion": 2}, ("Bp",)),
         ("pfa", {"expansion": 2, "density": 0.5}, ("Bp", "R_mask")), ("pfa_o", {}, ("Bp",)),
         ("fa", {"rho": 0.5}, ("B",)), ("fa", {"density": 0.5}, ("B",)),
         ("usf", {"density": 0.5}, ("mask",))]


@pytest.mark.parametrize("name,options,fixed", FIXED)
@pytest.mark.parametrize("x_shape,kernel_shape,conv_kwargs", SMALL_LAYERS)
def test_fixed_feedback_gets_exactly_zero_gradient(name, options, fixed, x_shape, kernel_shape,
                                                   conv_kwargs):
    rule, x, kernel, fb, _ = make_case(name, options, x_shape, kernel_shape)
    apply = apply_fn(rule, conv_kwargs)
    dfb = jax.grad(lambda fb_: jnp.sum(apply(x, kernel, fb_) ** 2))(fb)
    for field in fixed:
        np.testing.assert_array_equal(dfb[field], np.zeros(fb[field].shape))
    for field in rule.plastic:
        assert jnp.any(dfb[field] != 0)
    assert not set(fixed) & set(rule.plastic)


def test_plastic_declarations():
    assert R.get("kp").plastic == ("B",)
    assert R.get("pfa").plastic == ("R",)
    assert R.get("pfa_o").plastic == ("R",)
    for name in ("bp", "fa", "usf", "brsf", "frsf"):
        assert R.get(name).plastic == ()


# --------------------------------------------------------------------------------------------------
# Sparse fixed feedback (option density of fa, usf, dfa): B = m * B0 / sqrt(p), m ~ Bernoulli(p) fixed
# --------------------------------------------------------------------------------------------------

SPARSE_NAMES = ("fa", "usf", "dfa")


def sparse_rule(name, density, classes=3):
    return R.get(name, density=density, **({"classes": classes} if name == "dfa" else {}))


def dfa_feedback_shape(kernel_shape, classes):
    """DFA's ``B``: ``(classes, in)`` dense, ``(kh, kw, classes, in)`` conv."""
    if len(kernel_shape) == 2:
        return (classes, kernel_shape[0])
    return kernel_shape[:2] + (classes, kernel_shape[2])


def sparse_reference(rule, key, kernel, fb):
    """``(m, F0, F)`` by hand in NumPy: the mask read off the rule's feedback (``B``'s nonzeros; usf's
    stored 0/1 ``mask``), the dense feedback for the same key (the init draw; ``s sign K`` for usf) and
    the papers' sparse feedback ``F = m * F0 / sqrt(p)`` in the rule's own layout."""
    if rule.name == "usf":
        mask = np.asarray(fb["mask"])
        assert set(np.unique(mask)) <= {0.0, 1.0}
        dense = INIT_STD["xavier_uniform"](*fans(kernel.shape)) * np.sign(np.asarray(kernel))
        mask = mask == 1
    else:
        shape = kernel.shape if rule.name == "fa" else dfa_feedback_shape(kernel.shape, rule.classes)
        dense = np.asarray(INIT_DRAW["xavier_uniform"](key, shape))
        mask = np.asarray(fb["B"]) != 0
    return mask, dense, np.where(mask, dense / math.sqrt(rule.density), 0.0)


def stored_feedback(rule, kernel, fb):
    """The fixed feedback matrix a sparse rule uses (usf: its effective ``F``, mask included)."""
    return np.asarray(rule.effective_feedback(kernel, fb) if rule.name == "usf" else fb["B"])


@pytest.mark.parametrize("density", [0.5, 0.1])
@pytest.mark.parametrize("kernel_shape", [(300, 256), (3, 3, 32, 64)], ids=["dense", "conv"])
@pytest.mark.parametrize("name", SPARSE_NAMES)
def test_sparse_feedback_fraction_and_values(name, kernel_shape, density):
    """On a big layer: ~``p`` of the entries kept; the kept ones are the dense draw (usf: ``s sign K``)
    times ``1 / sqrt(p)``, the rest exactly ``+0.0``; ``E[F_ij^2]`` matches the dense feedback's."""
    rule = sparse_rule(name, density, classes=256)
    kernel = normal(0, kernel_shape)
    fb = rule.init_feedback(prng(1), kernel)
    assert set(fb) == ({"mask"} if name == "usf" else {"B"})
    if name == "usf":
        assert fb["mask"].shape == kernel.shape and fb["mask"].dtype == kernel.dtype
    mask, dense, _ = sparse_reference(rule, prng(1), kernel, fb)
    assert abs(mask.mean() - density) < 4 * math.sqrt(density * (1 - density) / mask.size)
    f = stored_feedback(rule, kernel, fb)
    assert f.shape == dense.shape
    np.testing.assert_allclose(f[mask], dense[mask] / math.sqrt(density), rtol=1e-6)
    assert np.all(f[~mask] == 0) and not np.any(np.signbit(f[~mask]))
    np.testing.assert_allclose(np.mean(f ** 2), np.mean(dense ** 2), rtol=0.05)


@pytest.mark.parametrize("x_shape,kernel_shape,conv_kwargs", SMALL_LAYERS)
@pytest.mark.parametrize("name", SPARSE_NAMES)
def test_sparse_dx_matches_reference(name, x_shape, kernel_shape, conv_kwargs):
    """The custom VJP's ``dx`` against ``g F^T`` (dfa: ``e F``, conv: through a plain conv) for the
    hand-built ``F = m * F0 / sqrt(p)``; ``dK = x^T g``; zero cotangents for the fixed feedback."""
    rule = sparse_rule(name, 0.5)
    if name == "dfa":  # the conv reference below projects through the input grid
        rule = R.get(name, density=0.5, classes=rule.classes, grid="input")
    x, kernel, key = normal(0, x_shape), normal(1, kernel_shape, 0.5), prng(2)
    fb = rule.init_feedback(key, kernel)
    mask, _, f = sparse_reference(rule, key, kernel, fb)
    assert 0 < mask.sum() < mask.size
    plain = jnp.matmul if conv_kwargs is None else functools.partial(plain_conv, **conv_kwargs)
    f32 = jnp.asarray(f, jnp.float32)
    out, pullback = jax.vjp(apply_fn(rule, conv_kwargs), x, kernel, fb)
    g = normal(7, (out[0] if name == "dfa" else out).shape)
    if name == "dfa":  # e F; conv: a stride-1 SAME conv through F of e broadcast over x's grid
        e = normal(8, out[1].shape)
        dx, dkernel, dfb = pullback((g, e))
        want_dx = np.asarray(e) @ f if conv_kwargs is None else plain_conv(
            jnp.broadcast_to(e[:, None, None, :], x.shape[:-1] + e.shape[-1:]), f32)
    else:  # g F^T; conv: the input-transpose of the plain conv at F
        dx, dkernel, dfb = pullback(g)
        want_dx = np.asarray(g) @ f.T if conv_kwargs is None else jax.vjp(
            lambda x_: plain(x_, f32), x)[1](g)[0]
    want_dkernel = jax.vjp(lambda k_: plain(x, k_), kernel)[1](g)[0]
    assert_close((dx, dkernel), (jnp.asarray(want_dx, jnp.float32), want_dkernel))
    chex.assert_trees_all_equal(dfb, jax.tree.map(jnp.zeros_like, fb))


@pytest.mark.parametrize("name", SPARSE_NAMES)
def test_sparse_feedback_stays_fixed_through_training(name):
    """A few optimizer steps (SGD, momentum, weight decay) through ``pfa_jax.train`` on a tiny ffn2: the
    weights move, the masked feedback (usf: its stored mask) stays bit-for-bit what init drew."""
    rng = np.random.default_rng(0)
    images = rng.normal(size=(16, 4, 4, 1)).astype(np.float32)
    labels = rng.integers(0, 3, 16).astype(np.int32)
    model = models.get("ffn2", rule=R.get(name, density=0.3), num_classes=3, widths=(24,))
    state = train.create_train_state(jax.random.key(0), model, images[:2],
                                     {"learning_rate": 0.1, "weight_decay": 1e-2})
    before = jax.tree.map(np.array, (state.params, state.feedback))
    assert set(before[1]) == {"hidden_0", "output"}
    for arrays in before[1].values():
        (field, value), = arrays.items()
        assert field == ("mask" if name == "usf" else "B")
        assert 0 < np.count_nonzero(value) < value.size
    step = jax.jit(train.train_step)
    for _ in range(3):
        state, _ = step(state, {"image": images, "label": labels})
    after = jax.tree.map(np.array, (state.params, state.feedback))
    assert jax.tree.structure(after[1]) == jax.tree.structure(before[1])
    assert [(a.dtype, a.tobytes()) for a in jax.tree.leaves(after[1])] == [
        (b.dtype, b.tobytes()) for b in jax.tree.leaves(before[1])], "fixed sparse feedback changed"
    assert not np.array_equal(before[0]["hidden_0"]["kernel"], after[0]["hidden_0"]["kernel"])


@pytest.mark.parametrize("kernel_shape", KERNEL_SHAPES)
@pytest.mark.parametrize("name", SPARSE_NAMES)
def test_density_one_is_the_dense_rule(name, kernel_shape):
    """``density=1`` (float or int) is the default: the same rule, the same feedback arrays and keys."""
    dense = sparse_rule(name, 1.0)
    assert dense.density == 1.0
    kernel = normal(0, kernel_shape)
    fb = dense.init_feedback(prng(3), kernel)
    assert set(fb) == (set() if name == "usf" else {"B"})
    for options in ({}, {"density": 1}):
        rule = R.get(name, **options, **({"classes": 3} if name == "dfa" else {}))
        assert rule == dense and hash(rule) == hash(dense)
        chex.assert_trees_all_equal(rule.init_feedback(prng(3), kernel), fb)


@pytest.mark.parametrize("name", SPARSE_NAMES)
@pytest.mark.parametrize("density", [0, -0.1, 1.5, float("nan"), float("inf"), "x"])
def test_bad_density(name, density):
    with pytest.raises(ValueError, match=re.escape(f"{name}: density={density!r}")) as info:
        R.get(name, density=density)
    assert ("must be a number" if density == "x" else "(0, 1]") in str(info.value)


def test_sparse_usf_without_its_mask():
    """Feedback without ``mask`` (e.g. from a dense usf) is an error, not silently dense feedback."""
    with pytest.raises(ValueError, match="'mask'"):
        R.get("usf", density=0.5).dense(normal(0, (7, 4)), normal(1, (4, 6)), {})


def test_fa_rho_and_sparse_density_do_not_combine():
    with pytest.raises(ValueError, match=r"rho=0\.5 and density=0\.5 cannot be combined"):
        R.get("fa", rho=0.5, density=0.5)
    assert R.get("fa", rho=0.5, density=1.0) == R.get("fa", rho=0.5)


# --------------------------------------------------------------------------------------------------
# brsf
# --------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("x_shape,kernel_shape,conv_kwargs", SMALL_LAYERS)
def test_brsf_key_controls_the_draw(x_shape, kernel_shape, conv_kwargs):
    rule, x, kernel, fb, _ = make_case("brsf", {}, x_shape, kernel_shape)
    apply = apply_fn(rule, conv_kwargs)
    dx = [rule_vjp(apply, x, kernel, fb, prng(k))[2][0] for k in (10, 10, 11)]
    np.testing.assert_array_equal(dx[0], dx[1])
    assert not np.allclose(dx[0], dx[2], rtol=1e-3, atol=1e-3)


@pytest.mark.parametrize("kernel_shape", KERNEL_SHAPES)
def test_brsf_effective_feedback_is_expected_magnitude(kernel_shape):
    """xavier_uniform: ``E|M| = limit / 2``, ``limit = sqrt(6 / (fan_in + fan_out))``."""
    kernel = normal(0, kernel_shape)
    fan_in, fan_out = fans(kernel_shape)
    limit = math.sqrt(6.0 / (fan_in + fan_out))
    f = R.get("brsf").effective_feedback(kernel, {})
    assert_close(f, limit / 2 * jnp.sign(kernel), rtol=1e-6, atol=0)


@pytest.mark.parametrize("init", ["he_normal", "xavier_normal"])
def test_brsf_expected_magnitude_truncated_normal(init):
    """``E|M|`` of JAX's truncated normals, against the Monte-Carlo mean of independent draws."""
    shape = (512, 512)
    mean_abs = float(jnp.mean(jnp.abs(INIT_DRAW[init](prng(0), shape))))
    f = R.get("brsf", init=init).effective_feedback(jnp.ones(shape), {})
    np.testing.assert_allclose(f, mean_abs, rtol=0.01)


@pytest.mark.parametrize("x_shape,kernel_shape,conv_kwargs", SMALL_LAYERS)
def test_brsf_without_key(x_shape, kernel_shape, conv_kwargs):
    """Forward works without a key; differentiating it (w.r.t. x or K) raises ValueError."""
    rule, x, kernel, fb, _ = make_case("brsf", {}, x_shape, kernel_shape)
    apply = apply_fn(rule, conv_kwargs)
    plain = jnp.matmul if conv_kwargs is None else plain_conv
    np.testing.assert_array_equal(apply(x, kernel, fb), plain(x, kernel))
    for argnum in (0, 1):
        with pytest.raises(ValueError, match="key"):
            jax.grad(lambda *a: jnp.sum(apply(*a, fb)), argnums=argnum)(x, kernel)


# --------------------------------------------------------------------------------------------------
# Registry, options and errors
# --------------------------------------------------------------------------------------------------

def test_names():
    names = R.names()
    assert set(ALL_NAMES) <= set(names)
    assert len(set(names)) == len(names)
    for name in names:
        assert R.get(name).name == name


def test_unknown_rule():
    with pytest.raises(ValueError, match="nope") as info:
        R.get("nope")
    for name in ALL_NAMES:
        assert name in str(info.value)


@pytest.mark.parametrize("name,options,bad", [
    ("pfa", {"expansion": 0.5}, "expansion=0.5"),
    ("pfa", {"density": 0}, "density=0"),
    ("pfa", {"density": 1.5}, "density=1.5"),
    ("pfa", {"density": -0.1}, "density=-0.1"),
    ("pfa", {"route": "x"}, "route='x'"),
    ("fa", {"rho": 2}, "rho=2"),
    ("kp", {"rho": -1.5}, "rho=-1.5"),
    ("frsf", {"rho": float("nan")}, "rho=nan"),
    ("fa", {"init": "bogus"}, "bogus"),
    ("pfa", {"init": "bogus"}, "bogus"),
    ("fa", {"expansion": 3}, "expansion"),
    ("usf", {"rho": 0.5}, "rho"),
    ("bp", {"density": 0.5}, "density"),
    ("pfa_o", {"expansion": 2}, "expansion=2"),
    ("pfa_o", {"density": 0.5}, "density=0.5"),
])
def test_bad_options(name, options, bad):
    with pytest.raises(ValueError, match=re.escape(bad)):
        R.get(name, **options)


def test_get_rule_instance():
    rule = R.get("pfa", expansion=3)
    assert R.get(rule) is rule
    assert R.get(rule, density=0.5) == R.get("pfa", expansion=3, density=0.5)
    with pytest.raises(ValueError, match="density=1.5"):
        R.get(rule, density=1.5)


SHAPE_ERRORS = [
    pytest.param((4, 5), (6, 3), None, "dense", id="dense-mismatch"),
    pytest.param((4, 5), (5, 3, 1), None, "dense", id="dense-kernel-rank"),
    pytest.param((1, 5, 5, 3), (3, 3, 4, 6), {}, "conv", id="conv-channels"),
    pytest.param((5, 5, 4), (3, 3, 4, 6), {}, "conv", id="conv-rank"),
    pytest.param((1, 5, 5, 4), (3, 3, 4, 6), {"padding": "FULL"}, "FULL", id="padding-FULL"),
    pytest.param((1, 5, 5, 4), (3, 3, 4, 6), {"padding": ((1, 1),)}, "padding", id="padding-pairs"),
    pytest.param((1, 5, 5, 4), (3, 3, 4, 6), {"strides": 0}, "strides=0", id="strides-0"),
    pytest.param((1, 5, 5, 4), (3, 3, 4, 6), {"strides": (1, 1, 1)}, "strides", id="strides-len"),
    pytest.param((1, 5, 5, 4), (3, 3, 4, 6), {"kernel_dilation": 0}, "kernel_dilation", id="dilation-0"),
    pytest.param((1, 5, 5, 8), (3, 3, 2, 6), {"feature_group_count": 4}, "feature_group_count",
                 id="groups-out-not-divisible"),
    pytest.param((1, 5, 5, 4), (3, 3, 4, 6), {"feature_group_count": 0}, "feature_group_count",
                 id="groups-0"),
]


@pytest.mark.parametrize("name", ALL_NAMES)
@pytest.mark.parametrize("x_shape,kernel_shape,conv_kwargs,match", SHAPE_ERRORS)
def test_shape_errors(name, x_shape, kernel_shape, conv_kwargs, match):
    rule, x, kernel, fb, key = make_case(name, {}, x_shape, kernel_shape)
    with pytest.raises(ValueError, match=re.escape(match)):
        apply_fn(rule, conv_kwargs)(x, kernel, fb, key)


# --------------------------------------------------------------------------------------------------
# Hashable, static under jit
# --------------------------------------------------------------------------------------------------

def _loss(rule, x, kernel, fb, key):
    return jnp.sum(jnp.sin(rule.dense(x, kernel, fb, key)))


_jitted_grads = jax.jit(jax.grad(_loss, argnums=(1, 2, 3)), static_argnums=0)


@pytest.mark.parametrize("name", ALL_NAMES)
def test_rule_is_hashable_static_jit_argument(name):
    options = {"expansion": 2} if name == "pfa" else {}
    rule, x, kernel, fb, key = make_case(name, options, (7, 4), (4, 6))
    assert hash(rule) == hash(R.get(name, **options)) and rule == R.get(name, **options)
    assert_close(_jitted_grads(rule, x, kernel, fb, key), jax.grad(_loss, argnums=(1, 2, 3))(
        rule, x, kernel, fb, key))


# --------------------------------------------------------------------------------------------------
# Input validation that the library gets wrong (kept last so that `pytest -x` runs everything else first)
# --------------------------------------------------------------------------------------------------

def test_get_rule_instance_unknown_option():
    """An unknown option is a ValueError naming it, whether the rule is given by name or as an instance
    (``R.get("fa", expansion=3)`` is; ``R.get(R.get("fa"), expansion=3)`` raised TypeError from
    ``dataclasses.replace``)."""
    with pytest.raises(ValueError, match="expansion"):
        R.get(R.get("fa"), expansion=3)


@pytest.mark.parametrize("options", [{"expansion": np.int64(4)}, {"density": np.float32(0.5)}],
                         ids=["int64-expansion", "float32-density"])
def test_pfa_accepts_numpy_scalars(options):
    """NumPy scalars (sweeps over ``np.arange`` / arrays) are numbers: ``expansion=np.int64(4)`` was refused
    with "expansion=np.int64(4) must be a finite number >= 1"."""
    rule = R.get("pfa", **options)
    fb = rule.init_feedback(prng(0), jnp.ones((5, 3)))
    assert fb["Bp"].shape == (3, round(float(options.get("expansion", 10)) * 3))
