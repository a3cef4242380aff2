"""Tests of the model summary: hand-computed rows and totals, CLI."""
import importlib.util
import json
import os
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import linen as nn

from fda_biper_jax import layers, summary
from fda_biper_jax.methods import schedule
from fda_biper_jax.summary import Summary, format_table, summarize

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
HAVE_MODELS = importlib.util.find_spec("fda_biper_jax.models") is not None


class Tiny(nn.Module):
  """8x8x3 input; every number below is computed by hand in EXPECTED."""
  binary: bool = True

  @nn.compact
  def __call__(self, x, train: bool = False):
    q = (lambda spec: spec) if self.binary else (lambda spec: "identity")
    # Full-precision stem: 3x3x3x4 = 108 float weights, 8*8*108 = 6912 float MACs.
    x = layers.BinaryConv(4, use_bias=False, name="conv0")(x, train)
    x = nn.BatchNorm(use_running_average=not train, name="bn0")(x)  # 4 + 4 params
    # Binary x binary, stride 2 -> 4x4x8: 3*3*4*8 = 288 1-bit, 8 learned scales,
    # 4*4*288 = 4608 binary MACs.
    x = layers.BinaryConv(8, strides=(2, 2), use_bias=False, kernel_quantizer=q("biper"),
                          input_quantizer=q("approx_sign"), scaling="learned",
                          name="conv1")(x, train)
    # Binary kernel, float input: 1x1x8x8 = 64 1-bit + 8 bias, 16*64 = 1024 mixed MACs.
    x = layers.BinaryConv(8, kernel_size=(1, 1), kernel_quantizer=q("ste"),
                          use_bias=True, name="conv2")(x, train)
    # FDA with noise adapters: 3*3*8*8 = 576 1-bit; kernel adapter d=72, hidden
    # max(72 // 64, 4) = 4: 2*72*4 = 576 float; input adapter d=8, hidden 4:
    # 2*8*4 = 64 float; 16*576 = 9216 binary MACs.
    fda = {"name": "fda", "noise": True}
    x = layers.BinaryConv(8, use_bias=False, kernel_quantizer=q(fda), input_quantizer=q(fda),
                          scaling="mean_abs", name="conv3")(x, train)
    x = nn.PReLU(name="prelu")(x)  # 1 float
    x = jnp.mean(x, axis=(1, 2))
    # Identity quantizers = full precision: 8*10 + 10 float, 80 float MACs.
    return layers.BinaryDense(10, kernel_quantizer="identity", input_quantizer="identity",
                              use_bias=True, name="fc")(x, train)


# name: (type, output, in bits, kernel bits, 1-bit params, 32-bit params, binary, mixed, float MACs)
EXPECTED = {
    "conv0": ("BinaryConv", (8, 8, 4), 32, 32, 0, 108, 0, 0, 6912),
    "bn0": ("BatchNorm", (8, 8, 4), None, None, 0, 8, 0, 0, 0),
    "conv1": ("BinaryConv", (4, 4, 8), 1, 1, 288, 8, 4608, 0, 0),
    "conv2": ("BinaryConv", (4, 4, 8), 32, 1, 64, 8, 0, 1024, 0),
    "conv3": ("BinaryConv", (4, 4, 8), 1, 1, 576, 640, 9216, 0, 0),
    "prelu": ("PReLU", (4, 4, 8), None, None, 0, 1, 0, 0, 0),
    "fc": ("BinaryDense", (10,), 32, 32, 0, 90, 0, 0, 80),
}
P1, P32 = 928, 863


def _param_count(model, shape):
  v = jax.eval_shape(lambda x: model.init(jax.random.key(0), x),
                     jax.ShapeDtypeStruct((1,) + shape, jnp.float32))
  return sum(int(np.prod(a.shape)) for a in jax.tree_util.tree_leaves(v["params"]))


@pytest.fixture(scope="module")
def tiny():
  return summarize(Tiny(), (8, 8, 3))


def test_rows_by_hand(tiny):
  assert [r.name for r in tiny.rows] == list(EXPECTED)
  for r in tiny.rows:
    t, out, ib, kb, p1, p32, mb, mm, mf = EXPECTED[r.name]
    got = (r.type, r.output_shape, r.input_bits, r.kernel_bits, r.params_1bit,
           r.params_32bit, r.macs_binary, r.macs_mixed, r.macs_float)
    assert got == EXPECTED[r.name], r.name
    assert r.memory_bytes == p1 / 8 + 4 * p32
  conv1 = tiny.rows[2]
  assert conv1.input_shape == (8, 8, 4) and conv1.kernel_shape == (3, 3, 4, 8)
  assert (conv1.kernel_quantizer, conv1.input_quantizer) == ("biper", "approx_sign")
  conv0 = tiny.rows[0]
  assert (conv0.kernel_quantizer, conv0.input_quantizer) == (None, None)
  assert tiny.rows[-1].kernel_quantizer == "identity"


