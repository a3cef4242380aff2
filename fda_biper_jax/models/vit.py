"""A small DeiT-style vision transformer, binarized as ProxConnect++ binarizes ViTs.

    stem:   patch embedding, a patch_size x patch_size conv with stride patch_size
            (full precision), plus a learned position embedding; a class token
    blocks: depth x [x + attn(LN(x)), x + mlp(LN(x))], pre-norm (DeiT):
            attn: the q, k, v and output projections are binary dense layers, the
                  scaled dot-product attention itself (activation x activation) is
                  float; mlp: binary dense (mlp_ratio x width) -> GELU -> binary dense
    head:   LayerNorm of the class token -> fc (full precision)

The binary layers are the attention projections and the MLP (the rule
`FULL_PRECISION` keeps 'stem' and 'head' in float), each binarizing its
LayerNorm'd (or attention-mixed) input and its kernel with the model's spec.
Defaults (width 64, depth 4, 4 heads, patches of 4) suit 28 x 28 and 32 x 32
images in a few minutes of CPU.
"""

from __future__ import annotations

from typing import ClassVar

import jax
import jax.numpy as jnp
from flax import linen as nn

from fda_biper_jax.models.blocks import BinaryNet, Context, torch_default_init
from fda_biper_jax.nn.linen import BinaryConv, BinaryDense

Array = jax.Array


def dense(ctx: Context, features: int, name: str) -> BinaryDense:
  return BinaryDense(features, use_bias=True, kernel_init=ctx.dense_init, dtype=ctx.dtype,
                     train=ctx.train, name=name, **ctx.spec.layer_kwargs())


class Attention(nn.Module):
  """Multi-head self-attention with binary q, k, v and output projections."""
  ctx: Context
  heads: int

  @nn.compact
  def __call__(self, x: Array) -> Array:
    n, t, c = x.shape
    if c % self.heads:
      raise ValueError(f"Attention: width {c} is not divisible by heads={self.heads}")
    d = c // self.heads
    split = lambda y: y.reshape(n, t, self.heads, d)  # noqa: E731
    q, k, v = (split(dense(self.ctx, c, name)(x)) for name in ("query", "key", "value"))
    weights = jax.nn.softmax(jnp.einsum("nthd,nshd->nhts", q, k) / jnp.sqrt(d).astype(q.dtype),
                             axis=-1)
    mixed = jnp.einsum("nhts,nshd->nthd", weights, v).reshape(n, t, c)
    return dense(self.ctx, c, "out")(mixed)


class EncoderBlock(nn.Module):
  """Pre-norm transformer block: x + attn(LN(x)), then x + mlp(LN(x))."""
  ctx: Context
  heads: int
  mlp_ratio: int

  @nn.compact
  def __call__(self, x: Array) -> Array:
    c = x.shape[-1]
    x = x + Attention(self.ctx, self.heads, name="attn")(
        nn.LayerNorm(dtype=self.ctx.dtype, name="ln1")(x))
    y = nn.LayerNorm(dtype=self.ctx.dtype, name="ln2")(x)
    y = dense(self.ctx, self.mlp_ratio * c, "fc1")(y)
    y = dense(self.ctx, c, "fc2")(nn.gelu(y))
    return x + y


class ViT(BinaryNet):
  """DeiT-style ViT (module docstring); BatchNorm-free, so `bn_scale_init` is unused."""
  width: int = 64
  depth: int = 4
  heads: int = 4
  mlp_ratio: int = 2
  patch_size: int = 4
  dense_init = staticmethod(torch_default_init)
  FULL_PRECISION: ClassVar[tuple[str, ...]] = ("stem", "head")

  @nn.compact
  def __call__(self, x: Array, train: bool = False) -> Array:
    ctx = self.context(train)
    p = self.patch_size
    x = BinaryConv(self.width, (p, p), strides=p, padding="VALID", use_bias=True,
                   kernel_init=ctx.conv_init, dtype=ctx.dtype, train=train, name="stem",
                   **ctx.spec.layer_kwargs())(x)
    n, h, w, c = x.shape
    x = x.reshape(n, h * w, c)
    cls = self.param("cls_token", nn.initializers.zeros, (1, 1, c), jnp.float32)
    x = jnp.concatenate([jnp.broadcast_to(cls.astype(x.dtype), (n, 1, c)), x], axis=1)
    pos = self.param("pos_embed", nn.initializers.normal(0.02), (1, h * w + 1, c), jnp.float32)
    x = x + pos.astype(x.dtype)
    for i in range(self.depth):
      x = EncoderBlock(ctx, self.heads, self.mlp_ratio, name=f"block{i}")(x)
    x = nn.LayerNorm(dtype=ctx.dtype, name="norm")(x[:, 0])
    logits = BinaryDense(self.num_classes, use_bias=True, kernel_init=ctx.dense_init,
                         dtype=ctx.dtype, train=train, name="head", **ctx.spec.layer_kwargs())(x)
    return logits.astype(jnp.float32)
