"""VGG-Small for CIFAR (32x32) as in the IR-Net / ReCU / BiPer code.

Source: ReCU's CIFAR `vgg_small_1w1a` (the IR-Net VGG-Small,
trained by the BiPer scripts; 4.66M published):

    conv0 3->128 (full precision) -> BN -> hardtanh
    conv1 128->128 -> maxpool -> BN -> hardtanh
    conv2 128->256 -> BN -> hardtanh
    conv3 256->256 -> maxpool -> BN -> hardtanh
    conv4 256->512 -> BN -> hardtanh
    conv5 512->512 -> maxpool -> BN -> hardtanh
    flatten (512 x 4 x 4 = 8192) -> fc (full precision)

Each 2x2 max-pool sits between its conv and BatchNorm, as in the reference.
The flatten is in NHWC order (H, W, C) where PyTorch flattens (C, H, W):
same function class, a permutation of the fc's input rows.
Initialisation as the reference: convs N(0, 2 / (9 C_out)) (kaiming, fan_out),
fc N(0, 0.01^2).
"""

from __future__ import annotations

import jax
from flax import linen as nn

from fda_biper_jax.models.blocks import BinaryNet, ConvUnit, Head

Array = jax.Array

# (width, max-pool after the conv) of the five binary convs after conv0.
BINARY_CONVS = ((128, True), (256, False), (256, True), (512, False), (512, True))


class VGGSmall(BinaryNet):
  """VGG-Small (IR-Net / ReCU / BiPer `vgg_small_1w1a`); see the module docstring."""
  conv_init = staticmethod(nn.initializers.variance_scaling(2.0, "fan_out", "normal"))
  dense_init = staticmethod(nn.initializers.normal(0.01))

  @nn.compact
  def __call__(self, x: Array, train: bool = False) -> Array:
    ctx = self.context(train)
    x = ConvUnit(ctx, 128, activation="hardtanh", name="stem")(x)
    for i, (width, pool) in enumerate(BINARY_CONVS, start=1):
      x = ConvUnit(ctx, width, pool=pool, name=f"conv{i}")(x)
    return Head(ctx, self.num_classes, pool="flatten", norm=False, name="head")(x)
