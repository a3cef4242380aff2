"""A first run on a laptop CPU: resnet20 on real Fashion-MNIST for one epoch.

  python -m experiments.cifar --config=experiments/configs/quick.py:biper --workdir=runs/quick_biper

The argument picks the quantizer, with its method's own settings:
identity (the full-precision twin), ste, approx_sign, sign_swish, fda, biper, bnn_pp.
Adam at lr 1e-3 with cosine decay, batch 128, crop (pad 2) + flip.
`python -m experiments.sweep` runs every quantizer with it and prints the table. Fashion-MNIST comes from
tfds (or offline from Debian's dataset-fashion-mnist package; see README).
"""

from experiments.configs import recipes


def get_config(arg: str = "biper"):
  (quantizer,) = recipes.parse(arg, {"quantizer": recipes.QUICK_QUANTIZERS}, "biper")
  return recipes.quick(quantizer)
