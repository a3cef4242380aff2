"""The operands of a binary layer, shared by the Linen and NNX layers.

Quantization is a property of a layer's operands: its kernel and its input.
The functions here compute them from a layer's settings (`Settings`: the
resolved quantizers, the weight scaling, the input prenorm), whatever
framework holds the parameters: `input_operand` and `kernel_operand` are
pure functions of the operand, the learned parts (`aux`) and the mode.

Training (`train=True`), for an operand t with quantizer q:

* kernel: q's training forward of W (learned parts included), times the
  'mean_abs' scale; the method's weighted regulariser is returned beside it;
* input: with `prenorm`, each sample is first divided by its own standard
  deviation over all axes but the batch (ReCU / BiPer: a / sqrt(var + 1e-5));
  then q's training forward. With prenorm or learned parts, the input
  quantization runs in float32 whatever the compute dtype, then is cast to
  it once.

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

Both operands are stored once (`xla_cpu.materialize`) for XLA:CPU.
"""

from __future__ import annotations

import dataclasses
import fnmatch
import math
from typing import Any, Sequence

import jax
import jax.numpy as jnp

from fda_biper_jax import methods
from fda_biper_jax.xla_cpu import materialize

Array = jax.Array

SCALINGS = ("none", "mean_abs", "mean_abs_tensor", "learned")
PRENORM_EPS = 1e-5

PaddingLike = str | int | Sequence[int | tuple[int, int]]
PADDINGS = ("SAME", "VALID", "CIRCULAR", "REFLECT", "CAUSAL")


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


def check_patterns(patterns, where: str) -> tuple[str, ...]:
  """Path patterns as a tuple of strings (a single string is one pattern)."""
  if isinstance(patterns, str):
    patterns = (patterns,)
  patterns = tuple(patterns or ())
  if not all(isinstance(p, str) and p for p in patterns):
    raise ValueError(f"{where}: full_precision={patterns!r} is not allowed; path patterns "
                     "such as ('stem/*', 'head/*') are required")
  return patterns


def matches(path: str, patterns: Sequence[str]) -> bool:
  """Whether a '/'-joined module path matches any fnmatch pattern."""
  return any(fnmatch.fnmatchcase(path, p) for p in patterns)


@dataclasses.dataclass(frozen=True)
class Settings:
  """A layer's effective quantization, after its `full_precision` rule."""
  kernel_quantizer: Any = None
  input_quantizer: Any = None
  scaling: str = "none"
  prenorm: bool = False

  @property
  def quantized(self) -> bool:
    return self.kernel_quantizer is not None or self.input_quantizer is not None

  @property
  def binary(self) -> bool:
    """A binary layer: its deployed kernel takes exactly two values (times a scale)."""
    return self.kernel_quantizer is not None and self.kernel_quantizer.is_binary

  @property
  def binary_input(self) -> bool:
    return self.input_quantizer is not None and self.input_quantizer.is_binary


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


def tuple_per_axis(x, n: int, name: str) -> tuple[int, ...]:
  """An int (or None: 1) as one per spatial axis; a sequence checked for length n."""
  if x is None:
    x = 1
  if isinstance(x, int):
    return (x,) * n
  x = tuple(x)
  if len(x) != n:
    raise ValueError(f"{name}={x!r} does not fit a {n}-D kernel")
  return x


def canonical_padding(padding, rank: int):
  """'SAME' / 'VALID' / 'CIRCULAR' / 'REFLECT' / 'CAUSAL', or [(lo, hi)] * rank (flax's forms:
  an int, or a sequence of ints or pairs, one per spatial axis)."""
  if isinstance(padding, str):
    if padding.upper() not in PADDINGS:
      raise ValueError(f"padding={padding!r} is not allowed; allowed: {list(PADDINGS)}, an int "
                       "or one int or (low, high) pair per spatial axis")
    return padding.upper()
  if isinstance(padding, int):
    return [(padding, padding)] * rank
  pads = [((p, p) if isinstance(p, int) else tuple(p)) for p in padding]
  if len(pads) != rank or not all(len(p) == 2 for p in pads):
    raise ValueError(f"padding={padding!r} is not allowed; one int or (low, high) pair per "
                     f"spatial axis ({rank}) is required")
  return pads


def dimension_numbers(ndim: int) -> jax.lax.ConvDimensionNumbers:
  """Channels-last input and output, [*spatial, in, out] kernel (flax's convention)."""
  lhs = (0, ndim - 1) + tuple(range(1, ndim - 1))
  rhs = (ndim - 1, ndim - 2) + tuple(range(0, ndim - 2))
  return jax.lax.ConvDimensionNumbers(lhs, rhs, lhs)


