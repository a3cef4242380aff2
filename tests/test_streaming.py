"""Tests of fda_biper_jax.streaming: the tf.data input pipeline for large image datasets.

On tfds mock data for imagenet2012 (shapes, dtypes, value ranges, labels, batch counts)
and on a tiny `synthetic_jpeg` dataset prepared in a temporary folder (per-host shards,
determinism and resumption, the evaluation transform against a direct computation, the
RandomResizedCrop windows, prefetching onto a mesh of the 8 fake CPU devices, argument
checks)."""

import dataclasses
import math

import jax
import numpy as np
import pytest
from jax.sharding import NamedSharding, PartitionSpec as P

from fda_biper_jax import parallel
from fda_biper_jax.data import streaming
from fda_biper_jax.data import DataUnavailableError

tfds = pytest.importorskip("tensorflow_datasets")
tf = pytest.importorskip("tensorflow")
from fda_biper_jax.data.datasets import synthetic_jpeg  # noqa: E402  (after the tfds import check)

S = 32  # crop side of the synthetic tests
NUM_TRAIN, NUM_EVAL = 37, 19  # odd on purpose: shards with remainders
NAME = synthetic_jpeg.dataset_name(NUM_TRAIN, NUM_EVAL, height=(40, 80), width=(40, 80),
                                   num_classes=5, seed=3)
MEAN = np.asarray(streaming.IMAGENET_MEAN, np.float32)
STD = np.asarray(streaming.IMAGENET_STD, np.float32)


def one_line(excinfo) -> str:
  assert isinstance(excinfo.value, ValueError)
  message = str(excinfo.value)
  assert "\n" not in message, message
  return message


def _pixels(images) -> np.ndarray:
  """Normalised images back to the [0, 255] pixel scale."""
  return (np.asarray(images, np.float32) * STD + MEAN) * 255.0


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
  data_dir = str(tmp_path_factory.mktemp("tfds"))
  info = streaming.info(NAME, data_dir=data_dir, image_size=S)
  builder = tfds.builder(NAME, data_dir=data_dir)
  sources = {}
  for split in ("train", "validation"):
    for ex in tfds.as_numpy(builder.as_dataset(split=split)):
      sources[split, int(ex["id"])] = (ex["image"], int(ex["label"]))
  return {"info": info, "data_dir": data_dir, "sources": sources}


def _train(tiny, **kwargs):
  """Internal train pipeline with ids: list of dict batches (numpy)."""
  args = dict(batch_size=4, seed=0, epoch=0, data_dir=tiny["data_dir"], with_ids=True)
  args.update(kwargs)
  return list(streaming._train_dataset(tiny["info"], **args).as_numpy_iterator())


def _eval(tiny, **kwargs):
  args = dict(batch_size=4, data_dir=tiny["data_dir"], resize_size=48, with_ids=True)
  args.update(kwargs)
  return list(streaming._eval_dataset(tiny["info"], **args).as_numpy_iterator())


# ----------------------------------------------------------------------------- info


def test_info_of_synthetic_dataset(tiny):
  info = tiny["info"]
  assert info == streaming.StreamInfo(
      name=NAME, num_classes=5, num_train=NUM_TRAIN, num_eval=NUM_EVAL, train_split="train",
      eval_split="validation", image_size=S, mean=(0.485, 0.456, 0.406),
      std=(0.229, 0.224, 0.225))
  with pytest.raises(dataclasses.FrozenInstanceError):
    info.num_classes = 3
  # the source images really are JPEGs of varied sizes
  shapes = {img.shape for (split, _), (img, _) in tiny["sources"].items() if split == "train"}
  assert len(shapes) > 10 and all(40 <= h <= 80 and 40 <= w <= 80 and c == 3
                                  for h, w, c in shapes)


