"""Data pipeline: whole small datasets held on the accelerator, augmented there.

Design
------
* `load(name, split)` reads a whole split of a small image dataset (CIFAR-10/100,
  MNIST, Fashion-MNIST) through tensorflow-datasets into numpy: images uint8
  [N, H, W, C], labels int32 [N]. With `process_count > 1` each host reads only its
  own shard (`tfds.even_splits(..., drop_remainder=True)`: disjoint, equal-sized,
  covering the split up to a remainder of fewer than `process_count` examples).
* The trainer holds a split on device once (`inputs.InMemory`). Shuffling
  (`epoch_permutation`), random crops and flips (`augment`) and normalisation
  (`normalize`) are jit-able jax.random / jnp functions, so the input pipeline
  runs on device and never limits step time.
* `synthetic` makes learnable data (class templates + noise) for tests and quick
  runs with no files at all.

tensorflow-datasets (and TensorFlow, which tfds needs to build and decode image
datasets) is imported only inside `load`, so importing this module is cheap.

Getting the data
----------------
The normal tfds path is used for every dataset: if `data_dir` (default: tfds'
default, `$TFDS_DATA_DIR` or `~/tensorflow_datasets`) does not hold the prepared
dataset, `tfds.builder(name, data_dir=...).download_and_prepare(
download_config=DownloadConfig(manual_dir=...))` downloads it (internet needed on
first use), or takes the original archives from `manual_dir` (e.g.
`cifar-10-binary.tar.gz`); tfds verifies their registered checksums. Before a
download starts, the source hosts are resolved by DNS (skipped when an HTTP(S)
proxy is configured): a machine with no network gets a one-line ValueError at
once instead of tfds retrying for minutes. Every failure to obtain the data is
reported as a one-line ValueError naming the dataset, the data_dir and how to
provide the files.

Fashion-MNIST offline (design (a))
----------------------------------
Debian's package `dataset-fashion-mnist` installs the real Fashion-MNIST IDX files
in /usr/share/datasets/fashion-mnist, but recompressed, so the gzip checksums tfds
registered for `fashion_mnist` do not match and tfds rightly rejects them.
Checksum verification is NOT disabled; instead the local tfds builder
`fashion_mnist_local` (`fda_biper_jax.data.datasets.fashion_mnist_local`, a
`GeneratorBasedBuilder` with the same features, splits and supervised keys as
`fashion_mnist`) reads the IDX files from `manual_dir`, verifies the SHA-256 of
their DECODED bytes and the shapes in their headers against hard-coded values, and
writes an ordinary tfds dataset to `data_dir/fashion_mnist_local/1.0.0`, which
later loads read without touching the files again. `load('fashion_mnist', ...)`
picks, in order:

1. the official `fashion_mnist` if it is already prepared in data_dir;
2. `fashion_mnist_local` if it is already prepared in data_dir;
3. if manual_dir (default: /usr/share/datasets/fashion-mnist when it exists)
   holds the files: the official builder when their gzip checksums are the ones
   tfds registered (original upstream files), else `fashion_mnist_local`
   (recompressed copies such as Debian's, content-verified);
4. otherwise the official builder's normal download.

On a fresh Debian/Ubuntu machine:
    apt-get install -y dataset-fashion-mnist
    python -c "from fda_biper_jax import data; data.load('fashion_mnist', 'train')"
(the first call verifies the files and builds the tfds dataset in 30-60 s; later calls
only read it, a few seconds).
"""

from __future__ import annotations

import dataclasses
import functools
import glob
import hashlib
import os
import socket
import sys
import threading
import urllib.parse
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from fda_biper_jax.data.datasets import sources

__all__ = [
    "DATASETS",
    "DatasetInfo",
    "info",
    "load",
    "check_obtainable",
    "normalize",
    "augment",
    "epoch_permutation",
    "synthetic",
    "synthetic_info",
    "FASHION_MNIST_DEBIAN_DIR",
    "DataUnavailableError",
]

DATASETS: tuple[str, ...] = ("cifar10", "cifar100", "fashion_mnist", "mnist")
SPLITS: tuple[str, ...] = ("train", "test")
_READ_BATCH = 8192