def test_totals_by_hand(tiny):
  t = tiny.totals
  assert (t.params_1bit, t.params_32bit, t.params) == (P1, P32, P1 + P32)
  assert t.params == _param_count(Tiny(), (8, 8, 3))
  assert t.non_trainable == 8  # BatchNorm mean and var, outside the sizes
  assert t.float32_bytes == 4 * 1791 == 7164
  assert t.deployed_bytes == 928 / 8 + 4 * 863 == 3568
  assert t.float32_mb == 7164 / 2**20 and t.deployed_mb == 3568 / 2**20
  assert t.compression_ratio == pytest.approx(7164 / 3568)
  assert (t.macs_binary, t.macs_mixed, t.macs_float) == (13824, 1024, 6992)
  assert t.macs == 21840
  assert t.binary_mac_share == pytest.approx(13824 / 21840)


def test_twin_has_no_binary_params_or_macs():
  s = summarize(Tiny(binary=False), (8, 8, 3))
  t = s.totals
  assert t.params_1bit == 0 and t.macs_binary == 0 and t.macs_mixed == 0
  # FDA's noise adapters (576 + 64 float parameters) belong to its quantizer: the twin
  # has none.
  assert t.params == P1 + P32 - 640 == _param_count(Tiny(binary=False), (8, 8, 3))
  assert t.macs_float == 21840 and t.compression_ratio == 1.0
  assert t.binary_mac_share == 0.0
  assert all(r.input_bits in (None, 32) and r.kernel_bits in (None, 32) for r in s.rows)


def test_train_mode_and_the_training_step_pass_through():
  with schedule.training_step(3, 10):  # FDA's schedules read the bound step in training
    s = summarize(Tiny(), (8, 8, 3), train=True)
  assert s.totals.params == P1 + P32 and s.totals.macs == 21840


class Shared(nn.Module):
  """A layer applied twice (params once, MACs twice) and plain flax layers."""

  @nn.compact
  def __call__(self, x):
    conv = layers.BinaryConv(3, kernel_size=(1, 1), use_bias=False, kernel_quantizer="ste",
                             input_quantizer="ste", train=False, name="shared")
    x = conv(conv(x))                                   # 2 * 4*4*9 = 288 binary MACs
    x = nn.Conv(2, (3, 3), padding="SAME", name="c")(x)  # 4*4*54 = 864 float, 56 params
    x = x.reshape((x.shape[0], -1))                       # 32
    return nn.Dense(5, use_bias=False, name="d")(x)       # 160 MACs, 160 params


def test_shared_layer_and_plain_flax_layers():
  s = summarize(Shared(), (4, 4, 3))
  rows = {r.name: r for r in s.rows}
  assert list(rows) == ["shared", "c", "d"]
  assert rows["shared"].calls == 2 and rows["shared"].params_1bit == 9
  assert rows["shared"].macs_binary == 288
  assert (rows["c"].macs_float, rows["c"].params_32bit, rows["c"].kernel_bits) == (864, 56, 32)
  assert (rows["d"].macs_float, rows["d"].params_32bit) == (160, 160)
  assert s.totals.params == 9 + 56 + 160 == _param_count(Shared(), (4, 4, 3))
  assert s.totals.non_trainable == 0


def test_json_round_trip(tiny):
  d = json.loads(json.dumps(tiny.to_dict()))
  assert d["totals"]["params"] == P1 + P32 and d["rows"][2]["memory_bytes"] == 288 / 8 + 32
  back = Summary.from_dict(d)
  assert back == tiny
  assert json.loads(back.to_json()) == d


def test_format_table(tiny):
  text = format_table(tiny)
  lines = text.splitlines()
  for name in EXPECTED:
    assert any(line.startswith(name + " ") for line in lines), name
  assert "13,824" in text and "1,791" in text and "2.01x" in text
  header = next(line for line in lines if line.startswith("Layer"))
  assert "1-bit MACs" in header and "Mixed MACs" in header and "32-bit MACs" in header
  assert str(tiny) == text


def test_bad_input_shape():
  with pytest.raises(ValueError, match="input_shape"):
    summarize(Tiny(), (0, 8, 3))