def test_info_errors_are_one_line(tmp_path):
  empty = tmp_path / "manual"
  empty.mkdir()
  with pytest.raises(DataUnavailableError) as excinfo:
    streaming.info("imagenet2012", data_dir=str(tmp_path / "tfds"), manual_dir=str(empty))
  message = one_line(excinfo)
  assert "ILSVRC2012_img_train.tar" in message and str(empty) in message
  with pytest.raises(ValueError) as excinfo:
    streaming.info("celeb_a", data_dir=str(tmp_path / "tfds"))  # no 'label' feature
  message = one_line(excinfo)
  assert "celeb_a" in message and "'label'" in message and "ClassLabel" in message
  with pytest.raises(ValueError) as excinfo:
    streaming.info("no_such_dataset_xyz", data_dir=str(tmp_path / "tfds"))
  assert "no_such_dataset_xyz" in one_line(excinfo)
  with pytest.raises(ValueError) as excinfo:
    streaming.info(NAME, image_size=0)
  assert "image_size=0" in one_line(excinfo)


# ----------------------------------------------------------------------------- mock imagenet2012


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_imagenet2012_mock_data(dtype, tmp_path):
  # Under mock data tfds still hands over the encoded image bytes when the image
  # feature's decoding is skipped (it encodes its random images as JPEG), so the
  # decode_and_crop_jpeg path of the real dataset is the one tested here.
  with tfds.testing.mock_data(num_examples=10):
    info = streaming.info("imagenet2012", data_dir=str(tmp_path))
    assert (info.num_classes, info.num_train, info.num_eval, info.image_size) == (1000, 10, 10, 224)
    assert (info.train_split, info.eval_split) == ("train", "validation")
    train = list(streaming.train_batches(info, batch_size=4, seed=0, epoch=0, dtype=dtype))
    evals = list(streaming.eval_batches(info, batch_size=4, dtype=dtype))
  assert len(train) == 2 and len(evals) == 3 == streaming.num_eval_batches(info, 4, 1)
  expected = np.dtype(np.float32) if dtype == "float32" else np.dtype(jax.numpy.bfloat16)
  low, high = -MEAN / STD, (1 - MEAN) / STD
  tol = 1e-5 if dtype == "float32" else 0.02
  for images, labels, *mask in train + evals:
    assert images.shape == (4, 224, 224, 3) and images.dtype == expected
    assert labels.shape == (4,) and labels.dtype == np.int32
    assert labels.min() >= 0 and labels.max() < 1000
    x = images.astype(np.float32)
    assert np.all(x >= low - tol) and np.all(x <= high + tol)
  for images, _ in train:  # random pixels in [0, 255]: the range is well used
    x = images.astype(np.float32)
    assert x.std() > 0.5 and x.min() < low.max() + 0.5 and x.max() > high.min() - 0.5
  masks = [m for _, _, m in evals]
  np.testing.assert_array_equal(np.concatenate(masks), [1] * 10 + [0] * 2)
  assert masks[0].dtype == np.float32
  assert np.all(evals[-1][0][2:].astype(np.float32) == 0) and np.all(evals[-1][1][2:] == 0)


# ----------------------------------------------------------------------------- shards


def test_train_shards_are_disjoint_and_equal(tiny):
  info, count = tiny["info"], 3
  shard = NUM_TRAIN // count  # 12
  assert streaming.num_train_batches(info, 4, count) == 3
  builder = tfds.builder(NAME, data_dir=tiny["data_dir"])
  seen = []
  for index in range(count):
    batches = _train(tiny, process_index=index, process_count=count)
    assert len(batches) == shard // 4 == 3
    ids = np.concatenate([b["id"] for b in batches])
    assert len(ids) == len(set(ids)) == 12
    split = tfds.even_splits("train", n=count, drop_remainder=True)[index]
    expected = {int(e["id"]) for e in tfds.as_numpy(builder.as_dataset(split=split))}
    assert set(ids.tolist()) == expected  # exactly this host's even_splits shard
    np.testing.assert_array_equal(np.concatenate([b["position"] for b in batches]), range(12))
    labels = np.concatenate([b["label"] for b in batches])
    assert labels.tolist() == [tiny["sources"]["train", i][1] for i in ids]
    seen.append(set(ids.tolist()))
  assert not (seen[0] & seen[1] or seen[0] & seen[2] or seen[1] & seen[2])
  assert len(set.union(*seen)) == 36  # one example (the remainder) is dropped
  # the public iterator is the same pipeline, without the ids
  public = list(streaming.train_batches(info, batch_size=4, seed=0, epoch=0, process_index=1,
                                        process_count=count, data_dir=tiny["data_dir"]))
  internal = _train(tiny, process_index=1, process_count=count)
  assert len(public) == len(internal)
  for (images, labels), b in zip(public, internal):
    np.testing.assert_array_equal(images, b["image"])
    np.testing.assert_array_equal(labels, b["label"])
    assert images.dtype == np.float32 and labels.dtype == np.int32


