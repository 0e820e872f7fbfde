"""Reference computations written independently of the library: a plain convolution and the
alignment rules' losses from their primitives' formulas."""
import jax
import jax.numpy as jnp
from jax import lax


def alignment_coefficients(rule):
    """Two Routes' rules as weights of the primitives: SA = a decay + b self, AA = a sparse + b amp,
    IA = a amp + b null (or null reversed) + c decay; ``alignment`` names each weight."""
    if rule.name == "alignment":
        return {p: getattr(rule, p) for p in ("decay", "self", "amp", "sparse", "null",
                                               "null_reversed")}
    weights = {"sa": lambda r: {"decay": r.alpha, "self": r.beta},
               "aa": lambda r: {"sparse": r.alpha, "amp": r.beta},
               "ia": lambda r: {"amp": r.alpha, "null_reversed" if r.reversed else "null": r.beta,
                                "decay": r.gamma}}[rule.name](rule)
    return {p: rule.scale * c for p, c in weights.items()}


def alignment_loss(rule, u, kernel, f, forward):
    """The rule's alignment loss from the primitives' formulas, with ``y = forward(u, K)``,
    ``z = forward(u, F)`` and reconstructions ``v W^T`` = the input cotangent of ``forward(., W)``;
    with ``normalize``, each sample of ``u`` centred and of unit norm first."""
    n = u.shape[0]
    if rule.normalize:
        flat = u.reshape(n, -1) - u.reshape(n, -1).mean(1, keepdims=True)
        u = (flat / jnp.linalg.norm(flat, axis=1, keepdims=True)).reshape(u.shape)
    y, z = forward(u, kernel), forward(u, f)
    back = lambda w, v: jax.vjp(lambda u_: forward(u_, w), u)[1](v)[0]  # noqa: E731
    primitive = {"decay": lambda: jnp.sum(kernel ** 2) + jnp.sum(f ** 2),
                 "self": lambda: -jnp.sum(kernel * f),
                 "amp": lambda: -jnp.sum(y * z) / n,
                 "sparse": lambda: (jnp.sum(y ** 2) + jnp.sum(z ** 2)) / n,
                 "null": lambda: jnp.sum(back(f, y) ** 2) / n,
                 "null_reversed": lambda: jnp.sum(back(kernel, z) ** 2) / n}
    return sum(c * primitive[p]() for p, c in alignment_coefficients(rule).items())


def plain_conv(x, kernel, strides=1, padding="SAME", kernel_dilation=1, feature_group_count=1):
    """Plain channels-last convolution (1-D or 2-D), no custom VJP."""
    n = kernel.ndim - 2
    if isinstance(padding, int):
        padding = ((padding, padding),) * n
    dimension_numbers = {1: ("NWC", "WIO", "NWC"), 2: ("NHWC", "HWIO", "NHWC")}[n]
    return lax.conv_general_dilated(
        x, kernel, window_strides=_ints(strides, n), padding=padding,
        rhs_dilation=_ints(kernel_dilation, n), feature_group_count=feature_group_count,
        dimension_numbers=dimension_numbers)


def _ints(value, n):
    return (value,) * n if isinstance(value, int) else tuple(value)
