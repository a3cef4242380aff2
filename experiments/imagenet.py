"""Trains or evaluates a binary network on ImageNet, or any tfds image dataset streamed.

  python -m experiments.imagenet --config=experiments/configs/biper_imagenet.py:resnet18,stage1 \
      --workdir=runs/biper_resnet18_stage1

The same command and trainer as experiments/cifar.py (`fda_biper_jax.cli.train`); the
ImageNet configs set input='stream' (fda_biper_jax/data/streaming.py).
"""

from fda_biper_jax.cli import train

if __name__ == "__main__":
  train.run()
