"""Local tfds builders and file readers for data that tfds cannot fetch offline.

Nothing here is imported by `fda_biper_jax.data` until a dataset is loaded, so
importing the library does not import tensorflow_datasets.

- `sources`: each small dataset's source files and how to provide them offline.
- `idx`: reads and verifies IDX files (the MNIST file format), numpy only.
- `fashion_mnist_local`: the `fashion_mnist_local` tfds builder, which builds
  Fashion-MNIST from IDX files found in a manual directory (for example
  Debian's `dataset-fashion-mnist` package) after checking their decoded
  content against hard-coded SHA-256 digests.
- `synthetic_jpeg`: the `synthetic_jpeg` tfds builder, generated JPEG images of
  varied sizes (ImageNet-like or tiny) with labels and example ids, for tests
  and benchmarks of the streaming pipeline (`fda_biper_jax.streaming`, which
  imports it, and so registers it with tfds, when it opens a dataset).
"""
