"""Tests of fda_biper_jax.data: static facts, tfds loading (mocked or from tiny local
IDX files, never the network), per-host sharding, on-device augmentation,
normalisation, epoch permutations and synthetic data."""

import dataclasses
import gzip
import os
import pathlib
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from fda_biper_jax import data
from fda_biper_jax.data import memory
from fda_biper_jax.data.datasets import idx, sources

tfds = pytest.importorskip("tensorflow_datasets")


# ----------------------------------------------------------------------------- helpers


def _one_line_value_error(excinfo):
  message = str(excinfo.value)
  assert isinstance(excinfo.value, ValueError)
  assert "\n" not in message, message
  return message


def _write_idx(directory, name, array, compress=True):
  raw = idx.encode(array)
  path = os.path.join(directory, name + (".gz" if compress else ""))
  if compress:
    with gzip.open(path, "wb") as f:
      f.write(raw)
  else:
    with open(path, "wb") as f:
      f.write(raw)
  return raw


@pytest.fixture
def tiny_fashion(tmp_path, monkeypatch):
  """A tiny Fashion-MNIST in Debian's layout (four IDX .gz files in one folder), with
  the local builder's expected digests replaced by those of these files.

  Image i carries its index in pixel (0, 0) (and its label in pixel (0, 1)), so
  shards can be identified exactly."""
  from fda_biper_jax.data.datasets import fashion_mnist_local as fml

  manual = tmp_path / "manual"
  manual.mkdir()
  rng = np.random.default_rng(0)
  arrays, files = {}, {}
  for split, n, prefix in (("train", 13, "train"), ("test", 5, "t10k")):
    images = rng.integers(0, 256, size=(n, 28, 28), dtype=np.uint8)
    labels = (np.arange(n) * 3 % 10).astype(np.uint8)
    images[:, 0, 0] = np.arange(n)
    images[:, 0, 1] = labels
    raw_images = _write_idx(manual, f"{prefix}-images-idx3-ubyte", images)
    raw_labels = _write_idx(manual, f"{prefix}-labels-idx1-ubyte", labels)
    files[split] = (
        idx.IdxSpec(f"{prefix}-images-idx3-ubyte", (n, 28, 28), idx.sha256_hex(raw_images)),
        idx.IdxSpec(f"{prefix}-labels-idx1-ubyte", (n,), idx.sha256_hex(raw_labels)),
    )
    arrays[split] = (images, labels)
  monkeypatch.setattr(fml, "FILES", files)
  return {"manual_dir": str(manual), "data_dir": str(tmp_path / "tfds"), "arrays": arrays}


# ----------------------------------------------------------------------------- info


def test_info_static_facts():
  assert set(data.DATASETS) >= {"cifar10", "cifar100", "fashion_mnist", "mnist"}
  expected = {
      "cifar10": (10, (32, 32, 3), 50000, 10000),
      "cifar100": (100, (32, 32, 3), 50000, 10000),
      "fashion_mnist": (10, (28, 28, 1), 60000, 10000),
      "mnist": (10, (28, 28, 1), 60000, 10000),
  }
  for name, (classes, shape, n_train, n_test) in expected.items():
    i = data.info(name)
    assert isinstance(i, data.DatasetInfo)
    assert (i.name, i.num_classes, i.image_shape, i.num_train, i.num_test) == (
        name,
        classes,
        shape,
        n_train,
        n_test,
    )
    assert len(i.mean) == len(i.std) == shape[-1]
    assert all(0 < m < 1 for m in i.mean) and all(0 < s < 1 for s in i.std)
  for name in data.DATASETS:
    hash(data.info(name))  # usable as a static jit argument
  with pytest.raises(dataclasses.FrozenInstanceError):
    data.info("mnist").num_classes = 3


def test_info_unknown_name():
  with pytest.raises(ValueError) as excinfo:
    data.info("imagenet_nope")
  message = _one_line_value_error(excinfo)
  assert "imagenet_nope" in message
  assert all(name in message for name in data.DATASETS)


