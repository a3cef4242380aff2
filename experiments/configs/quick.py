"""A first run on a laptop CPU: resnet20 on real Fashion-MNIST for one epoch.

  python -m experiments.cifar --config=experiments/configs/quick.py:biper --workdir=runs/quick_biper

The argument names any registered method (identity for the full-precision
twin, ste, approx_sign, sign_swish, fda, biper, biper_sine, bnn_pp, ir_net,
reste, rsign, or one a user registered), trained with its own quantization
settings (`Method.usage`); 'NAME/VARIANT' picks one of its `variants` (e.g.
bnn_pp/weights_only). Adam at lr 1e-3 with cosine decay, batch 128, crop
(pad 2) + flip. `python -m experiments.sweep` runs every method with it and
prints the table. Fashion-MNIST comes from tfds (or offline from Debian's
dataset-fashion-mnist package; see README).
"""

from experiments.configs import recipes


def get_config(arg: str = "biper"):
  name, _, variant = (arg or "biper").partition("/")
  (name,) = recipes.parse(name, {"quantizer": recipes.quick_methods()}, "biper")
  return recipes.quick(name, variant=variant)
