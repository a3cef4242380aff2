"""Straight-through baselines: sign on weights and activations with a named
backward (ste, approx_sign, sign_swish), any model, CIFAR-10.

  python -m experiments.cifar --config=experiments/configs/baselines.py:approx_sign,resnet20 \
      --workdir=runs/approx_sign_resnet20
  python -m experiments.cifar --config=experiments/configs/baselines.py:ste,vgg_small \
      --workdir=runs/ste_vgg_small
"""

from experiments.configs import recipes
from fda_biper_jax import models

QUANTIZERS = ("ste", "approx_sign", "sign_swish")


def get_config(arg: str = "approx_sign,resnet20"):
  quantizer, model = recipes.parse(arg, {"quantizer": QUANTIZERS, "model": models.NAMES},
                                   "approx_sign,resnet20")
  return recipes.baseline(quantizer, model)
