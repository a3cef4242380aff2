"""Where the small datasets' original files come from; no tensorflow_datasets needed.

`URLS` are the source files tfds registers for each dataset (a test checks them
against tfds' own `url_infos`). `fda_biper_jax.data.check_obtainable` reads this
table to tell, before TensorFlow is imported, whether a missing dataset could be
obtained at all: from a prepared copy, from files in a manual directory, or by a
download whose source hosts resolve.
"""

from __future__ import annotations

import os

#: dataset -> {source URL: file name} (tfds' registered sources).
URLS: dict[str, dict[str, str]] = {
    "cifar10": {"https://www.cs.toronto.edu/~kriz/cifar-10-binary.tar.gz": "cifar-10-binary.tar.gz"},
    "cifar100": {
        "https://www.cs.toronto.edu/~kriz/cifar-100-binary.tar.gz": "cifar-100-binary.tar.gz"
    },
    "mnist": {
        f"https://storage.googleapis.com/cvdf-datasets/mnist/{f}": f
        for f in (
            "train-images-idx3-ubyte.gz",
            "train-labels-idx1-ubyte.gz",
            "t10k-images-idx3-ubyte.gz",
            "t10k-labels-idx1-ubyte.gz",
        )
    },
    "fashion_mnist": {
        f"http://fashion-mnist.s3-website.eu-central-1.amazonaws.com/{f}": f
        for f in (
            "train-images-idx3-ubyte.gz",
            "train-labels-idx1-ubyte.gz",
            "t10k-images-idx3-ubyte.gz",
            "t10k-labels-idx1-ubyte.gz",
        )
    },
}

#: Where Debian's `dataset-fashion-mnist` package puts the Fashion-MNIST IDX files.
FASHION_MNIST_DEBIAN_DIR = "/usr/share/datasets/fashion-mnist"

FASHION_MNIST_HOW_TO = (
    "install Debian's dataset-fashion-mnist package (files land in "
    f"{FASHION_MNIST_DEBIAN_DIR}) or put the four Fashion-MNIST IDX files "
    "(train-images-idx3-ubyte.gz, train-labels-idx1-ubyte.gz, t10k-images-idx3-ubyte.gz, "
    "t10k-labels-idx1-ubyte.gz, from https://github.com/zalandoresearch/fashion-mnist) in manual_dir"
)


def has_file(directory: str | None, filename: str) -> bool:
  """Whether `directory` holds `filename`, or its decompressed twin (name without .gz)."""
  if not directory:
    return False
  names = {filename, filename[:-3] if filename.endswith(".gz") else filename}
  return any(os.path.isfile(os.path.join(directory, n)) for n in names)
