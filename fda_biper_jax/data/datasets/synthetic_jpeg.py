"""`synthetic_jpeg`: a generated tfds dataset of JPEG images of varied sizes.

For tests and benchmarks of the streaming input pipeline (`fda_biper_jax.streaming`)
where no real image data can be downloaded. It has the shape of an ImageNet-style
tfds dataset: features `image` (tfds.features.Image, JPEG-encoded, RGB, varied
height and width), `label` (ClassLabel) and `id` (int64, the example's index in its
split, so tests can tell which examples a host read), splits `train` and
`validation`.

Image `i` of a split: its class's template (a smooth colour field, a 4x4x3 grid of
levels bilinearly upsampled to the image size), plus a smooth per-image field (a
16x16x3 grid, std 30 grey levels, upsampled) and per-pixel Gaussian noise (std 16),
clipped to uint8 and JPEG-encoded by tfds (quality 95). At ImageNet's average size
(about 400x350) that gives files of about 90 KB, close to ImageNet's, so decoding
costs about what it does there. Height and width are uniform in the config's
ranges; labels are uniform over the classes. Everything is deterministic given the
config (its seed, split and index).

Configs. Named configs: `tiny` (48 train / 20 validation images of 40-80 px, for
tests) and `imagenet_like` (2000 / 500 images, height 250-450, width 300-500). Any
other size is a config too, named by `config_name(...)`: for example
`synthetic_jpeg/t300_v100_h250-450_w300-500_c10_s0` has 300 train and 100
validation images, heights in [250, 450], widths in [300, 500], 10 classes, seed 0.
`dataset_name(...)` returns such a name, ready for `tfds.builder` or
`streaming.info`. Importing this module registers the builder with tfds.
"""

from __future__ import annotations

import dataclasses
import re

import numpy as np
import tensorflow_datasets as tfds

from fda_biper_jax.data.memory import linear_upsample

NAME = "synthetic_jpeg"
_NOISE_STD = 16.0  # per-pixel noise, grey levels
_FIELD_STD = 30.0  # per-image smooth field, grey levels
_FIELD_GRID = 16
_SPLITS = ("train", "validation")

_NAME_RE = re.compile(
    r"^t(?P<num_train>\d+)_v(?P<num_validation>\d+)_h(?P<h0>\d+)-(?P<h1>\d+)"
    r"_w(?P<w0>\d+)-(?P<w1>\d+)_c(?P<num_classes>\d+)_s(?P<seed>\d+)$"
)


@dataclasses.dataclass(eq=False)
class SyntheticJpegConfig(tfds.core.BuilderConfig):
  """Sizes of a synthetic_jpeg dataset. height/width: inclusive (min, max) in pixels."""

  num_train: int = 48
  num_validation: int = 20
  height: tuple[int, int] = (40, 80)
  width: tuple[int, int] = (40, 80)
  num_classes: int = 10
  seed: int = 0

  def __post_init__(self):
    if not (
        self.num_train >= 0
        and self.num_validation >= 0
        and 1 <= self.height[0] <= self.height[1]
        and 1 <= self.width[0] <= self.width[1]
        and self.num_classes >= 1
        and self.seed >= 0
    ):
      raise ValueError(
          f"bad synthetic_jpeg config {self.name!r}: num_train={self.num_train}, "
          f"num_validation={self.num_validation}, height={self.height}, width={self.width}, "
          f"num_classes={self.num_classes}, seed={self.seed} (need counts >= 0, "
          "1 <= min <= max sizes, num_classes >= 1, seed >= 0)"
      )


def config_name(
    num_train: int,
    num_validation: int,
    height: tuple[int, int] = (250, 450),
    width: tuple[int, int] = (300, 500),
    num_classes: int = 10,
    seed: int = 0,
) -> str:
  """The config name of these sizes, e.g. 't300_v100_h250-450_w300-500_c10_s0'."""
  name = (
      f"t{int(num_train)}_v{int(num_validation)}_h{int(height[0])}-{int(height[1])}"
      f"_w{int(width[0])}-{int(width[1])}_c{int(num_classes)}_s{int(seed)}"
  )
  _parse(name)  # validates
  return name


def dataset_name(*args, **kwargs) -> str:
  """'synthetic_jpeg/<config_name(...)>', for tfds.builder or streaming.info."""
  return f"{NAME}/{config_name(*args, **kwargs)}"