#: Where Debian's `dataset-fashion-mnist` puts the IDX files; the default manual_dir
#: for fashion_mnist when it exists.
FASHION_MNIST_DEBIAN_DIR = sources.FASHION_MNIST_DEBIAN_DIR


@dataclasses.dataclass(frozen=True)
class DatasetInfo:
  """Static facts of a dataset. mean/std are per channel on the [0, 1] pixel scale.

  Registered as a pytree with no leaves (every field is static metadata), so it
  can be passed straight into jitted functions.
  """

  name: str
  num_classes: int
  image_shape: tuple[int, int, int]  # (H, W, C)
  num_train: int
  num_test: int
  mean: tuple[float, ...]
  std: tuple[float, ...]


jax.tree_util.register_dataclass(
    DatasetInfo,
    data_fields=[],
    meta_fields=["name", "num_classes", "image_shape", "num_train", "num_test", "mean", "std"],
)

# Per-channel pixel mean/std over the training split on the [0, 1] scale.
# Fashion-MNIST's were computed from the real files (0.28604, 0.35302).
_INFOS: dict[str, DatasetInfo] = {
    "cifar10": DatasetInfo(
        "cifar10", 10, (32, 32, 3), 50000, 10000, (0.4914, 0.4822, 0.4465), (0.2470, 0.2435, 0.2616)
    ),
    "cifar100": DatasetInfo(
        "cifar100",
        100,
        (32, 32, 3),
        50000,
        10000,
        (0.5071, 0.4865, 0.4409),
        (0.2673, 0.2564, 0.2762),
    ),
    "fashion_mnist": DatasetInfo(
        "fashion_mnist", 10, (28, 28, 1), 60000, 10000, (0.2860,), (0.3530,)
    ),
    "mnist": DatasetInfo("mnist", 10, (28, 28, 1), 60000, 10000, (0.1307,), (0.3081,)),
}
assert tuple(sorted(_INFOS)) == tuple(sorted(DATASETS))


def info(name: str) -> DatasetInfo:
  """Static facts of dataset `name` (no download). ValueError for unknown names."""
  try:
    return _INFOS[name]
  except (KeyError, TypeError):
    raise ValueError(f"unknown dataset {name!r}; known datasets: {', '.join(DATASETS)}") from None


_dataset_info = info  # `info` is also a parameter name below


class DataUnavailableError(ValueError):
  """The dataset is not prepared and cannot be obtained (one-line message)."""


# ----------------------------------------------------------------------------- loading


def one_line(e: BaseException, limit: int = 300) -> str:
  text = " ".join(str(e).split()) or type(e).__name__
  text = text if len(text) <= limit else text[: limit - 3] + "..."
  return f"{type(e).__name__}: {text}"


def import_tfds():
  """tfds, with TensorFlow (if importable) kept off any GPU so JAX keeps its memory."""
  try:
    import tensorflow as tf  # noqa: PLC0415

    try:
      tf.config.set_visible_devices([], "GPU")
    except (RuntimeError, ValueError):  # already initialised, or no GPU support
      pass
  except ImportError:
    pass
  import tensorflow_datasets as tfds  # noqa: PLC0415

  return tfds


def default_data_dir(data_dir: str | None) -> str:
  if data_dir is not None:
    return os.fspath(data_dir)
  return os.environ.get(
      "TFDS_DATA_DIR", os.path.join(os.path.expanduser("~"), "tensorflow_datasets")
  )


PROXY_VARS = ("https_proxy", "http_proxy", "all_proxy", "HTTPS_PROXY", "HTTP_PROXY", "ALL_PROXY")
_TFDS_GCS_HOST = "storage.googleapis.com"  # tfds also tries its prepared copies there


def _resolves(host: str, timeout: float = 5.0) -> bool:
  """Whether DNS resolves `host` within `timeout` seconds."""
  ok: list[bool] = []

  def lookup():
    try:
      socket.getaddrinfo(host, 443)
      ok.append(True)
    except OSError:
      ok.append(False)

  thread = threading.Thread(target=lookup, daemon=True)
  thread.start()
  thread.join(timeout)
  return bool(ok and ok[0])


