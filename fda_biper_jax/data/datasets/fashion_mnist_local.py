"""`fashion_mnist_local`: Fashion-MNIST built by tfds from local IDX files.

Why: tfds' own `fashion_mnist` builder verifies the SHA-256 of the *gzip* files it
downloads (or finds in `manual_dir`). Debian's package `dataset-fashion-mnist` ships
the same data recompressed, so those checksums differ and tfds rejects the files.
This builder reads the four IDX files from `manual_dir` (`.gz` or uncompressed),
verifies the DECODED bytes against the SHA-256 digests below (and the header
shapes), and writes an ordinary tfds dataset, with the same features, splits and
supervised keys as `fashion_mnist`, into `data_dir/fashion_mnist_local/1.0.0`.
Checksum verification stays on; only what is hashed changes (content, not its
compression).

The digests are those of the decompressed upstream files of
https://github.com/zalandoresearch/fashion-mnist (data/fashion/*.gz); they were
computed from Debian's `dataset-fashion-mnist` 0.0~git20200523.55506a9-1 and match
the raw-file digests published by independent projects that download upstream.
"""

from __future__ import annotations

import os

import numpy as np
import tensorflow_datasets as tfds

from fda_biper_jax.data.datasets import idx, sources

#: Where Debian's `dataset-fashion-mnist` package puts the files.
DEBIAN_DIR = sources.FASHION_MNIST_DEBIAN_DIR

NUM_CLASSES = 10
IMAGE_SHAPE = (28, 28, 1)
LABEL_NAMES = (
    "T-shirt/top",
    "Trouser",
    "Pullover",
    "Dress",
    "Coat",
    "Sandal",
    "Shirt",
    "Sneaker",
    "Bag",
    "Ankle boot",
)

#: split -> (images spec, labels spec). Read at build time, so tests may replace it.
FILES: dict[str, tuple[idx.IdxSpec, idx.IdxSpec]] = {
    "train": (
        idx.IdxSpec(
            "train-images-idx3-ubyte",
            (60000, 28, 28),
            "c59f468a2f672dc815687fe0f83887768d799fd8a3f3276145d20f83aa44d888",
        ),
        idx.IdxSpec(
            "train-labels-idx1-ubyte",
            (60000,),
            "bad3541b69d912435c50bb6ba87bec294ff4f6a2e1246121d8633921760443d9",
        ),
    ),
    "test": (
        idx.IdxSpec(
            "t10k-images-idx3-ubyte",
            (10000, 28, 28),
            "5b4141f0afbad91edebe8549f8fcffe087ea10ca49f1dbef5c9a5cd8815ce37b",
        ),
        idx.IdxSpec(
            "t10k-labels-idx1-ubyte",
            (10000,),
            "0402a96d92fd2663957122ceb108a494c5af83dab82d92729df917d7dec38c34",
        ),
    ),
}

HOW_TO = sources.FASHION_MNIST_HOW_TO


def file_names() -> list[str]:
  return [spec.name for pair in FILES.values() for spec in pair]


def find_files(manual_dir: str | os.PathLike | None) -> dict[str, str | None]:
  """File name (without .gz) -> path found in manual_dir (None where missing)."""
  if manual_dir is None or not os.path.isdir(manual_dir):
    return {name: None for name in file_names()}
  return {name: idx.find(manual_dir, name) for name in file_names()}


def read_split(manual_dir: str | os.PathLike, split: str) -> tuple[np.ndarray, np.ndarray]:
  """Verified (images uint8 [N,28,28], labels uint8 [N]) of one split; idx.IdxError if not."""
  image_spec, label_spec = FILES[split]
  found = find_files(manual_dir)
  missing = [n for n in (image_spec.name, label_spec.name) if found[n] is None]
  if missing:
    raise idx.IdxError(
        f"fashion_mnist_local: {', '.join(missing)}(.gz) not found in "
        f"manual_dir={os.fspath(manual_dir)}; {HOW_TO}"
    )
  images = idx.read_verified(found[image_spec.name], image_spec)
  labels = idx.read_verified(found[label_spec.name], label_spec)
  if images.shape[0] != labels.shape[0]:
    raise idx.IdxError(
        f"fashion_mnist_local {split}: {images.shape[0]} images but " f"{labels.shape[0]} labels"
    )
  if labels.size and int(labels.max()) >= NUM_CLASSES:
    raise idx.IdxError(
        f"fashion_mnist_local {split}: label {int(labels.max())} out of "
        f"range [0, {NUM_CLASSES})"
    )
  return images, labels


class FashionMnistLocal(tfds.core.GeneratorBasedBuilder):
  """Fashion-MNIST from verified local IDX files (see the module docstring)."""

  VERSION = tfds.core.Version("1.0.0")
  RELEASE_NOTES = {"1.0.0": "Fashion-MNIST built from local IDX files, content-verified."}
  MANUAL_DOWNLOAD_INSTRUCTIONS = HOW_TO

  def _info(self) -> tfds.core.DatasetInfo:
    return tfds.core.DatasetInfo(
        builder=self,
        description=(
            "Fashion-MNIST (Zalando article images, 60,000 train / 10,000 test, "
            "28x28 grey, 10 classes), built from local IDX files whose decoded "
            "content is verified by SHA-256."
        ),
        features=tfds.features.FeaturesDict(
            {
                "image": tfds.features.Image(shape=IMAGE_SHAPE),
                "label": tfds.features.ClassLabel(names=list(LABEL_NAMES)),
            }
        ),
        supervised_keys=("image", "label"),
        homepage="https://github.com/zalandoresearch/fashion-mnist",
    )

  def _split_generators(self, dl_manager):
    try:
      manual_dir = os.fspath(dl_manager.manual_dir)
    except AssertionError as e:  # tfds: missing or empty directory (multi-line message)
      raise idx.IdxError(f"fashion_mnist_local: manual_dir is missing or empty; {HOW_TO}") from e
    # Verify every file before writing anything, so a bad test split fails fast too.
    self._verified = {split: read_split(manual_dir, split) for split in FILES}
    return {split: self._generate_examples(split=split) for split in FILES}

  def _generate_examples(self, split):
    images, labels = self._verified[split]
    for i in range(images.shape[0]):
      yield i, {"image": images[i][..., None], "label": int(labels[i])}
