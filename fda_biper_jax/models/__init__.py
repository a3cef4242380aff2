"""The model zoo: the architectures of the public BiPer and FDA-BNN code.

==============  ==========================================  ==============
name            source                                      published
==============  ==========================================  ==============
resnet18_cifar  ReCU / BiPer `resnet18_1w1a` (CIFAR)        11.01M
resnet20        BiPer `resnet20_1w1a` (Bi-Real layout)      0.27M
resnet20_fda    FDA-BNN MindSpore ResNet-20 (PReLU)         -
vgg_small       IR-Net / ReCU / BiPer `vgg_small_1w1a`      4.66M
resnet18        ReCU / BiPer ImageNet `resnet18_1w1a`       11.69M
resnet34        ReCU / BiPer ImageNet `resnet34_1w1a`       21.81M
vit_tiny        `vit.ViT`: DeiT-style, binarized as PC++      -
tiny_cnn        `tiny.TinyCNN`: tests and CPU smoke runs    -
==============  ==========================================  ==============

`create(name, num_classes, **quantization)` builds a model; the quantization
keywords go to `layers.BinarySpec.create` (kernel_quantizer, input_quantizer,
scaling, prenorm). A quantizer not given is
'identity', so `create(name, n)` is the full-precision twin: the same
network, with the identity in place of each binarizer. The BiPer setting is

    create('resnet20', 10, kernel_quantizer='biper', input_quantizer='approx_sign',
           scaling='learned', prenorm=True)

`config(model)` is a JSON-serialisable dict from which `from_config` builds an
equal model (every quantizer parameter included); `axis_name` is a property
of where the model runs, not of the model, so it is passed to `from_config`.

A user's own model goes where a zoo name goes, as the import path of its
factory: `create('mypkg.models:create', num_classes, dtype=..., axis_name=...,
**kwargs)` calls `create(num_classes, dtype=dtype, axis_name=axis_name,
**kwargs)`, which returns a Linen module called as `(x, train=...)` (built
from the library's layers, or any Flax layers binarized with
`fda_biper_jax.binarize`; its BatchNorms average over `axis_name`, the
trainer's data-parallel axis); the result is a `FactoryModel`, whose parameters
are the factory model's own and whose `config` names the factory, so
checkpoints and exports rebuild it.

Every model is called as `model.apply(variables, x, train=...)`
on NHWC float images and returns float32 logits [N, num_classes]; training
needs `mutable=['batch_stats']` (plus 'losses' for quantizer regularisers,
'intermediates' for the sown quantized kernels and inputs).
"""

from __future__ import annotations

import dataclasses
import importlib
import numbers
from typing import Any, Mapping

import jax.numpy as jnp
import numpy as np
from flax import linen as nn
from flax.core import FrozenDict

from fda_biper_jax.nn.linen import REMOVED, BinarySpec
from fda_biper_jax.models.blocks import BinaryNet
from fda_biper_jax.models.resnet_cifar import ResNet18CIFAR, ResNet20, ResNet20FDA
from fda_biper_jax.models.resnet_imagenet import ResNet18, ResNet34
from fda_biper_jax.models.tiny import TinyCNN
from fda_biper_jax.models.vgg import VGGSmall
from fda_biper_jax.models.vit import ViT

_MODELS: dict[str, type[BinaryNet]] = {
    "resnet18_cifar": ResNet18CIFAR,
    "resnet20": ResNet20,
    "resnet20_fda": ResNet20FDA,
    "vgg_small": VGGSmall,
    "resnet18": ResNet18,
    "resnet34": ResNet34,
    "vit_tiny": ViT,
    "tiny_cnn": TinyCNN,  # not a published model: for tests and smoke runs
}

NAMES: tuple[str, ...] = tuple(_MODELS)
QUANTIZATION_KEYS: tuple[str, ...] = ("kernel_quantizer", "input_quantizer", "scaling",
                                      "prenorm")