# ----------------------------------------------------------------------------- load (mocked tfds)


@pytest.mark.parametrize("name", ["cifar10", "cifar100", "fashion_mnist", "mnist"])
def test_load_every_dataset_with_mock_data(name, tmp_path):
  i = data.info(name)
  empty_manual = tmp_path / "manual"
  empty_manual.mkdir()
  with tfds.testing.mock_data(num_examples=6):
    for split in ("train", "test"):
      images, labels = data.load(
          name, split, data_dir=str(tmp_path / "tfds"), manual_dir=str(empty_manual)
      )
      assert images.shape == (6, *i.image_shape) and images.dtype == np.uint8
      assert labels.shape == (6,) and labels.dtype == np.int32
      assert labels.min() >= 0 and labels.max() < i.num_classes


def test_load_rejects_bad_arguments():
  with pytest.raises(ValueError, match="unknown dataset"):
    data.load("svhn", "train")
  with pytest.raises(ValueError, match="split"):
    data.load("mnist", "validation")
  with pytest.raises(ValueError, match="process_index"):
    data.load("mnist", "train", process_index=2, process_count=2)


# ----------------------------------------------------------------------------- Fashion-MNIST local builder


def test_fashion_mnist_local_builder_reads_debian_layout(tiny_fashion):
  for split in ("train", "test"):
    images, labels = data.load(
        "fashion_mnist",
        split,
        data_dir=tiny_fashion["data_dir"],
        manual_dir=tiny_fashion["manual_dir"],
    )
    want_images, want_labels = tiny_fashion["arrays"][split]
    assert images.dtype == np.uint8 and labels.dtype == np.int32
    # tfds stores examples in a deterministic shuffled order (as the official builder
    # does); pixel (0, 0) holds the original index.
    order = images[:, 0, 0, 0].astype(int)
    np.testing.assert_array_equal(np.sort(order), np.arange(len(want_labels)))
    np.testing.assert_array_equal(images, want_images[order][..., None])
    np.testing.assert_array_equal(labels, want_labels[order])
    again, _ = data.load(
        "fashion_mnist",
        split,
        data_dir=pathlib.Path(tiny_fashion["data_dir"]),
        manual_dir=pathlib.Path(tiny_fashion["manual_dir"]),
    )
    np.testing.assert_array_equal(again, images)  # same order every time
  prepared = os.path.join(tiny_fashion["data_dir"], "fashion_mnist_local", "1.0.0")
  assert os.path.isfile(os.path.join(prepared, "dataset_info.json"))
  # Once prepared, the manual files are no longer needed.
  for f in os.listdir(tiny_fashion["manual_dir"]):
    os.remove(os.path.join(tiny_fashion["manual_dir"], f))
  images, _ = data.load(
      "fashion_mnist",
      "test",
      data_dir=tiny_fashion["data_dir"],
      manual_dir=tiny_fashion["manual_dir"],
  )
  assert images.shape == (5, 28, 28, 1)


def test_fashion_mnist_local_builder_has_official_features():
  from fda_biper_jax.data.datasets import fashion_mnist_local as fml

  official = tfds.builder("fashion_mnist").info
  local = fml.FashionMnistLocal(data_dir="/tmp/non-existing-tfds-dir").info
  assert repr(local.features) == repr(official.features)
  assert local.supervised_keys == official.supervised_keys


