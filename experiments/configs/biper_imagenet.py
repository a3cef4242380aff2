"""BiPer two-stage recipe for resnet18 / resnet34 on ImageNet (imagenet2012, streamed at 224).

  python -m experiments.imagenet --config=experiments/configs/biper_imagenet.py:resnet18,stage1 \
      --workdir=runs/biper_resnet18_stage1
  python -m experiments.imagenet --config=experiments/configs/biper_imagenet.py:resnet18,stage2 \
      --workdir=runs/biper_resnet18_stage2
  (resnet34: the same with resnet34 in both places)

imagenet2012 is a tfds manual download: put ILSVRC2012_img_train.tar and
ILSVRC2012_img_val.tar in --config.manual_dir (default
~/tensorflow_datasets/downloads/manual). Stage 2 starts from stage 1's best
checkpoint (config.init_from). Published top-1 (BiPer README): resnet18 61.40%,
resnet34 65.73%.
"""

from experiments.configs import recipes


def get_config(arg: str = "resnet18,stage1"):
  model, stage = recipes.parse(
      arg, {"model": ("resnet18", "resnet34"), "stage": tuple(recipes.IMAGENET_BIPER_STAGES)},
      "resnet18,stage1")
  return recipes.biper_imagenet(model, stage)
