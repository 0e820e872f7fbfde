"""``vit`` and ``transformer_lm`` as NNX modules written with NNX's own layers, the names, shapes and
computation of their linen twins (``pfa_jax.models.transformer``); ``pfa_jax.nnx.models.get``
puts them under the rule with ``pfa_jax.nnx.with_rule`` and attaches the twin (``model.linen``)
and ``input_shape``, so ``to_linen`` / ``from_linen`` map their variables one to one.
"""
from __future__ import annotations

from typing import Any

import jax.numpy as jnp
from flax import nnx

__all__ = ["Block", "TransformerLM", "ViT"]


class Block(nnx.Module):
    """One pre-LN block: ``norm_attention``, ``attention``, ``norm_mlp``, ``mlp_in``, ``mlp_out``."""

    def __init__(self, dim: int, heads: int, mlp_dim: int, dropout: float, dtype, rngs: nnx.Rngs):
        self.norm_attention = nnx.LayerNorm(dim, dtype=dtype, rngs=rngs)
        self.attention = nnx.MultiHeadAttention(heads, dim, dropout_rate=dropout, decode=False,
                                                dtype=dtype, rngs=rngs)
        self.norm_mlp = nnx.LayerNorm(dim, dtype=dtype, rngs=rngs)
        self.mlp_in = nnx.Linear(dim, mlp_dim, dtype=dtype, rngs=rngs)
        self.mlp_out = nnx.Linear(mlp_dim, dim, dtype=dtype, rngs=rngs)
        self.drop = nnx.Dropout(dropout, rngs=rngs)

    def __call__(self, x, mask, train: bool):
        h = self.attention(self.norm_attention(x), mask=mask, deterministic=not train)
        x = x + self.drop(h, deterministic=not train)
        h = self.mlp_out(nnx.gelu(self.mlp_in(self.norm_mlp(x))))
        return x + self.drop(h, deterministic=not train)


class _Stack(nnx.Module):
    def __init__(self, num_classes: int, dim: int, depth: int, heads: int, mlp_dim: int,
                 dropout: float, dtype: Any, rngs: nnx.Rngs):
        self.depth = depth
        for i in range(depth):
            setattr(self, f"block_{i}", Block(dim, heads, mlp_dim, dropout, dtype, rngs))
        self.norm = nnx.LayerNorm(dim, dtype=dtype, rngs=rngs)
        self.output = nnx.Linear(dim, num_classes, dtype=dtype, rngs=rngs)

    def blocks_and_head(self, x, mask, train: bool):
        for i in range(self.depth):
            x = getattr(self, f"block_{i}")(x, mask, train)
        return self.norm(x)


class ViT(_Stack):
    def __init__(self, *, input_shape, num_classes=10, dim=64, depth=2, heads=4, mlp_dim=128,
                 dropout=0.0, dtype=None, patch=7, pool="cls", rngs: nnx.Rngs):
        super().__init__(num_classes, dim, depth, heads, mlp_dim, dropout, dtype, rngs)
        height, width, channels = input_shape
        self.patch = nnx.Conv(channels, dim, (patch, patch), strides=patch, padding="VALID",
                              dtype=dtype, rngs=rngs)
        self.pool = pool
        tokens = (height // patch) * (width // patch) + (pool == "cls")
        if pool == "cls":
            self.cls = nnx.Param(jnp.zeros((1, 1, dim)))
        self.position = nnx.Param(0.02 * nnx.initializers.normal()(rngs.params(), (tokens, dim)))

    def __call__(self, images, train: bool = False):
        x = self.patch(images)
        x = x.reshape(x.shape[0], -1, x.shape[-1])
        if self.pool == "cls":
            token = jnp.broadcast_to(self.cls[...], (x.shape[0], 1, x.shape[-1])).astype(x.dtype)
            x = jnp.concatenate([token, x], axis=1)
        x = self.blocks_and_head(x + self.position[...], None, train)
        x = x[:, 0] if self.pool == "cls" else x.mean(1)
        return jnp.asarray(self.output(x), jnp.float32)


class TransformerLM(_Stack):
    def __init__(self, *, input_shape=None, num_classes=10, dim=64, depth=2, heads=4,
                 mlp_dim=128, dropout=0.0, dtype=None, context=128, rngs: nnx.Rngs):
        del input_shape  # tokens (N, T): nothing to size from them
        super().__init__(num_classes, dim, depth, heads, mlp_dim, dropout, dtype, rngs)
        self.embed = nnx.Embed(num_classes, dim, dtype=dtype, rngs=rngs)
        self.position = nnx.Param(0.02 * nnx.initializers.normal()(rngs.params(), (context, dim)))

    def __call__(self, tokens, train: bool = False):
        x = self.embed(tokens) + self.position[...][:tokens.shape[1]]
        x = self.blocks_and_head(x, nnx.make_causal_mask(tokens), train)
        return jnp.asarray(self.output(x), jnp.float32)
