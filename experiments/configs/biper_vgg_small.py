"""BiPer two-stage recipe for vgg_small on CIFAR-10 (the public code's CIFAR-10 scripts).

  python -m experiments.cifar --config=experiments/configs/biper_vgg_small.py:stage1 \
      --workdir=runs/biper_vgg_small_stage1
  python -m experiments.cifar --config=experiments/configs/biper_vgg_small.py:stage2 \
      --workdir=runs/biper_vgg_small_stage2

Stage 2 starts from stage 1's best checkpoint (config.init_from).
"""

from experiments.configs import recipes


def get_config(arg: str = "stage1"):
  (stage,) = recipes.parse(arg, {"stage": tuple(recipes.BIPER_STAGES)}, "stage1")
  return recipes.biper("vgg_small", stage)
