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

What the operands are in training and in evaluation, the prenorm and the
weight scalings: `fda_biper_jax.nn.core`, shared with the NNX layers.
Scheduled method parameters (FDA's series length, BNN++'s slope, ...) are
evaluated at the training step bound by `methods.training_step` (the trainer
binds it around the model call): a schedule never recompiles the step, and
training a scheduled quantizer with no step bound is an error, never a
silent default. A method's weighted regulariser is sown into the 'losses'
collection, which the trainer adds to the loss; the quantized kernel and
input are sown into 'intermediates' for inspection.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Callable, Sequence

import jax
import jax.numpy as jnp
from flax import linen as nn
from flax.linen.dtypes import promote_dtype

from fda_biper_jax import methods
from fda_biper_jax.xla_cpu import materialize
from fda_biper_jax.nn.core import (PRENORM_EPS, SCALINGS, ConvGeometry, PaddingLike, Settings,
                                   check_patterns, check_role, check_scaling, deployed_input,
                                   init_learned_scale, input_operand, kernel_operand, kernel_scale,
                                   matches, prenormalize, resolve)

Array = jax.Array
REMOVED = methods.REMOVED_QUANTIZATION


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
    """The input operand (`core.input_operand`), sown as 'input'."""
    x = x.astype(self.dtype) if self.dtype is not None else x
    q = s.input_quantizer
    aux = None if q is None else self.aux(q, "input", x.shape)
    y = input_operand(q, x, aux, prenorm=s.prenorm, train=train)
    if q is not None:
      self.sow("intermediates", "input", y)
    return y

  def quantize_kernel(self, w: Array, s: Settings, train: bool) -> Array:
    """The quantized kernel (`core.kernel_operand`), the mask applied, sown as 'kernel' in
    the compute dtype; the regulariser sown into 'losses'."""
    q = s.kernel_quantizer
    aux = None if q is None else self.aux(q, "kernel", w.shape)
    k, reg = kernel_operand(q, w, aux, scaling=s.scaling, train=train)
    if reg is not None:
      self.sow("losses", "kernel_regularizer", reg)
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
      scale = self.param("scale", init_learned_scale, self.features, self.param_dtype)
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
    return ConvGeometry.of(self.kernel_size, self.strides, self.padding, self.input_dilation,
                           self.kernel_dilation, self.feature_group_count, input_shape)

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