@pytest.mark.parametrize("count", [1, 3])
def test_eval_shards_cover_every_example_once(tiny, count):
  info = tiny["info"]
  num_batches = streaming.num_eval_batches(info, 4, count)
  assert num_batches == math.ceil(math.ceil(NUM_EVAL / count) / 4)
  ids = []
  for index in range(count):
    batches = _eval(tiny, process_index=index, process_count=count)
    assert len(batches) == num_batches  # the same on every host
    public = list(streaming.eval_batches(info, batch_size=4, process_index=index,
                                         process_count=count, data_dir=tiny["data_dir"],
                                         resize_size=48))
    assert len(public) == num_batches
    for (images, labels, mask), b in zip(public, batches):
      np.testing.assert_array_equal(images, b["image"])
      np.testing.assert_array_equal(labels, b["label"])
      np.testing.assert_array_equal(mask, b["mask"])
      assert images.shape == (4, S, S, 3) and labels.dtype == np.int32 and mask.dtype == np.float32
    mask = np.concatenate([b["mask"] for b in batches])
    host_ids = np.concatenate([b["id"] for b in batches])
    assert set(np.unique(mask)) <= {0.0, 1.0}
    np.testing.assert_array_equal(mask == 0, host_ids == -1)  # padding is masked
    padded = np.concatenate([b["image"] for b in batches])[mask == 0]
    assert np.all(padded == 0)
    assert np.all(np.diff(mask) <= 0)  # padding only at the end
    labels = np.concatenate([b["label"] for b in batches])
    assert labels[mask == 1].tolist() == [tiny["sources"]["validation", i][1]
                                          for i in host_ids[mask == 1]]
    ids += host_ids[mask == 1].tolist()
  assert sorted(ids) == list(range(NUM_EVAL))  # every example, once


# ----------------------------------------------------------------------------- determinism


def test_train_is_deterministic_and_resumable(tiny):
  info, data_dir = tiny["info"], tiny["data_dir"]

  def run(**kwargs):
    args = dict(batch_size=4, seed=7, epoch=2, data_dir=data_dir)
    args.update(kwargs)
    return list(streaming.train_batches(info, **args))

  first = run()
  assert len(first) == NUM_TRAIN // 4 == 9
  again = run()
  for (a, la), (b, lb) in zip(first, again, strict=True):
    np.testing.assert_array_equal(a, b)  # bit-identical
    np.testing.assert_array_equal(la, lb)
  tail = run(start_batch=5)
  assert len(tail) == 4
  for (a, la), (b, lb) in zip(first[5:], tail, strict=True):
    np.testing.assert_array_equal(a, b)
    np.testing.assert_array_equal(la, lb)
  assert run(start_batch=9) == []
  serial = run(start_batch=7, num_parallel_calls=1)  # the thread count changes nothing
  for (a, la), (b, lb) in zip(first[7:], serial, strict=True):
    np.testing.assert_array_equal(a, b)
    np.testing.assert_array_equal(la, lb)
  # bfloat16 output is the float32 output rounded
  half = run(dtype="bfloat16", start_batch=8)
  np.testing.assert_array_equal(half[0][0], first[8][0].astype(jax.numpy.bfloat16))

  def ids(**kwargs):
    return np.concatenate([b["id"] for b in _train(tiny, **{"seed": 7, "epoch": 2, **kwargs})])

  base, next_epoch = ids(), ids(epoch=3)
  assert len(set(base) & set(next_epoch)) >= NUM_TRAIN - 2  # the same examples (but the
  assert not np.array_equal(base, next_epoch)  # remainder) in another order
  assert not np.array_equal(base, ids(seed=8))
  other = run(epoch=3)
  assert not any(np.array_equal(a, b) for (a, _), (b, _) in zip(first, other))


