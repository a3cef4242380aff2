"""FDA recipe for resnet18 on ImageNet (imagenet2012, streamed at 224).

  python -m experiments.imagenet --config=experiments/configs/fda_resnet18_imagenet.py \
      --workdir=runs/fda_resnet18_imagenet

imagenet2012 is a tfds manual download: put ILSVRC2012_img_train.tar and
ILSVRC2012_img_val.tar in --config.manual_dir (default
~/tensorflow_datasets/downloads/manual). Published: 60.2% top-1 (FDA paper, on
a Bi-Real + PReLU ResNet-18; see recipes.py for what differs here).
"""

from experiments.configs import recipes


def get_config():
  return recipes.fda_imagenet("resnet18")
