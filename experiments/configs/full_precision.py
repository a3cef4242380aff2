"""The full-precision twin of any model (identity quantizer), CIFAR-10.

  python -m experiments.cifar --config=experiments/configs/full_precision.py:resnet20 \
      --workdir=runs/fp_resnet20
"""

from experiments.configs import recipes
from fda_biper_jax import models


def get_config(arg: str = "resnet20"):
  (model,) = recipes.parse(arg, {"model": models.NAMES}, "resnet20")
  return recipes.full_precision(model)