@dataclasses.dataclass(frozen=True)
class ConvGeometry:
  """A BinaryConv's convolution, canonical: tuples per spatial axis, the padding as
  lax takes it (a string or (low, high) pairs), and the input's batch shape."""
  kernel_size: tuple[int, ...]
  strides: tuple[int, ...]
  padding: Any
  input_dilation: tuple[int, ...]
  kernel_dilation: tuple[int, ...]
  groups: int
  batch_shape: tuple[int, ...]

  @classmethod
  def of(cls, kernel_size, strides, padding, input_dilation, kernel_dilation, groups: int,
         input_shape) -> "ConvGeometry":
    """The canonical geometry of a conv layer's fields (flax's forms) on an input shape."""
    kernel_size = (kernel_size,) if isinstance(kernel_size, int) else tuple(kernel_size)
    rank = len(kernel_size)
    return cls(kernel_size, tuple_per_axis(strides, rank, "strides"),
               canonical_padding(padding, rank),
               tuple_per_axis(input_dilation, rank, "input_dilation"),
               tuple_per_axis(kernel_dilation, rank, "kernel_dilation"), groups,
               tuple(input_shape[:len(input_shape) - rank - 1]))

  @property
  def rank(self) -> int:
    return len(self.kernel_size)

  def flatten(self, x: Array) -> Array:
    """x with its batch axes as one leading axis (none: a batch of one)."""
    return jnp.reshape(x, (-1, *x.shape[len(self.batch_shape):]))

  def unflatten(self, y: Array) -> Array:
    return jnp.reshape(y, (*self.batch_shape, *y.shape[1:]))

  def pad(self, x: Array) -> tuple[Array, Any]:
    """(x, padding): CIRCULAR / REFLECT / CAUSAL applied to x (then 'VALID'), as flax does."""
    if self.padding not in ("CIRCULAR", "REFLECT", "CAUSAL"):
      return x, self.padding
    dilated = [(k - 1) * d + 1 for k, d in zip(self.kernel_size, self.kernel_dilation)]
    if self.padding == "CAUSAL":
      if self.rank != 1:
        raise ValueError("BinaryConv: CAUSAL padding is for 1-D convolutions only")
      pads, mode = [(dilated[0] - 1, 0)], "constant"
    else:
      pads = [((k - 1) // 2, k // 2) for k in dilated]
      mode = {"CIRCULAR": "wrap", "REFLECT": "reflect"}[self.padding]
    return jnp.pad(x, [(0, 0), *pads, (0, 0)], mode=mode), "VALID"

  def kernel_shape(self, in_features: int, features: int) -> tuple[int, ...]:
    if in_features % self.groups or features % self.groups:
      raise ValueError(f"BinaryConv: feature_group_count={self.groups} must divide the input "
                       f"channels ({in_features}) and features ({features})")
    return (*self.kernel_size, in_features // self.groups, features)

  def conv(self, fn, x: Array, k: Array, precision=None) -> Array:
    """fn (lax.conv_general_dilated's signature) of x and k with this geometry."""
    return fn(x, k, self.strides, self.padding, lhs_dilation=self.input_dilation,
              rhs_dilation=self.kernel_dilation, dimension_numbers=dimension_numbers(x.ndim),
              feature_group_count=self.groups, precision=precision)




def input_operand(q, x: Array, aux, *, prenorm: bool, train: bool) -> Array:
  """The input operand of x (already in the compute dtype), stored once."""
  if q is None:
    return materialize(x)
  if train:
    dtype = x.dtype
    if prenorm or aux is not None:
      # In float32 from one stored float32 x, cast to the compute dtype once: a float32
      # schedule value or learned part would otherwise promote the operand, and XLA:CPU
      # would convert x and its gradients again in every pass.
      x = materialize(x.astype(jnp.float32))
    if prenorm:
      x = prenormalize(x)
    y = q.quantize(x, aux, "input").astype(dtype)
  else:
    y = deployed_input(q, x, aux, prenorm)
  return materialize(y)


def kernel_operand(q, w: Array, aux, *, scaling: str, train: bool) -> tuple[Array, Array | None]:
  """(k, regulariser): the quantized kernel of latent w [..., features] with its
  'mean_abs' scale, and in training the method's weighted regulariser (or None)."""
  reg = None
  if q is None:
    k = w
  elif train:
    k = q.quantize(w, aux, "kernel")
    reg = q.regularizer(w)
  else:
    k = q.binarize(w, aux, "kernel")
  scale = kernel_scale(scaling, w)
  if scale is not None:
    k = k * jax.lax.stop_gradient(scale).astype(k.dtype)
  return k, reg


def init_learned_scale(key, features: int, dtype=jnp.float32) -> Array:
  """The 'learned' scale's initial value: uniform in [0, 1) (the public BiPer code)."""
  return jax.random.uniform(key, (features,), dtype)
