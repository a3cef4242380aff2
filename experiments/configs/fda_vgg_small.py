"""FDA recipe (Fourier-series gradient + noise adaptation) for vgg_small on CIFAR-10.

  python -m experiments.cifar --config=experiments/configs/fda_vgg_small.py \
      --workdir=runs/fda_vgg_small
"""

from experiments.configs import recipes


def get_config():
  return recipes.fda("vgg_small")