def _builder_urls(builder) -> dict[str, str]:
  """A tfds builder's registered sources: {URL: file name}."""
  return {url: getattr(ui, "filename", None) or "" for url, ui in (builder.url_infos or {}).items()}


def _offline_reason(urls: dict[str, str], manual_dir: str | None) -> str | None:
  """A short reason when downloading the sources `urls` ({URL: file name}) cannot
  possibly work: some file is not in manual_dir and no source host resolves."""
  if any(os.environ.get(v) for v in PROXY_VARS):
    return None  # the proxy resolves names; let tfds try
  if not urls:
    return None  # nothing known about the sources; let tfds decide
  needed = [u for u, f in urls.items() if not (f and sources.has_file(manual_dir, f))]
  if not needed:
    return None  # every source file is in manual_dir
  hosts = sorted({urllib.parse.urlparse(u).hostname for u in needed} - {None} | {_TFDS_GCS_HOST})
  if any(_resolves(h) for h in hosts):
    return None
  return f"no network (cannot resolve {', '.join(hosts)})"


def _how_to_provide(name: str, urls: dict[str, str], manual_dir: str | None) -> str:
  """One-line advice on how to make `name` available."""
  where = f"manual_dir (now {manual_dir})" if manual_dir else "a manual_dir"
  if name == "fashion_mnist":
    return "run once with internet (tfds downloads it into data_dir), or " + (
        sources.FASHION_MNIST_HOW_TO.replace("in manual_dir", f"in {where}")
    )
  files = sorted(set(urls.values()) - {""})
  return (
      "run once with internet (tfds downloads it into data_dir), or put "
      f"{', '.join(files) or 'the original source files'} in {where}"
  )


def _unavailable(name: str, data_dir: str, reason: str, urls, manual_dir) -> DataUnavailableError:
  return DataUnavailableError(
      f"{name}: not prepared in data_dir={data_dir} and cannot be downloaded: {reason}; "
      f"{_how_to_provide(name, urls, manual_dir)}"
  )


def _guard_download(builder, name: str, data_dir: str, manual_dir: str | None) -> None:
  """Fail fast, before tfds' download retries, when the download cannot work.

  The check is attached to this builder instance's download-manager factory, which
  tfds calls only when it really generates the dataset (not when the data is
  already prepared, and not under `tfds.testing.mock_data`).
  """
  make_download_manager = builder._make_download_manager

  def checked(*args, **kwargs):
    reason = _offline_reason(_builder_urls(builder), manual_dir)
    if reason is not None:
      raise _unavailable(name, data_dir, reason, _builder_urls(builder), manual_dir)
    return make_download_manager(*args, **kwargs)

  builder._make_download_manager = checked


def check_obtainable(
    name: str, *, data_dir: str | None = None, manual_dir: str | None = None
) -> None:
  """Fails at once (one-line DataUnavailableError) when `name` surely cannot be had.

  A check of the file system and DNS only, made before tensorflow_datasets is
  imported, so that a machine without the data and without network learns it in
  milliseconds rather than after the seconds TensorFlow takes to import: it
  passes when data_dir holds a prepared copy (any version), when manual_dir (for
  fashion_mnist also Debian's folder) holds a source file, when a proxy is set,
  or when a source host resolves; `load` then does the real work and the real
  checks. When tensorflow_datasets is already imported (a notebook, or tests
  under `tfds.testing.mock_data`), `load` itself fails as fast, so nothing is
  checked here.
  """
  info(name)
  if "tensorflow_datasets" in sys.modules:
    return
  data_dir = os.path.expanduser(os.fspath(data_dir)) if data_dir else None
  manual_dir = os.path.expanduser(os.fspath(manual_dir)) if manual_dir else None
  shown_dir = default_data_dir(data_dir)
  builders = [name] + (["fashion_mnist_local"] if name == "fashion_mnist" else [])
  if any(glob.glob(os.path.join(shown_dir, b, "**", "dataset_info.json"), recursive=True)
         for b in builders):
    return
  urls = sources.URLS[name]
  folders = [manual_dir]
  if name == "fashion_mnist" and manual_dir is None:
    folders.append(sources.FASHION_MNIST_DEBIAN_DIR)
  if any(sources.has_file(d, f) for d in folders for f in urls.values()):
    return
  reason = _offline_reason(urls, manual_dir)
  if reason is not None:
    raise _unavailable(name, shown_dir, reason, urls, manual_dir)


