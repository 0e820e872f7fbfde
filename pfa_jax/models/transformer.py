"""``vit`` and ``transformer_lm``: transformers written with Flax's own layers only, put under the
rule by ``pfa_jax.nn.with_rule`` (``pfa_jax.models.get`` does it), so they double as the example of
that route.

Both are pre-LN stacks of ``depth`` blocks ``block_{i}``::

    x = x + drop(attention(norm_attention(x)))        # nn.MultiHeadDotProductAttention, `heads` heads
    x = x + drop(mlp_out(gelu(mlp_in(norm_mlp(x)))))  # nn.Dense dim -> mlp_dim -> dim

then ``norm`` and the ``output`` head. Every kernel follows the rule of its path: the patch
embedding ``patch`` (``nn.Conv``), each block's ``attention/{query,key,value,out}`` (``DenseGeneral``,
their kernels read as ``(dim, dim)`` matrices), ``mlp_in``, ``mlp_out`` and ``output``. The products
of two activations inside attention (``q k^T``, the weighted sum of values) keep their exact
gradients; so do LayerNorm, the residual additions and the learned ``position`` embeddings and
class token. ``transformer_lm``'s token embedding ``embed`` (``nn.Embed``) receives its true gradient
from the error that reaches it: it sends nothing further down, so no rule applies to it.

* ``ViT(x, train)``: images ``(N, H, W, C)`` cut into ``patch x patch`` patches, a class token
  (``pool='cls'``) or mean pooling (``pool='mean'``) for the ``output`` logits ``(N, num_classes)``.
* ``TransformerLM(tokens, train)``: tokens ``(N, T)``, ``T <= context``, causal attention,
  logits ``(N, T, num_classes)`` (``num_classes`` is the vocabulary size) for the next token at each
  position. DFA's error taps keep the positions, so the output error at each position reaches every
  DFA layer's units at that position (Launay et al. 2020).

``dropout`` (default 0) is applied to the attention weights and after each residual branch in
training mode (RNG stream ``dropout``). ``dtype``: the computation dtype (parameters float32);
the logits are returned in float32.
"""
from __future__ import annotations

from typing import Any

import flax.linen as nn
import jax.numpy as jnp

__all__ = ["Block", "TransformerLM", "ViT"]


class Block(nn.Module):
    """One pre-LN transformer block (module docstring)."""

    heads: int
    mlp_dim: int
    dropout: float = 0.0
    dtype: Any = None

    @nn.compact
    def __call__(self, x, mask=None, train: bool = False):
        drop = nn.Dropout(self.dropout, deterministic=not train)
        h = nn.LayerNorm(dtype=self.dtype, name="norm_attention")(x)
        h = nn.MultiHeadDotProductAttention(self.heads, dtype=self.dtype, dropout_rate=self.dropout,
                                            deterministic=not train, name="attention")(h, mask=mask)
        x = x + drop(h)
        h = nn.LayerNorm(dtype=self.dtype, name="norm_mlp")(x)
        h = nn.gelu(nn.Dense(self.mlp_dim, dtype=self.dtype, name="mlp_in")(h))
        return x + drop(nn.Dense(x.shape[-1], dtype=self.dtype, name="mlp_out")(h))


class _Stack(nn.Module):
    """The fields the two models share, and the blocks plus the head."""

    num_classes: int = 10
    dim: int = 64
    depth: int = 2
    heads: int = 4
    mlp_dim: int = 128
    dropout: float = 0.0
    dtype: Any = None
    axis_name: str | None = None  # accepted for uniformity with the registry (no BatchNorm here)

    def __post_init__(self):
        if self.dim % self.heads:
            raise ValueError(f"{type(self).__name__}: dim={self.dim} is not divisible by "
                             f"heads={self.heads}")
        super().__post_init__()

    def blocks_and_head(self, x, mask, train: bool):
        for i in range(self.depth):
            x = Block(self.heads, self.mlp_dim, self.dropout, self.dtype, name=f"block_{i}")(
                x, mask, train)
        x = nn.LayerNorm(dtype=self.dtype, name="norm")(x)
        return x


class ViT(_Stack):
    """A vision transformer for images ``(N, H, W, C)`` (module docstring)."""

    patch: int = 7
    pool: str = "cls"

    @nn.compact
    def __call__(self, images, train: bool = False):
        if images.ndim != 4 or images.shape[1] % self.patch or images.shape[2] % self.patch:
            raise ValueError(f"ViT takes images (batch, height, width, channels) with height and "
                             f"width divisible by patch={self.patch}, got shape {images.shape}")
        if self.pool not in ("cls", "mean"):
            raise ValueError(f"ViT: unknown pool {self.pool!r}; valid: 'cls', 'mean'")
        x = nn.Conv(self.dim, (self.patch, self.patch), strides=self.patch, padding="VALID",
                    dtype=self.dtype, name="patch")(images)
        x = x.reshape(x.shape[0], -1, self.dim)
        if self.pool == "cls":
            token = self.param("cls", nn.initializers.zeros, (1, 1, self.dim))
            x = jnp.concatenate([jnp.broadcast_to(token, (x.shape[0], 1, self.dim)).astype(x.dtype),
                                 x], axis=1)
        x = x + self.param("position", nn.initializers.normal(0.02), x.shape[1:])
        x = self.blocks_and_head(x, None, train)
        x = x[:, 0] if self.pool == "cls" else x.mean(1)
        return jnp.asarray(nn.Dense(self.num_classes, dtype=self.dtype, name="output")(x),
                           jnp.float32)


class TransformerLM(_Stack):
    """A causal character (or token) language model (module docstring)."""

    context: int = 128

    @nn.compact
    def __call__(self, tokens, train: bool = False):
        if tokens.ndim != 2 or tokens.shape[1] > self.context:
            raise ValueError(f"TransformerLM takes tokens (batch, length) with length <= "
                             f"context={self.context}, got shape {tokens.shape}")
        x = nn.Embed(self.num_classes, self.dim, dtype=self.dtype, name="embed")(tokens)
        position = self.param("position", nn.initializers.normal(0.02), (self.context, self.dim))
        x = x + position[:tokens.shape[1]].astype(x.dtype)
        x = self.blocks_and_head(x, nn.make_causal_mask(tokens), train)
        return jnp.asarray(nn.Dense(self.num_classes, dtype=self.dtype, name="output")(x),
                           jnp.float32)