# ----------------------------------------------------------------------------- transforms


def _bilinear_weights(n_out: int, n_in: int) -> np.ndarray:
  """[n_out, n_in] bilinear interpolation, half-pixel centres, edges clamped, no antialias."""
  src = np.clip((np.arange(n_out) + 0.5) * n_in / n_out - 0.5, 0, n_in - 1)
  lo = np.floor(src).astype(int)
  hi = np.minimum(lo + 1, n_in - 1)
  weights = np.zeros((n_out, n_in))
  np.add.at(weights, (np.arange(n_out), lo), 1 - (src - lo))
  np.add.at(weights, (np.arange(n_out), hi), src - lo)
  return weights


def _resize(image: np.ndarray, h: int, w: int) -> np.ndarray:
  """Bilinear resize in numpy (the same as jax.image.resize(..., antialias=False))."""
  return np.einsum("hi,ijc,wj->hwc", _bilinear_weights(h, image.shape[0]), image.astype(np.float64),
                   _bilinear_weights(w, image.shape[1]), optimize=True)


def test_reference_resize_matches_jax():
  image = np.random.default_rng(0).uniform(0, 255, (45, 70, 3)).astype(np.float32)
  for shape in ((32, 32), (48, 74), (90, 50)):
    expected = jax.image.resize(image, (*shape, 3), "bilinear", antialias=False)
    np.testing.assert_allclose(_resize(image, *shape), expected, atol=1e-2)


def _resize_crop_reference(image: np.ndarray, resize_size: int, size: int) -> np.ndarray:
  """Shorter side to resize_size (longer rounded down), central size x size crop."""
  h, w, _ = image.shape
  new_h, new_w = (resize_size, w * resize_size // h) if h <= w else (h * resize_size // w,
                                                                    resize_size)
  resized = _resize(image, new_h, new_w)
  top, left = (new_h - size + 1) // 2, (new_w - size + 1) // 2
  return resized[top:top + size, left:left + size]


def test_eval_transform_is_resize_then_centre_crop(tiny):
  batches = _eval(tiny)
  checked = 0
  for b in batches:
    for image, i, m in zip(b["image"], b["id"], b["mask"]):
      if m == 0:
        continue
      source = tiny["sources"]["validation", int(i)][0]
      expected = _resize_crop_reference(source, 48, S)
      np.testing.assert_allclose(_pixels(image), expected, atol=2e-3)
      checked += 1
  assert checked == NUM_EVAL
  shapes = [tiny["sources"]["validation", i][0].shape for i in range(NUM_EVAL)]
  assert any(h > w for h, w, _ in shapes) and any(h < w for h, w, _ in shapes)  # both cases