@pytest.mark.parametrize("process_count", [2, 3])
def test_per_host_shards_are_disjoint_equal_and_covering(tiny_fashion, process_count):
  kwargs = dict(data_dir=tiny_fashion["data_dir"], manual_dir=tiny_fashion["manual_dir"])
  n = 13
  seen = []
  for process_index in range(process_count):
    images, labels = data.load(
        "fashion_mnist", "train", process_index=process_index, process_count=process_count, **kwargs
    )
    assert images.shape == (n // process_count, 28, 28, 1)
    np.testing.assert_array_equal(labels, images[:, 0, 1, 0])  # rows intact
    seen.append(images[:, 0, 0, 0].astype(int))
  flat = np.concatenate(seen)
  assert len(set(flat)) == len(flat) == process_count * (n // process_count)  # disjoint
  assert n - len(flat) < process_count  # covering up to a remainder
  assert set(flat) <= set(range(n))


def test_tampered_fashion_mnist_file_is_rejected(tiny_fashion):
  path = os.path.join(tiny_fashion["manual_dir"], "train-images-idx3-ubyte.gz")
  with gzip.open(path, "rb") as f:
    raw = bytearray(f.read())
  raw[-1] ^= 0xFF  # one pixel changed, header intact, still valid gzip
  with gzip.open(path, "wb") as f:
    f.write(bytes(raw))
  with pytest.raises(ValueError) as excinfo:
    data.load(
        "fashion_mnist",
        "test",
        data_dir=tiny_fashion["data_dir"],
        manual_dir=tiny_fashion["manual_dir"],
    )
  message = _one_line_value_error(excinfo)
  assert "fashion_mnist" in message and "sha256" in message
  assert "train-images-idx3-ubyte" in message and tiny_fashion["data_dir"] in message
  assert "dataset-fashion-mnist" in message  # says how to get good files
  assert not os.path.exists(os.path.join(tiny_fashion["data_dir"], "fashion_mnist_local", "1.0.0"))


def test_fashion_mnist_missing_or_broken_files_are_rejected(tiny_fashion):
  kwargs = dict(data_dir=tiny_fashion["data_dir"], manual_dir=tiny_fashion["manual_dir"])
  os.remove(os.path.join(tiny_fashion["manual_dir"], "t10k-labels-idx1-ubyte.gz"))
  with pytest.raises(ValueError) as excinfo:
    data.load("fashion_mnist", "train", **kwargs)
  message = _one_line_value_error(excinfo)
  assert "t10k-labels-idx1-ubyte" in message and tiny_fashion["manual_dir"] in message
  with open(os.path.join(tiny_fashion["manual_dir"], "t10k-labels-idx1-ubyte.gz"), "wb") as f:
    f.write(b"not gzip at all")
  with pytest.raises(ValueError) as excinfo:
    data.load("fashion_mnist", "train", **kwargs)
  assert "gzip" in _one_line_value_error(excinfo)


def test_real_digests_reject_other_content(tmp_path):
  """With the real (hard-coded) digests, a right-shaped but different file fails."""
  from fda_biper_jax.data.datasets import fashion_mnist_local as fml

  spec = fml.FILES["test"][1]
  assert spec.shape == (10000,) and len(spec.sha256) == 64
  _write_idx(tmp_path, spec.name, np.zeros(10000, np.uint8))
  with pytest.raises(idx.IdxError, match="sha256"):
    idx.read_verified(idx.find(tmp_path, spec.name), spec)
  _write_idx(tmp_path, spec.name, np.zeros(9999, np.uint8), compress=False)
  os.remove(os.path.join(tmp_path, spec.name + ".gz"))
  with pytest.raises(idx.IdxError, match="shape"):
    idx.read_verified(idx.find(tmp_path, spec.name), spec)


# ----------------------------------------------------------------------------- missing data, no network


def test_missing_data_without_network_fails_fast(tmp_path, monkeypatch):
  monkeypatch.setattr(memory, "_resolves", lambda host, timeout=5.0: False)
  for var in memory.PROXY_VARS:
    monkeypatch.delenv(var, raising=False)
  start = time.monotonic()
  with pytest.raises(ValueError) as excinfo:
    data.load(
        "cifar10", "train", data_dir=str(tmp_path / "empty"), manual_dir=str(tmp_path / "nothing")
    )
  assert time.monotonic() - start < 20
  message = _one_line_value_error(excinfo)
  assert "cifar10" in message and str(tmp_path / "empty") in message
  assert "cifar-10-binary.tar.gz" in message and "manual_dir" in message


@pytest.mark.parametrize("name", data.DATASETS)
def test_source_table_matches_tfds(name):
  builder = tfds.builder(name, data_dir="/nonexistent")
  assert sources.URLS[name] == {u: ui.filename for u, ui in builder.url_infos.items()}


def test_check_obtainable_without_tfds(tmp_path, monkeypatch):
  """The pre-import check: fails offline with nothing on disk, passes otherwise."""
  monkeypatch.delitem(sys.modules, "tensorflow_datasets")  # as in a fresh process
  monkeypatch.setattr(memory, "_resolves", lambda host, timeout=5.0: False)
  for var in memory.PROXY_VARS:
    monkeypatch.delenv(var, raising=False)
  empty, manual = tmp_path / "data", tmp_path / "manual"
  manual.mkdir()
  kw = dict(data_dir=str(empty), manual_dir=str(manual))
  for name in data.DATASETS:
    with pytest.raises(data.DataUnavailableError) as excinfo:
      data.check_obtainable(name, **kw)
    message = _one_line_value_error(excinfo)
    assert message.startswith(f"{name}: not prepared in data_dir={empty}") and "no network" in message
  # A source file in manual_dir (or its decompressed twin), a prepared copy, a
  # resolving host or a proxy: the check passes and leaves the work to `load`.
  (manual / "train-images-idx3-ubyte").write_bytes(b"")
  data.check_obtainable("mnist", **kw)
  data.check_obtainable("fashion_mnist", **kw)
  (empty / "cifar10" / "3.0.2").mkdir(parents=True)
  (empty / "cifar10" / "3.0.2" / "dataset_info.json").write_text("{}")
  data.check_obtainable("cifar10", **kw)
  with pytest.raises(data.DataUnavailableError):
    data.check_obtainable("cifar100", **kw)
  monkeypatch.setenv("HTTPS_PROXY", "http://proxy:3128")
  data.check_obtainable("cifar100", **kw)
  monkeypatch.delenv("HTTPS_PROXY")
  monkeypatch.setattr(memory, "_resolves", lambda host, timeout=5.0: host == "www.cs.toronto.edu")
  data.check_obtainable("cifar100", **kw)
  with pytest.raises(ValueError, match="unknown dataset 'svhn'"):
    data.check_obtainable("svhn", **kw)


def test_failed_download_becomes_one_line_value_error(tmp_path, monkeypatch):
  def fail(self, *args, **kwargs):
    raise ConnectionError("Failed to resolve 'storage.googleapis.com'\n(with a traceback)")

  monkeypatch.setattr(tfds.core.DatasetBuilder, "download_and_prepare", fail)
  with pytest.raises(ValueError) as excinfo:
    data.load("mnist", "test", data_dir=str(tmp_path))
  message = _one_line_value_error(excinfo)
  assert "mnist" in message and str(tmp_path) in message
  assert "ConnectionError" in message and "internet" in message


def test_fashion_mnist_without_files_or_network(tmp_path, monkeypatch):
  monkeypatch.setattr(memory, "_resolves", lambda host, timeout=5.0: False)
  for var in memory.PROXY_VARS:
    monkeypatch.delenv(var, raising=False)
  (tmp_path / "empty_manual").mkdir()
  with pytest.raises(ValueError) as excinfo:
    data.load(
        "fashion_mnist",
        "train",
        data_dir=str(tmp_path / "tfds"),
        manual_dir=str(tmp_path / "empty_manual"),
    )
  message = _one_line_value_error(excinfo)
  assert "fashion_mnist" in message and "train-images-idx3-ubyte.gz" in message
  assert "dataset-fashion-mnist" in message and str(tmp_path / "empty_manual") in message


# ----------------------------------------------------------------------------- augment


def _shifted(image, dy, dx):
  """image moved by (dy, dx) with zeros entering from the border."""
  h, w = image.shape[:2]
  p = max(abs(dy), abs(dx))
  padded = np.pad(image, ((p, p), (p, p), (0, 0)))
  return padded[p - dy : p - dy + h, p - dx : p - dx + w]


def test_augment_preserves_shape_and_dtype():
  rng = jax.random.key(0)
  for dtype in (np.uint8, np.float32):
    x = np.ones((5, 12, 10, 3), dtype)
    y = data.augment(rng, x)
    assert y.shape == x.shape and y.dtype == x.dtype
  single = data.augment(rng, jnp.ones((12, 10, 3), jnp.uint8), pad=2)
  assert single.shape == (12, 10, 3)


def test_augment_identity_when_disabled():
  x = np.random.default_rng(1).integers(0, 256, (4, 8, 8, 3), dtype=np.uint8)
  np.testing.assert_array_equal(data.augment(jax.random.key(2), x, pad=0, flip=False), x)


def test_augment_crop_is_shifted_window_with_zero_border():
  pad = 2
  x = np.arange(1, 1 + 64 * 9 * 7 * 2).reshape(64, 9, 7, 2).astype(np.float32)  # no zeros
  y = np.asarray(data.augment(jax.random.key(3), jnp.asarray(x), pad=pad, flip=False))
  shifts = []
  for image, out in zip(x, y, strict=True):
    matches = [
        (dy, dx)
        for dy in range(-pad, pad + 1)
        for dx in range(-pad, pad + 1)
        if np.array_equal(out, _shifted(image, dy, dx))
    ]
    assert len(matches) == 1, "output is not a zero-filled shifted window of its input"
    shifts.append(matches[0])
  assert len(set(shifts)) > 10  # per-image offsets, covering many of the 25
  assert (y == 0).any()  # zeros entered from the border


def test_augment_flip_reverses_width():
  x = np.arange(32 * 4 * 5 * 1).reshape(32, 4, 5, 1).astype(np.int32)
  y = np.asarray(data.augment(jax.random.key(4), jnp.asarray(x), pad=0, flip=True))
  flipped = [np.array_equal(o, i[:, ::-1]) for i, o in zip(x, y, strict=True)]
  kept = [np.array_equal(o, i) for i, o in zip(x, y, strict=True)]
  assert all(f or k for f, k in zip(flipped, kept, strict=True))
  assert 0 < sum(flipped) < len(x)


def test_augment_randomness_and_jit():
  x = np.random.default_rng(5).uniform(size=(8, 16, 16, 3)).astype(np.float32)
  a = data.augment(jax.random.key(6), x)
  assert np.array_equal(a, data.augment(jax.random.key(6), x))
  assert not np.array_equal(a, data.augment(jax.random.key(7), x))
  jitted = jax.jit(lambda r, im: data.augment(r, im, pad=4, flip=True))
  np.testing.assert_array_equal(jitted(jax.random.key(6), x), a)


# ----------------------------------------------------------------------------- normalize


def test_normalize_values_and_jit():
  i = data.info("cifar10")
  x = np.zeros((2, 32, 32, 3), np.uint8)
  x[1] = 255
  y = data.normalize(x, i)
  assert y.dtype == jnp.float32 and y.shape == x.shape
  mean, std = np.array(i.mean), np.array(i.std)
  np.testing.assert_allclose(y[0, 0, 0], -mean / std, rtol=1e-6)
  np.testing.assert_allclose(y[1, 5, 7], (1 - mean) / std, rtol=1e-6)
  np.testing.assert_allclose(jax.jit(data.normalize)(x, i), y, rtol=1e-6)  # info is a static pytree
  np.testing.assert_allclose(data.normalize(jnp.asarray(x), "cifar10"), y, rtol=1e-6)
  # On real statistics the normalised data is about zero-mean, unit-std.
  d = data.synthetic(200, 10, (8, 8, 3), 4)
  z = data.normalize(d["train"][0], data.synthetic_info(d, 4))
  np.testing.assert_allclose(z.mean(axis=(0, 1, 2)), 0, atol=1e-3)
  np.testing.assert_allclose(z.std(axis=(0, 1, 2)), 1, atol=1e-3)


# ----------------------------------------------------------------------------- epoch_permutation


def test_epoch_permutation():
  perm = data.epoch_permutation(jax.random.key(0), 12, 4)
  assert perm.shape == (3, 4) and perm.dtype == jnp.int32
  np.testing.assert_array_equal(np.sort(np.asarray(perm).ravel()), np.arange(12))
  short = np.asarray(data.epoch_permutation(jax.random.key(1), 10, 3))
  assert short.shape == (3, 3) and len(set(short.ravel())) == 9 and short.max() < 10
  a = data.epoch_permutation(jax.random.key(2), 100, 10)
  assert np.array_equal(a, data.epoch_permutation(jax.random.key(2), 100, 10))
  assert not np.array_equal(a, data.epoch_permutation(jax.random.key(3), 100, 10))
  with pytest.raises(ValueError):
    data.epoch_permutation(jax.random.key(0), 3, 4)


# ----------------------------------------------------------------------------- synthetic


def _nearest_mean_accuracy(train, test, num_classes):
  x, y = train[0].reshape(len(train[0]), -1).astype(np.float32), train[1]
  means = np.stack([x[y == k].mean(0) for k in range(num_classes)])
  t = test[0].reshape(len(test[0]), -1).astype(np.float32)
  d = (t**2).sum(1, keepdims=True) - 2 * t @ means.T + (means**2).sum(1)
  return float((d.argmin(1) == test[1]).mean())


@pytest.mark.parametrize("shape,classes", [((28, 28, 1), 10), ((32, 32, 3), 100)])
def test_synthetic_is_learnable_and_deterministic(shape, classes):
  n_train, n_test = 10 * classes, 3 * classes
  d = data.synthetic(n_train, n_test, shape, classes, seed=0)
  assert set(d) == {"train", "test"}
  for split, n in (("train", n_train), ("test", n_test)):
    images, labels = d[split]
    assert images.shape == (n, *shape) and images.dtype == np.uint8
    assert labels.shape == (n,) and labels.dtype == np.int32
    np.testing.assert_array_equal(np.bincount(labels, minlength=classes), n // classes)
  assert _nearest_mean_accuracy(d["train"], d["test"], classes) > 0.9
  # Templates are left-right symmetric (flips keep the class) and smooth (crops change
  # the interior little).
  test_images = jnp.asarray(d["test"][0])
  flipped = np.asarray(data.augment(jax.random.key(0), test_images, pad=0, flip=True))
  assert _nearest_mean_accuracy(d["train"], (flipped, d["test"][1]), classes) > 0.9
  cropped = np.asarray(data.augment(jax.random.key(0), test_images, pad=4, flip=True))
  inner = (d["train"][0][:, 4:-4, 4:-4], d["train"][1])
  assert _nearest_mean_accuracy(inner, (cropped[:, 4:-4, 4:-4], d["test"][1]), classes) > 0.8
  again = data.synthetic(n_train, n_test, shape, classes, seed=0)
  for split in ("train", "test"):
    np.testing.assert_array_equal(again[split][0], d[split][0])
    np.testing.assert_array_equal(again[split][1], d[split][1])
  other = data.synthetic(n_train, n_test, shape, classes, seed=1)
  assert not np.array_equal(other["train"][0], d["train"][0])




def test_synthetic_info_describes_the_generated_split():
  d = data.synthetic(64, 16, (8, 8, 1), 4)
  i = data.synthetic_info(d, 4)
  assert (i.num_train, i.num_test, i.image_shape, i.num_classes) == (64, 16, (8, 8, 1), 4)
  images = d["train"][0]
  np.testing.assert_allclose(i.mean, images.mean(axis=(0, 1, 2)) / 255.0, rtol=1e-5)
