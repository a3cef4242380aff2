"""Binary Flax NNX layers: `nnx.Conv` and `nnx.Linear` with quantized operands.

`BinaryConv` and `BinaryLinear` subclass `flax.nnx.Conv` / `flax.nnx.Linear`
(every argument theirs, the parameters `kernel` and `bias` theirs) and take,
in addition, `kernel_quantizer`, `input_quantizer`, `scaling` and `prenorm`,
computing their operands with the same core as the Linen layers
(`fda_biper_jax.nn.core`): for the same weights a Linen and an NNX layer give
the same outputs and gradients. A method's learned parts are the layer's
`nnx.Param`s `{role}_{aux_name}` (FDA's `input_noise`, ReActNet's
`input_threshold`), the learned scale is `scale`.

The mode is NNX's: `deterministic=False` trains (the surrogate gradients),
`True` deploys; `model.train()` and `model.eval()` set it with dropout's and
BatchNorm's. A layer with quantizers and no mode set raises when called. A
method's weighted regulariser is sown as a `Regularizer` variable;
`pop_regularizers(model)` returns their sum (and clears them) for the loss.
Scheduled method parameters read the step bound by
`fda_biper_jax.training_step`, as in Linen.
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
from flax import nnx

from fda_biper_jax.nn.core import (ConvGeometry, Settings, check_role, check_scaling,
                                   init_learned_scale, input_operand, kernel_operand, resolve)
from fda_biper_jax.xla_cpu import materialize

Array = jax.Array


class Regularizer(nnx.Variable):
  """A method's weighted weight regulariser, sown by a binary layer in training."""


def pop_regularizers(model: nnx.Module) -> Array:
  """The sum of the regularisers the layers sowed in the last training call (removed)."""
  leaves = jax.tree.leaves(nnx.pop(model, Regularizer))
  return sum(leaves) if leaves else jnp.zeros((), jnp.float32)


class BinaryOperands:
  """What BinaryConv and BinaryLinear add to their NNX layer: quantizers and mode."""

  def init_binary(self, kernel_quantizer, input_quantizer, scaling: str, prenorm: bool,
                  deterministic: bool | None, in_features: int, rngs: nnx.Rngs) -> None:
    where = type(self).__name__
    check_scaling(scaling, where)
    if not isinstance(prenorm, bool):
      raise ValueError(f"{where}: prenorm={prenorm!r} is not allowed; True or False")
    self.kernel_quantizer = resolve(kernel_quantizer)
    self.input_quantizer = resolve(input_quantizer)
    check_role(self.kernel_quantizer, "kernel", where)
    check_role(self.input_quantizer, "input", where)
    self.scaling, self.prenorm, self.deterministic = scaling, prenorm, deterministic
    if scaling == "learned":
      self.scale = nnx.Param(init_learned_scale(rngs.params(), self.out_features,
                                                self.param_dtype))
    for role, q, shape in (("kernel", self.kernel_quantizer, self.kernel_shape),
                           ("input", self.input_quantizer, (in_features,))):
      if q is not None and q.has_aux(role):
        parts = jax.tree.map(nnx.Param, q.init_aux(rngs.params(), role, shape))
        setattr(self, f"{role}_{q.aux_name}", nnx.data(parts))

  def settings(self) -> Settings:
    return Settings(self.kernel_quantizer, self.input_quantizer, self.scaling, self.prenorm)

  def mode(self, s: Settings) -> bool:
    """True to train: `deterministic` False; required when the layer quantizes."""
    if self.deterministic is None:
      if not s.quantized:
        return False
      raise ValueError(f"{type(self).__name__}: the mode is not set: deterministic=False (or "
                       "model.train()) trains with the surrogate gradients, deterministic=True "
                       "(or model.eval()) runs the deployed form")
    return not self.deterministic

  def aux(self, q, role: str):
    if q is None or not q.has_aux(role):
      return None
    return jax.tree.map(lambda p: p[...], getattr(self, f"{role}_{q.aux_name}"),
                        is_leaf=lambda p: isinstance(p, nnx.Variable))

  def operands(self, x: Array, s: Settings, train: bool):
    """(xq, k, scale, bias) in the compute dtype, as the Linen layer's."""
    x = x.astype(self.dtype) if self.dtype is not None else x
    xq = input_operand(s.input_quantizer, x, self.aux(s.input_quantizer, "input"),
                       prenorm=s.prenorm, train=train)
    k, reg = kernel_operand(s.kernel_quantizer, self.kernel[...],
                            self.aux(s.kernel_quantizer, "kernel"), scaling=s.scaling,
                            train=train)
    if reg is not None:
      self.sow(Regularizer, "kernel_regularizer", reg)
    if getattr(self, "mask", None) is not None:
      k = k * self.mask
    scale = self.scale[...] if s.scaling == "learned" else None
    if train and scale is not None:
      k, scale = k * scale.astype(k.dtype), None
    bias = self.bias[...] if self.use_bias else None
    xq, k, bias = self.promote_dtype((xq, k, bias), dtype=self.dtype)
    if s.kernel_quantizer is not None:
      k = materialize(k)
    return xq, k, scale, bias

  @staticmethod
  def finish(y: Array, scale: Array | None, bias: Array | None) -> Array:
    if scale is not None:
      y = y * scale.astype(y.dtype)
    if bias is not None:
      y = y + jnp.reshape(bias, (1,) * (y.ndim - 1) + (-1,)).astype(y.dtype)
    return y


