"""Streaming input pipeline for image datasets too large for device memory (ImageNet).

`data.memory` holds a small dataset whole on the accelerator; this module instead streams
a tensorflow-datasets image dataset (`imagenet2012`, or any tfds dataset with an
`image` and a ClassLabel `label` feature) from disk with tf.data, one epoch at a time:

* `info(name)` prepares the dataset if needed and returns its `StreamInfo` (classes,
  split sizes, crop size, normalisation constants).
* `train_batches(info, batch_size=..., seed=..., epoch=...)` yields this process's
  batches of one training epoch: numpy (images [B, S, S, 3] normalised, float32 or
  bfloat16; labels int32 [B]).
* `eval_batches(info, batch_size=...)` yields (images, labels, mask) of this
  process's part of the evaluation split, padded to full batches.
* `prefetch_to_device(batches, mesh)` turns either into global `jax.Array`s sharded
  over the mesh (`parallel.shard_batch`), with a few batches in flight so the host to
  device copy overlaps the step.

Pass the same `data_dir` to `info` and to the batch functions (StreamInfo does not
hold it). Work is done in tf.data's parallel map (`num_parallel_calls`, default
AUTOTUNE: tf.data tunes the number of threads, up to the CPU cores; the threads are
TensorFlow's C++ runtime's, free of the GIL), followed by batching and prefetching;
TensorFlow is kept off GPUs (`memory.import_tfds`), so JAX keeps the accelerator memory.

Throughput: `python -m benchmarks.input_pipeline` measures it (ImageNet-sized JPEGs);
measured figures are in benchmarks/NOTES.md.

Each host reads its own shard
-----------------------------
With `process_count` processes, process `i` reads only
`tfds.even_splits(split, n=process_count)[i]`: the training split with
`drop_remainder=True` (disjoint, equal-sized shards; the last `< process_count`
examples are never read), the evaluation split without it (disjoint shards covering
every example, whose sizes differ by at most one). Every host therefore yields the
same number of training batches, `num_train // process_count // batch_size` (the
remainder is dropped), and of evaluation batches, `num_eval_batches(...)`, padding
with masked examples where its shard is short: multi-host collectives need equal
counts. `batch_size` is always the per-process batch.

Determinism and resumption
--------------------------
`train_batches` is a pure function of (dataset, seed, epoch, process_index,
process_count, batch_size, start_batch): the same arguments give bit-identical
batches, and `start_batch=k` gives exactly batches k, k+1, ... of `start_batch=0`, so
a killed run resumes mid-epoch where it stopped. How: the file order is shuffled with
`ReadConfig(shuffle_seed=...)` and the examples with a shuffle buffer of fixed seed,
both seeds derived from (seed, epoch, process_index); the tf.data options are
`deterministic=True`; each example's augmentation uses stateless random ops seeded
from (seed, epoch, process_index) and the example's position in the epoch
(`Dataset.enumerate()` after the shuffle), never from a stateful generator; and the
first `start_batch * batch_size` examples are skipped as raw records, before any
decoding, so resuming costs reading, not decoding, them. (Reading order depends on
TensorFlow's global seed, which this module never sets: a program that calls
`tf.random.set_seed` gets another, equally reproducible, order.)

Augmentation (training)
-----------------------
Inception-style RandomResizedCrop (Szegedy et al. 2015), as in the reference
ImageNet recipes: a crop window covering a fraction of the image's area uniform in
[0.08, 1] with aspect ratio (width / height) in [3/4, 4/3]
(`tf.image.stateless_sample_distorted_bounding_box`, 10 attempts); when no attempt
fits, the centre crop of side min(H, W) * S / (S + 32) instead (for S = 224 the region
the evaluation transform keeps).
For JPEG images only the window is decoded (`tf.io.decode_and_crop_jpeg` on the raw
bytes: `tfds.decode.SkipDecoding` on the image feature), about a quarter less decoding
time than a full decode on ImageNet-sized images (libjpeg still reads the rows above the
window); other formats are decoded whole and then cropped. The crop is resized
to S x S (bilinear, no antialiasing), flipped left-right with probability 1/2, and
normalised: (x / 255 - mean) / std per channel, with ImageNet's mean and std.
Greyscale images are converted to RGB. Evaluation: the shorter side resized to
`resize_size` (256) keeping the aspect ratio (the longer side rounded down, as
torchvision's Resize), the central S x S (224) crop, the same normalisation.

Getting imagenet2012
--------------------
tfds cannot download ImageNet (registration required): download
`ILSVRC2012_img_train.tar` and `ILSVRC2012_img_val.tar` from
https://image-net.org/download-images and put them in `manual_dir` (default
`~/tensorflow_datasets/downloads/manual`, i.e. `<data_dir>/downloads/manual`). The
first `info('imagenet2012', manual_dir=...)` then prepares the dataset in `data_dir`
(hours, and about as much disk space again as the 144 GiB of archives); later calls
only read it. Missing files give a
one-line `data.DataUnavailableError` naming them. Tests and benchmarks use
`fda_biper_jax.data.datasets.synthetic_jpeg` (generated JPEGs) and
`tfds.testing.mock_data` instead.
"""

