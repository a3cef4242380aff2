"""Binary Flax layers: quantization is a property of a layer's operands.

`BinaryConv` and `BinaryDense` hold latent float32 weights and quantize, on
each call, their kernel with `kernel_quantizer` and their input with
`input_quantizer` (a registered method's name or config mapping, a
`methods.Quantizer`, or any callable; None keeps the operand in full
precision), in the manner of Larq's `QuantConv2D` and qwix. A layer never
knows which method it holds: it asks the quantizer for its training forward
(`quantize`), its deployed form (`binarize`), its learned parts (kept as the
layer's parameter `{role}_{aux_name}`, e.g. FDA's `input_noise`) and its
regulariser.

Training (`train=True`), for an operand t with quantizer q:

* kernel: q's training forward of W (learned parts included), times a
  per-output-channel scale (below); a method's weighted regulariser is sown
  into the 'losses' collection, which the trainer adds to the loss;
* input: with `prenorm`, each sample is first divided by its own standard
  deviation over all axes but the batch (ReCU / BiPer: a / sqrt(var + 1e-5));
  then q's training forward. With prenorm or learned parts, the input
  quantization runs in float32 whatever the compute dtype, then is cast to
  it once.

Scheduled method parameters (FDA's series length, BNN++'s slope, ...) are evaluated at
the training step bound by `schedules.training_step` (the trainer binds it
around the model call): a schedule never recompiles the step, and training
a scheduled quantizer with no step bound is an error, never a silent default.

Evaluation (`train=False`): the kernel is exactly `q.binarize(W)` times the
scale and the input exactly `q.binarize(a)`; the prenorm is skipped when the
deployed form ignores a positive scale (`scale_invariant`, true of sign).

Weight scaling (`scaling`):

* 'none': the binary kernel as is;
* 'mean_abs': per output channel s_c = mean |W_c|, not differentiated
  (XNOR-Net; FDA-BNN);
* 'mean_abs_tensor': one s = mean |W| over the whole kernel (ReSTE);
* 'learned': a per-output-channel parameter multiplying the layer output,
  initialised uniformly in [0, 1) (the public BiPer code). In training it
  is folded into the kernel, conv(x, k) s_c = conv(x, k s_c).

The quantized kernel and input are sown into 'intermediates' for inspection.
Both operands are stored once (`xla_cpu.materialize`) for XLA:CPU.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any, Callable, Sequence

import jax
import jax.numpy as jnp
from flax import linen as nn

from fda_biper_jax import methods
from fda_biper_jax.xla_cpu import materialize

Array = jax.Array
SCALINGS = ("none", "mean_abs", "mean_abs_tensor", "learned")
PRENORM_EPS = 1e-5
REMOVED = methods.REMOVED_QUANTIZATION

# PyTorch's default conv/linear init, kaiming_uniform(a=sqrt(5)), i.e.
# U(-1/sqrt(fan_in), 1/sqrt(fan_in)), for layers used on their own; the zoo's
# models pass the initialisers of their reference code (models/blocks.py).
default_kernel_init = nn.initializers.variance_scaling(1.0 / 3.0, "fan_in", "uniform")


def resolve(spec) -> methods.Quantizer | methods.CallableQuantizer | None:
  """A layer's quantizer setting as a quantizer (None stays None)."""
  return None if spec is None else methods.get(spec)


def check_role(q, role: str, where: str) -> None:
  """Raises if a registered method does not binarize this operand (e.g. ReActNet's
  thresholds are for inputs)."""
  if isinstance(q, methods.Quantizer) and role not in q.method.roles:
    raise ValueError(f"{where}: quantizer {q.name!r} binarizes {list(q.method.roles)} only, "
                     f"not the {role}; choose another {role}_quantizer")


def check_scaling(scaling, where: str) -> None:
  if scaling not in SCALINGS:
    raise ValueError(f"{where}: scaling={scaling!r} is not allowed; allowed: {list(SCALINGS)}")


@dataclasses.dataclass(frozen=True)
class BinarySpec:
  """How a model binarizes its binary layers: the configuration they share.

  Built by `BinarySpec.create(**quantization)` from plain values (names,
  mappings); `config()` gives them back as a JSON-serialisable dict, saved
  with every checkpoint so evaluation uses the values training used.
  """
  kernel_quantizer: methods.Quantizer | None = None
  input_quantizer: methods.Quantizer | None = None
  scaling: str = "none"
  prenorm: bool = False

  @classmethod
  def create(cls, kernel_quantizer=None, input_quantizer=None, scaling="none",
             prenorm=False, **removed) -> "BinarySpec":
    for key in removed:
      if key in REMOVED:
        raise ValueError(methods.removed_layer_setting(key))
      raise TypeError(f"BinarySpec.create() got an unexpected keyword argument {key!r}")
    check_scaling(scaling, "BinarySpec")
    if not isinstance(prenorm, bool):
      raise ValueError(f"prenorm={prenorm!r} is not allowed; it must be True or False")
    kq, iq = resolve(kernel_quantizer), resolve(input_quantizer)
    check_role(kq, "kernel", "BinarySpec")
    check_role(iq, "input", "BinarySpec")
    return cls(kq, iq, scaling, prenorm)

  def layer_kwargs(self) -> dict[str, Any]:
    return {f.name: getattr(self, f.name) for f in dataclasses.fields(self)}

  def activation(self):
    """The activation module class the input quantizer's method prescribes after
    its binary layers (ReActNet's RPReLU), or None for the model's own."""
    q = self.input_quantizer
    return q.method.activation if isinstance(q, methods.Quantizer) else None

  def config(self) -> dict[str, Any]:
    c = self.layer_kwargs()
    for k in ("kernel_quantizer", "input_quantizer"):
      c[k] = None if c[k] is None else c[k].config()
    return c


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
  factor sum(x - mean) is zero); residuals are x and two scalars per sample.
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


