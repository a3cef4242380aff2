"""Binarize an existing Linen model by rules, without editing its code.

    model = binarize(ResNet(...), jnp.zeros((1, 32, 32, 3)), kernel_quantizer="biper",
                     input_quantizer="approx_sign", scaling="learned", prenorm=True)
    variables = model.init(key, x, train=False)
    logits, updates = model.apply(variables, x, train=True, mutable=["batch_stats", "losses"])

In the spirit of qwix's `quantize_model`: the model's `nn.Conv` and
`nn.Dense` calls are intercepted (`flax.linen.intercept_methods`) and run as
`BinaryConv` / `BinaryDense` with the same fields, bound to the same scope,
so the parameters keep their paths (a float checkpoint of the model loads
into the binarized one; the binary layers add only their methods' learned
parts and scales). Which layers are binarized is a rule over module paths:
`include` patterns (fnmatch; default every conv and dense), minus
`full_precision` patterns, which default to the first and the last layer
called (found by tracing the model once on the example inputs, nothing
computed), as BNNs keep their first and last layers in full precision.

The mode: `train=True` (training forward, surrogate gradients) or `False`
(the deployed form) must be given to the call; it is passed on to the model
too when the model's own `__call__` takes `train` (BatchNorm, dropout).
"""

from __future__ import annotations

import inspect
from typing import Any, Sequence

import jax
import jax.numpy as jnp
from flax import linen as nn

from fda_biper_jax.nn.linen import BinaryConv, BinaryDense, BinarySpec, matches

# The flax layers replaced, with their binary counterparts (exact types: ConvLocal,
# ConvTranspose and DenseGeneral are other layers).
REPLACED = ((nn.Conv, BinaryConv), (nn.Dense, BinaryDense))


def replacement(module: nn.Module):
  """The binary layer class for a flax layer, or None."""
  return next((b for f, b in REPLACED if type(module) is f), None)


def flax_fields(module: nn.Module) -> dict[str, Any]:
  """The dataclass fields of a flax layer, as keywords of its binary counterpart."""
  return {name: getattr(module, name) for name in module.__dataclass_fields__
          if name not in ("parent", "name")}


class Binarized(nn.Module):
  """A Linen model whose matching conv and dense layers run binarized (module docstring).

  Attributes:
    model: the wrapped model (unchanged; its parameters are this module's).
    spec: the quantization of the binarized layers; its `full_precision` holds
      the patterns of the layers kept in full precision.
    include: path patterns of the layers to binarize.
  """
  model: nn.Module
  spec: BinarySpec
  include: tuple[str, ...] = ("*",)

  def setup(self):
    nn.share_scope(self, self.model)

  def binarized(self, module: nn.Module) -> bool:
    path = "/".join(str(p) for p in module.path)
    return (replacement(module) is not None and matches(path, self.include)
            and not matches(path, self.spec.full_precision))

  def __call__(self, *args, train: bool | None = None, **kwargs):
    if train is not None and _takes(self.model, "train"):
      kwargs["train"] = train

    def interceptor(next_fun, call_args, call_kwargs, context):
      module = context.module
      if context.method_name != "__call__" or not self.binarized(module):
        return next_fun(*call_args, **call_kwargs)
      layer = replacement(module)(**flax_fields(module), **self.spec.layer_kwargs(), train=train,
                                  parent=module.scope)
      return layer(*call_args, **call_kwargs)

    with nn.intercept_methods(interceptor):
      return self.model(*args, **kwargs)


def _takes(model: nn.Module, arg: str) -> bool:
  try:
    return arg in inspect.signature(model.__call__).parameters
  except (TypeError, ValueError):
    return False


def layer_paths(model: nn.Module, *args, **kwargs) -> list[str]:
  """The paths of the model's convs and dense layers, in call order (traced, nothing
  runs), on example inputs `args` (arrays or ShapeDtypeStructs)."""
  found: list[str] = []

  def interceptor(next_fun, call_args, call_kwargs, context):
    if context.method_name == "__call__" and replacement(context.module) is not None:
      path = "/".join(str(p) for p in context.module.path)
      if path not in found:
        found.append(path)
    return next_fun(*call_args, **call_kwargs)

  def init(*a):
    with nn.intercept_methods(interceptor):
      return model.init(jax.random.key(0), *a, **kwargs)

  jax.eval_shape(init, *[jax.ShapeDtypeStruct(jnp.shape(a), jnp.result_type(a)) for a in args])
  return found


def binarize(model: nn.Module, *example_args, kernel_quantizer="ste", input_quantizer=None,
             scaling: str = "none", prenorm: bool = False, include: Sequence[str] = ("*",),
             full_precision: Sequence[str] | None = None, **example_kwargs) -> Binarized:
  """`model` with its conv and dense layers binarized by rule (module docstring).

  Args:
    model: a Linen model built from `nn.Conv` / `nn.Dense` (any other layer is
      left as it is).
    *example_args, **example_kwargs: example inputs of the model's call (e.g. a
      batch of zeros; `train=False` is passed when the model takes `train`),
      used to find the first and last layers; only when `full_precision` is None.
    kernel_quantizer, input_quantizer, scaling, prenorm: the binarized layers'
      quantization (`BinaryConv`'s fields).
    include: path patterns of the layers to binarize (default: all).
    full_precision: path patterns kept in full precision (default: the first
      and the last layer called).
  """
  if full_precision is None:
    if not example_args:
      raise ValueError("binarize: give example inputs (to find the first and last layers) "
                       "or full_precision=[path patterns]")
    if _takes(model, "train"):
      example_kwargs.setdefault("train", False)
    paths = layer_paths(model, *example_args, **example_kwargs)
    full_precision = tuple(dict.fromkeys([paths[0], paths[-1]])) if paths else ()
  spec = BinarySpec.create(kernel_quantizer=kernel_quantizer, input_quantizer=input_quantizer,
                           scaling=scaling, prenorm=prenorm, full_precision=full_precision)
  return Binarized(model, spec, tuple(include))