from __future__ import annotations

import collections
import dataclasses
import itertools
import math
import os
from typing import Any, Iterable, Iterator

import numpy as np

from fda_biper_jax import parallel
from fda_biper_jax.data.memory import (
    DataUnavailableError,
    default_data_dir,
    import_tfds,
    is_prepared,
    one_line,
    prepare,
)

__all__ = [
    "IMAGENET_MEAN",
    "IMAGENET_STD",
    "DTYPES",
    "StreamInfo",
    "info",
    "train_batches",
    "eval_batches",
    "num_train_batches",
    "num_eval_batches",
    "prefetch_to_device",
]

#: Per-channel mean and std of ImageNet's training images, on the [0, 1] scale.
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)

DTYPES = ("float32", "bfloat16")

AREA_RANGE = (0.08, 1.0)
ASPECT_RATIO_RANGE = (3.0 / 4.0, 4.0 / 3.0)
MAX_ATTEMPTS = 10
CROP_PADDING = 32  # fallback centre crop: side min(H, W) * S / (S + CROP_PADDING)
_SHUFFLE_BUFFER_BATCHES = 16  # example shuffle buffer: 16 batches (as flax's ImageNet example)
_MIN_SHUFFLE_BUFFER = 1024
_SEED_TAG = 0x5EA1  # domain separation of the derived seeds

#: Files a manual-download dataset needs in manual_dir (named in the error message).
_MANUAL_FILES = {
    "imagenet2012": ("ILSVRC2012_img_train.tar", "ILSVRC2012_img_val.tar"),
}


@dataclasses.dataclass(frozen=True)
class StreamInfo:
  """Static facts of a streamed dataset. num_train / num_eval: whole splits (all hosts)."""

  name: str
  num_classes: int
  num_train: int
  num_eval: int
  train_split: str
  eval_split: str
  image_size: int
  mean: tuple[float, ...]
  std: tuple[float, ...]


# ----------------------------------------------------------------------------- validation


def _is_int(value) -> bool:
  return isinstance(value, (int, np.integer)) and not isinstance(value, bool)


def _check_int(name: str, value, low: int, high: int | None = None) -> int:
  ok = _is_int(value) and value >= low and (high is None or value <= high)
  if not ok:
    allowed = f"an integer >= {low}" if high is None else f"an integer in [{low}, {high}]"
    raise ValueError(f"{name}={value!r} is not allowed: it must be {allowed}")
  return int(value)


def _dtype_name(dtype) -> str:
  if isinstance(dtype, str):
    name = dtype
  else:
    try:
      import ml_dtypes  # noqa: F401, PLC0415  (registers bfloat16 with numpy)

      name = np.dtype(dtype).name
    except TypeError:
      name = str(dtype)
  if name not in DTYPES:
    raise ValueError(f"dtype={dtype!r} is not allowed: use one of {', '.join(DTYPES)}")
  return name


def _check_common(info, batch_size, process_index, process_count, dtype, num_parallel_calls):
  if not isinstance(info, StreamInfo):
    raise ValueError(
        f"info={info!r} is not allowed: pass the StreamInfo that streaming.info returns"
    )
  _check_int("batch_size", batch_size, 1)
  _check_int("process_count", process_count, 1)
  if not (_is_int(process_index) and 0 <= process_index < process_count):
    raise ValueError(
        f"process_index={process_index!r} is not allowed: it must be an integer in "
        f"[0, process_count) = [0, {process_count})"
    )
  dtype = _dtype_name(dtype)
  if num_parallel_calls is not None and not (
      _is_int(num_parallel_calls) and (num_parallel_calls >= 1 or num_parallel_calls == -1)
  ):
    raise ValueError(
        f"num_parallel_calls={num_parallel_calls!r} is not allowed: use None or "
        "tf.data.AUTOTUNE (-1) for autotuning, or an integer >= 1"
    )
  return dtype


