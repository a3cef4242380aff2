"""Data: small datasets held in memory, large ones streamed, and the trainer's inputs.

* `memory`: tfds acquisition (offline checks, Fashion-MNIST from Debian's
  files), whole small splits as arrays, on-device augmentation, generated data;
  its public names are re-exported here (`data.load`, `data.info`, ...);
* `streaming`: tf.data streaming of large datasets (ImageNet) per host;
* `inputs`: the trainer's input sources (in memory or streamed) and the data
  order across hosts;
* `datasets`: the local tfds builders.

TensorFlow and tensorflow-datasets are imported only when data is read.
"""

from fda_biper_jax.data.memory import (DATASETS, FASHION_MNIST_DEBIAN_DIR, DataUnavailableError,
                                       DatasetInfo, augment, check_obtainable, epoch_permutation,
                                       info, load, normalize, synthetic, synthetic_info)

__all__ = ["DATASETS", "FASHION_MNIST_DEBIAN_DIR", "DataUnavailableError", "DatasetInfo",
           "augment", "check_obtainable", "epoch_permutation", "info", "load", "normalize",
           "synthetic", "synthetic_info"]