def _parse(name: str) -> SyntheticJpegConfig | None:
  match = _NAME_RE.match(name)
  if match is None:
    return None
  g = {k: int(v) for k, v in match.groupdict().items()}
  return SyntheticJpegConfig(
      name=name,
      description="Sizes given by the config name.",
      num_train=g["num_train"],
      num_validation=g["num_validation"],
      height=(g["h0"], g["h1"]),
      width=(g["w0"], g["w1"]),
      num_classes=g["num_classes"],
      seed=g["seed"],
  )


def class_templates(num_classes: int, seed: int) -> np.ndarray:
  """[num_classes, 4, 4, 3] grey levels of the class templates' grids."""
  rng = np.random.default_rng([seed, 0x5EED])
  return rng.uniform(24.0, 232.0, size=(num_classes, 4, 4, 3))


def _upsample(grid: np.ndarray, h: int, w: int) -> np.ndarray:
  """[gh, gw, C] -> [h, w, C] float32, bilinear (two small matrix products)."""
  rows = linear_upsample(h, grid.shape[0]).astype(np.float32)
  cols = linear_upsample(w, grid.shape[1]).astype(np.float32)
  tall = np.tensordot(rows, grid.astype(np.float32), axes=(1, 0))  # [h, gw, C]
  return np.einsum("wj,hjc->hwc", cols, tall, optimize=True)


def make_image(config: SyntheticJpegConfig, split: str, index: int) -> tuple[np.ndarray, int]:
  """(image uint8 [H, W, 3], label) of example `index` of `split` (before JPEG encoding)."""
  rng = np.random.default_rng([config.seed, _SPLITS.index(split), index])
  h = int(rng.integers(config.height[0], config.height[1] + 1))
  w = int(rng.integers(config.width[0], config.width[1] + 1))
  label = int(rng.integers(config.num_classes))
  grid = class_templates(config.num_classes, config.seed)[label]
  field = rng.normal(0.0, _FIELD_STD, size=(_FIELD_GRID, _FIELD_GRID, 3))
  smooth = _upsample(grid, h, w) + _upsample(field, h, w)
  noise = rng.standard_normal(size=(h, w, 3), dtype=np.float32) * _NOISE_STD
  image = np.clip(np.rint(smooth + noise), 0, 255).astype(np.uint8)
  return image, label


class SyntheticJpeg(tfds.core.GeneratorBasedBuilder):
  """Generated JPEG images of varied sizes (see the module docstring)."""

  VERSION = tfds.core.Version("1.0.0")
  RELEASE_NOTES = {"1.0.0": "Generated JPEG images, class templates plus noise."}
  BUILDER_CONFIGS = [
      SyntheticJpegConfig(
          name="tiny", description="48 train / 20 validation images of 40-80 px, for tests."
      ),
      SyntheticJpegConfig(
          name="imagenet_like",
          description="2000 train / 500 validation images of ImageNet-like sizes.",
          num_train=2000,
          num_validation=500,
          height=(250, 450),
          width=(300, 500),
      ),
  ]

  @classmethod
  def get_builder_config(cls, name, version=None):
    """The named configs, and any name `config_name(...)` writes."""
    config = super().get_builder_config(name, version)
    if config is None and isinstance(name, str):
      config = _parse(name)
    return config

  def _info(self) -> tfds.core.DatasetInfo:
    config = self.builder_config
    return tfds.core.DatasetInfo(
        builder=self,
        description="Generated JPEG images of varied sizes: class templates plus noise.",
        features=tfds.features.FeaturesDict(
            {
                "image": tfds.features.Image(shape=(None, None, 3), encoding_format="jpeg"),
                "label": tfds.features.ClassLabel(num_classes=config.num_classes),
                "id": tfds.features.Scalar(dtype=np.int64),
            }
        ),
        supervised_keys=("image", "label"),
    )

  def _split_generators(self, dl_manager):
    del dl_manager  # nothing to download
    config = self.builder_config
    counts = {"train": config.num_train, "validation": config.num_validation}
    return {split: self._generate_examples(split, counts[split]) for split in _SPLITS}

  def _generate_examples(self, split, count):
    for i in range(count):
      image, label = make_image(self.builder_config, split, i)
      yield i, {"image": image, "label": label, "id": i}
