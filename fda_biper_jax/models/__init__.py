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

Every model is called as `model.apply(variables, x, train=...)`
on NHWC float images and returns float32 logits [N, num_classes]; training
needs `mutable=['batch_stats']` (plus 'losses' for quantizer regularisers,
'intermediates' for the sown quantized kernels and inputs).
"""

from __future__ import annotations

import numbers
from typing import Any, Mapping

import jax.numpy as jnp
import numpy as np
from flax import linen as nn

from fda_biper_jax.nn.linen import REMOVED, BinarySpec
from fda_biper_jax.models.blocks import BinaryNet
from fda_biper_jax.models.resnet_cifar import ResNet18CIFAR, ResNet20, ResNet20FDA
from fda_biper_jax.models.resnet_imagenet import ResNet18, ResNet34
from fda_biper_jax.models.tiny import TinyCNN
from fda_biper_jax.models.vgg import VGGSmall

_MODELS: dict[str, type[BinaryNet]] = {
    "resnet18_cifar": ResNet18CIFAR,
    "resnet20": ResNet20,
    "resnet20_fda": ResNet20FDA,
    "vgg_small": VGGSmall,
    "resnet18": ResNet18,
    "resnet34": ResNet34,
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


def create(name: str, num_classes: int, *, dtype=None, axis_name: str | None = None,
           bn_scale_init: float = 1.0, full_precision=None, **quantization) -> nn.Module:
  """The model `name` with `num_classes` logits.

  Args:
    name: one of `NAMES`.
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
      input_quantizer default to 'identity' (the full-precision twin).

  Raises:
    ValueError: unknown name or quantization keyword, bad num_classes or
      dtype, or any value `BinarySpec.create` rejects.
  """
  if name not in _MODELS:
    raise ValueError(f"unknown model {name!r}; allowed: {list(NAMES)}")
  if (not isinstance(num_classes, numbers.Integral) or isinstance(num_classes, bool)
      or num_classes < 1):
    raise ValueError(f"num_classes={num_classes!r} is not allowed; it must be an integer >= 1")
  if axis_name is not None and not isinstance(axis_name, str):
    raise ValueError(f"axis_name={axis_name!r} is not allowed; a string or None")
  if not (isinstance(bn_scale_init, (int, float)) and not isinstance(bn_scale_init, bool)
          and 0 < bn_scale_init < float("inf")):
    raise ValueError(f"bn_scale_init={bn_scale_init!r} is not allowed; a finite number > 0")
  bad = set(quantization) - set(QUANTIZATION_KEYS) - set(REMOVED)
  if bad:
    raise ValueError(f"create: unknown quantization keyword {sorted(bad)}; "
                     f"allowed: {list(QUANTIZATION_KEYS)}")
  quantization.setdefault("kernel_quantizer", "identity")
  quantization.setdefault("input_quantizer", "identity")
  if full_precision is None:
    full_precision = _MODELS[name].FULL_PRECISION
  spec = BinarySpec.create(full_precision=full_precision, **quantization)
  return _MODELS[name](num_classes=int(num_classes), spec=spec, dtype=_dtype(dtype),
                       axis_name=axis_name, bn_scale_init=float(bn_scale_init))


def config(model: nn.Module) -> dict[str, Any]:
  """JSON-serialisable {'name', 'num_classes', 'dtype', **spec.config()} of a zoo model."""
  names = {cls: n for n, cls in _MODELS.items()}
  if type(model) not in names:
    raise ValueError(f"config: {type(model).__name__} is not a model of the zoo {list(NAMES)}")
  return {"name": names[type(model)], "num_classes": model.num_classes,
          "dtype": None if model.dtype is None else jnp.dtype(model.dtype).name,
          "bn_scale_init": model.bn_scale_init, **model.spec.config()}


def from_config(cfg: Mapping[str, Any], *, axis_name: str | None = None) -> nn.Module:
  """The model `config` describes (the inverse of `config`), on `axis_name`."""
  cfg = dict(cfg)
  if "axis_name" in cfg:
    raise ValueError("from_config: axis_name is not part of a model config; pass it as a keyword")
  missing = {"name", "num_classes"} - set(cfg)
  if missing:
    raise ValueError(f"from_config: config lacks {sorted(missing)}")
  return create(**cfg, axis_name=axis_name)


__all__ = ["NAMES", "create", "config", "from_config", "BinaryNet", "ResNet18CIFAR",
           "ResNet20", "ResNet20FDA", "VGGSmall", "ResNet18", "ResNet34", "TinyCNN"]
