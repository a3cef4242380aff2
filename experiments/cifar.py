"""Trains or evaluates a binary network on CIFAR-10/100 or another small dataset.

  python -m experiments.cifar --config=experiments/configs/biper_resnet20.py:stage1 \
      --workdir=runs/biper_resnet20_s1 [--config.num_epochs=100]

The command is `fda_biper_jax.cli.train` (installed as `fda-biper-jax-train`); the logic
lives in `fda_biper_jax.train`. A bad flag, config file, override or setting stops with
one line before anything is written.
"""

from fda_biper_jax.cli import train

if __name__ == "__main__":
  train.run()