def deployed_input(q, x: Array, aux, prenorm: bool) -> Array:
  """The deployed form of a layer input: q.binarize(x), after the prenorm when
  q's deployed form is not invariant to a positive scale."""
  if prenorm and not q.scale_invariant:
    x = prenormalize(x)
  return q.binarize(x, aux, "input")


def kernel_scale(scaling: str, w: Array) -> Array | None:
  """The per-output-channel weight scale of 'mean_abs' / 'mean_abs_tensor' scaling
  (float32 [Cout]); None for 'none' and 'learned' (a parameter)."""
  if scaling == "mean_abs":
    return jnp.mean(jnp.abs(w), axis=tuple(range(w.ndim - 1)))
  if scaling == "mean_abs_tensor":
    return jnp.full((w.shape[-1],), jnp.mean(jnp.abs(w)), w.dtype)
  return None


class _BinaryOperands(nn.Module):
  """Shared fields and operand quantization of BinaryConv and BinaryDense."""
  features: int
  kernel_quantizer: Any = None
  input_quantizer: Any = None
  scaling: str = "none"
  prenorm: bool = False
  use_bias: bool = False
  dtype: Any = None  # compute dtype (e.g. jnp.bfloat16); latent weights stay float32
  kernel_init: Callable = default_kernel_init

  def _check(self):
    where = type(self).__name__
    check_scaling(self.scaling, where)
    check_role(resolve(self.kernel_quantizer), "kernel", where)
    check_role(resolve(self.input_quantizer), "input", where)

  def _aux(self, q, role: str, shape) -> Any:
    """The learned parts of q for this operand (a parameter of the layer), or None."""
    if not q.has_aux(role):
      return None
    return self.param(f"{role}_{q.aux_name}", lambda key: q.init_aux(key, role, shape))

  def _quantize_input(self, x: Array, train: bool) -> Array:
    """The operand of the conv / dot, computed once (`materialize`)."""
    q = resolve(self.input_quantizer)
    x = x.astype(self.dtype) if self.dtype is not None else x
    if q is None:
      return materialize(x)
    aux = self._aux(q, "input", x.shape)
    if train:
      dtype = x.dtype
      if self.prenorm or aux is not None:
        # In float32 from one stored float32 x, cast to the compute dtype once: a float32
        # schedule value or learned part would otherwise promote the operand, and XLA:CPU
        # would convert x and its gradients again in every pass.
        x = materialize(x.astype(jnp.float32))
      if self.prenorm:
        x = prenormalize(x)
      y = q.quantize(x, aux, "input").astype(dtype)
    else:
      y = deployed_input(q, x, aux, self.prenorm)
    y = materialize(y)
    self.sow("intermediates", "input", y)
    return y

  def _quantize_kernel(self, w: Array, train: bool) -> Array:
    """Quantized kernel of latent w [..., features], per-channel scale included."""
    q = resolve(self.kernel_quantizer)
    if q is None:
      k = w
    else:
      aux = self._aux(q, "kernel", w.shape)
      if train:
        k = q.quantize(w, aux, "kernel")
        reg = q.regularizer(w)
        if reg is not None:
          self.sow("losses", "kernel_regularizer", reg)
      else:
        k = q.binarize(w, aux, "kernel")
    scale = kernel_scale(self.scaling, w)
    if scale is not None:
      k = k * jax.lax.stop_gradient(scale)
    if self.dtype is not None:
      k = k.astype(self.dtype)
    self.sow("intermediates", "kernel", k)
    return k

  def _learned_scale(self) -> Array | None:
    if self.scaling != "learned":
      return None
    return self.param("scale", nn.initializers.uniform(1.0), (self.features,), jnp.float32)

  def _operands(self, x: Array, w: Array, train: bool):
    """(xq, k, scale): the quantized operands; in training the learned scale is
    folded into k (conv(x, k) * s_c = conv(x, k s_c), per output
    channel) and scale is None: a multiply over the kernel instead of two
    passes over the activations (forward and backward) and a reduction for
    its gradient. In evaluation the output is scaled, as the deployed model."""
    xq = self._quantize_input(x, train)
    k = self._quantize_kernel(w, train)
    scale = self._learned_scale()
    if train and scale is not None:
      k, scale = k * scale.astype(k.dtype), None
    k = k.astype(xq.dtype)
    if self.kernel_quantizer is not None:
      # Stored once: else each consumer (the conv, the transposed copies for its
      # gradients) recomputes the quantizer.
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
  def __call__(self, x: Array, train: bool = False) -> Array:
    self._check()
    kh, kw = self.kernel_size
    w = self.param("kernel", self.kernel_init, (kh, kw, x.shape[-1], self.features),
                   jnp.float32)
    xq, k, scale = self._operands(x, w, train)
    pad = self.padding if isinstance(self.padding, str) else [(self.padding,) * 2] * 2
    y = jax.lax.conv_general_dilated(xq, k, tuple(self.strides), pad,
                                     dimension_numbers=("NHWC", "HWIO", "NHWC"))
    return self._finish(y, scale)


class BinaryDense(_BinaryOperands):
  """Dense layer (kernel [in, out]) with quantized kernel and input."""

  @nn.compact
  def __call__(self, x: Array, train: bool = False) -> Array:
    self._check()
    w = self.param("kernel", self.kernel_init, (x.shape[-1], self.features), jnp.float32)
    xq, k, scale = self._operands(x, w, train)
    return self._finish(jnp.dot(xq, k), scale)