def _dtype(dtype) -> np.dtype | None:
  if dtype is None:
    return None
  try:
    d = jnp.dtype(dtype)
  except TypeError as e:
    raise ValueError(f"dtype={dtype!r} is not a dtype; use e.g. 'float32' or 'bfloat16'") from e
  if not jnp.issubdtype(d, jnp.floating):
    raise ValueError(f"dtype={dtype!r} is not allowed; a floating compute dtype is required")
  return d


def resolve_factory(path: str):
  """The callable named by 'package.module:attribute'."""
  module, sep, attr = str(path).partition(":")
  if not sep or not module or not attr:
    raise ValueError(f"model={path!r} is not allowed; a zoo name {list(NAMES)} or a factory's "
                     "import path 'package.module:function' is required")
  try:
    target = importlib.import_module(module)
  except ImportError as e:
    raise ValueError(f"model={path!r}: module {module!r} cannot be imported ({e})") from None
  for part in attr.split("."):
    if not hasattr(target, part):
      raise ValueError(f"model={path!r}: {module!r} has no attribute {attr!r}")
    target = getattr(target, part)
  if not callable(target):
    raise ValueError(f"model={path!r} is not callable")
  return target


class FactoryModel(nn.Module):
  """A user's model, made by the factory at import path `factory` (module docstring).

  Shares its scope with the model the factory builds, so the parameters are
  the factory model's own, with no extra level.
  """
  factory: str
  num_classes: int
  dtype: Any = None
  axis_name: str | None = None
  kwargs: Any = FrozenDict()

  def setup(self):
    self.factory_model = resolve_factory(self.factory)(
        self.num_classes, dtype=self.dtype, axis_name=self.axis_name, **dict(self.kwargs))
    nn.share_scope(self, self.factory_model)

  def __call__(self, x, train: bool = False):
    return self.factory_model(x, train=train)


def architecture(cls) -> dict[str, Any]:
  """A zoo model's own architecture options (e.g. the ViT's width and depth) and defaults."""
  shared = {f.name for f in dataclasses.fields(BinaryNet)}
  return {f.name: f.default for f in dataclasses.fields(cls)
          if f.name not in shared and f.name not in ("parent", "name")}


def create(name: str, num_classes: int, *, dtype=None, axis_name: str | None = None,
           bn_scale_init: float = 1.0, full_precision=None, **quantization) -> nn.Module:
  """The model `name` with `num_classes` logits.

  Args:
    name: one of `NAMES`, or a factory's import path 'package.module:function'
      (module docstring), which then receives `quantization` as its keywords.
    num_classes: an int >= 1.
    dtype: compute dtype (None: float32 inputs stay float32; 'bfloat16' for
      mixed precision; parameters and logits stay float32).
    axis_name: the mapped axis BatchNorm averages its statistics over under
      shard_map / pmap; None on one device.
    bn_scale_init: the initial scale of every BatchNorm (> 0; default 1).
    full_precision: path patterns of the layers kept in full precision (None:
      the model's `FULL_PRECISION`, its first conv and last fc, and the
      ImageNet ResNets' 1x1 downsample convs).
    **quantization: keywords of `BinarySpec.create`; kernel_quantizer and
      input_quantizer default to 'identity' (the full-precision twin); and the
      model's architecture options (`architecture`, e.g. vit_tiny's depth).

  Raises:
    ValueError: unknown name or quantization keyword, bad num_classes or
      dtype, or any value `BinarySpec.create` rejects.
  """
  if (not isinstance(num_classes, numbers.Integral) or isinstance(num_classes, bool)
      or num_classes < 1):
    raise ValueError(f"num_classes={num_classes!r} is not allowed; it must be an integer >= 1")
  if axis_name is not None and not isinstance(axis_name, str):
    raise ValueError(f"axis_name={axis_name!r} is not allowed; a string or None")
  if name not in _MODELS and ":" in str(name):
    resolve_factory(name)  # fails here, with one line, if it cannot be imported
    kwargs = dict(quantization)
    if full_precision is not None:
      kwargs["full_precision"] = full_precision
    return FactoryModel(name, int(num_classes), _dtype(dtype), axis_name,
                        FrozenDict(_plain(kwargs)))
  if name not in _MODELS:
    raise ValueError(f"unknown model {name!r}; allowed: {list(NAMES)} or a factory's import "
                     "path 'package.module:function'")
  if not (isinstance(bn_scale_init, (int, float)) and not isinstance(bn_scale_init, bool)
          and 0 < bn_scale_init < float("inf")):
    raise ValueError(f"bn_scale_init={bn_scale_init!r} is not allowed; a finite number > 0")
  cls = _MODELS[name]
  options = {k: quantization.pop(k) for k in list(quantization) if k in architecture(cls)}
  bad = set(quantization) - set(QUANTIZATION_KEYS) - set(REMOVED)
  if bad:
    raise ValueError(f"create: unknown keyword {sorted(bad)}; allowed: quantization "
                     f"{list(QUANTIZATION_KEYS)} or {name}'s architecture {list(architecture(cls))}")
  quantization.setdefault("kernel_quantizer", "identity")
  quantization.setdefault("input_quantizer", "identity")
  if full_precision is None:
    full_precision = _MODELS[name].FULL_PRECISION
  spec = BinarySpec.create(full_precision=full_precision, **quantization)
  return cls(num_classes=int(num_classes), spec=spec, dtype=_dtype(dtype), axis_name=axis_name,
             bn_scale_init=float(bn_scale_init), **options)


