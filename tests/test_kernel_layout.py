"""A conv kernel's layout is said, never guessed: ``rule.conv`` and ``rule.init_feedback`` take
``kernel_layout='OIHW'`` for PyTorch's ``(out, in, *window)``, a kernel that fits only that layout is
refused with the fix, and Flax conv calls in another layout are refused by ``with_rule``."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax import lax

import pfa_jax as pj
from pfa_jax import products


@pytest.mark.parametrize("name, options", [
    ("bp", {}), ("fa", {}), ("kp", {}), ("pfa", {"expansion": 2}), ("dfa", {"classes": 3})])
def test_an_oihw_kernel_named_as_such_trains_as_its_hwio_transpose(name, options):
    """Forward, error sent down and feedback equal to the same kernel given in flax's layout, and
    the kernel's gradient the HWIO one transposed back, for a square kernel whose shape fits both."""
    rule = pj.rules.get(name, **options)
    x = jax.random.normal(jax.random.key(0), (2, 5, 5, 3))
    oihw = jax.random.normal(jax.random.key(1), (3, 3, 3, 3))
    hwio = jnp.asarray(np.transpose(np.asarray(oihw), (2, 3, 1, 0)))
    key = jax.random.key(2)
    fb_oihw = rule.init_feedback(key, oihw, kernel_layout="OIHW")
    fb_hwio = rule.init_feedback(key, hwio)
    jax.tree.map(np.testing.assert_array_equal, fb_oihw, fb_hwio)

    def run(kernel, fb, **layout):
        def loss(x, kernel, fb):
            y = rule.conv(x, kernel, fb, strides=2, **layout)
            if not rule.output_error:
                return jnp.sum(jnp.sin(y))
            y, tap = y  # DFA: the tap's cotangent is the output error it projects
            return jnp.sum(jnp.sin(y)) + jnp.sum(tap * jnp.arange(tap.size).reshape(tap.shape))
        return jax.value_and_grad(loss, argnums=(0, 1))(x, kernel, fb)

    (value_o, (dx_o, dk_o)), (value_h, (dx_h, dk_h)) = run(oihw, fb_oihw, kernel_layout="OIHW"), \
        run(hwio, fb_hwio)
    np.testing.assert_allclose(value_o, value_h, rtol=1e-6)
    np.testing.assert_allclose(dx_o, dx_h, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(dk_o, np.transpose(np.asarray(dk_h), (3, 2, 0, 1)), rtol=1e-5, atol=1e-6)
    misread = run(oihw, fb_hwio)[0]  # the layout matters: the array read as HWIO is another kernel
    assert abs(float(misread) - float(value_h)) > 1e-3


def test_a_kernel_that_fits_only_pytorchs_layout_is_refused_with_the_fix():
    rule = pj.rules.get("fa")
    x = jnp.ones((2, 5, 5, 3))
    torch_kernel = jnp.ones((8, 3, 2, 2))  # (out, in, H, W); read as HWIO its in is 2, not 3
    fb = rule.init_feedback(jax.random.key(0), torch_kernel, kernel_layout="OIHW")
    with pytest.raises(ValueError, match=r"fits PyTorch's \(out, in, \*window\): pass "
                                         r"kernel_layout='OIHW'"):
        rule.conv(x, torch_kernel, fb)
    assert rule.conv(x, torch_kernel, fb, kernel_layout="OIHW").shape == (2, 5, 5, 8)


def test_an_unknown_layout_names_the_valid_ones():
    rule = pj.rules.get("bp")
    with pytest.raises(ValueError, match=r"kernel_layout='NCHW' is unknown; valid layouts: 'HWIO' "
                                         r"\(\*window, in, out\).*'OIHW' \(out, in, \*window\)"):
        rule.conv(jnp.ones((1, 4, 4, 2)), jnp.ones((3, 3, 2, 2)), {}, kernel_layout="NCHW")
    with pytest.raises(ValueError, match="kernel_layout='hwio' is unknown"):
        rule.init_feedback(jax.random.key(0), jnp.ones((3, 3, 2, 2)), kernel_layout="hwio")


@pytest.mark.parametrize("dimension_numbers", [None, ("NCHW", "OIHW", "NCHW"), ("NHWC", "OIHW", "NHWC")])
def test_with_rule_refuses_a_conv_call_in_another_layout(dimension_numbers):
    x, kernel = jnp.ones((1, 4, 4, 4)), jnp.ones((3, 3, 4, 4))
    with pytest.raises(ValueError, match=r"layer 'conv' calls its conv with dimension_numbers=.*"
                                         r"channels-last inputs and outputs with a \(\*window, in, "
                                         r"out\) kernel"):
        products.check_conv("conv", x, kernel, None, dimension_numbers)


def test_with_rule_takes_flaxs_own_conv_layout():
    x, kernel = jnp.ones((1, 4, 4, 4)), jnp.ones((3, 3, 4, 4))
    products.check_conv("conv", x, kernel, None, ("NHWC", "HWIO", "NHWC"))
    products.check_conv("conv", x, kernel, (1, 1), lax.ConvDimensionNumbers(
        (0, 3, 1, 2), (3, 2, 0, 1), (0, 3, 1, 2)))
