"""Tests of export (`fda_biper_jax.export`) and packed inference (`fda_biper_jax.inference`).

Bit packing, the xor-popcount dot and the zero-padded conv are checked
exactly against +-1 float arithmetic; every model of the zoo and every
binary quantizer round-trips export -> bytes -> load -> `Predictor` to the
model's own eval-mode logits (random variables from the init's shapes, with
non-trivial BatchNorm), and one real checkpoint of a tiny training run
round-trips through `experiments.export.export_run` and the command line.
The StableHLO artifact of a packed network runs in a fresh process that
cannot import Flax, optax or the models, to the Predictor's logits bit for bit.
"""

import dataclasses
import functools
import hashlib
import json
import os
import pathlib
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from benchmarks import inference as bench
from experiments.configs import tiny
import randn  # tests/randn.py
from fda_biper_jax import data, models, train
from fda_biper_jax.cli import export as export_cli
from fda_biper_jax.deploy import export, inference
from fda_biper_jax.deploy import packed as packed_lib
from fda_biper_jax.deploy import stablehlo
from fda_biper_jax.train import runs
from fda_biper_jax.data import inputs

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
BIPER = dict(kernel_quantizer="biper", input_quantizer="approx_sign", scaling="learned",
             prenorm=True)
FDA = dict(kernel_quantizer={"name": "fda", "noise": True},
           input_quantizer={"name": "fda", "noise": True}, scaling="mean_abs")
# One quantization per model, so the zoo together covers every scaling, prenorm,
# the noise adapters and several quantizers on kernels and inputs.
ZOO = {
    "resnet18_cifar": BIPER,
    "resnet20": dict(BIPER, scaling="none"),
    "resnet20_fda": FDA,
    "vgg_small": dict(kernel_quantizer="ste", input_quantizer="sign_swish", scaling="mean_abs"),
    "resnet18": dict(BIPER, input_quantizer="ste"),
    "resnet34": BIPER,
    "tiny_cnn": dict(kernel_quantizer="approx_sign", input_quantizer="bnn_pp", scaling="learned"),
    "vit_tiny": dict(kernel_quantizer="ste", input_quantizer="rsign", scaling="mean_abs"),
}
BINARY_QUANTIZERS = ("ste", "approx_sign", "sign_swish", "fda", "biper", "bnn_pp", "ir_net",
                     "reste")
IMAGENET = ("resnet18", "resnet34")
ODD_K = (1, 31, 32, 33, 45, 100)


def _shape(name):
  return {"tiny_cnn": (8, 8, 3)}.get(name, (64, 64, 3) if name in IMAGENET else (32, 32, 3))


def _images(shape, batch=2, seed=1):
  return randn.normal(jax.random.key(seed), (batch, *shape))


@functools.cache
def _exported(name, negative_bn_scales=0.0, **quantization):
  """(model, variables, packed) of a zoo model with random variables."""
  model = models.create(name, 10, **(quantization or ZOO[name]))
  variables = bench.random_variables(model, _shape(name), negative_bn_scales=negative_bn_scales)
  return model, variables, export.export(model, variables, _shape(name))


def _load_checked(data: bytes):
  """A file's bytes, parsed and checked whole: its structure and its fit to its model."""
  packed = packed_lib.from_bytes(data)
  inference.Predictor(packed).check(packed.header["input_shape"])
  return packed


def _assert_same_logits(model, variables, packed, x):
  ref = jax.jit(lambda v, x: model.apply(v, x, train=False))(variables, x)
  got = inference.Predictor(_load_checked(packed_lib.to_bytes(packed)))(x)
  np.testing.assert_array_equal(np.argmax(got, -1), np.argmax(ref, -1))
  np.testing.assert_allclose(got, ref, rtol=1e-4, atol=1e-4)


# --------------------------------------------------------------------------
# Bits
# --------------------------------------------------------------------------