# ----------------------------------------------------------------------------- info


def _manual_dir(data_dir: str, manual_dir: str | None) -> str:
  return manual_dir or os.path.join(data_dir, "downloads", "manual")


def _prepare_stream(tfds, builder, name: str, data_dir: str, manual_dir: str | None) -> None:
  """Prepares `builder` unless it is; one-line DataUnavailableError on failure.

  Datasets tfds downloads go through `data.prepare` (its offline check included).
  Manual-download datasets (imagenet2012) are built straight from manual_dir: there is
  nothing to download, so no network check applies, and a failure names the files
  that are missing there and tfds' instructions.
  """
  instructions = getattr(builder, "MANUAL_DOWNLOAD_INSTRUCTIONS", None)
  if not instructions:
    prepare(tfds, builder, name, data_dir, manual_dir)
    return
  if is_prepared(builder):
    return
  # (no prepared copy of a manual-download dataset is on tfds' GCS bucket: don't look)
  config = tfds.download.DownloadConfig(manual_dir=manual_dir, try_download_gcs=False)
  try:
    builder.download_and_prepare(download_config=config)
  except Exception as e:  # noqa: BLE001  (tfds' manual-dir assertions, archive and I/O errors)
    where = _manual_dir(data_dir, manual_dir)
    needed = _MANUAL_FILES.get(builder.name, ())
    missing = [f for f in needed if not os.path.isfile(os.path.join(where, f))]
    detail = f"{', '.join(missing)} not found there" if missing else one_line(e)
    raise DataUnavailableError(
        f"{name}: not prepared in data_dir={data_dir} and could not be built from "
        f"manual_dir={where} ({detail}); {' '.join(str(instructions).split())}"
    ) from e


def _check_features(tfds, builder, name: str):
  """(image feature, label feature); one-line ValueError unless usable."""
  features = builder.info.features
  keys = list(features.keys())
  image = features["image"] if "image" in keys else None
  label = features["label"] if "label" in keys else None
  image_ok = (
      isinstance(image, tfds.features.Image)
      and len(image.shape) == 3
      and image.shape[-1] in (None, 1, 3)
      and np.dtype(image.np_dtype) == np.uint8
  )
  if not image_ok or not isinstance(label, tfds.features.ClassLabel):
    found = ", ".join(f"{k}: {type(features[k]).__name__}" for k in keys)
    raise ValueError(
        f"{name}: cannot be streamed: it needs an 'image' feature (tfds.features.Image, uint8, "
        f"1 or 3 channels) and an integer 'label' feature (tfds.features.ClassLabel); "
        f"its features are {{{found}}}"
    )
  return image, label


def _split_sizes(builder) -> dict[str, int]:
  sizes = {str(k): int(v.num_examples) for k, v in builder.info.splits.items()}
  if sizes:
    return sizes
  # Metadata without split sizes: tfds.testing.mock_data (no metadata files), which
  # accepts any split name; count the examples the (mocked) reader yields instead.
  for split in ("train", "validation"):
    count = int(builder.as_dataset(split=split).cardinality())
    if count >= 0:
      sizes[split] = count
  return sizes


