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
  plus alpha e_A(a) per pixel across channels with noise adaptation.

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
  initialised uniformly in [0, 1) (the public BiPer code).

A quantizer with a weight regulariser (BiPer's mean sin^2(omega0 W)) sows
its value into the 'losses' collection in training; the trainer scales it.
The quantized kernel and input are sown into 'intermediates' for inspection.
"""

from __future__ import annotations

import dataclasses
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
    q = _resolve(self.input_quantizer)
    x = x.astype(self.dtype) if self.dtype is not None else x
    if q is None:
      return x
    noise = _noise_config(self.input_noise)
    if train:
      if self.prenorm:
        axes = tuple(range(1, x.ndim))
        x32 = x.astype(jnp.float32)
        x = (x32 / jnp.sqrt(jnp.var(x32, axis=axes, keepdims=True) + PRENORM_EPS)).astype(x.dtype)
      y = q(x, **q.scheduled(schedule))
      if noise is not None:
        y = y + _alpha(schedule) * NoiseAdapter(**noise, name="input_noise")(x).astype(y.dtype)
    else:
      if noise is not None and self.is_initializing():
        NoiseAdapter(**noise, name="input_noise")(x)
      y = q.binarize(x)
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

  def _finish(self, y: Array) -> Array:
    if self.scaling == "learned":
      alpha = self.param("scale", nn.initializers.uniform(1.0), (self.features,), jnp.float32)
      y = y * alpha.astype(y.dtype)
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
    xq = self._quantize_input(x, train, schedule)
    k = self._quantize_kernel(w, train, schedule)
    pad = self.padding if isinstance(self.padding, str) else [(self.padding,) * 2] * 2
    y = jax.lax.conv_general_dilated(
        xq, k.astype(xq.dtype), tuple(self.strides), pad,
        dimension_numbers=("NHWC", "HWIO", "NHWC"))
    return self._finish(y)


class BinaryDense(_BinaryOperands):
  """Dense layer (kernel [in, out]) with quantized kernel and input."""

  @nn.compact
  def __call__(self, x: Array, train: bool = False,
               schedule: Mapping[str, Any] | None = None) -> Array:
    self._check()
    w = self.param("kernel", self.kernel_init, (x.shape[-1], self.features), jnp.float32)
    xq = self._quantize_input(x, train, schedule)
    k = self._quantize_kernel(w, train, schedule)
    return self._finish(jnp.dot(xq, k.astype(xq.dtype)))