@pytest.mark.parametrize("k", ODD_K)
def test_pack_unpack_round_trip_and_layout(k):
  bits = np.random.default_rng(k).uniform(size=(3, 2, k)) < 0.5
  words = inference.pack_bits(bits)
  assert words.dtype == np.uint32 and words.shape == (3, 2, -(-k // 32))
  # Entry 32 i + j is bit j of word i, tail bits 0: numpy's little-endian bit order.
  padded = np.pad(bits, ((0, 0), (0, 0), (0, 32 * words.shape[-1] - k)))
  np.testing.assert_array_equal(words, np.packbits(padded, -1, "little").view("<u4"))
  np.testing.assert_array_equal(inference.pack_bits(jnp.asarray(bits)), words)
  np.testing.assert_array_equal(inference.unpack_bits(jnp.asarray(words), k), bits)
  # Along another axis.
  moved = inference.pack_bits(np.moveaxis(bits, -1, 0), axis=0)
  np.testing.assert_array_equal(np.moveaxis(moved, 0, -1), words)
  np.testing.assert_array_equal(inference.unpack_bits(moved, k, axis=0), np.moveaxis(bits, -1, 0))


def test_unpack_rejects_a_length_that_does_not_fit():
  words = np.zeros((2, 2), np.uint32)
  with pytest.raises(ValueError, match="length=65 does not fit 2 words"):
    inference.unpack_bits(words, 65)
  with pytest.raises(ValueError, match="uint32 is required"):
    inference.unpack_bits(words.astype(np.int32), 40)


@pytest.mark.parametrize("k", ODD_K + (577,))
def test_popcount_dot_equals_the_plus_minus_one_dot(k):
  rng = np.random.default_rng(k)
  a = np.where(rng.uniform(size=(5, k)) < 0.5, -1.0, 1.0).astype(np.float32)
  w = np.where(rng.uniform(size=(7, k)) < 0.5, -1.0, 1.0).astype(np.float32)
  got = inference.binary_dense(jnp.asarray(a) < 0, inference.pack_bits(w < 0))
  assert got.dtype == jnp.int32
  np.testing.assert_array_equal(got, (a @ w.T).astype(np.int32))
  np.testing.assert_array_equal(inference.xnor_dot(inference.pack_bits(a < 0),
                                                   inference.pack_bits(w < 0), k), a @ w.T)


@pytest.mark.parametrize("channels,kernel,strides,padding", [
    (3, 3, 1, 1), (45, 3, 2, 1), (32, 3, 1, 1), (64, 3, 2, "SAME"), (33, 1, 2, 0),
    (5, 5, 1, 2), (16, 3, 2, "VALID"), (7, 3, 1, ((2, 0), (1, 3))),
])
def test_binary_conv_handles_zero_padding_exactly(channels, kernel, strides, padding):
  """The packed conv equals a float conv of +-1 values with 0-padding, integer for integer."""
  rng = np.random.default_rng(channels)
  x = np.where(rng.uniform(size=(2, 7, 6, channels)) < 0.5, -1.0, 1.0).astype(np.float32)
  w = np.where(rng.uniform(size=(kernel, kernel, channels, 5)) < 0.5, -1.0, 1.0).astype(np.float32)
  ks, st = (kernel, kernel), (strides, strides)
  pads = (jax.lax.padtype_to_pads(x.shape[1:3], ks, st, padding) if isinstance(padding, str)
          else padding if isinstance(padding, tuple) else ((padding, padding),) * 2)
  ref = jax.lax.conv_general_dilated(x, w, st, pads, dimension_numbers=("NHWC", "HWIO", "NHWC"))
  packed = inference.pack_bits((w < 0).reshape(-1, 5).T)
  conv = jax.jit(inference.binary_conv, static_argnums=(2, 3, 4))
  got = conv(jnp.asarray(x) < 0, packed, ks, st, tuple(map(tuple, pads)))
  assert got.dtype == jnp.int32
  np.testing.assert_array_equal(got, np.asarray(ref).astype(np.int32))


# --------------------------------------------------------------------------
# Round trips: model -> file -> logits
# --------------------------------------------------------------------------


@pytest.mark.parametrize("name", models.NAMES)
def test_every_model_round_trips_to_its_eval_logits(name):
  """ResNet-34 is only traced (its blocks are ResNet-18's), the others run."""
  model, variables, packed = _exported(name)
  if name == "resnet34":
    logits = inference.Predictor(_load_checked(packed_lib.to_bytes(packed))).check(_shape(name))
    assert logits.shape == (1, 10) and logits.dtype == jnp.float32
  else:
    _assert_same_logits(model, variables, packed, _images(_shape(name)))
  layers = packed.header["layers"]
  assert layers and all(e["binary_input"] for e in layers.values())
  assert not any(k.startswith("float/params/" + p + "/") for k in packed.arrays for p in layers)


@pytest.mark.parametrize("quantizer", BINARY_QUANTIZERS)
def test_every_binary_quantizer_round_trips(quantizer):
  quantization = dict(kernel_quantizer=quantizer, input_quantizer=quantizer, scaling="mean_abs")
  model, variables, packed = _exported("tiny_cnn", **quantization)
  _assert_same_logits(model, variables, packed, _images(_shape("tiny_cnn"), batch=4))
  assert {e["kernel_quantizer"]["name"] for e in packed.header["layers"].values()} == {quantizer}


@pytest.mark.parametrize("quantization", [
    # ReActNet: learned per-channel thresholds travel with the packed layer
    dict(kernel_quantizer={"name": "ste", "clip": 1.0}, input_quantizer="rsign",
         scaling="mean_abs"),
    # IR-Net's balanced weights and ReSTE's whole-tensor scale
    dict(kernel_quantizer={"name": "ir_net", "balance": True}, input_quantizer="ir_net",
         scaling="mean_abs_tensor"),
    # a deployed input form that depends on scale, after the prenorm
    dict(kernel_quantizer="biper", input_quantizer="biper", scaling="learned", prenorm=True),
], ids=["rsign", "ir_net_balance", "biper_input_prenorm"])
def test_method_parts_round_trip(quantization):
  model = models.create("tiny_cnn", 10, **quantization)
  variables = bench.random_variables(model, _shape("tiny_cnn"))
  packed = export.export(model, variables, _shape("tiny_cnn"))
  _assert_same_logits(model, variables, packed, _images(_shape("tiny_cnn"), batch=4))
  entries = packed.header["layers"].values()
  if quantization["input_quantizer"] == "rsign":
    assert all(e["input_aux"] == ["alpha"] for e in entries)
    thresholds = [a for k, a in packed.arrays.items() if k.endswith("/input_aux/alpha")]
    assert len(thresholds) == 2 and all(np.abs(t).max() > 0 for t in thresholds)
    # Without the thresholds the logits differ: they are used, not just carried.
    stripped = packed_lib.Packed({**packed.header, "layers": {
        p: {**e, "input_aux": []} for p, e in packed.header["layers"].items()}},
        {k: v for k, v in packed.arrays.items() if "/input_aux/" not in k})
    x = _images(_shape("tiny_cnn"), batch=4)
    assert not np.allclose(inference.Predictor(stripped)(x), inference.Predictor(packed)(x))


@pytest.mark.parametrize("quantization,packed_layers", [
    (dict(kernel_quantizer="biper", input_quantizer="identity", scaling="none"), 2),  # mixed
    (dict(kernel_quantizer="biper", input_quantizer="identity", prenorm=True), 2),  # mixed
    (dict(kernel_quantizer="biper_sine", input_quantizer="approx_sign"), 0),  # not binary
])
def test_mixed_and_float_kernels_round_trip(quantization, packed_layers):
  model, variables, packed = _exported("tiny_cnn", **quantization)
  _assert_same_logits(model, variables, packed, _images(_shape("tiny_cnn")))
  assert len(packed.header["layers"]) == packed_layers
  assert not any(e["binary_input"] for e in packed.header["layers"].values())


def test_batch_norm_after_max_pool_is_folded_only_when_exact():
  """VGG-Small pools between conv and BN: max commutes with the BN only for m >= 0."""
  folded = {e["folded_bn"] for e in _exported("vgg_small")[2].header["layers"].values()}
  assert None not in folded and len(folded) == 5
  model, variables, packed = _exported("vgg_small", negative_bn_scales=0.1)
  layers = packed.header["layers"]
  pooled = {p for p, e in layers.items() if int(p[len("conv")]) % 2 == 1}
  assert pooled == {"conv1/conv", "conv3/conv", "conv5/conv"}
  assert all(layers[p]["folded_bn"] is None for p in pooled)
  assert all(layers[p]["folded_bn"] for p in set(layers) - pooled)
  assert all(f"float/batch_stats/{p[:-len('conv')]}bn/mean" in packed.arrays for p in pooled)
  _assert_same_logits(model, variables, packed, _images((32, 32, 3)))


def test_fda_batch_norm_after_prelu_is_not_folded():
  layers = _exported("resnet20_fda")[2].header["layers"]
  assert len(layers) == 18 and all(e["folded_bn"] is None for e in layers.values())


def test_resnet18_cifar_file_is_at_most_a_twentieth_of_float32():
  sizes = _exported("resnet18_cifar")[2].sizes()
  assert sizes["float32_param_bytes"] == 4 * 11_005_002
  assert sizes["ratio"] <= 1 / 20, sizes


def test_checkpoint_round_trip(tmp_path):
  """A tiny training run's checkpoint -> file (library and command line) -> logits."""
  workdir, out = str(tmp_path / "run"), str(tmp_path / "tiny.safetensors")
  config = tiny.get_config()
  train.train_and_evaluate(config, workdir)
  report = export_cli.export_run(workdir, out, "best")
  assert report["model"] == "tiny_cnn" and report["step"] in (8, 16) and report["ratio"] < 1
  assert report["checkpoint_bytes"] > report["file_bytes"] == os.path.getsize(out)
  run = runs.restore(workdir, "best")
  model, variables, shape = run.model, run.variables, run.input_shape
  assert run.step == report["step"]
  packed = inference.load(out)
  assert packed.header["model"] == models.config(model)
  assert tuple(packed.header["input_shape"]) == shape == tuple(config.synthetic.image_shape)
  info, [(images, _)] = inputs.load_shards(config, "test", [0], 1)
  _assert_same_logits(model, variables, packed, data.normalize(images, info))  # every test image

  cli, hlo = str(tmp_path / "cli.safetensors"), str(tmp_path / "cli.stablehlo")
  run = subprocess.run([sys.executable, "-m", "experiments.export", f"--workdir={workdir}",
                        f"--out={cli}", "--which=latest", f"--stablehlo={hlo}"], cwd=ROOT,
                       capture_output=True, text=True, check=False)
  assert run.returncode == 0, run.stderr
  assert "exported tiny_cnn (latest checkpoint, step 16)" in run.stdout
  assert f"wrote the StableHLO artifact {hlo}: {os.path.getsize(hlo):,} bytes" in run.stdout
  assert inference.load(cli).arrays.keys() == packed.arrays.keys()
  x = data.normalize(images, info)[:5]
  np.testing.assert_array_equal(stablehlo.load(hlo)(x), inference.Predictor(inference.load(cli))(x))


def test_export_argument_errors(tmp_path):
  with pytest.raises(ValueError, match="which='last' is not allowed"):
    runs.restore(str(tmp_path), "last")
  with pytest.raises(ValueError, match="holds no checkpoints/ folder"):
    runs.restore(str(tmp_path), "latest")
  assert not os.listdir(tmp_path)


# --------------------------------------------------------------------------
# Bad files
# --------------------------------------------------------------------------


@pytest.fixture(scope="module")
def tiny_file():
  return packed_lib.to_bytes(_exported("tiny_cnn")[2])


def _resave(packed, header=None, arrays=None):
  return packed_lib.to_bytes(dataclasses.replace(packed, header=header or packed.header,
                                             arrays=arrays or packed.arrays))


def test_valid_file_loads_from_disk_and_is_safetensors(tmp_path, tiny_file):
  path = str(tmp_path / "net.safetensors")
  packed = _load_checked(tiny_file)
  packed_lib.save(packed, path)
  again = inference.load(path)
  assert again.header == packed.header and again.arrays.keys() == packed.arrays.keys()
  for k, a in packed.arrays.items():
    np.testing.assert_array_equal(again.arrays[k], a)
  # any safetensors reader reads the packed weights and the metadata
  from safetensors import safe_open  # noqa: PLC0415
  with safe_open(path, framework="numpy") as f:
    meta = f.metadata()
    kernel = f.get_tensor("packed/unit1/conv/kernel")
  assert meta["format"] == "fda_biper_jax.packed" and meta["version"] == "2"
  assert json.loads(meta["header"])["model"]["name"] == "tiny_cnn"
  assert kernel.dtype == np.uint32 and set(json.loads(meta["sha256"])) >= {
      "header", "packed/unit1/conv/kernel"}


@pytest.mark.parametrize("cut", [4, 30, 60, -1000, -1])
def test_truncated_file_is_rejected(tiny_file, cut):
  with pytest.raises(ValueError, match="truncated"):
    _load_checked(tiny_file[:cut])


def test_extended_file_is_rejected(tiny_file):
  with pytest.raises(ValueError, match="too long"):
    _load_checked(tiny_file + b"\0")


def _header_end(data: bytes) -> int:
  return 8 + int.from_bytes(data[:8], "little")


@pytest.mark.parametrize("target,match", [("array", "fails its SHA-256 checksum"),
                                          ("header", "header fails its SHA-256"),
                                          ("json", "not a safetensors file")])
def test_tampered_file_is_rejected(tiny_file, target, match):
  data = bytearray(tiny_file)
  if target == "array":
    data[-5] ^= 0x01
  elif target == "json":
    data[9] = ord("#")
  else:  # a digit of the description (the model's num_classes), same length
    at = data.index(b'num_classes\\": 10', 0, _header_end(tiny_file))
    data[at + len(b'num_classes\\": ')] = ord("2")
  with pytest.raises(ValueError, match=match):
    _load_checked(bytes(data))


def test_another_safetensors_file_is_rejected():
  import safetensors.numpy  # noqa: PLC0415
  other = safetensors.numpy.save({"w": np.ones(3, np.float32)}, metadata={"format": "pt"})
  with pytest.raises(ValueError, match="format='pt' is not supported"):
    _load_checked(other)
  with pytest.raises(ValueError, match="not a safetensors file"):
    _load_checked((10).to_bytes(8, "little") + b"not json!!")
  with pytest.raises(ValueError, match="truncated"):
    _load_checked(b"PK\x03\x04" + bytes(40))


@pytest.mark.parametrize("version,match", [
    ("1", r"format version '1' is not supported; supported: \[2\]"),
    ("3", r"format version '3' is not supported"),
])
def test_wrong_version_is_rejected(tiny_file, version, match):
  import safetensors.numpy  # noqa: PLC0415
  packed = _exported("tiny_cnn")[2]
  meta = {"format": "fda_biper_jax.packed", "version": version, "header": "{}", "sha256": "{}"}
  with pytest.raises(ValueError, match=match):
    _load_checked(safetensors.numpy.save(dict(packed.arrays), metadata=meta))


def _with_array(packed, name, value):
  return _resave(packed, arrays={**packed.arrays, name: value})


def test_inconsistent_files_are_rejected():
  packed = _exported("tiny_cnn")[2]
  kernel = packed.arrays["packed/unit1/conv/kernel"]
  cases = [
      (_with_array(packed, "packed/unit1/conv/kernel", kernel[:, :-1]),
       r"'packed/unit1/conv/kernel' is uint32 \[32, 4\]; layer unit1/conv needs uint32 \[32, 5\]"),
      (_with_array(packed, "packed/unit1/conv/scale", np.ones(31, np.float32)),
       "layer unit1/conv needs float32"),
      (_with_array(packed, "packed/unit1/conv/kernel", kernel | np.uint32(1 << 31)),
       "unused tail bits of its packed kernel are not 0"),
      (_with_array(packed, "stray", np.ones(1, np.float32)), "belong to no packed layer"),
      (_with_array(packed, "float/params/stem/conv/kernel", np.ones((3, 3, 3, 8), np.float32)),
       "the exported arrays do not fit TinyCNN"),
      (_resave(packed, arrays={k: v for k, v in packed.arrays.items()
                               if k != "float/params/head/fc/bias"}),
       "the exported arrays do not fit TinyCNN"),
  ]
  layers = dict(packed.header["layers"])
  layers["unit9/conv"] = layers["unit1/conv"]
  arrays = {**packed.arrays, **{f"packed/unit9/conv/{k}": packed.arrays[f"packed/unit1/conv/{k}"]
                                for k in ("kernel", "scale", "bias")}}
  cases.append((_resave(packed, {**packed.header, "layers": layers}, arrays),
                r"exported layers \['unit9/conv'\] are not in TinyCNN"))
  entry = dict(layers["unit1/conv"], kernel_shape=[3, 3, 8, 32], reduction=72)
  short = np.concatenate([kernel[:, :2], kernel[:, 2:3] & np.uint32(0xFF)], axis=1)
  arrays = {**packed.arrays, "packed/unit1/conv/kernel": short}
  cases.append((_resave(packed, {**packed.header, "layers": {**packed.header["layers"],
                                                               "unit1/conv": entry}}, arrays),
                r"layer unit1/conv: the exported kernel shape \(3, 3, 8, 32\) does not fit"))
  for data, match in cases:
    with pytest.raises(ValueError, match=match):
      _load_checked(data)

# --------------------------------------------------------------------------
# StableHLO artifact
# --------------------------------------------------------------------------

# Runs in a fresh process with a clean environment: a finder first on sys.meta_path
# makes Flax, optax and the package's models, layers, trainer and data unimportable.
_FRESH = """
import importlib.abc, sys

BLOCKED = ("flax", "optax", "safetensors", "tensorflow", "fda_biper_jax.models",
           "fda_biper_jax.nn", "fda_biper_jax.train", "fda_biper_jax.data")

class Block(importlib.abc.MetaPathFinder):
  def find_spec(self, name, path=None, target=None):
    if any(name == b or name.startswith(b + ".") for b in BLOCKED):
      raise ImportError(f"{name} is blocked")
    return None

sys.meta_path.insert(0, Block())
import jax
import numpy as np

path, inputs, outputs = sys.argv[1:]
raw = jax.export.deserialize(bytearray(open(path, "rb").read()))  # jax alone
assert not [m for m in sys.modules if m.startswith("fda_biper_jax")]
from fda_biper_jax.deploy import stablehlo
artifact = stablehlo.load(path)
x = dict(np.load(inputs))
np.savez(outputs, raw=raw.call(x["big"]), **{k: artifact(v) for k, v in x.items()})
print(sorted(m for m in sys.modules if m.startswith(("fda_biper_jax", "flax", "optax"))))
print(list(artifact.platforms), artifact.input_shape)
"""


@pytest.fixture(scope="module")
def tiny_stablehlo():
  """(packed, artifact bytes) of the tiny model: symbolic batch, cpu + cuda + tpu."""
  packed = _exported("tiny_cnn")[2]
  return packed, stablehlo.to_bytes(export.stablehlo(packed))


def test_stablehlo_runs_in_a_fresh_process_without_the_models(tmp_path, tiny_stablehlo):
  """Two batch sizes through one artifact (symbolic batch), in a process that cannot
  import Flax or the models: the Predictor's logits, bit for bit."""
  packed, data = tiny_stablehlo
  path, inputs, outputs = (str(tmp_path / n) for n in ("tiny.stablehlo", "x.npz", "y.npz"))
  pathlib.Path(path).write_bytes(data)
  x = {"one": np.asarray(_images(_shape("tiny_cnn"), batch=1, seed=2)),
       "big": np.asarray(_images(_shape("tiny_cnn"), batch=5, seed=3))}
  np.savez(inputs, **x)
  env = {"JAX_PLATFORMS": "cpu", "PATH": os.environ.get("PATH", "")}
  run = subprocess.run([sys.executable, "-c", _FRESH, path, inputs, outputs], cwd=ROOT,
                       env=env, capture_output=True, text=True, check=False, timeout=300)
  assert run.returncode == 0, run.stderr
  assert run.stdout.splitlines() == [
      "['fda_biper_jax', 'fda_biper_jax.deploy', 'fda_biper_jax.deploy.stablehlo']",
      "['cpu', 'cuda', 'tpu'] (None, 8, 8, 3)"]
  got = dict(np.load(outputs))
  predictor = inference.Predictor(packed)
  for name, images in x.items():
    np.testing.assert_array_equal(got[name], predictor(images))
  np.testing.assert_array_equal(got["raw"], got["big"])
  # One image's logits depend on the batch size only by float32 rounding (XLA vectorises
  # the float layers' sums by batch size): 2e-7 measured.
  x2 = np.concatenate([x["one"], x["big"]])
  np.testing.assert_allclose(stablehlo.from_bytes(data)(x2)[:1], got["one"], rtol=1e-6,
                             atol=1e-6)


def test_stablehlo_fixed_batch_and_argument_errors(tmp_path, tiny_stablehlo):
  packed, _ = tiny_stablehlo
  path = str(tmp_path / "net.safetensors")
  packed_lib.save(packed, path)
  artifact = export.stablehlo(path, batch_size=2, platforms=["cpu"])  # from a file
  assert artifact.input_shape == (2, 8, 8, 3) and artifact.platforms == ("cpu",)
  assert artifact.metadata["model"]["name"] == "tiny_cnn"
  x = _images(_shape("tiny_cnn"), batch=2)
  np.testing.assert_array_equal(artifact(x), inference.Predictor(packed)(x))
  with pytest.raises(ValueError, match=r"shape \(3, 8, 8, 3\) do not fit the artifact, which "
                                       r"takes \(2, 8, 8, 3\)"):
    artifact(_images(_shape("tiny_cnn"), batch=3))
  with pytest.raises(ValueError, match="batch_size=0: a positive int"):
    export.stablehlo(packed, batch_size=0)
  with pytest.raises(ValueError, match=r"platforms=\['gpu'\]: one or more of"):
    export.stablehlo(packed, platforms=("gpu",))


def _framed(payload: bytes, trailer: bytes) -> bytes:
  """An artifact's layout around any payload and trailer bytes (`deploy.stablehlo`)."""
  return payload + trailer + len(trailer).to_bytes(8, "little") + stablehlo.MAGIC


def _with_trailer(payload: bytes, **fields) -> bytes:
  return _framed(payload, json.dumps(fields).encode())


def _bad_artifacts(data: bytes, tiny_file: bytes) -> list[tuple[str, bytes, str]]:
  """(what, bytes, the error it must raise) of broken or foreign files."""
  tail = 8 + len(stablehlo.MAGIC)
  length = int.from_bytes(data[-tail:-len(stablehlo.MAGIC)], "little")
  payload, trailer = data[:-tail - length], json.loads(data[-tail - length:-tail])
  flipped = bytearray(data)
  flipped[len(payload) // 2] ^= 0x01
  garbage = b"\x07" * 100
  return [
      ("empty", b"", "not a complete one"),
      ("cut at the end", data[:-1], "not a complete one"),
      ("cut in half", data[:len(data) // 2], "not a complete one"),
      ("extended", data + b"\0", "not a complete one"),
      ("packed file", tiny_file, "not a complete one"),
      ("payload cut", data[1:], "the artifact is truncated: its payload is"),
      ("long trailer", data[:-tail] + (len(data)).to_bytes(8, "little") + stablehlo.MAGIC,
       "the artifact is truncated"),
      ("bad trailer", _framed(payload, b"{not json"), "trailer is not valid"),
      ("a bit flipped", bytes(flipped), "fails its SHA-256 checksum"),
      ("version", _with_trailer(payload, **dict(trailer, version=2)),
       r"artifact version 2 is not supported; supported: \[1\]"),
      ("format", _with_trailer(payload, **dict(trailer, format="other")),
       "format='other' is not supported"),
      ("not jax's", _with_trailer(garbage, **dict(trailer, payload_bytes=100,
                                                  sha256=hashlib.sha256(garbage).hexdigest())),
       "cannot read this artifact"),
  ]


def test_bad_stablehlo_artifacts_are_rejected_with_one_line(tiny_stablehlo, tiny_file):
  _, data = tiny_stablehlo
  for what, bad, match in _bad_artifacts(data, tiny_file):
    with pytest.raises(ValueError, match=match) as e:
      stablehlo.from_bytes(bad)
    assert "\n" not in str(e.value), (what, str(e.value))


# --------------------------------------------------------------------------
# Benchmark
# --------------------------------------------------------------------------


def test_benchmark_writes_a_well_formed_table(tmp_path):
  out = str(tmp_path / "bench.json")
  proc = subprocess.run([sys.executable, "-m", "benchmarks.inference", "--models=tiny_cnn",
                         "--batch_sizes=3", "--windows=2", "--min_window_s=0", f"--json={out}"],
                        cwd=ROOT, capture_output=True, text=True, timeout=300)
  assert proc.returncode == 0, proc.stderr[-2000:]
  lines = proc.stdout.splitlines()
  assert lines[0].startswith("| backend | model | batch |") and lines[1].startswith("|---|")
  assert lines[2].startswith("| cpu | tiny_cnn | 3 |") and lines[2].count("|") == 9
  assert lines[4].startswith("| model |") and lines[6].startswith("| tiny_cnn | ")
  assert lines[6].count("|") == 5 and "| 1/" in lines[6]
  results = json.loads(pathlib.Path(out).read_text())
  assert [r["batch"] for r in results["rows"]] == [3]
  for r in results["rows"]:
    assert r["predictions_agree"] and r["float_ms"] > 0 and r["packed_ms"] > 0
    assert r["packed_images_per_s"] == pytest.approx(1e3 * r["batch"] / r["packed_ms"])
  assert results["sizes"][0]["model"] == "tiny_cnn" and results["sizes"][0]["ratio"] < 1