PROG = "python -m fda_biper_jax.cli.summary"


def _cli(*args):
  env = dict(os.environ, JAX_PLATFORMS="cpu", TF_CPP_MIN_LOG_LEVEL="3")
  return subprocess.run([sys.executable, "-m", "fda_biper_jax.cli.summary", *args],
                        cwd=ROOT, env=env, capture_output=True, text=True, timeout=120)


@pytest.mark.parametrize("args, allowed", [
    (["--model=no_such_model"], "resnet18_cifar, resnet20, "),
    (["--model=resnet20", "--input_shape=32,32"], "H,W,C: three positive integers"),
    (["--model=resnet20", "--num_classes=0"], "a positive integer"),
    (["--model=resnet20", "--scaling=bogus"], "none, mean_abs, mean_abs_tensor, learned"),
    (["--model=resnet20", "--kernel_quantizer=nope"], "identity, ste, "),
    (["--model=resnet20", "--input_quantizer=nope"], "identity, ste, "),
])
def test_cli_bad_flag_is_one_line_error(args, allowed):
  r = _cli(*args)
  assert r.returncode == 2 and r.stdout == "" and "Traceback" not in r.stderr, r.stderr
  (err,) = r.stderr.strip().splitlines()
  assert err.startswith(f"{PROG}: error: {args[-1]} is not allowed; allowed: {allowed}"), err


@pytest.mark.skipif(not HAVE_MODELS, reason="fda_biper_jax.models does not exist yet")
def test_cli_resnet20_table():
  r = _cli("--model=resnet20")
  assert r.returncode == 0, r.stderr
  assert r.stdout.splitlines()[0].startswith("resnet20 stats (input (32, 32, 3)")
  assert "Ratio of MACs that are binary" in r.stdout and "Compression ratio" in r.stdout


@pytest.mark.skipif(not HAVE_MODELS, reason="fda_biper_jax.models does not exist yet")
def test_cli_json_biper_and_twin():
  r = _cli("--model=resnet20", "--json")
  assert r.returncode == 0, r.stderr
  d = json.loads(r.stdout)
  t = d["totals"]
  assert d["model"] == "resnet20" and d["input_shape"] == [32, 32, 3]
  assert t["params_1bit"] > 0 and t["macs_binary"] > 0 and t["compression_ratio"] > 1
  assert t["params"] == t["params_1bit"] + t["params_32bit"]
  assert Summary.from_dict(d).to_dict() == d
  r = _cli("--model=resnet20", "--json", "--kernel_quantizer=identity",
           "--input_quantizer=identity")
  assert r.returncode == 0, r.stderr
  twin = json.loads(r.stdout)["totals"]
  assert twin["params_1bit"] == 0 and twin["macs_binary"] == 0 and twin["macs_mixed"] == 0
  assert twin["params"] == t["params"] and twin["macs"] == t["macs"]


def test_default_input_shape():
  assert summary.default_input_shape("resnet18") == (224, 224, 3)
  assert summary.default_input_shape("resnet34") == (224, 224, 3)
  assert summary.default_input_shape("resnet18_cifar") == (32, 32, 3)
  assert summary.default_input_shape("resnet20") == (32, 32, 3)


@pytest.mark.skipif(not HAVE_MODELS, reason="fda_biper_jax.models does not exist yet")
def test_zoo_totals_equal_params_collection():
  from fda_biper_jax import models
  for name in models.NAMES:
    shape = summary.default_input_shape(name)
    if shape != summary.CIFAR_SHAPE:
      continue  # the ImageNet models are covered by the CLI; keep this test fast
    model = models.create(name, 10, kernel_quantizer="biper", input_quantizer="approx_sign",
                          scaling="learned")
    s = summarize(model, shape)
    assert s.totals.params == _param_count(model, shape), name
    assert s.totals.macs_binary > 0, name


class NeedsTrain(nn.Module):
  @nn.compact
  def __call__(self, x, train):
    x = layers.BinaryDense(4, use_bias=False, kernel_quantizer="ste", input_quantizer="ste",
                           name="fc")(x, train)
    return nn.BatchNorm(use_running_average=not train, name="bn")(x)


def test_train_defaults_to_false_when_required():
  s = summarize(NeedsTrain(), (6,))
  assert [(r.name, r.params_1bit, r.params_32bit, r.macs_binary) for r in s.rows] == [
      ("fc", 24, 0, 24), ("bn", 0, 8, 0)]
  assert s.totals.non_trainable == 8
