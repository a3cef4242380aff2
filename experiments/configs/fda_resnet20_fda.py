"""FDA recipe (Fourier-series gradient + noise adaptation) for resnet20_fda on CIFAR-10.

  python -m experiments.cifar --config=experiments/configs/fda_resnet20_fda.py \
      --workdir=runs/fda_resnet20_fda
"""

from experiments.configs import recipes


def get_config():
  return recipes.fda("resnet20_fda")