def _plain(value):
  """A config value as plain JSON-able Python (mappings to dicts, sequences to lists)."""
  if hasattr(value, "items"):
    return {k: _plain(v) for k, v in value.items()}
  if isinstance(value, (list, tuple)):
    return [_plain(v) for v in value]
  return value


def config(model: nn.Module) -> dict[str, Any]:
  """JSON-serialisable {'name', 'num_classes', 'dtype', **spec.config()} of a zoo model, or
  {'name': factory path, 'num_classes', 'dtype', **kwargs} of a `FactoryModel`."""
  if isinstance(model, FactoryModel):
    return {"name": model.factory, "num_classes": model.num_classes,
            "dtype": None if model.dtype is None else jnp.dtype(model.dtype).name,
            **_plain(model.kwargs)}
  names = {cls: n for n, cls in _MODELS.items()}
  if type(model) not in names:
    raise ValueError(f"config: {type(model).__name__} is neither a model of the zoo "
                     f"{list(NAMES)} nor made by a factory (models.create('pkg.mod:fn', ...))")
  options = {k: getattr(model, k) for k, default in architecture(type(model)).items()
             if getattr(model, k) != default}
  return {"name": names[type(model)], "num_classes": model.num_classes,
          "dtype": None if model.dtype is None else jnp.dtype(model.dtype).name,
          "bn_scale_init": model.bn_scale_init, **options, **model.spec.config()}


def from_config(cfg: Mapping[str, Any], *, axis_name: str | None = None) -> nn.Module:
  """The model `config` describes (the inverse of `config`), on `axis_name`."""
  cfg = dict(cfg)
  if "axis_name" in cfg:
    raise ValueError("from_config: axis_name is not part of a model config; pass it as a keyword")
  missing = {"name", "num_classes"} - set(cfg)
  if missing:
    raise ValueError(f"from_config: config lacks {sorted(missing)}")
  return create(**cfg, axis_name=axis_name)


__all__ = ["NAMES", "FactoryModel", "architecture", "create", "config", "from_config", "resolve_factory", "BinaryNet", "ResNet18CIFAR",
           "ResNet20", "ResNet20FDA", "VGGSmall", "ResNet18", "ResNet34", "TinyCNN", "ViT"]
