"""A tiny binary CNN for tests, smoke runs and the notebooks' CPU mode.

Full-precision stem conv 16 -> BN -> hardtanh; two binary 3x3 conv units
(32 channels stride 2, 64 channels stride 2), each conv -> BN -> hardtanh;
then global average pool -> BatchNorm1d -> full-precision fc: the shape of
the papers' models (first and last layers in float) at a few thousand
parameters, so a training step compiles and runs in well under a second.
"""

from __future__ import annotations

import jax
from flax import linen as nn

from fda_biper_jax.models.blocks import BinaryNet, ConvUnit, Head


class TinyCNN(BinaryNet):
  """stem (float) -> 2 binary conv units -> head (float)."""

  @nn.compact
  def __call__(self, x: jax.Array, train: bool = False) -> jax.Array:
    ctx = self.context(train)
    x = ConvUnit(ctx, 16, activation="hardtanh", name="stem")(x)
    x = ConvUnit(ctx, 32, strides=2, name="unit1")(x)
    x = ConvUnit(ctx, 64, strides=2, name="unit2")(x)
    return Head(ctx, self.num_classes, name="head")(x)