def is_prepared(builder) -> bool:
  # (checking the folder first avoids tfds' warning about a missing variant folder)
  return builder.data_path.exists() and builder.is_prepared()


def prepare(tfds, builder, name: str, data_dir: str, manual_dir: str | None) -> None:
  """download_and_prepare `builder` unless prepared; one-line ValueError on failure."""
  if is_prepared(builder):
    return
  local = builder.name == "fashion_mnist_local"
  if not local:
    _guard_download(builder, name, data_dir, manual_dir)
  config = tfds.download.DownloadConfig(manual_dir=manual_dir)
  try:
    builder.download_and_prepare(download_config=config)
  except DataUnavailableError:
    raise
  except Exception as e:  # noqa: BLE001  (network, checksum, file and I/O errors from tfds)
    if local:
      hint = sources.FASHION_MNIST_HOW_TO
    else:
      hint = _how_to_provide(name, _builder_urls(builder), manual_dir)
    detail = " ".join(str(e).split())
    if hint not in detail:
      detail = one_line(e)
    message = (
        f"{name}: could not {'build' if local else 'download/prepare'} {builder.name} "
        f"into data_dir={data_dir} ({detail})"
    )
    if hint not in detail:
      message += f"; {hint}"
    raise DataUnavailableError(message) from e


def _sha256_file(path: str) -> str:
  digest = hashlib.sha256()
  with open(path, "rb") as f:
    for block in iter(lambda: f.read(1 << 20), b""):
      digest.update(block)
  return digest.hexdigest()


def _fashion_mnist_builder(tfds, data_dir: str | None, manual_dir: str | None):
  """(builder, manual_dir) to use for fashion_mnist; see the module docstring."""
  from fda_biper_jax.data.datasets import fashion_mnist_local as fml  # noqa: PLC0415 (registers it)

  official = tfds.builder("fashion_mnist", data_dir=data_dir)
  if is_prepared(official):
    return official, manual_dir
  local = fml.FashionMnistLocal(data_dir=data_dir)
  if is_prepared(local):
    return local, manual_dir
  if manual_dir is None and os.path.isdir(FASHION_MNIST_DEBIAN_DIR):
    manual_dir = FASHION_MNIST_DEBIAN_DIR
  found = fml.find_files(manual_dir)
  if any(path is not None for path in found.values()):
    url_infos = official.url_infos or {}
    originals = [
        (os.path.join(manual_dir, ui.filename or "?"), ui.checksum) for ui in url_infos.values()
    ]
    if url_infos and all(
        os.path.isfile(p) and _sha256_file(p) == checksum for p, checksum in originals
    ):
      return official, manual_dir  # the original gzip files: tfds' own checks pass
    return local, manual_dir  # e.g. Debian's recompressed copies: content-verified build
  return official, manual_dir


