"""Binary Flax layers: quantization is a property of a layer's operands.

`BinaryConv` and `BinaryDense` hold latent float32 weights and quantize, on
each call, their kernel with `kernel_quantizer` and their input with
`input_quantizer` (a registered name, a config mapping, a
`quantizers.Quantizer`, or any callable; None keeps the operand in full
precision), in the manner of Larq's `QuantConv2D` and qwix. A layer never
knows which estimator it holds.

Training (`train=True`), for an operand t with quantizer q:

* kernel: q(W), times a per-output-channel scale (below); with FDA's noise
  adaptation, q(W) + alpha e_W(W) where e_W sees each output channel's
  flattened filter (FDA-BNN Eq. 13-14, `noise_adapter.NoiseAdapter`);
* input: with `prenorm`, each sample is first divided by its own standard
  deviation over (H, W, C) (ReCU / BiPer: a / sqrt(var + 1e-5)); then q(a),
  plus alpha e_A(a) per pixel across channels with noise adaptation (with
  prenorm or noise, in float32 whatever the compute dtype, then cast to it).

Schedule values (FDA `n_terms`, BNN++ `beta`, the noise weight `alpha`) come
in through the `schedule` mapping at call time, as traced scalars, so a
schedule never recompiles the step.

Evaluation (`train=False`): the kernel is exactly `q.binarize(W)` times the
scale and the input exactly `q.binarize(a)` (+-1): pure sign, no noise term,
no prenorm (dividing by a positive std does not change a sign).

Weight scaling (`scaling`):

* 'none': the binary kernel as is;
* 'mean_abs': per output channel alpha_c = mean |W_c|, not differentiated
  (XNOR-Net; FDA-BNN);
* 'learned': a per-output-channel parameter multiplying the layer output,
  initialised uniformly in [0, 1) (the public BiPer code). In training it
  is folded into the kernel, conv(x, k) alpha_c = conv(x, k alpha_c).

A quantizer with a weight regulariser (BiPer's mean sin^2(omega0 W)) sows
its value into the 'losses' collection in training; the trainer scales it.
The quantized kernel and input are sown into 'intermediates' for inspection.

Cost (XLA:CPU, benchmarks/train_step.py). The layer's operands are stored
once (`materialize`) rather than recomputed in every consumer; the prenorm
is `prenormalize`, whose backward takes one reduction where autodiff takes
two. Values and gradients are those of the formulas above.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any, Callable, Mapping, Sequence

import jax
import jax.numpy as jnp
from flax import linen as nn
from flax.core import FrozenDict

from fda_biper_jax import quantizers
from fda_biper_jax.noise_adapter import NoiseAdapter

Array = jax.Array
SCALINGS = ("none", "mean_abs", "learned")
NOISE_FIELDS = ("reduction", "min_width", "shortcut", "a")
PRENORM_EPS = 1e-5

# PyTorch's default conv/linear init, kaiming_uniform(a=sqrt(5)), i.e.
# U(-1/sqrt(fan_in), 1/sqrt(fan_in)), for layers used on their own; the zoo's
# models pass the initialisers of their reference code (models/blocks.py).
default_kernel_init = nn.initializers.variance_scaling(1.0 / 3.0, "fan_in", "uniform")


def _resolve(spec) -> quantizers.Quantizer | None:
  return None if spec is None else quantizers.get(spec)


def _noise_config(cfg) -> FrozenDict | None:
  if cfg is None or cfg is False:
    return None
  cfg = {} if cfg is True else dict(cfg)
  bad = set(cfg) - set(NOISE_FIELDS)
  if bad:
    raise ValueError(f"noise adapter takes no option {sorted(bad)}; allowed: {list(NOISE_FIELDS)}")
  NoiseAdapter(**cfg)  # validates the values
  return FrozenDict(cfg)


@dataclasses.dataclass(frozen=True)
class BinarySpec:
  """How a model binarizes its binary layers: the configuration they share.

  Built by `BinarySpec.create(**quantization)` from plain values (names,
  mappings); `config()` gives them back as a JSON-serialisable dict, saved
  with every checkpoint so evaluation uses the values training used.
  """
  kernel_quantizer: quantizers.Quantizer | None = None
  input_quantizer: quantizers.Quantizer | None = None
  scaling: str = "none"
  prenorm: bool = False
  kernel_noise: FrozenDict | None = None
  input_noise: FrozenDict | None = None

  @classmethod
  def create(cls, kernel_quantizer=None, input_quantizer=None, scaling="none",
             prenorm=False, kernel_noise=None, input_noise=None) -> "BinarySpec":
    if scaling not in SCALINGS:
      raise ValueError(f"scaling={scaling!r} is not allowed; allowed: {list(SCALINGS)}")
    if not isinstance(prenorm, bool):
      raise ValueError(f"prenorm={prenorm!r} is not allowed; it must be True or False")
    return cls(_resolve(kernel_quantizer), _resolve(input_quantizer), scaling, prenorm,
               _noise_config(kernel_noise), _noise_config(input_noise))

  def layer_kwargs(self) -> dict[str, Any]:
    return {f.name: getattr(self, f.name) for f in dataclasses.fields(self)}

  def config(self) -> dict[str, Any]:
    c = self.layer_kwargs()
    for k in ("kernel_quantizer", "input_quantizer"):
      c[k] = None if c[k] is None else c[k].config()
    for k in ("kernel_noise", "input_noise"):
      c[k] = None if c[k] is None else dict(c[k])
    return c


@jax.custom_vjp
def _materialized(x: Array) -> Array:
  one = jnp.maximum(jnp.abs(jnp.sign(x)), 1).astype(x.dtype)  # 1 (nan for nan), not a constant
  return x / one


def _materialized_fwd(x):
  return _materialized(x), None


def _materialized_bwd(_, g):
  return (g,)


_materialized.defvjp(_materialized_fwd, _materialized_bwd)


def materialize(x: Array) -> Array:
  """x, exactly, computed once into its own buffer on XLA:CPU; identity gradient.

  XLA:CPU fuses a cheap elementwise producer (add, multiply, clamp, select,
  sin, ...) into every consumer that can take it, recomputing it in each
  rather than reading one stored result; only "expensive" operations
  (divide, exp, tanh, ...) are computed once. In a Bi-Real ResNet each
  binary layer's input is hardtanh(BN(conv) + shortcut), the shortcut being
  the previous such input, so each consumer recomputed the whole chain of
  BatchNorms back to the stage's first layer; the consumers include the
  `transpose_copy` fusions that lay the input out for the weight-gradient
  convolution, which read those 5-8 tensors in transposed order (about half
  of every CPU step, full-precision twin included). Dividing by a one that
  XLA cannot fold, max(|sign(x)|, 1), is exact (x / 1 = x for every float,
  -0, inf and nan included) and makes x a divide, computed once: the
  ResNet-20 training step takes about 35% less time. Only on the CPU
  backend (where it was measured); elsewhere x is returned as is.
  """
  if jax.default_backend() != "cpu":
    return x
  return _materialized(x)


def _prenorm_stats(x: Array) -> tuple[Array, Array]:
  """(mean, std) per sample, std = sqrt(var + 1e-5), var as `jnp.var` computes it."""
  axes = tuple(range(1, x.ndim))
  mu = jnp.mean(x, axis=axes, keepdims=True)
  return mu, jnp.sqrt(jnp.mean(jnp.square(x - mu), axis=axes, keepdims=True) + PRENORM_EPS)


@jax.custom_vjp
def prenormalize(x: Array) -> Array:
  """x / sqrt(var + 1e-5), the variance per sample over all axes but the first
  (ReCU / BiPer's activation normalisation), in x's dtype (float32 inside).

  The value of `x / jnp.sqrt(jnp.var(x, axes) + 1e-5)`. The backward is the
  closed form of its derivative, per sample with N elements and h the
  incoming gradient:

      dx = h / std - (x - mean) * sum(h x) / (N std^3),

  one reduction, where autodiff of `jnp.var` takes two and stores two more
  activation-sized temporaries (one is the gradient through the mean, whose
  factor sum(x - mean) is zero); residuals are x (stored by the layer) and
  two scalars per sample. (Sums stay single-operand reductions: XLA:CPU
  gives those to a library kernel that reads a stored input at memory speed,
  where a variadic reduce that reads x without storing anything is an
  unvectorised loop, twice as slow as storing and reading.)
  """
  return _prenormalize_fwd(x)[0]


def _prenormalize_fwd(x):
  x32 = x.astype(jnp.float32)
  mu, std = _prenorm_stats(x32)
  return (x32 / std).astype(x.dtype), (x, mu, std)


def _prenormalize_bwd(res, g):
  x, mu, std = res
  axes = tuple(range(1, x.ndim))
  n = math.prod(x.shape[1:])
  x32, g32 = x.astype(jnp.float32), g.astype(jnp.float32)
  c = jnp.sum(g32 * x32, axis=axes, keepdims=True) / (n * std * jnp.square(std))
  return ((g32 / std - (x32 - mu) * c).astype(x.dtype),)


prenormalize.defvjp(_prenormalize_fwd, _prenormalize_bwd)


def _alpha(schedule: Mapping[str, Any] | None) -> Array:
  if not schedule or "alpha" not in schedule:
    raise ValueError("noise adaptation is on, so training needs schedule['alpha'] "
                     "(the weight of the learned error term; decays to 0)")
  return schedule["alpha"]


class _BinaryOperands(nn.Module):
  """Shared fields and operand quantization of BinaryConv and BinaryDense."""
  features: int
  kernel_quantizer: Any = None
  input_quantizer: Any = None
  scaling: str = "none"
  prenorm: bool = False
  kernel_noise: Any = None
  input_noise: Any = None
  use_bias: bool = False
  dtype: Any = None  # compute dtype (e.g. jnp.bfloat16); latent weights stay float32
  kernel_init: Callable = default_kernel_init

  def _check(self):
    if self.scaling not in SCALINGS:
      raise ValueError(f"{type(self).__name__}: scaling={self.scaling!r} is not allowed; "
                       f"allowed: {list(SCALINGS)}")

  def _quantize_input(self, x: Array, train: bool, schedule) -> Array:
    """The operand of the conv / dot, computed once (`materialize`)."""
    q = _resolve(self.input_quantizer)
    x = x.astype(self.dtype) if self.dtype is not None else x
    if q is None:
      return materialize(x)
    noise = _noise_config(self.input_noise)
    if train:
      dtype = x.dtype
      if self.prenorm or noise is not None:
        # q(prenorm(x)) + alpha e(x) in float32 from one stored float32 x, cast to the
        # compute dtype once (a float32 alpha would otherwise promote the sum). XLA:CPU
        # runs 16-bit products and reductions in float32: with 16-bit x they converted
        # x and the gradients again in every pass. One-off A/B of bfloat16 resnet20
        # steps against bfloat16 here (one process, 13 interleaved windows): fda 0.87x
        # wall / 0.94x CPU time, biper 0.99x / 0.97x (benchmarks/train_step.py notes).
        x = materialize(x.astype(jnp.float32))  # read by reductions / the noise matmul too
      if self.prenorm:
        x = prenormalize(x)
      y = q(x, **q.scheduled(schedule))
      if noise is not None:
        y = y + _alpha(schedule) * NoiseAdapter(**noise, name="input_noise")(x)
      y = y.astype(dtype)
    else:
      if noise is not None and self.is_initializing():
        NoiseAdapter(**noise, name="input_noise")(x)
      y = q.binarize(x)
    y = materialize(y)
    self.sow("intermediates", "input", y)
    return y

  def _quantize_kernel(self, w: Array, train: bool, schedule) -> Array:
    """Quantized kernel of latent w [..., features], per-channel scale included."""
    q = _resolve(self.kernel_quantizer)
    if q is None:
      k = w
    elif train:
      k = q(w, **q.scheduled(schedule))
      noise = _noise_config(self.kernel_noise)
      if noise is not None:
        rows = w.reshape(-1, self.features).T  # one row per output channel
        e = NoiseAdapter(**noise, name="kernel_noise")(rows).T.reshape(w.shape)
        k = k + _alpha(schedule) * e
      reg = q.regularizer(w)
      if reg is not None:
        self.sow("losses", "kernel_regularizer", reg)
    else:
      noise = _noise_config(self.kernel_noise)
      if noise is not None and self.is_initializing():
        NoiseAdapter(**noise, name="kernel_noise")(w.reshape(-1, self.features).T)
      k = q.binarize(w)
    if self.scaling == "mean_abs":
      axes = tuple(range(w.ndim - 1))
      k = k * jax.lax.stop_gradient(jnp.mean(jnp.abs(w), axis=axes))
    if self.dtype is not None:
      k = k.astype(self.dtype)
    self.sow("intermediates", "kernel", k)
    return k

  def _learned_scale(self) -> Array | None:
    if self.scaling != "learned":
      return None
    return self.param("scale", nn.initializers.uniform(1.0), (self.features,), jnp.float32)

  def _operands(self, x: Array, w: Array, train: bool, schedule):
    """(xq, k, scale): the quantized operands; in training the learned scale is
    folded into k (conv(x, k) * alpha_c = conv(x, k alpha_c), per output
    channel) and scale is None: a multiply over the kernel instead of two
    passes over the activations (forward and backward) and a reduction for
    its gradient. In evaluation the output is scaled, as the deployed model."""
    xq = self._quantize_input(x, train, schedule)
    k = self._quantize_kernel(w, train, schedule)
    scale = self._learned_scale()
    if train and scale is not None:
      k, scale = k * scale.astype(k.dtype), None
    k = k.astype(xq.dtype)
    if self.kernel_quantizer is not None:
      # Stored once: else each consumer (the conv, the transposed copies for its
      # gradients) recomputes the quantizer, BiPer's libm sine included.
      k = materialize(k)
    return xq, k, scale

  def _finish(self, y: Array, scale: Array | None) -> Array:
    if scale is not None:
      y = y * scale.astype(y.dtype)
    if self.use_bias:
      bias = self.param("bias", nn.initializers.zeros, (self.features,), jnp.float32)
      y = y + bias.astype(y.dtype)
    return y


class BinaryConv(_BinaryOperands):
  """2-D convolution (NHWC, HWIO kernel) with quantized kernel and input."""
  kernel_size: Sequence[int] = (3, 3)
  strides: Sequence[int] = (1, 1)
  padding: str | int = "SAME"

  @nn.compact
  def __call__(self, x: Array, train: bool = False,
               schedule: Mapping[str, Any] | None = None) -> Array:
    self._check()
    kh, kw = self.kernel_size
    w = self.param("kernel", self.kernel_init, (kh, kw, x.shape[-1], self.features),
                   jnp.float32)
    xq, k, scale = self._operands(x, w, train, schedule)
    pad = self.padding if isinstance(self.padding, str) else [(self.padding,) * 2] * 2
    y = jax.lax.conv_general_dilated(xq, k, tuple(self.strides), pad,
                                     dimension_numbers=("NHWC", "HWIO", "NHWC"))
    return self._finish(y, scale)


class BinaryDense(_BinaryOperands):
  """Dense layer (kernel [in, out]) with quantized kernel and input."""

  @nn.compact
  def __call__(self, x: Array, train: bool = False,
               schedule: Mapping[str, Any] | None = None) -> Array:
    self._check()
    w = self.param("kernel", self.kernel_init, (x.shape[-1], self.features), jnp.float32)
    xq, k, scale = self._operands(x, w, train, schedule)
    return self._finish(jnp.dot(xq, k), scale)
