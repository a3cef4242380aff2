"""The trainer's two input sources: small datasets held on device, large ones streamed.

Both give the trainer the same four things: `steps_per_epoch`, `train_batch(step)`
(the global batch of a step, a pair of arrays sharded over the mesh),
`preprocess(key, images)` (what the jitted step applies to it before the model)
and `eval_batches()` (global (images, labels, mask) batches covering the whole
evaluation split once), plus `image_shape` and `num_classes` for the model.

`InMemory` (config.input = 'memory': CIFAR, MNIST, Fashion-MNIST, synthetic)
holds this process's shards of the training split on its devices; a step's
global batch is gathered there, and crop + flip + normalisation run inside the
step with jax.random.

Data order and the number of processes. The training split is cut into
`data_shards` equal shards (default: one per process); each process holds
`data_shards / process_count` of them. Step i of epoch e takes batch_size /
data_shards examples from every shard s, at row i of shard s's permutation for
(seed, s, e), and the global batch is the shards' parts in shard order. The
order depends on data_shards and the seed only: one process holding two shards
feeds its devices exactly the batches two processes holding one shard each
feed theirs, which is how a multi-process run is checked against a single
process (tests/test_multihost.py).

`Streamed` (config.input = 'stream': imagenet2012 or any tfds image dataset)
reads this host's shard through `streaming` (tf.data workers decode, crop,
flip and normalise), prefetches it to the devices, and starts an epoch at any
step, so a resumed run continues the stream where the checkpoint left it.
"""

from __future__ import annotations

from typing import Iterator

import jax
import jax.numpy as jnp
import numpy as np

from fda_biper_jax.data import memory as data_lib
from fda_biper_jax import parallel

INPUTS = ("memory", "stream")


def data_shards(config) -> int:
  """The number of training-data shards (config.data_shards, 0 = one per process)."""
  return config.data_shards or jax.process_count()


def check(config, mesh) -> None:
  """One-line ValueErrors for input settings that cannot work; reads no data."""
  if config.input not in INPUTS:
    raise ValueError(f"input={config.input!r} is not allowed; allowed: {list(INPUTS)}")
  if config.input == "stream" and config.dataset == "synthetic":
    raise ValueError("input='stream' needs a tfds dataset, not dataset='synthetic'")
  if config.input == "memory" and config.dataset not in data_lib.DATASETS + ("synthetic",):
    raise ValueError(
        f"dataset={config.dataset!r} is not allowed with input='memory'; allowed: "
        f"{list(data_lib.DATASETS + ('synthetic',))} (other tfds datasets: input='stream')")
  shards, procs = data_shards(config), jax.process_count()
  if config.input == "memory" and (shards < 1 or shards % procs or config.batch_size % shards):
    raise ValueError(
        f"data_shards={config.data_shards} is not allowed: it must be a multiple of the "
        f"process count {procs} that divides batch_size={config.batch_size} (0 = {procs})")
  parallel.check_batch_size(config.batch_size, mesh)
  parallel.check_batch_size(config.eval_batch_size or config.batch_size, mesh)


def _split_evenly(arrays, index: int, count: int):
  n = len(arrays[0]) // count
  return tuple(a[index * n:(index + 1) * n] for a in arrays)


def _padded_batches(arrays, batch_size: int) -> Iterator[tuple[np.ndarray, ...]]:
  """(images, labels, mask) numpy batches over `arrays`, the last padded with mask 0."""
  images, labels = arrays
  n = images.shape[0]
  for i in range(0, max(n, 1), batch_size):
    x, y = images[i:i + batch_size], labels[i:i + batch_size]
    pad = batch_size - x.shape[0]
    yield (np.concatenate([x, np.zeros((pad, *x.shape[1:]), x.dtype)]),
           np.concatenate([y, np.zeros(pad, y.dtype)]),
           np.concatenate([np.ones(x.shape[0], np.float32), np.zeros(pad, np.float32)]))


def load_shards(config, split: str, shards, count: int):
  """(info, [(images, labels) of shard i of `count`, for i in `shards`]) as numpy.

  Shards are equal-sized and disjoint (the remainder of fewer than `count`
  examples is left out); a tfds dataset reads only the shards asked for.
  """
  if config.dataset == "synthetic":
    s = config.synthetic
    d = data_lib.synthetic(s.num_train, s.num_test, tuple(s.image_shape), s.num_classes,
                           seed=s.seed)
    return (data_lib.synthetic_info(d, s.num_classes),
            [_split_evenly(d[split], i, count) for i in shards])
  kw = dict(data_dir=config.data_dir or None, manual_dir=config.manual_dir or None)
  return data_lib.info(config.dataset), [
      data_lib.load(config.dataset, split, process_index=i, process_count=count, **kw)
      for i in shards]