def load(
    name: str,
    split: str,
    *,
    data_dir: str | None = None,
    manual_dir: str | None = None,
    process_index: int = 0,
    process_count: int = 1,
) -> tuple[np.ndarray, np.ndarray]:
  """Whole split as (images uint8 [N,H,W,C], labels int32 [N]) via tensorflow-datasets.

  split is 'train' or 'test'. With process_count > 1 returns only this host's shard
  (disjoint, equal-size, covering the split up to a remainder < process_count).
  data_dir: tfds data directory (default tfds' own). manual_dir: directory with the
  original source files for offline preparation (fashion_mnist: the IDX files;
  default /usr/share/datasets/fashion-mnist when it exists).
  Raises ValueError with one line when the data is missing or unreachable.
  """
  ds_info = info(name)
  if split not in SPLITS:
    raise ValueError(f"{name}: unknown split {split!r}; expected one of {', '.join(SPLITS)}")
  if not (
      isinstance(process_count, int)
      and process_count >= 1
      and isinstance(process_index, int)
      and 0 <= process_index < process_count
  ):
    raise ValueError(
        f"need 0 <= process_index < process_count, got process_index="
        f"{process_index}, process_count={process_count}"
    )
  # '' means unset (as config files often write it).
  data_dir = os.path.expanduser(os.fspath(data_dir)) if data_dir else None
  manual_dir = os.path.expanduser(os.fspath(manual_dir)) if manual_dir else None
  tfds = import_tfds()
  shown_dir = default_data_dir(data_dir)

  if name == "fashion_mnist":
    builder, manual_dir = _fashion_mnist_builder(tfds, data_dir, manual_dir)
  else:
    builder = tfds.builder(name, data_dir=data_dir)
  prepare(tfds, builder, name, shown_dir, manual_dir)

  read_split: Any = split
  if process_count > 1:
    read_split = tfds.even_splits(split, n=process_count, drop_remainder=True)[process_index]
  try:
    # Batches of a fixed size rather than batch_size=-1, which asks tfds for the split
    # size up front (unknown under tfds.testing.mock_data).
    dataset = builder.as_dataset(
        split=read_split, batch_size=_READ_BATCH, as_supervised=True, shuffle_files=False
    )
    batches = list(tfds.as_numpy(dataset))
  except Exception as e:  # noqa: BLE001
    raise DataUnavailableError(
        f"{name}: could not read split {split!r} from " f"data_dir={shown_dir} ({one_line(e)})"
    ) from e
  if batches:
    images = np.concatenate([b[0] for b in batches]).astype(np.uint8, copy=False)
    labels = np.concatenate([b[1] for b in batches]).astype(np.int32)
  else:
    images = np.zeros((0, *ds_info.image_shape), np.uint8)
    labels = np.zeros((0,), np.int32)
  if images.ndim != 4 or images.shape[1:] != ds_info.image_shape:
    raise ValueError(
        f"{name}: read images of shape {images.shape}, expected "
        f"[N, {', '.join(map(str, ds_info.image_shape))}]"
    )
  return images, labels


# ----------------------------------------------------------------------------- on device


def normalize(images: jax.Array | np.ndarray, info: DatasetInfo) -> jax.Array:
  """uint8 images [..., C] -> float32 (x / 255 - mean) / std per channel. jit-able."""
  if isinstance(info, str):
    info = _dataset_info(info)
  mean = jnp.asarray(info.mean, jnp.float32)
  std = jnp.asarray(info.std, jnp.float32)
  return (jnp.asarray(images, jnp.float32) / 255.0 - mean) / std


@functools.partial(jax.jit, static_argnames=("pad", "flip"))
def augment(rng: jax.Array, images: jax.Array, *, pad: int = 4, flip: bool = True) -> jax.Array:
  """Random crop with zero padding `pad` + random horizontal flip, per image, on device.

  images: [N, H, W, C] (or one image [H, W, C]) of any dtype; the result has the same
  shape and dtype. Each image gets its own offsets, uniform in [0, 2*pad] on both
  axes, into the zero-padded image (so zeros enter from the border), and is
  mirrored along W with probability 1/2. pad=0 and flip=False is the identity.
  """
  if pad < 0:
    raise ValueError(f"pad must be >= 0, got {pad}")
  if pad == 0 and not flip:
    return images
  single = images.ndim == 3
  if single:
    images = images[None]
  if images.ndim != 4:
    raise ValueError(f"augment expects images [N, H, W, C] or [H, W, C], got shape {images.shape}")
  n, h, w, c = images.shape
  crop_rng, flip_rng = jax.random.split(rng)
  if pad > 0:
    padded = jnp.pad(images, ((0, 0), (pad, pad), (pad, pad), (0, 0)))
    offsets = jax.random.randint(crop_rng, (n, 2), 0, 2 * pad + 1)
    images = jax.vmap(lambda im, o: jax.lax.dynamic_slice(im, (o[0], o[1], 0), (h, w, c)))(
        padded, offsets
    )
  if flip:
    mirror = jax.random.bernoulli(flip_rng, 0.5, (n,))
    images = jnp.where(mirror[:, None, None, None], images[:, :, ::-1, :], images)
  return images[0] if single else images


