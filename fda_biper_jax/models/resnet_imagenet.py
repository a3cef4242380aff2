"""ImageNet ResNet-18 / ResNet-34 (224x224) of the ReCU / BiPer code.

Source: ReCU's ImageNet ResNets (`resnet18_1w1a`, `resnet34_1w1a`),
the model file of the BiPer ImageNet scripts; BiPer publishes 11.69M and
21.81M parameters (its README notes 11,694,376 for ResNet-18, which counts
the learned per-channel scale of every binary conv).

    stem: 7x7 stride-2 conv 64 (full precision) -> BN -> hardtanh
          -> 3x3 stride-2 max-pool (padding 1)
    stages: widths 64, 128, 256, 512, strides 1, 2, 2, 2, of [2, 2, 2, 2]
          (ResNet-18) or [3, 4, 6, 3] (ResNet-34) `BiRealBlock`s: a shortcut
          around each binary 3x3 conv; where a unit changes shape, the
          shortcut is a full-precision 1x1 stride-2 conv + BN (ReCU's
          `downsample` with its default avg_down=False)
    head: global average pool -> BatchNorm1d -> fc (full precision)

The reference pools with `nn.AvgPool2d(7)`, i.e. globally at 224x224; the
global mean here also serves smaller inputs. BatchNorm is initialised to
scale 1, bias 0 (ReCU sets BN2d scales to 1e-8).
"""

from __future__ import annotations

from typing import ClassVar

import jax
from flax import linen as nn

from fda_biper_jax.models.blocks import BinaryNet, BiRealBlock, ConvUnit, Head, stage_plan

Array = jax.Array


class ResNetImageNet(BinaryNet):
  """Bi-Real-layout ImageNet ResNet; subclasses fix `stage_sizes`. The 1x1 downsample
  convs stay full precision, with the stem and the fc."""
  stage_sizes: ClassVar[tuple[int, ...]] = ()
  FULL_PRECISION: ClassVar[tuple[str, ...]] = ("stem/*", "head/*", "*/downsample/*")

  @nn.compact
  def __call__(self, x: Array, train: bool = False) -> Array:
    ctx = self.context(train)
    x = ConvUnit(ctx, 64, kernel_size=7, strides=2, activation="hardtanh", name="stem")(x)
    x = nn.max_pool(x, (3, 3), strides=(2, 2), padding=((1, 1), (1, 1)))
    for i, (width, stride) in enumerate(stage_plan((64, 128, 256, 512), self.stage_sizes)):
      x = BiRealBlock(ctx, width, stride, "conv", name=f"block{i}")(x)
    return Head(ctx, self.num_classes, name="head")(x)


class ResNet18(ResNetImageNet):
  """ImageNet ResNet-18 (ReCU / BiPer `resnet18_1w1a`): blocks [2, 2, 2, 2]."""
  stage_sizes: ClassVar[tuple[int, ...]] = (2, 2, 2, 2)


class ResNet34(ResNetImageNet):
  """ImageNet ResNet-34 (ReCU / BiPer `resnet34_1w1a`): blocks [3, 4, 6, 3]."""
  stage_sizes: ClassVar[tuple[int, ...]] = (3, 4, 6, 3)
