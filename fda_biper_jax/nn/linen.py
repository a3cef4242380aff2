"""Binary Flax Linen layers: `nn.Conv` and `nn.Dense` with quantized operands.

`BinaryConv` and `BinaryDense` take every argument of `flax.linen.Conv` /
`flax.linen.Dense` (same names, same order, same defaults but `kernel_size`,
which defaults to 3x3) and, in addition, quantize on each call their kernel
with `kernel_quantizer` and their input with `input_quantizer` (a registered
method's name or config mapping, a `methods.Quantizer`, or any callable; None
keeps the operand in full precision), in the manner of Larq's `QuantConv2D`
and qwix. A layer never knows which method it holds: it asks the quantizer
for its training forward (`quantize`), its deployed form (`binarize`), its
learned parts (kept as the layer's parameter `{role}_{aux_name}`, e.g. FDA's
`input_noise`) and its regulariser.

The mode must be given: `train=True` (training forward, surrogate gradients)
or `train=False` (the deployed form, which has no surrogate gradient), as a
call argument or a constructor field (bound by the model, as flax examples
bind BatchNorm's `use_running_average`); a layer with quantizers called with
neither raises, so it never trains silently through a gradient-less forward.

`full_precision` holds path patterns (fnmatch, over the layer's '/'-joined
module path): a layer whose path matches one computes in full precision
whatever its quantizers, so a model states "first and last layers stay full
precision" once, as a rule (`settings()` is the layer's effective setting).

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
the training step bound by `methods.training_step` (the trainer binds it
around the model call): a schedule never recompiles the step, and training
a scheduled quantizer with no step bound is an error, never a silent default.

Evaluation (`train=False`): the kernel is exactly `q.binarize(W)` times the
scale and the input exactly `q.binarize(a)`; the prenorm is skipped when the
deployed form ignores a positive scale (`scale_invariant`, true of sign).
Zero padding (and a `mask`) applies to the quantized operands: a padded tap
contributes 0, as in the packed XNOR inference.

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
import fnmatch
import math
from typing import Any, Callable, Sequence

import jax
import jax.numpy as jnp
from flax import linen as nn
from flax.linen.dtypes import promote_dtype

from fda_biper_jax import methods
from fda_biper_jax.xla_cpu import materialize

Array = jax.Array
SCALINGS = ("none", "mean_abs", "mean_abs_tensor", "learned")
PRENORM_EPS = 1e-5
REMOVED = methods.REMOVED_QUANTIZATION

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
  full_precision: tuple[str, ...] = ()

  @classmethod
  def create(cls, kernel_quantizer=None, input_quantizer=None, scaling="none",
             prenorm=False, full_precision=(), **removed) -> "BinarySpec":
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
    return cls(kq, iq, scaling, prenorm, check_patterns(full_precision, "BinarySpec"))

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
    c["full_precision"] = list(c["full_precision"])
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


def _tuple(x, n: int, name: str) -> tuple[int, ...]:
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


class BinaryLayer(nn.Module):
  """What BinaryConv and BinaryDense share: the mode, and the operands' quantization.

  Subclasses declare the fields (their flax counterpart's first, in its order,
  then `BINARY_FIELDS`).
  """

  def settings(self) -> Settings:
    """The effective quantization: none where the path matches `full_precision`."""
    where = type(self).__name__
    check_scaling(self.scaling, where)
    if not isinstance(self.prenorm, bool):
      raise ValueError(f"{where}: prenorm={self.prenorm!r} is not allowed; True or False")
    patterns = check_patterns(self.full_precision, where)
    if patterns and matches("/".join(str(p) for p in self.path), patterns):
      return Settings()
    kq, iq = resolve(self.kernel_quantizer), resolve(self.input_quantizer)
    check_role(kq, "kernel", where)
    check_role(iq, "input", where)
    return Settings(kq, iq, self.scaling, self.prenorm)

  def mode(self, train: bool | None, s: Settings) -> bool:
    """The call's `train`, else the field's; required when the layer quantizes."""
    mode = self.train if train is None else train
    if mode is None:
      if not s.quantized:
        return False
      raise ValueError(
          f"{type(self).__name__} {'/'.join(map(str, self.path)) or '(root)'}: the mode is not "
          "given: pass train=True (training forward, surrogate gradients) or train=False "
          "(the deployed form, no gradient through the quantizers) to the call or the layer")
    if not isinstance(mode, bool):
      raise ValueError(f"{type(self).__name__}: train={mode!r} is not allowed; True or False")
    return mode

  def aux(self, q, role: str, shape) -> Any:
    """The learned parts of q for this operand (a parameter of the layer), or None."""
    if not q.has_aux(role):
      return None
    return self.param(f"{role}_{q.aux_name}", lambda key: q.init_aux(key, role, shape))

  def quantize_input(self, x: Array, s: Settings, train: bool) -> Array:
    """The input operand, computed once (`materialize`)."""
    q = s.input_quantizer
    x = x.astype(self.dtype) if self.dtype is not None else x
    if q is None:
      return materialize(x)
    aux = self.aux(q, "input", x.shape)
    if train:
      dtype = x.dtype
      if s.prenorm or aux is not None:
        # In float32 from one stored float32 x, cast to the compute dtype once: a float32
        # schedule value or learned part would otherwise promote the operand, and XLA:CPU
        # would convert x and its gradients again in every pass.
        x = materialize(x.astype(jnp.float32))
      if s.prenorm:
        x = prenormalize(x)
      y = q.quantize(x, aux, "input").astype(dtype)
    else:
      y = deployed_input(q, x, aux, s.prenorm)
    y = materialize(y)
    self.sow("intermediates", "input", y)
    return y

  def quantize_kernel(self, w: Array, s: Settings, train: bool) -> Array:
    """The quantized kernel of latent w [..., features], 'mean_abs' scales and the mask
    applied (sown as 'kernel' in the compute dtype)."""
    q = s.kernel_quantizer
    if q is None:
      k = w
    else:
      aux = self.aux(q, "kernel", w.shape)
      if train:
        k = q.quantize(w, aux, "kernel")
        reg = q.regularizer(w)
        if reg is not None:
          self.sow("losses", "kernel_regularizer", reg)
      else:
        k = q.binarize(w, aux, "kernel")
    scale = kernel_scale(s.scaling, w)
    if scale is not None:
      k = k * jax.lax.stop_gradient(scale).astype(k.dtype)
    if self.mask is not None:
      k = k * self.mask
    self.sow("intermediates", "kernel", k if self.dtype is None else k.astype(self.dtype))
    return k

  def finish(self, y: Array, scale: Array | None, bias: Array | None) -> Array:
    if scale is not None:
      y = y * scale.astype(y.dtype)
    if bias is not None:
      y = y + jnp.reshape(bias, (1,) * (y.ndim - 1) + (-1,)).astype(y.dtype)
    return y

  def operands(self, x: Array, kernel_shape, s: Settings, train: bool):
    """(xq, k, scale, bias) in the compute dtype (`promote_dtype`), k stored once.

    The learned scale is folded into k in training (conv(x, k) s_c = conv(x, k s_c): a
    multiply over the kernel instead of passes over the activations) and returned to
    scale the output in evaluation, as the deployed model does."""
    k = self.quantize_kernel(
        self.param("kernel", self.kernel_init, kernel_shape, self.param_dtype), s, train)
    scale = None
    if s.scaling == "learned":
      scale = self.param("scale", nn.initializers.uniform(1.0), (self.features,),
                         self.param_dtype)
      if train:
        k, scale = k * scale.astype(k.dtype), None
    bias = (self.param("bias", self.bias_init, (self.features,), self.param_dtype)
            if self.use_bias else None)
    x, k, bias = self.promote_dtype(x, k, bias, dtype=self.dtype)
    if s.kernel_quantizer is not None:
      # Stored once: else each consumer (the conv, the transposed copies for its
      # gradients) recomputes the quantizer.
      k = materialize(k)
    return x, k, scale, bias


# Each layer declares its flax counterpart's fields first, in flax's order (so positional
# arguments mean what they mean there), then these: the lists cannot come from a shared
# base class, whose fields a dataclass would put first.
BINARY_FIELDS = ("kernel_quantizer", "input_quantizer", "scaling", "prenorm", "train",
                 "full_precision")


class BinaryConv(BinaryLayer):
  """`flax.linen.Conv` (channels last, N-D, grouped, dilated) with quantized operands.

  Fields: those of `nn.Conv`, then `kernel_quantizer`, `input_quantizer`,
  `scaling`, `prenorm`, `train` (the mode, if bound here) and `full_precision`
  (path patterns). Zero padding and the mask apply to the quantized operands.
  """
  features: int
  kernel_size: int | Sequence[int] = (3, 3)
  strides: int | Sequence[int] | None = 1
  padding: PaddingLike = "SAME"
  input_dilation: int | Sequence[int] | None = 1
  kernel_dilation: int | Sequence[int] | None = 1
  feature_group_count: int = 1
  use_bias: bool = True
  mask: Array | None = None
  dtype: Any = None
  param_dtype: Any = jnp.float32
  precision: Any = None
  kernel_init: Callable = nn.linear.default_kernel_init
  bias_init: Callable = nn.initializers.zeros_init()
  promote_dtype: Callable = promote_dtype
  conv_general_dilated: Callable | None = None
  conv_general_dilated_cls: Any = None
  kernel_quantizer: Any = None
  input_quantizer: Any = None
  scaling: str = "none"
  prenorm: bool = False
  train: bool | None = None
  full_precision: Sequence[str] = ()

  def geometry(self, input_shape) -> ConvGeometry:
    kernel_size = ((self.kernel_size,) if isinstance(self.kernel_size, int)
                   else tuple(self.kernel_size))
    rank = len(kernel_size)
    return ConvGeometry(kernel_size, _tuple(self.strides, rank, "strides"),
                        canonical_padding(self.padding, rank),
                        _tuple(self.input_dilation, rank, "input_dilation"),
                        _tuple(self.kernel_dilation, rank, "kernel_dilation"),
                        self.feature_group_count,
                        tuple(input_shape[:len(input_shape) - rank - 1]))

  @nn.compact
  def __call__(self, inputs: Array, train: bool | None = None) -> Array:
    s = self.settings()
    mode = self.mode(train, s)
    g = self.geometry(inputs.shape)
    x = self.quantize_input(g.flatten(inputs), s, mode)  # before padding: a padded tap is 0
    x, padding = g.pad(x)
    g = dataclasses.replace(g, padding=padding)
    x, k, scale, bias = self.operands(x, g.kernel_shape(x.shape[-1], self.features), s, mode)
    if self.conv_general_dilated_cls is not None:
      conv = self.conv_general_dilated_cls()
    else:
      conv = self.conv_general_dilated or jax.lax.conv_general_dilated
    y = self.finish(g.conv(conv, x, k, self.precision), scale, bias)
    return g.unflatten(y)


class BinaryDense(BinaryLayer):
  """`flax.linen.Dense` (over the last axis) with quantized operands.

  Fields: those of `nn.Dense`, then `kernel_quantizer`, `input_quantizer`,
  `scaling`, `prenorm`, `train` and `full_precision`, as `BinaryConv`.
  """
  features: int
  use_bias: bool = True
  dtype: Any = None
  param_dtype: Any = jnp.float32
  precision: Any = None
  kernel_init: Callable = nn.linear.default_kernel_init
  bias_init: Callable = nn.initializers.zeros_init()
  promote_dtype: Callable = promote_dtype
  dot_general: Callable | None = None
  dot_general_cls: Any = None
  kernel_quantizer: Any = None
  input_quantizer: Any = None
  scaling: str = "none"
  prenorm: bool = False
  train: bool | None = None
  full_precision: Sequence[str] = ()
  mask = None  # nn.Dense has no mask

  @nn.compact
  def __call__(self, inputs: Array, train: bool | None = None) -> Array:
    s = self.settings()
    mode = self.mode(train, s)
    x = self.quantize_input(inputs, s, mode)
    x, k, scale, bias = self.operands(x, (x.shape[-1], self.features), s, mode)
    if self.dot_general_cls is not None:
      dot = self.dot_general_cls()
    else:
      dot = self.dot_general or jax.lax.dot_general
    y = dot(x, k, (((x.ndim - 1,), (0,)), ((), ())), precision=self.precision)
    return self.finish(y, scale, bias)