def info(
    name: str, *, data_dir: str | None = None, manual_dir: str | None = None, image_size: int = 224
) -> StreamInfo:
  """Prepares tfds dataset `name` if needed and returns its StreamInfo.

  data_dir: tfds data directory (default tfds' own: $TFDS_DATA_DIR or
  ~/tensorflow_datasets). manual_dir: manually downloaded files (imagenet2012: the two
  ILSVRC2012 tars; default <data_dir>/downloads/manual). image_size: the crop side S.
  The evaluation split is 'validation' when the dataset has one, else 'test'.
  One-line ValueError (DataUnavailableError when the data cannot be obtained) on failure.
  """
  if not isinstance(name, str) or not name:
    raise ValueError(f"name={name!r} is not allowed: it must be a tfds dataset name")
  image_size = _check_int("image_size", image_size, 1)
  data_dir = os.path.expanduser(os.fspath(data_dir)) if data_dir else None
  manual_dir = os.path.expanduser(os.fspath(manual_dir)) if manual_dir else None
  shown_dir = default_data_dir(data_dir)
  tfds = import_tfds()
  from fda_biper_jax.data.datasets import synthetic_jpeg  # noqa: F401, PLC0415  (registers it)

  try:
    builder = tfds.builder(name, data_dir=data_dir)
  except Exception as e:  # noqa: BLE001  (unknown name or config)
    raise ValueError(f"{name}: not a usable tfds dataset ({one_line(e)})") from e
  _, label = _check_features(tfds, builder, name)  # before any (long) preparation
  _prepare_stream(tfds, builder, name, shown_dir, manual_dir)
  sizes = _split_sizes(builder)
  eval_split = next((s for s in ("validation", "test") if s in sizes), None)
  if "train" not in sizes or eval_split is None:
    raise ValueError(
        f"{name}: needs a 'train' split and a 'validation' or 'test' split; it has "
        f"{', '.join(sorted(sizes)) or 'none'}"
    )
  return StreamInfo(
      name=name,
      num_classes=int(label.num_classes),
      num_train=sizes["train"],
      num_eval=sizes[eval_split],
      train_split="train",
      eval_split=eval_split,
      image_size=image_size,
      mean=IMAGENET_MEAN,
      std=IMAGENET_STD,
  )


def num_train_batches(info: StreamInfo, batch_size: int, process_count: int) -> int:
  """Training batches per host and epoch: num_train // process_count // batch_size."""
  _check_int("batch_size", batch_size, 1)
  _check_int("process_count", process_count, 1)
  return info.num_train // process_count // batch_size


def num_eval_batches(info: StreamInfo, batch_size: int, process_count: int) -> int:
  """Evaluation batches every host yields: ceil(ceil(num_eval / process_count) / batch_size)."""
  _check_int("batch_size", batch_size, 1)
  _check_int("process_count", process_count, 1)
  per_host = math.ceil(info.num_eval / process_count)
  return math.ceil(per_host / batch_size)


# ----------------------------------------------------------------------------- transforms
# (TensorFlow functions, traced inside tf.data's map; `tf` is imported by the callers.)


def _derived_seeds(seed: int, epoch: int, process_index: int) -> tuple[int, int, tuple[int, int]]:
  """(file shuffle seed, example shuffle seed, augmentation key) of one host's epoch."""
  entropy = [_SEED_TAG, int(seed) % 2**64, int(epoch), int(process_index)]
  state = np.random.SeedSequence(entropy).generate_state(4, np.uint32)
  return int(state[0]), int(state[1]), (int(state[2]), int(state[3]))


