"""A reference ViT of Flax's own layers (Conv patches, DenseGeneral attention, Einsum, Dense),
written once with explicit feedback matrices in float64: the rules' signals computed here
independently of the library, for ``test_with_rule`` and ``test_nnx_with_rule``."""
import functools
import math

import flax.linen as nn
import jax
import jax.numpy as jnp
import optax

import pfa_jax as pj

DIM, HEADS, HIDDEN, CLASSES = 8, 2, 12, 5
# every layer-wise rule but brsf, which redraws its feedback from the step's key
RULES = ("bp", "fa", "usf", "frsf", "kp", "wm", "pfa", "pfa_o", "sa", "aa", "ia", "alignment")


class ViT(nn.Module):
    """A one-block ViT written the usual Flax way: patch Conv, MultiHeadDotProductAttention
    (DenseGeneral projections), an Einsum and a Dense MLP, LayerNorms, mean pooling, a head."""

    @nn.compact
    def __call__(self, images):
        x = nn.Conv(DIM, (4, 4), strides=4, padding="VALID", name="patch")(images)
        x = x.reshape(x.shape[0], -1, DIM)
        x = x + self.param("pos", nn.initializers.normal(0.1), x.shape[1:])
        x = x + nn.MultiHeadDotProductAttention(HEADS, name="attention")(nn.LayerNorm()(x))
        y = nn.Einsum((DIM, HIDDEN), "btd,dh->bth", name="mlp_in")(nn.LayerNorm()(x))
        x = x + nn.Dense(DIM, name="mlp_out")(nn.gelu(y))
        return nn.Dense(CLASSES, name="head")(nn.LayerNorm()(x.mean(1)))


# -- the reference: the same network in jnp, each linear map ``y = x K`` with ``dx`` through F ---
@functools.partial(jax.custom_vjp, nondiff_argnums=(0,))
def reference_linear(op, x, kernel, feedback):
    return op(x, kernel)


def _reference_fwd(op, x, kernel, feedback):
    return op(x, kernel), (x, kernel, feedback)


def _reference_bwd(op, residuals, g):
    x, kernel, feedback = residuals
    dx = jax.vjp(lambda x: op(x, feedback), x)[1](g)[0]
    dk = jax.vjp(lambda k: op(x, k), kernel)[1](g)[0]
    return dx, dk, jnp.zeros_like(feedback)


reference_linear.defvjp(_reference_fwd, _reference_bwd)


def matmul(x, k):
    return x @ k


def patch_conv(x, k):
    return jax.lax.conv_general_dilated(x, k, (4, 4), "VALID",
                                        dimension_numbers=("NHWC", "HWIO", "NHWC"))


def layer_norm(x, p):
    mean = x.mean(-1, keepdims=True)
    var = ((x - mean) ** 2).mean(-1, keepdims=True)
    return (x - mean) / jnp.sqrt(var + 1e-6) * p["scale"] + p["bias"]


def explicit_feedback(rule: str, kernel, fb):
    """The matrix through which ``rule`` sends errors down, written out per rule."""
    if rule == "bp":
        return kernel
    if rule in ("pfa", "pfa_o"):
        return fb["R"] @ fb["Bp"].T
    if rule == "usf":
        lifted = math.prod(kernel.shape[:-2])
        fan_in, fan_out = kernel.shape[-2] * lifted, kernel.shape[-1] * lifted
        return math.sqrt(2.0 / (fan_in + fan_out)) * jnp.sign(kernel)
    if rule == "frsf":
        return jnp.abs(fb["M"]) * jnp.sign(kernel)
    return fb["B"]


def reference_logits(rule, params, feedback, images):
    """The ViT forward in jnp; every kernel read as its ``(prod in, prod out)`` matrix."""
    def linear(x, name, matrix_shape=None, op=matmul):
        outer, _, inner = name.partition("/")
        kernel = params[name]["kernel"] if not inner else params["attention"][inner]["kernel"]
        fb = feedback.get(outer, {}) if not inner else feedback.get("attention", {}).get(inner, {})
        matrix = kernel.reshape(matrix_shape) if matrix_shape else kernel
        return reference_linear(op, x, matrix, explicit_feedback(rule, matrix, fb))

    b = images.shape[0]
    x = linear(images, "patch", op=patch_conv) + params["patch"]["bias"]
    x = x.reshape(b, -1, DIM) + params["pos"]
    h = layer_norm(x, params["LayerNorm_0"]).reshape(-1, DIM)
    att = params["attention"]
    depth = DIM // HEADS
    q, k, v = (
        (linear(h, f"attention/{n}", (DIM, DIM)) + att[n]["bias"].reshape(-1)).reshape(b, -1, HEADS, depth)
        for n in ("query", "key", "value"))
    weights = jax.nn.softmax(jnp.einsum("bqhd,bkhd->bhqk", q / math.sqrt(depth), k), -1)
    o = jnp.einsum("bhqk,bkhd->bqhd", weights, v).reshape(-1, DIM)
    x = x + (linear(o, "attention/out", (DIM, DIM)) + att["out"]["bias"]).reshape(b, -1, DIM)
    h = layer_norm(x, params["LayerNorm_1"]).reshape(-1, DIM)
    y = linear(h, "mlp_in") + params["mlp_in"]["bias"]
    x = x + (linear(jax.nn.gelu(y), "mlp_out") + params["mlp_out"]["bias"]).reshape(b, -1, DIM)
    return linear(layer_norm(x.mean(1), params["LayerNorm_2"]), "head") + params["head"]["bias"]


def reference_feedback_signal(rule: str, dk, kernel, fb, rows):
    """The plastic feedback's learning signal, written out per rule (``rows``: the layer's inputs)."""
    if rule == "kp":
        return {"B": dk}
    if rule in ("pfa", "pfa_o"):
        return {"R": dk @ fb["Bp"]}
    if rule == "sa":
        return {"B": fb["B"] - kernel}
    if rule in ("aa", "ia"):
        u = rows - rows.mean(1, keepdims=True)
        u = u / jnp.linalg.norm(u, axis=1, keepdims=True)
        s = u.T @ u / u.shape[0]
        if rule == "aa":
            return {"B": s @ (fb["B"] - kernel)}
        return {"B": -s @ kernel + fb["B"] @ kernel.T @ s @ kernel}
    return {"B": jnp.zeros_like(kernel)} if rule == "alignment" else {}


def init(rule, images):
    model = pj.nn.with_rule(ViT(), rule)
    variables = model.init(jax.random.key(0), images)
    return model, jax.tree.map(lambda a: jnp.asarray(a, jnp.float64), variables)


def loss(logits, labels):
    return optax.softmax_cross_entropy_with_integer_labels(logits, labels).mean()


def at(tree, path):
    """The sub-dict of ``tree`` at a layer path (``{}`` where it has none)."""
    for part in path.split("/"):
        tree = tree.get(part, {})
    return tree


def layer_inputs(params, images):
    """Each dense layer's input rows, from the bp model's intermediates (flax's capture)."""
    captured = {}

    def keep(next_fun, args, kwargs, context):
        flax_layers = (nn.Dense, nn.DenseGeneral, nn.Einsum)
        if context.method_name == "__call__" and isinstance(context.module, flax_layers):
            x = args[0]
            axes = 1 if not isinstance(context.module, nn.DenseGeneral) or context.module.name != "out" else 2
            captured["/".join(context.module.scope.path)] = x.reshape(-1, math.prod(x.shape[x.ndim - axes:]))
        return next_fun(*args, **kwargs)

    with nn.intercept_methods(keep):
        ViT().apply({"params": params}, images)
    return captured
