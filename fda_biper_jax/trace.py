"""The model tracer: which modules a model calls, with what shapes and quantizers.

`calls(model, input_shape)` traces the model (its `init`, or its `apply`
when variables are given) under `jax.eval_shape`, so no arithmetic runs and
no weights are allocated, with `flax.linen.intercept_methods` recording
every module call in order: its '/'-joined path, the module, the input and
output shapes. Summaries, the analysis, the trainer's logs and the exporter
read a model through it.

`settings(module)` is a layer's effective quantization (its quantizers
after its `full_precision` rule; None for any other module) and
`is_binary(module)` the one answer to "is this layer binary": a binary layer
whose kernel quantizer's deployed form takes exactly two values. Both need a
bound module, as the tracer records. `binary_layers` keeps the binary
layers; `quantizers` lists the distinct quantizers a model holds, labelled
'{role}/{name}', for logging their scheduled values.
"""

from __future__ import annotations

import dataclasses
import inspect
from typing import Any, Mapping, Sequence

import jax
import jax.numpy as jnp
from flax import linen as nn

from fda_biper_jax import methods
from fda_biper_jax.nn import linen as layers

LAYER_TYPES = (layers.BinaryLayer,)


@dataclasses.dataclass(frozen=True)
class Call:
  """One module call: path ('' for the root), module, input and output shapes
  (batch axis included), and the path's parts (the module's Flax path)."""
  path: str
  module: nn.Module
  input_shape: tuple | None
  output_shape: tuple | None
  parts: tuple = ()


def _shape(x) -> tuple | None:
  s = getattr(x, "shape", None)
  return None if s is None else tuple(int(d) for d in s)


def _accepts(model: nn.Module, arg: str) -> bool:
  try:
    return arg in inspect.signature(model.__call__).parameters
  except (TypeError, ValueError):
    return False


def calls(model: nn.Module, input_shape: Sequence[int], *, variables=None, batch_size: int = 1,
          dtype=jnp.float32, **apply_kwargs) -> tuple[list[Call], Any]:
  """([Call, ...] in call order, the variables' shapes) of one traced forward.

  `input_shape` is one example's shape (e.g. (32, 32, 3)). Without
  `variables` the model's `init` is traced; with them, its `apply`.
  `train=False` is passed when the model takes `train` and none is given.
  """
  shape = tuple(int(d) for d in input_shape)
  if any(d <= 0 for d in shape):
    raise ValueError(f"input_shape={shape} is not allowed; every dimension must be positive")
  if "train" not in apply_kwargs and _accepts(model, "train"):
    apply_kwargs["train"] = False
  found: list[Call] = []

  def interceptor(next_fun, args, kwargs, context):
    start = len(found)
    out = next_fun(*args, **kwargs)
    if context.method_name == "__call__":
      parts = tuple(context.module.path)
      # A call replaced by another module at the same path (`binarize` runs a flax conv as
      # a BinaryConv in its scope) is that module's call: the outer one is not recorded.
      if any(c.parts == parts for c in found[start:]):
        return out
      x = args[0] if args else next(iter(kwargs.values()), None)
      found.append(Call("/".join(str(p) for p in parts), context.module, _shape(x), _shape(out),
                        parts))
    return out

  def run(v, x):
    with nn.intercept_methods(interceptor):
      if v is None:
        key = jax.random.key(0)
        return model.init({"params": key, "dropout": key}, x, **apply_kwargs)
      return model.apply(v, x, **apply_kwargs)

  x = jax.ShapeDtypeStruct((batch_size, *shape), dtype)
  out = jax.eval_shape(run, variables, x)
  return found, out


def settings(module) -> layers.Settings | None:
  """A (bound) binary layer's effective quantization; None for other modules."""
  return module.settings() if isinstance(module, LAYER_TYPES) else None


def is_binary(module) -> bool:
  """Whether a (bound) module is a binary layer: a BinaryConv / BinaryDense whose
  effective kernel quantizer deploys to exactly two values."""
  s = settings(module)
  return s is not None and s.binary


def binary_layers(model: nn.Module, input_shape: Sequence[int], *, analysis: bool = False
                  ) -> dict[str, nn.Module]:
  """{path: layer} of the binary layers, in call order (first call).

  With `analysis`, also the layers whose kernel quantizer has a binary view
  (BiPer's stage-1 sine, binarized by stage 2); see `kernel_binarizer`.
  """
  out: dict[str, nn.Module] = {}
  for c in calls(model, input_shape)[0]:
    if c.path in out:
      continue
    if is_binary(c.module) or (analysis and kernel_binarizer(c.module) is not None):
      out[c.path] = c.module
  return out


def kernel_binarizer(module) -> methods.Quantizer | None:
  """The binarizer the analysis studies for a layer's kernel (None: not binarized):
  the kernel quantizer's method's `binary_view`."""
  s = settings(module)
  q = None if s is None else s.kernel_quantizer
  if q is None:
    return None
  if not isinstance(q, methods.Quantizer):
    return q if q.is_binary else None
  return q.method.binary_view(q)


def quantizers(model: nn.Module, input_shape: Sequence[int]) -> dict[str, Any]:
  """The distinct quantizers of a model's layers, labelled '{role}/{name}'.

  A second, different quantizer under a label already taken is labelled
  '{role}/{name}@{layer path}'.
  """
  out: dict[str, Any] = {}
  for c in calls(model, input_shape)[0]:
    s = settings(c.module)
    if s is None:
      continue
    for role in ("kernel", "input"):
      q = getattr(s, f"{role}_quantizer")
      if q is None:
        continue
      label = f"{role}/{q.name}"
      if label in out and out[label] != q:
        label = f"{label}@{c.path}"
      out.setdefault(label, q)
  return out


def scheduled_values(quantizer_map: Mapping[str, Any], progress) -> dict[str, jax.Array]:
  """{'{label}/{parameter}': value at `progress`} of every scheduled parameter."""
  return {f"{label}/{k}": v for label, q in quantizer_map.items()
          for k, v in q.scheduled_values(progress).items()}