def _crop_window(tf, shape, seed, image_size: int):
  """int32 [4] (top, left, height, width) of the RandomResizedCrop window.

  shape: int32 [3] (H, W, C) of the image; seed: int [2] of the stateless sampler.
  """
  shape = tf.cast(shape, tf.int32)
  h, w = shape[0], shape[1]
  whole = tf.constant([0.0, 0.0, 1.0, 1.0], tf.float32, shape=[1, 1, 4])
  begin, size, _ = tf.image.stateless_sample_distorted_bounding_box(
      shape,
      bounding_boxes=whole,
      seed=seed,
      min_object_covered=0.0,  # only area_range constrains the crop
      aspect_ratio_range=ASPECT_RATIO_RANGE,
      area_range=AREA_RANGE,
      max_attempts=MAX_ATTEMPTS,
      use_image_if_no_bounding_boxes=True,
  )
  sampled = tf.stack([begin[0], begin[1], size[0], size[1]])
  # The sampler returns the whole image when no attempt fits: use the centre crop then
  # (as the reference recipes do, also for the rare whole image sampled on purpose).
  side = tf.cast(
      tf.cast(tf.minimum(h, w), tf.float64) * (image_size / (image_size + CROP_PADDING)), tf.int32
  )
  side = tf.maximum(side, 1)
  centre = tf.stack([(h - side + 1) // 2, (w - side + 1) // 2, side, side])
  failed = tf.logical_and(tf.equal(size[0], h), tf.equal(size[1], w))
  return tf.where(failed, centre, sampled)


def _decode_crop(tf, encoded, seed, image_size: int):
  """uint8 [h, w, 3]: the RandomResizedCrop window of an encoded image, decoded."""

  def jpeg():
    window = _crop_window(tf, tf.io.extract_jpeg_shape(encoded), seed, image_size)
    return tf.io.decode_and_crop_jpeg(encoded, window, channels=3)

  def other():
    image = tf.io.decode_image(encoded, channels=3, expand_animations=False)
    window = _crop_window(tf, tf.shape(image), seed, image_size)
    return tf.slice(image, tf.stack([window[0], window[1], 0]), tf.stack([window[2], window[3], 3]))

  return tf.cond(tf.io.is_jpeg(encoded), jpeg, other)


def _normalize(tf, image, dtype: str):
  """float32 [..., 3] pixels in [0, 255] -> (x / 255 - mean) / std, cast to dtype."""
  mean = tf.constant([255.0 * m for m in IMAGENET_MEAN], tf.float32)
  std = tf.constant([255.0 * s for s in IMAGENET_STD], tf.float32)
  image = (image - mean) / std
  return tf.cast(image, tf.bfloat16 if dtype == "bfloat16" else tf.float32)


def _train_image(tf, encoded, position, key, image_size: int, dtype: str):
  """The training transform of one example: crop, resize, flip, normalise."""
  seed = tf.random.experimental.stateless_fold_in(key, position)
  crop_seed, flip_seed = tf.unstack(tf.random.experimental.stateless_split(seed, num=2))
  image = _decode_crop(tf, encoded, crop_seed, image_size)
  image = tf.image.resize(image, [image_size, image_size], method="bilinear", antialias=False)
  image = tf.image.stateless_random_flip_left_right(image, seed=flip_seed)
  image = tf.ensure_shape(image, [image_size, image_size, 3])
  return _normalize(tf, image, dtype)


def _resized_shape(tf, h, w, resize_size: int):
  """(new_h, new_w) with the shorter side resize_size, the longer rounded down."""
  tall = h > w
  new_h = tf.where(tall, h * resize_size // w, resize_size)
  new_w = tf.where(tall, resize_size, w * resize_size // h)
  return new_h, new_w


def _eval_image(tf, encoded, image_size: int, resize_size: int, dtype: str):
  """Shorter side resized to resize_size, central image_size crop, normalised."""
  image = tf.io.decode_image(encoded, channels=3, expand_animations=False)
  shape = tf.shape(image)
  new_h, new_w = _resized_shape(tf, shape[0], shape[1], resize_size)
  image = tf.image.resize(image, tf.stack([new_h, new_w]), method="bilinear", antialias=False)
  top = (new_h - image_size + 1) // 2
  left = (new_w - image_size + 1) // 2
  image = image[top : top + image_size, left : left + image_size, :]
  image = tf.ensure_shape(image, [image_size, image_size, 3])
  return _normalize(tf, image, dtype)


# ----------------------------------------------------------------------------- pipelines


def _options(tf):
  options = tf.data.Options()
  options.deterministic = True
  return options


def _open(tfds, info: StreamInfo, split, data_dir, read_config, shuffle_files: bool):
  """Raw examples (image bytes not decoded) of `split`; one-line error if unreadable."""
  data_dir = os.path.expanduser(os.fspath(data_dir)) if data_dir else None
  from fda_biper_jax.data.datasets import synthetic_jpeg  # noqa: F401, PLC0415  (registers it)

  try:
    builder = tfds.builder(info.name, data_dir=data_dir)
    return builder.as_dataset(
        split=split,
        shuffle_files=shuffle_files,
        read_config=read_config,
        decoders={"image": tfds.decode.SkipDecoding()},
    )
  except Exception as e:  # noqa: BLE001  (not prepared there, unreadable files)
    raise DataUnavailableError(
        f"{info.name}: could not read split {split} from data_dir={default_data_dir(data_dir)} "
        f"({one_line(e)}); call streaming.info with this data_dir first"
    ) from e


def _train_dataset(
    info: StreamInfo,
    *,
    batch_size: int,
    seed: int,
    epoch: int,
    start_batch: int = 0,
    data_dir=None,
    process_index: int = 0,
    process_count: int = 1,
    dtype: str = "float32",
    num_parallel_calls=None,
    with_ids: bool = False,
):
  """The tf.data pipeline of `train_batches` (arguments checked), yielding dict batches.

  Keys 'image' and 'label'; with_ids adds 'position' (the example's index in this
  host's epoch) and 'id' (the dataset's own 'id' feature, where it has one).
  """
  tfds = import_tfds()
  import tensorflow as tf  # noqa: PLC0415

  size = info.image_size
  num_batches = info.num_train // process_count // batch_size
  file_seed, shuffle_seed, key = _derived_seeds(seed, epoch, process_index)
  split = info.train_split
  if process_count > 1:
    split = tfds.even_splits(split, n=process_count, drop_remainder=True)[process_index]
  read_config = tfds.ReadConfig(shuffle_seed=file_seed, options=_options(tf), try_autocache=False)
  ds = _open(tfds, info, split, data_dir, read_config, shuffle_files=True)
  buffer = max(_SHUFFLE_BUFFER_BATCHES * batch_size, _MIN_SHUFFLE_BUFFER)
  ds = ds.shuffle(buffer, seed=shuffle_seed, reshuffle_each_iteration=False)
  ds = ds.enumerate()
  # Raw records: skipped examples are read (and shuffled) but never decoded.
  ds = ds.take(num_batches * batch_size).skip(start_batch * batch_size)
  key = tf.constant(key, tf.int64)

  def transform(position, example):
    out = {
        "image": _train_image(tf, example["image"], position, key, size, dtype),
        "label": tf.cast(example["label"], tf.int32),
    }
    if with_ids:
      out["position"] = position
      if "id" in example:
        out["id"] = example["id"]
    return out

  calls = tf.data.AUTOTUNE if num_parallel_calls is None else num_parallel_calls
  ds = ds.map(transform, num_parallel_calls=calls, deterministic=True)
  ds = ds.batch(batch_size, drop_remainder=True)
  return ds.prefetch(tf.data.AUTOTUNE).with_options(_options(tf))


def _eval_dataset(
    info: StreamInfo,
    *,
    batch_size: int,
    data_dir=None,
    process_index: int = 0,
    process_count: int = 1,
    dtype: str = "float32",
    resize_size: int = 256,
    num_parallel_calls=None,
    with_ids: bool = False,
):
  """The tf.data pipeline of `eval_batches` (arguments checked), yielding dict batches.

  Keys 'image', 'label', 'mask'; with_ids adds 'id' (-1 for padding) where the dataset
  has an 'id' feature.
  """
  tfds = import_tfds()
  import tensorflow as tf  # noqa: PLC0415

  size = info.image_size
  total = num_eval_batches(info, batch_size, process_count) * batch_size
  split = info.eval_split
  if process_count > 1:
    split = tfds.even_splits(split, n=process_count, drop_remainder=False)[process_index]
  read_config = tfds.ReadConfig(options=_options(tf), try_autocache=False)
  ds = _open(tfds, info, split, data_dir, read_config, shuffle_files=False)
  has_id = with_ids and "id" in ds.element_spec
  out_dtype = tf.bfloat16 if dtype == "bfloat16" else tf.float32

  def transform(example):
    out = {
        "image": _eval_image(tf, example["image"], size, resize_size, dtype),
        "label": tf.cast(example["label"], tf.int32),
        "mask": tf.constant(1.0, tf.float32),
    }
    if has_id:
      out["id"] = tf.cast(example["id"], tf.int64)
    return out

  padding = {
      "image": tf.zeros([size, size, 3], out_dtype),
      "label": tf.constant(0, tf.int32),
      "mask": tf.constant(0.0, tf.float32),
  }
  if has_id:
    padding["id"] = tf.constant(-1, tf.int64)
  calls = tf.data.AUTOTUNE if num_parallel_calls is None else num_parallel_calls
  ds = ds.map(transform, num_parallel_calls=calls, deterministic=True)
  ds = ds.concatenate(tf.data.Dataset.from_tensors(padding).repeat()).take(total)
  ds = ds.batch(batch_size, drop_remainder=True)
  return ds.prefetch(tf.data.AUTOTUNE).with_options(_options(tf))


def _iterate(ds, keys: tuple[str, ...]) -> Iterator[tuple[np.ndarray, ...]]:
  for batch in ds.as_numpy_iterator():
    yield tuple(batch[k] for k in keys)


def train_batches(
    info: StreamInfo,
    *,
    batch_size: int,
    seed: int,
    epoch: int,
    start_batch: int = 0,
    data_dir: str | None = None,
    process_index: int = 0,
    process_count: int = 1,
    dtype: Any = "float32",
    num_parallel_calls: int | None = None,
) -> Iterator[tuple[np.ndarray, np.ndarray]]:
  """This process's batches of one training epoch: (images [B, S, S, 3] dtype, labels int32 [B]).

  batch_size: per process. Yields num_train // process_count // batch_size -
  start_batch batches, batches start_batch, start_batch + 1, ... of the epoch;
  deterministic in all arguments (see the module docstring). dtype: 'float32' or
  'bfloat16' (ml_dtypes bfloat16 numpy arrays). num_parallel_calls: threads of the
  decoding map (None: tf.data.AUTOTUNE). Arguments are checked (one-line ValueError)
  before anything is read.
  """
  dtype = _check_common(info, batch_size, process_index, process_count, dtype, num_parallel_calls)
  if not _is_int(seed):
    raise ValueError(f"seed={seed!r} is not allowed: it must be an integer")
  _check_int("epoch", epoch, 0)
  shard = info.num_train // process_count
  num_batches = shard // batch_size
  if num_batches < 1:
    raise ValueError(
        f"batch_size={batch_size} is not allowed: this host's shard of {info.name} "
        f"{info.train_split} has {shard} examples (num_train={info.num_train}, "
        f"process_count={process_count}); use batch_size <= {max(shard, 1)}"
    )
  _check_int("start_batch", start_batch, 0, num_batches)
  ds = _train_dataset(
      info,
      batch_size=int(batch_size),
      seed=int(seed),
      epoch=int(epoch),
      start_batch=int(start_batch),
      data_dir=data_dir,
      process_index=int(process_index),
      process_count=int(process_count),
      dtype=dtype,
      num_parallel_calls=num_parallel_calls,
  )
  return _iterate(ds, ("image", "label"))


def eval_batches(
    info: StreamInfo,
    *,
    batch_size: int,
    data_dir: str | None = None,
    process_index: int = 0,
    process_count: int = 1,
    dtype: Any = "float32",
    resize_size: int = 256,
    num_parallel_calls: int | None = None,
) -> Iterator[tuple[np.ndarray, np.ndarray, np.ndarray]]:
  """This process's part of the evaluation split: (images, labels int32, mask float32).

  Shorter side resized to resize_size, central S x S crop, normalised. Padded to
  full batches (zero images, label 0, mask 0); every host yields
  num_eval_batches(info, batch_size, process_count) batches, and over all hosts
  the examples with mask 1 are the split, each once.
  """
  dtype = _check_common(info, batch_size, process_index, process_count, dtype, num_parallel_calls)
  _check_int("resize_size", resize_size, info.image_size)
  ds = _eval_dataset(
      info,
      batch_size=int(batch_size),
      data_dir=data_dir,
      process_index=int(process_index),
      process_count=int(process_count),
      dtype=dtype,
      resize_size=int(resize_size),
      num_parallel_calls=num_parallel_calls,
  )
  return _iterate(ds, ("image", "label", "mask"))


# ----------------------------------------------------------------------------- to device


def prefetch_to_device(batches: Iterable[tuple], mesh, size: int = 2) -> Iterator[tuple]:
  """Global arrays (`parallel.shard_batch` over `mesh`) of each host batch, `size` ahead.

  Like flax's `jax_utils.prefetch_to_device`, for a global sharded mesh: the next
  `size` batches are already being copied to the devices (jax transfers
  asynchronously) while the caller's step runs on the current one. Every process
  passes its own batches (as train_batches / eval_batches yield them).
  """
  _check_int("size", size, 1)
  return _prefetch(iter(batches), mesh, int(size))


def _prefetch(iterator: Iterator[tuple], mesh, size: int) -> Iterator[tuple]:
  queue: collections.deque = collections.deque()

  def enqueue(n: int) -> None:
    for batch in itertools.islice(iterator, n):
      queue.append(parallel.shard_batch(batch, mesh))

  enqueue(size)
  while queue:
    yield queue.popleft()
    enqueue(1)