def test_crop_windows_stay_inside_the_image():
  size = 224
  shapes = [(350, 400), (500, 260), (60, 45), (20, 400)]  # the last one: no window fits

  def windows(shape):
    seeds = tf.data.Dataset.range(300).map(lambda s: tf.stack([s, tf.constant(11, tf.int64)]))
    ds = seeds.map(lambda seed: streaming._crop_window(tf, tf.constant([*shape, 3]), seed, size))
    return np.stack(list(ds.as_numpy_iterator()))

  for h, w in shapes:
    win = windows((h, w))
    top, left, ch, cw = win.T
    assert np.all(top >= 0) and np.all(left >= 0) and np.all(ch >= 1) and np.all(cw >= 1)
    assert np.all(top + ch <= h) and np.all(left + cw <= w)
    side = int(min(h, w) * size / (size + 32))
    centre = (ch == side) & (cw == side) & (top == (h - side + 1) // 2) & (left == (w - side + 1)
                                                                          // 2)
    area, aspect = ch * cw / (h * w), cw / ch
    sampled = ~centre
    assert np.all(area[sampled] >= 0.08 - 1e-9) and np.all(area[sampled] <= 1.0)
    assert np.all(aspect[sampled] >= 0.75 * 0.97) and np.all(aspect[sampled] <= 4 / 3 / 0.97)
    if (h, w) == (20, 400):
      assert np.all(centre)  # aspect 20: every attempt fails -> the centre crop
    else:
      assert sampled.mean() > 0.8 and len({tuple(x) for x in win}) > 200  # random windows
      assert area[sampled].min() < 0.2  # the range is used (large areas only where the
      assert area[sampled].max() > (0.8 if (h, w) == (350, 400) else 0.5)  # aspect allows)


def test_random_resized_crop_end_to_end(tiny):
  """Each training image is crop(window) resized and maybe mirrored, of its own source."""
  seed, epoch = 5, 1
  batches = _train(tiny, seed=seed, epoch=epoch)
  _, _, key = streaming._derived_seeds(seed, epoch, 0)
  key = tf.constant(key, tf.int64)
  flips, differs_from_centre = [], []
  for b in batches:
    for image, i, position in zip(b["image"], b["id"], b["position"]):
      source = tiny["sources"]["train", int(i)][0]
      example_seed = tf.random.experimental.stateless_fold_in(key, position)
      crop_seed = tf.random.experimental.stateless_split(example_seed, num=2)[0]
      top, left, h, w = streaming._crop_window(tf, tf.constant(source.shape), crop_seed, S).numpy()
      assert top >= 0 and left >= 0 and top + h <= source.shape[0] and left + w <= source.shape[1]
      crop = source[top:top + h, left:left + w].astype(np.float32)
      expected = _resize(crop, S, S)
      got = _pixels(image)
      err, err_mirrored = (np.abs(got - expected).mean(), np.abs(got - expected[:, ::-1]).mean())
      # (decode_and_crop_jpeg may differ from decode-then-crop by a grey level at edges)
      assert min(err, err_mirrored) < 0.5, (err, err_mirrored)
      flips.append(err_mirrored < err)
      centre = _resize_crop_reference(source, int(round(S * 256 / 224)), S)
      differs_from_centre.append(min(np.abs(got - centre).mean(),
                                     np.abs(got - centre[:, ::-1]).mean()) > 2.0)
  assert len(flips) == 36 and 8 <= sum(flips) <= 28  # both outcomes, about half
  assert np.mean(differs_from_centre) > 0.8


# ----------------------------------------------------------------------------- to device


def test_prefetch_to_device_shards_over_the_mesh(tiny):
  mesh = parallel.make_mesh()
  assert mesh.size == 8
  info, data_dir = tiny["info"], tiny["data_dir"]
  host = list(streaming.train_batches(info, batch_size=8, seed=0, epoch=0, data_dir=data_dir,
                                      dtype="bfloat16"))
  consumed = []

  def counted():
    for batch in host:
      consumed.append(1)
      yield batch

  stream = streaming.prefetch_to_device(counted(), mesh, size=2)
  assert consumed == []  # nothing is read before the first batch is asked for
  device = []
  for images, labels in stream:
    if not device:
      assert len(consumed) == 2  # `size` batches in flight
    device.append((images, labels))
  assert len(device) == len(host) == NUM_TRAIN // 8
  for (images, labels), (x, y) in zip(device, host):
    assert isinstance(images, jax.Array) and images.shape == (8, S, S, 3)
    assert images.dtype == jax.numpy.bfloat16 and labels.dtype == np.int32
    assert images.sharding == NamedSharding(mesh, P(parallel.AXIS))
    assert len(images.addressable_shards) == 8
    assert {s.data.shape for s in images.addressable_shards} == {(1, S, S, 3)}
    np.testing.assert_array_equal(np.asarray(images), x)
    np.testing.assert_array_equal(np.asarray(labels), y)
  evals = list(streaming.prefetch_to_device(
      streaming.eval_batches(info, batch_size=8, data_dir=data_dir), mesh))
  assert len(evals) == streaming.num_eval_batches(info, 8, 1) == 3
  assert all(len(t) == 3 and t[2].shape == (8,) for t in evals)
  assert float(sum(t[2].sum() for t in evals)) == NUM_EVAL


# ----------------------------------------------------------------------------- arguments


def test_bad_arguments_raise_one_line_value_errors(tiny):
  info = tiny["info"]
  # a dataset that does not exist: the checks must come before any reading
  ghost = dataclasses.replace(info, name="no_such_dataset_xyz")
  train = dict(batch_size=4, seed=0, epoch=0, data_dir="/nonexistent")
  cases = [
      (lambda: streaming.train_batches(ghost, **{**train, "batch_size": 0}), "batch_size=0"),
      (lambda: streaming.train_batches(ghost, **{**train, "batch_size": 2.0}), "batch_size=2.0"),
      (lambda: streaming.train_batches(ghost, **{**train, "batch_size": 38}), "batch_size=38"),
      (lambda: streaming.train_batches(ghost, **train, dtype="float16"), "dtype='float16'"),
      (lambda: streaming.train_batches(ghost, **train, process_index=3, process_count=3),
       "process_index=3"),
      (lambda: streaming.train_batches(ghost, **train, process_index=-1), "process_index=-1"),
      (lambda: streaming.train_batches(ghost, **train, process_count=0), "process_count=0"),
      (lambda: streaming.train_batches(ghost, **train, start_batch=-1), "start_batch=-1"),
      (lambda: streaming.train_batches(ghost, **train, start_batch=10), "start_batch=10"),
      (lambda: streaming.train_batches(ghost, **{**train, "epoch": -1}), "epoch=-1"),
      (lambda: streaming.train_batches(ghost, **{**train, "seed": "a"}), "seed='a'"),
      (lambda: streaming.train_batches(ghost, **train, num_parallel_calls=0),
       "num_parallel_calls=0"),
      (lambda: streaming.train_batches({"name": NAME}, **train), "info="),
      (lambda: streaming.eval_batches(ghost, batch_size=0), "batch_size=0"),
      (lambda: streaming.eval_batches(ghost, batch_size=4, dtype="int8"), "dtype='int8'"),
      (lambda: streaming.eval_batches(ghost, batch_size=4, process_index=2, process_count=2),
       "process_index=2"),
      (lambda: streaming.eval_batches(ghost, batch_size=4, resize_size=S - 1),
       f"resize_size={S - 1}"),
      (lambda: streaming.num_eval_batches(info, 0, 1), "batch_size=0"),
      (lambda: streaming.prefetch_to_device([], parallel.make_mesh(), size=0), "size=0"),
      (lambda: streaming.info(NAME, image_size=-3), "image_size=-3"),
  ]
  for call, fragment in cases:
    with pytest.raises(ValueError) as excinfo:
      call()
    message = one_line(excinfo)
    assert fragment in message, (fragment, message)
    assert "allowed" in message or "use" in message, message
  # and a good call with the ghost fails only when reading, with a one-line error
  with pytest.raises(DataUnavailableError) as excinfo:
    streaming.train_batches(ghost, **train)
  assert "no_such_dataset_xyz" in one_line(excinfo)
  # dtype objects are accepted as well as names
  assert streaming._dtype_name(np.float32) == "float32"
  assert streaming._dtype_name(jax.numpy.bfloat16) == "bfloat16"
