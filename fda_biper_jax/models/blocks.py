"""Building blocks shared by the model zoo, each written once.

Every model in `fda_biper_jax.models` is assembled from the pieces here:

* `Context`: what every layer of one model shares (the `BinarySpec`, the
  train mode, the compute dtype, the BatchNorm `axis_name`, the kernel
  initialisers) and the layer factories that apply it: conv, classifier,
  BatchNorm and the activation after a binary layer. The model binds the mode
  once (`BinaryNet.context(train)`, as flax's examples bind BatchNorm's
  `use_running_average`); blocks take only `x`;
* `ConvUnit`: conv (-> 2x2 max-pool) -> BatchNorm -> activation, or
  conv -> activation -> BatchNorm (FDA's order);
* `option_a_shortcut`: the parameter-free ResNet shortcut for a stride or
  channel change (He et al. 2016, option A);
* `BiRealUnit`: one 3x3 conv with its own shortcut, Bi-Real Net's layout
  (Liu et al., ECCV 2018), and `BiRealBlock`, two of them: the basic block of
  the BiPer ResNet-20 and of the ImageNet ResNet-18/34; `stage_plan` lists
  the (width, stride) of every block of a ResNet;
* `Head`: global average pool (or flatten) -> BatchNorm1d -> classifier;
* `PReLU` and `hardtanh`, the activations the reference models use.

Every conv and fc is a `BinaryConv` / `BinaryDense` with the spec's
quantizers; which stay full precision (first conv, last fc, ImageNet 1x1
downsample convs) is a rule of the model, path patterns
(`BinaryNet.full_precision`, e.g. ('stem/*', 'head/*')), that each layer
applies to its own path: one layer type serves summaries and exporters, and
no block passes a "binary" flag.

Convolutions use explicit symmetric padding kernel_size // 2, as PyTorch's
`padding=k//2` does: 'SAME' pads a stride-2 conv on an even input only at the
bottom/right, which shifts the sampling grid relative to the reference models.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Callable, ClassVar

import flax
import jax
import jax.numpy as jnp
from flax import linen as nn

from fda_biper_jax import xla_cpu
from fda_biper_jax.nn.linen import BinaryConv, BinaryDense, BinarySpec

Array = jax.Array

# PyTorch's default conv/linear init, kaiming_uniform(a=sqrt(5)), i.e.
# U(-1/sqrt(fan_in), 1/sqrt(fan_in)): the initialisation of the reference code's layers
# that set none.
torch_default_init = nn.initializers.variance_scaling(1.0 / 3.0, "fan_in", "uniform")

BN_MOMENTUM = 0.9  # PyTorch's momentum 0.1 for the new batch statistic
BN_EPSILON = 1e-5
# 'method': hardtanh, or the activation the input quantizer's method prescribes after a
# binary layer (ReActNet's RPReLU): the activation of a binary unit.
ACTIVATIONS = (None, "hardtanh", "method", "prelu", "relu")

# PyTorch's init.kaiming_normal_ (fan_in, gain sqrt 2; JAX's "normal" is untruncated), the
# conv initialisation of the BiPer / ReCU / IR-Net ResNets.
kaiming_normal = nn.initializers.variance_scaling(2.0, "fan_in", "normal")


def hardtanh(x: Array) -> Array:
  """clip(x, -1, 1): the activation of the BiPer / ReCU / IR-Net models."""
  return jnp.clip(x, -1, 1)


class BatchNorm(nn.BatchNorm):
  """Flax's `nn.BatchNorm` (same fields, parameters, statistics and values, to float32
  rounding) with its per-channel sums in XLA:CPU's fast form.

  Over the last axis, without a mask and with the fast variance (the models'
  use): mean = sum(x) / n and var = max(sum(x^2) / n - mean^2, 0) by
  `xla_cpu.channel_sum` (pmean'd over `axis_name` in training), and
  y = (x - mean) * (scale / sqrt(var + epsilon)) + bias with the per-channel
  vectors broadcast by `xla_cpu.broadcast_channels`, so that the gradient's
  sums over the batch are channel sums too. The running averages follow
  flax's update. Any other use is flax's own `__call__`. On other backends
  the forms are flax's.
  """

  @nn.compact
  def __call__(self, x, use_running_average: bool | None = None, *, mask=None):
    if mask is not None or not self.use_fast_variance or self.axis not in (-1, x.ndim - 1):
      return super().__call__(x, use_running_average, mask=mask)
    use_running_average = nn.merge_param("use_running_average", self.use_running_average,
                                         use_running_average)
    c = x.shape[-1]
    ra_mean = self.variable("batch_stats", "mean", lambda s: jnp.zeros(s, jnp.float32), (c,))
    ra_var = self.variable("batch_stats", "var", lambda s: jnp.ones(s, jnp.float32), (c,))
    if use_running_average:
      mean, var = ra_mean.value, ra_var.value
    else:
      mean, var = self._batch_stats(x)
      if not self.is_initializing():
        ra_mean.value = self.momentum * ra_mean.value + (1 - self.momentum) * mean
        ra_var.value = self.momentum * ra_var.value + (1 - self.momentum) * var
    return self._normalize(x, mean, var)

  def _batch_stats(self, x):
    """(mean, var) per channel, float32, over every axis but the last (and the devices)."""
    x32 = x.astype(jnp.promote_types(self.dtype or x.dtype, jnp.float32))
    n = x.size // x.shape[-1]
    moments = jnp.stack([xla_cpu.channel_sum(x32), xla_cpu.channel_sum(x32 * x32)]) / n
    if self.axis_name is not None and not self.is_initializing():
      moments = jax.lax.pmean(moments, self.axis_name,
                              axis_index_groups=self.axis_index_groups)
    mean, mean2 = moments[0], moments[1]
    return mean, jnp.maximum(0.0, mean2 - mean * mean)

  def _normalize(self, x, mean, var):
    c = x.shape[-1]
    mul = jax.lax.rsqrt(var + self.epsilon)
    args = [x]
    if self.use_scale:
      scale = self.param("scale", self.scale_init, (c,), self.param_dtype)
      mul, args = mul * scale, args + [scale]
    y = (x - xla_cpu.broadcast_channels(mean, x.shape)) * xla_cpu.broadcast_channels(
        mul, x.shape)
    if self.use_bias:
      bias = self.param("bias", self.bias_init, (c,), self.param_dtype)
      y, args = y + xla_cpu.broadcast_channels(bias, x.shape), args + [bias]
    return jnp.asarray(y, flax.linen.dtypes.canonicalize_dtype(*args, dtype=self.dtype))


@dataclasses.dataclass(frozen=True)
class Context:
  """What every layer of one model shares, and the factories that apply it.

  The factories build Flax submodules, so call them inside a compact method:
  the layer belongs to the module whose method is running.
  """
  spec: BinarySpec
  train: bool = False
  dtype: Any = None
  axis_name: str | None = None
  conv_init: Callable = torch_default_init
  dense_init: Callable = torch_default_init
  bn_scale_init: float = 1.0

  def conv(self, features: int, kernel_size: int = 3, strides: int = 1, *,
           name: str | None = None) -> BinaryConv:
    """A square bias-free conv with PyTorch padding k // 2 and the spec's quantization
    (full precision where the spec's `full_precision` rule matches its path)."""
    return BinaryConv(features, kernel_size=(kernel_size, kernel_size), strides=strides,
                      padding=kernel_size // 2, use_bias=False, kernel_init=self.conv_init,
                      dtype=self.dtype, train=self.train, name=name,
                      **self.spec.layer_kwargs())

  def classifier(self, num_classes: int, name: str | None = None) -> BinaryDense:
    """The last layer, with bias (full precision by the models' rules)."""
    return BinaryDense(num_classes, use_bias=True, kernel_init=self.dense_init,
                       dtype=self.dtype, train=self.train, name=name,
                       **self.spec.layer_kwargs())

  def batch_norm(self, name: str | None = None) -> nn.BatchNorm:
    """BatchNorm over every axis but the last, statistics pmean'd over `axis_name`."""
    return BatchNorm(use_running_average=not self.train, momentum=BN_MOMENTUM,
                     epsilon=BN_EPSILON, axis_name=self.axis_name, dtype=self.dtype,
                     scale_init=nn.initializers.constant(self.bn_scale_init), name=name)

  def binary_activation(self, x: Array, name: str = "act") -> Array:
    """The activation after a binary layer: hardtanh, or the module the input
    quantizer's method prescribes there (ReActNet's RPReLU)."""
    module = self.spec.activation()
    return hardtanh(x) if module is None else module(name=name)(x)


class PReLU(nn.Module):
  """Per-channel PReLU, max(x, 0) + a_c min(x, 0), a_c initialised to 0.25.

  As PyTorch's `nn.PReLU(channels)`; Flax's `nn.PReLU` has a single slope.
  """
  init_slope: float = 0.25

  @nn.compact
  def __call__(self, x: Array) -> Array:
    a = self.param("negative_slope", nn.initializers.constant(self.init_slope),
                   (x.shape[-1],), jnp.float32)
    return jnp.where(x >= 0, x, a.astype(x.dtype) * x)


def _activate(kind: str | None, x: Array, ctx: Context) -> Array:
  if kind is None:
    return x
  if kind == "hardtanh":
    return hardtanh(x)
  if kind == "method":
    return ctx.binary_activation(x)
  if kind == "relu":
    return nn.relu(x)
  return PReLU(name="act")(x)


class ConvUnit(nn.Module):
  """conv -> [2x2 max-pool] -> BatchNorm -> activation (or activation -> BN).

  Attributes:
    ctx: the model's shared `Context` (its mode included).
    features, kernel_size, strides: of the conv (padding kernel_size // 2).
    pool: a 2x2 stride-2 max-pool between conv and BatchNorm (VGG-Small of
      IR-Net / ReCU / BiPer pools before its BatchNorm).
    activation: None, 'hardtanh', 'method' (a binary unit's: hardtanh unless
      the input quantizer's method prescribes one), 'relu' or 'prelu'
      (per-channel).
    activation_first: conv -> activation -> BN, FDA-BNN's MindSpore ResNet-20
      order; otherwise conv -> BN -> activation.
  """
  ctx: Context
  features: int
  kernel_size: int = 3
  strides: int = 1
  pool: bool = False
  activation: str | None = "method"
  activation_first: bool = False

  @nn.compact
  def __call__(self, x: Array) -> Array:
    if self.activation not in ACTIVATIONS:
      raise ValueError(f"ConvUnit: activation={self.activation!r} is not allowed; "
                       f"allowed: {list(ACTIVATIONS)}")
    y = self.ctx.conv(self.features, self.kernel_size, self.strides, name="conv")(x)
    if self.pool:
      y = nn.max_pool(y, (2, 2), strides=(2, 2))
    if self.activation_first:
      y = _activate(self.activation, y, self.ctx)
    y = self.ctx.batch_norm(name="bn")(y)
    if not self.activation_first:
      y = _activate(self.activation, y, self.ctx)
    return y


SHORTCUT_POOLS = ("avg", "subsample")


def option_a_shortcut(x: Array, features: int, strides: int = 1, pool: str = "avg") -> Array:
  """The parameter-free shortcut (He et al. 2016, option A).

  Spatial reduction by `strides`, then zero channels padded evenly on both
  sides up to `features`; the identity when neither changes. `pool`:

  * 'avg': `strides` x `strides` average pooling, as the IR-Net / ReCU / BiPer
    CIFAR ResNets (`nn.AvgPool2d((2, 2))`);
  * 'subsample': every `strides`-th pixel (`x[:, ::2, ::2]`), the original
    option A and FDA-BNN's MindSpore ResNet-20.
  """
  if pool not in SHORTCUT_POOLS:
    raise ValueError(f"option_a_shortcut: pool={pool!r} is not allowed; "
                     f"allowed: {list(SHORTCUT_POOLS)}")
  if strides != 1:
    if pool == "avg":
      x = nn.avg_pool(x, (strides, strides), strides=(strides, strides))
    else:
      x = x[:, ::strides, ::strides, :]
  extra = features - x.shape[-1]
  if extra < 0:
    raise ValueError(f"option_a_shortcut: cannot reduce {x.shape[-1]} channels to {features}")
  if extra:
    x = jnp.pad(x, [(0, 0)] * (x.ndim - 1) + [(extra // 2, extra - extra // 2)])
  return x


DOWNSAMPLES = ("option_a", "conv")


class BiRealUnit(nn.Module):
  """hardtanh(BN(binary conv(x)) + shortcut(x)): a shortcut around each conv.

  Bi-Real Net's layout, as the BiPer CIFAR ResNet-20 (`BasicBlock_1w1a`) and
  the ReCU / BiPer ImageNet ResNet-18/34 write their basic blocks: each of the
  two 3x3 convs of a block has its own shortcut. When the unit changes the
  resolution or width, the shortcut is

  * 'option_a': average pool + zero channel padding (no parameters), or
  * 'conv': a full-precision 1x1 conv with the unit's stride + BatchNorm
    (ReCU's ImageNet `downsample` with `avg_down=False`; Bi-Real Net itself
    average-pools first and uses a stride-1 1x1 conv, same parameter count).
  """
  ctx: Context
  features: int
  strides: int = 1
  downsample: str = "option_a"

  @nn.compact
  def __call__(self, x: Array) -> Array:
    if self.downsample not in DOWNSAMPLES:
      raise ValueError(f"BiRealUnit: downsample={self.downsample!r} is not allowed; "
                       f"allowed: {list(DOWNSAMPLES)}")
    y = ConvUnit(self.ctx, self.features, strides=self.strides, activation=None,
                 name="main")(x)
    reshape = self.strides != 1 or x.shape[-1] != self.features
    if reshape and self.downsample == "conv":
      shortcut = ConvUnit(self.ctx, self.features, kernel_size=1, strides=self.strides,
                          activation=None, name="downsample")(x)
    else:
      shortcut = option_a_shortcut(x, self.features, self.strides)
    return self.ctx.binary_activation(y + shortcut)


class BiRealBlock(nn.Module):
  """A ResNet basic block in Bi-Real layout: two `BiRealUnit`s, the first strided."""
  ctx: Context
  features: int
  strides: int = 1
  downsample: str = "option_a"

  @nn.compact
  def __call__(self, x: Array) -> Array:
    x = BiRealUnit(self.ctx, self.features, self.strides, self.downsample, name="unit1")(x)
    return BiRealUnit(self.ctx, self.features, 1, self.downsample, name="unit2")(x)


def stage_plan(widths, blocks_per_stage, strides=(1, 2, 2, 2)):
  """(width, stride) of every block of a ResNet: each stage's first block strides."""
  return [(width, (first if b == 0 else 1))
          for width, first, n in zip(widths, strides, blocks_per_stage) for b in range(n)]


class Head(nn.Module):
  """Global average pool (or flatten) -> [BatchNorm1d] -> full-precision fc.

  The BiPer / ReCU ResNets end with avgpool -> `nn.BatchNorm1d` -> `nn.Linear`;
  VGG-Small flattens straight into its fc. Logits are float32 in every dtype.
  """
  ctx: Context
  num_classes: int
  pool: str = "avg"  # 'avg' (global mean over H, W) or 'flatten'
  norm: bool = True

  @nn.compact
  def __call__(self, x: Array) -> Array:
    if self.pool == "avg":
      x = jnp.mean(x, axis=(1, 2))
    elif self.pool == "flatten":
      x = x.reshape(x.shape[0], -1)
    else:
      raise ValueError(f"Head: pool={self.pool!r} is not allowed; allowed: ['avg', 'flatten']")
    if self.norm:
      x = self.ctx.batch_norm(name="bn")(x)
    logits = self.ctx.classifier(self.num_classes, name="fc")(x)
    return logits.astype(jnp.float32)


class BinaryNet(nn.Module):
  """Fields shared by every model of the zoo; subclasses add only structure.

  Attributes:
    num_classes: width of the logits.
    spec: how the binary layers binarize (`BinarySpec`; a spec with the
      'identity' quantizers is the full-precision twin); its `full_precision`
      rule (default: the class's `FULL_PRECISION`) keeps layers full precision
      by path.
    dtype: compute dtype (e.g. jnp.bfloat16); parameters stay float32 and
      logits are float32.
    axis_name: the mapped axis over which BatchNorm statistics are averaged
      (data parallelism under shard_map / pmap); None on one device.
    bn_scale_init: the initial scale of every BatchNorm (1; the public BiPer
      ImageNet code starts them at 1e-8).
  """
  num_classes: int
  spec: BinarySpec = BinarySpec()
  dtype: Any = None
  axis_name: str | None = None
  bn_scale_init: float = 1.0

  # Initialisers of the reference code; subclasses override.
  conv_init = staticmethod(kaiming_normal)
  dense_init = staticmethod(torch_default_init)
  # Layers that stay full precision, as path patterns: the first conv and the last fc.
  FULL_PRECISION: ClassVar[tuple[str, ...]] = ("stem/*", "head/*")

  def context(self, train: bool) -> Context:
    """The model's layer factories with the mode bound."""
    return Context(self.spec, bool(train), self.dtype, self.axis_name, self.conv_init,
                   self.dense_init, self.bn_scale_init)