@functools.partial(jax.jit, static_argnums=(1, 2))
def _permutation(rng: jax.Array, n: int, batch_size: int) -> jax.Array:
  steps = n // batch_size
  perm = jax.random.permutation(rng, n)
  return perm[: steps * batch_size].reshape(steps, batch_size).astype(jnp.int32)


def epoch_permutation(rng: jax.Array, n: int, batch_size: int) -> jax.Array:
  """jax.random permutation of range(n), truncated to whole batches.

  Returns int32 [n // batch_size, batch_size]; row i holds the indices of step i.
  """
  n, batch_size = int(n), int(batch_size)
  if batch_size < 1 or n < batch_size:
    raise ValueError(f"need 1 <= batch_size <= n, got batch_size={batch_size}, n={n}")
  return _permutation(rng, n, batch_size)


# ----------------------------------------------------------------------------- synthetic


def linear_upsample(n_out: int, n_in: int) -> np.ndarray:
  """[n_out, n_in] linear interpolation weights, sample points symmetric about the centre."""
  pos = np.linspace(0.0, n_in - 1.0, n_out)
  lo = np.clip(np.floor(pos).astype(int), 0, max(n_in - 2, 0))
  frac = pos - lo
  weights = np.zeros((n_out, n_in))
  weights[np.arange(n_out), lo] += 1.0 - frac
  if n_in > 1:
    weights[np.arange(n_out), lo + 1] += frac
  return weights


def synthetic(
    num_train: int,
    num_test: int,
    image_shape: tuple[int, int, int],
    num_classes: int,
    seed: int = 0,
) -> dict[str, tuple[np.ndarray, np.ndarray]]:
  """Learnable generated data: {'train': (images uint8 [N,H,W,C], labels int32 [N]), 'test': ...}.

  Each class has a fixed random template: a 4x4xC grid of grey levels, mirrored
  left-right and bilinearly upsampled to H x W: templates are smooth (a crop of a
  few pixels changes them little) and symmetric (a flip keeps the class). An example
  is its class template plus Gaussian noise (std 40 grey levels), clipped to
  uint8. Labels are balanced and shuffled. A nearest-class-mean classifier, and
  so any small CNN/MLP, reaches high accuracy within a few steps. Deterministic
  for a given seed; train and test share templates but not noise.
  """
  h, w, c = (int(d) for d in image_shape)
  if num_classes < 1 or min(h, w, c) < 1 or num_train < 0 or num_test < 0:
    raise ValueError(
        f"bad synthetic spec: image_shape={image_shape}, num_classes={num_classes}, "
        f"num_train={num_train}, num_test={num_test}"
    )
  rng = np.random.default_rng(seed)
  grid = rng.uniform(24.0, 232.0, size=(num_classes, 4, 4, c))
  grid[:, :, 2:, :] = grid[:, :, 1::-1, :]  # left-right symmetric
  templates = np.einsum("hi,kijc,wj->khwc", linear_upsample(h, 4), grid, linear_upsample(w, 4))

  def make(n: int) -> tuple[np.ndarray, np.ndarray]:
    labels = rng.permutation(np.arange(n) % num_classes).astype(np.int32)
    noise = rng.normal(0.0, 40.0, size=(n, h, w, c))
    images = np.clip(np.rint(templates[labels] + noise), 0, 255).astype(np.uint8)
    return images, labels

  train = make(int(num_train))
  test = make(int(num_test))
  return {"train": train, "test": test}


def synthetic_info(
    data: dict[str, tuple[np.ndarray, np.ndarray]], num_classes: int, name: str = "synthetic"
) -> DatasetInfo:
  """DatasetInfo of `synthetic(...)` output, with mean/std measured on its train split."""
  train_images = np.asarray(data["train"][0], dtype=np.float64) / 255.0
  test_n = int(np.asarray(data["test"][1]).shape[0])
  axes = tuple(range(train_images.ndim - 1))
  mean = tuple(float(m) for m in train_images.mean(axis=axes))
  std = tuple(max(float(s), 1e-6) for s in train_images.std(axis=axes))
  return DatasetInfo(
      name,
      int(num_classes),
      tuple(int(d) for d in train_images.shape[1:]),
      int(train_images.shape[0]),
      test_n,
      mean,
      std,
  )
