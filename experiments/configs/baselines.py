"""Any registered method with its own quantization settings on any model, CIFAR-10,
with the FDA paper's SGD recipe (400 epochs at lr 0.1, batch 128).

  python -m experiments.cifar --config=experiments/configs/baselines.py:approx_sign,resnet20 \
      --workdir=runs/approx_sign_resnet20
  python -m experiments.cifar --config=experiments/configs/baselines.py:ir_net,vgg_small \
      --workdir=runs/ir_net_vgg_small

'NAME/VARIANT' picks one of the method's `variants` (e.g. bnn_pp/weights_only).
"""

from experiments.configs import recipes
from fda_biper_jax import models


def get_config(arg: str = "approx_sign,resnet20"):
  first, *rest = (arg or "approx_sign,resnet20").split(",")
  name, _, variant = first.partition("/")
  name, model = recipes.parse(",".join([name, *rest]), {"quantizer": recipes.quick_methods(),
                                                        "model": models.NAMES},
                              "approx_sign,resnet20")
  return recipes.baseline(name, model, variant=variant)