class InMemory:
  """This process's training shards on its devices; batches gathered there."""

  def __init__(self, config, mesh, data_key: jax.Array, train: bool = True):
    self.mesh, self.key = mesh, data_key
    procs, index = jax.process_count(), jax.process_index()
    self.info, [self.test] = load_shards(config, "test", [index], procs)
    self.image_shape, self.num_classes = self.info.image_shape, self.info.num_classes
    self.eval_batch = (config.eval_batch_size or config.batch_size) // procs
    if train:
      self._load_train(config)

  def _load_train(self, config):
    procs, index = jax.process_count(), jax.process_index()
    self.shards = data_shards(config)
    local = range(index * self.shards // procs, (index + 1) * self.shards // procs)
    _, parts = load_shards(config, "train", local, self.shards)
    self.shard_size = parts[0][0].shape[0]
    self.shard_batch = config.batch_size // self.shards
    self.local_shards = list(local)
    self.num_train = self.shard_size * self.shards
    self.steps_per_epoch = self.shard_size // self.shard_batch
    if self.steps_per_epoch < 1:
      raise ValueError(f"batch_size={config.batch_size} is larger than the {self.num_train} "
                       "training examples")
    self.pad, self.flip = config.crop_pad, config.flip
    train = tuple(np.concatenate([p[k] for p in parts]) for k in range(2))
    self.images, self.labels = parallel.replicate_local(train, self.mesh)
    self.gather = parallel.host_batch_gatherer(self.mesh)
    self.epoch, self.indices = -1, None

  def host_indices(self, epoch: int) -> jax.Array:
    """[steps_per_epoch, host batch] rows of this process's data for each step of `epoch`
    (on device: a step slices its row there, with no host-to-device copy)."""
    rows = [data_lib.epoch_permutation(
        jax.random.fold_in(jax.random.fold_in(self.key, s), epoch), self.shard_size,
        self.shard_batch) + j * self.shard_size for j, s in enumerate(self.local_shards)]
    return jnp.concatenate(rows, axis=1)

  def train_batch(self, step: int):
    epoch, i = divmod(step, self.steps_per_epoch)
    if epoch != self.epoch:
      self.epoch, self.indices = epoch, self.host_indices(epoch)
    return self.gather(self.images, self.labels, self.indices[i])

  def preprocess(self, key, images):
    """Random crop (zero padding, as the reference CIFAR pipelines) and flip, then normalise."""
    return data_lib.normalize(data_lib.augment(key, images, pad=self.pad, flip=self.flip),
                              self.info)

  def eval_preprocess(self, images):
    return data_lib.normalize(images, self.info)

  def eval_batches(self):
    for batch in _padded_batches(self.test, self.eval_batch):
      yield parallel.shard_batch(batch, self.mesh)


class Streamed:
  """This host's shard streamed from tfds through `streaming`, prefetched to the devices."""

  def __init__(self, config, mesh, data_key: jax.Array, train: bool = True):
    del train  # nothing is read before the first batch is asked for
    from fda_biper_jax.data import streaming  # noqa: PLC0415  (imports TensorFlow)

    self.streaming, self.mesh = streaming, mesh
    procs = jax.process_count()
    self.kw = dict(data_dir=config.data_dir or None, process_index=jax.process_index(),
                   process_count=procs, dtype=config.compute_dtype,
                   num_parallel_calls=config.stream.num_parallel_calls or None)
    self.info = streaming.info(config.dataset, data_dir=config.data_dir or None,
                               manual_dir=config.manual_dir or None,
                               image_size=config.stream.image_size)
    self.seed = int(jax.random.randint(data_key, (), 0, 2**31 - 1))
    self.batch = config.batch_size // procs
    self.eval_batch = (config.eval_batch_size or config.batch_size) // procs
    self.resize = config.stream.eval_resize
    self.prefetch = config.stream.prefetch
    self.num_train = self.info.num_train
    self.steps_per_epoch = self.info.num_train // procs // self.batch
    if self.steps_per_epoch < 1:
      raise ValueError(f"batch_size={config.batch_size} is larger than the {self.num_train} "
                       "training examples")
    s = self.info.image_size
    self.image_shape, self.num_classes = (s, s, 3), self.info.num_classes
    self.epoch, self.next_step, self.stream = -1, None, None

  def train_batch(self, step: int):
    epoch, i = divmod(step, self.steps_per_epoch)
    if epoch != self.epoch or step != self.next_step:
      batches = self.streaming.train_batches(self.info, batch_size=self.batch, seed=self.seed,
                                             epoch=epoch, start_batch=i, **self.kw)
      self.stream = self.streaming.prefetch_to_device(batches, self.mesh, self.prefetch)
      self.epoch = epoch
    self.next_step = step + 1
    return next(self.stream)

  @staticmethod
  def preprocess(key, images):
    del key  # cropped, flipped and normalised by the tf.data workers
    return images

  @staticmethod
  def eval_preprocess(images):
    return images

  def eval_batches(self):
    batches = self.streaming.eval_batches(self.info, batch_size=self.eval_batch,
                                          resize_size=self.resize, **self.kw)
    return self.streaming.prefetch_to_device(batches, self.mesh, self.prefetch)


def create(config, mesh, data_key: jax.Array, train: bool = True):
  """The input source config.input names, with this process's data loaded or opened
  (train=False: the evaluation split only)."""
  return (InMemory if config.input == "memory" else Streamed)(config, mesh, data_key, train)
