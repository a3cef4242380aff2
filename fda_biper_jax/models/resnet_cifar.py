"""CIFAR ResNets (32x32 inputs) of the public BiPer and FDA-BNN code.

* `ResNet18CIFAR`: ReCU's CIFAR `resnet18_1w1a`, which
  the BiPer CIFAR scripts train (`--model resnet18_1w1a`).
* `ResNet20`: BiPer's CIFAR-10 `resnet20_1w1a`
  (Bi-Real layout: a shortcut around each conv).
* `ResNet20FDA`: the ResNet-20 of FDA-BNN's MindSpore release: conv -> PReLU
  -> BN per conv, one option-A shortcut per block, no activation after the sum.

First conv and last fc are full precision everywhere.
"""

from __future__ import annotations

import jax
from flax import linen as nn

from fda_biper_jax.models.blocks import (BinaryNet, BiRealBlock, ConvUnit, Context, Head,
                                         option_a_shortcut, stage_plan, torch_default_init)

Array = jax.Array


class BasicBlock(nn.Module):
  """ReCU / BiPer CIFAR ResNet-18 basic block:

  hardtanh(BN(conv2(hardtanh(BN(conv1(x))))) + shortcut(x)), both convs
  binary, shortcut = 2x2 average pool + zero channel padding (option A).
  """
  ctx: Context
  features: int
  strides: int = 1

  @nn.compact
  def __call__(self, x: Array) -> Array:
    y = ConvUnit(self.ctx, self.features, strides=self.strides, name="unit1")(x)
    y = ConvUnit(self.ctx, self.features, activation=None, name="unit2")(y)
    return self.ctx.binary_activation(y + option_a_shortcut(x, self.features, self.strides))


class ResNet18CIFAR(BinaryNet):
  """ResNet-18 for CIFAR (ReCU `resnet18_1w1a`, used by BiPer; 11.01M published).

  Stem: full-precision 3x3 conv 64 -> BN, with no activation (ReCU's forward
  is `bn1(conv1(x))`); four stages of two `BasicBlock`s, widths 64, 128, 256,
  512, strides 1, 2, 2, 2; head: global average pool -> BatchNorm1d -> fc.
  """

  @nn.compact
  def __call__(self, x: Array, train: bool = False) -> Array:
    ctx = self.context(train)
    x = ConvUnit(ctx, 64, activation=None, name="stem")(x)
    for i, (width, stride) in enumerate(stage_plan((64, 128, 256, 512), (2, 2, 2, 2))):
      x = BasicBlock(ctx, width, stride, name=f"block{i}")(x)
    return Head(ctx, self.num_classes, name="head")(x)


class ResNet20(BinaryNet):
  """ResNet-20 of the BiPer code (`resnet20_1w1a`; 0.27M published).

  Stem: full-precision 3x3 conv 16 -> BN -> hardtanh; three stages of three
  `BiRealBlock`s (each conv has its own option-A shortcut: 2x2 average pool
  + zero channel padding),
  widths 16, 32, 64; head: global average pool -> BatchNorm1d -> fc.
  """

  @nn.compact
  def __call__(self, x: Array, train: bool = False) -> Array:
    ctx = self.context(train)
    x = ConvUnit(ctx, 16, activation="hardtanh", name="stem")(x)
    for i, (width, stride) in enumerate(stage_plan((16, 32, 64), (3, 3, 3))):
      x = BiRealBlock(ctx, width, stride, "option_a", name=f"block{i}")(x)
    return Head(ctx, self.num_classes, name="head")(x)


class FDABlock(nn.Module):
  """FDA-BNN MindSpore `BasicCell`: BN(PReLU(conv2(BN(PReLU(conv1(x)))))) + shortcut(x).

  Both convs binary; the shortcut subsamples every second pixel and
  zero-pads channels (option A); nothing follows the sum.
  """
  ctx: Context
  features: int
  strides: int = 1

  @nn.compact
  def __call__(self, x: Array) -> Array:
    unit = dict(activation="prelu", activation_first=True)
    y = ConvUnit(self.ctx, self.features, strides=self.strides, name="unit1", **unit)(x)
    y = ConvUnit(self.ctx, self.features, name="unit2", **unit)(y)
    return y + option_a_shortcut(x, self.features, self.strides, pool="subsample")


class ResNet20FDA(BinaryNet):
  """ResNet-20 of FDA-BNN's MindSpore release (Xu et al., NeurIPS 2021).

  Stem: full-precision 3x3 conv 16 -> BN (no activation); three stages of
  three `FDABlock`s, widths 16, 32, 64; then ReLU -> global average pool ->
  fc (no BatchNorm1d), as the release's `construct`.

  PReLU choice: the release's `PReLU()` cells default to channel=1, a single
  learned slope per layer (init 0.25); this model uses one slope per channel
  (PyTorch `nn.PReLU(channels)`, ReActNet/Bi-Real + PReLU practice), which
  adds 654 parameters (672 slopes instead of 18) and is a superset of it.
  Latent weights use PyTorch's default init (the release initialises binary
  kernels to ones, a placeholder for loading pretrained weights).
  """
  conv_init = staticmethod(torch_default_init)

  @nn.compact
  def __call__(self, x: Array, train: bool = False) -> Array:
    ctx = self.context(train)
    x = ConvUnit(ctx, 16, activation=None, name="stem")(x)
    for i, (width, stride) in enumerate(stage_plan((16, 32, 64), (3, 3, 3))):
      x = FDABlock(ctx, width, stride, name=f"block{i}")(x)
    return Head(ctx, self.num_classes, norm=False, name="head")(nn.relu(x))