class BinaryConv(BinaryOperands, nnx.Conv):
  """`flax.nnx.Conv` with quantized kernel and input (module docstring)."""

  def __init__(self, in_features: int, out_features: int, kernel_size, strides=1, *,
               kernel_quantizer=None, input_quantizer=None, scaling: str = "none",
               prenorm: bool = False, deterministic: bool | None = None,
               rngs: nnx.Rngs, **conv_kwargs: Any):
    nnx.Conv.__init__(self, in_features, out_features, kernel_size, strides, rngs=rngs,
                      **conv_kwargs)
    self.init_binary(kernel_quantizer, input_quantizer, scaling, prenorm, deterministic,
                     in_features, rngs)

  def __call__(self, inputs: Array) -> Array:
    s = self.settings()
    train = self.mode(s)
    g = ConvGeometry.of(self.kernel_size, self.strides, self.padding, self.input_dilation,
                        self.kernel_dilation, self.feature_group_count, inputs.shape)
    x, k, scale, bias = self.operands(g.flatten(inputs), s, train)
    x, padding = g.pad(x)
    g = ConvGeometry(g.kernel_size, g.strides, padding, g.input_dilation, g.kernel_dilation,
                     g.groups, g.batch_shape)
    y = g.conv(self.conv_general_dilated, x, k, self.precision)
    return g.unflatten(self.finish(y, scale, bias))


class BinaryLinear(BinaryOperands, nnx.Linear):
  """`flax.nnx.Linear` with quantized kernel and input (module docstring)."""

  def __init__(self, in_features: int, out_features: int, *, kernel_quantizer=None,
               input_quantizer=None, scaling: str = "none", prenorm: bool = False,
               deterministic: bool | None = None, rngs: nnx.Rngs, **linear_kwargs: Any):
    nnx.Linear.__init__(self, in_features, out_features, rngs=rngs, **linear_kwargs)
    self.kernel_shape = (in_features, out_features)
    self.init_binary(kernel_quantizer, input_quantizer, scaling, prenorm, deterministic,
                     in_features, rngs)

  def __call__(self, inputs: Array) -> Array:
    s = self.settings()
    x, k, scale, bias = self.operands(inputs, s, self.mode(s))
    y = self.dot_general(x, k, (((x.ndim - 1,), (0,)), ((), ())), precision=self.precision)
    return self.finish(y, scale, bias)
