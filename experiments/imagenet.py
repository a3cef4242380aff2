"""Trains or evaluates a binary network on ImageNet, or any tfds image dataset streamed.

  python -m experiments.imagenet --config=experiments/configs/biper_imagenet.py:resnet18,stage1 \
      --workdir=runs/biper_resnet18_stage1

The same flags and trainer as experiments/cifar.py; the ImageNet configs set
input='stream' (fda_biper_jax/data/streaming.py).
"""

from absl import app

from experiments import cifar

if __name__ == "__main__":
  app.run(cifar.main)
