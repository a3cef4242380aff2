"""A researcher's own model: drop-in layers, `binarize`, factories through the trainer,
the ViT of the zoo, and the installed wheel in a fresh environment."""

import dataclasses
import functools
import inspect
import os
import subprocess
import sys
import textwrap
from typing import Callable

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import linen as nn

from experiments.configs import tiny
import randn  # tests/randn.py
from fda_biper_jax import binarize, layers, models, summary, trace, train, training_step
from fda_biper_jax.cli import export as export_cli
from fda_biper_jax.deploy import export, inference
from fda_biper_jax.nn import linen
from fda_biper_jax.train import runs

import installs  # tests/installs.py

BIPER = dict(kernel_quantizer="biper", input_quantizer="approx_sign", scaling="learned",
             prenorm=True)


# ----------------------------------------------------------------------------- drop-in layers


@pytest.mark.parametrize("binary, flax_layer", [(layers.BinaryConv, nn.Conv),
                                                (layers.BinaryDense, nn.Dense)])
def test_binary_layers_take_every_argument_of_their_flax_counterparts(binary, flax_layer):
  ours = [f.name for f in dataclasses.fields(binary) if f.name not in ("parent", "name")]
  theirs = [f.name for f in dataclasses.fields(flax_layer) if f.name not in ("parent", "name")]
  assert ours[:len(theirs)] == theirs  # same names, same order: positional arguments agree
  assert ours[len(theirs):] == list(linen.BINARY_FIELDS)
  defaults = {f.name: f.default for f in dataclasses.fields(flax_layer)}
  for f in dataclasses.fields(binary):
    if f.name in defaults and f.name != "kernel_size":
      assert f.default == defaults[f.name] or f.name in ("kernel_init", "bias_init",
                                                         "promote_dtype"), f.name
  assert list(inspect.signature(binary.__call__).parameters)[:2] == ["self", "inputs"]


@pytest.mark.parametrize("kwargs, shape", [
    (dict(kernel_size=3), (2, 9, 5)),                                     # 1-D, int kernel
    (dict(kernel_size=(3, 3), feature_group_count=4), (2, 7, 7, 4)),      # depthwise
    (dict(kernel_size=(3, 3), feature_group_count=2), (2, 7, 7, 4)),      # grouped
    (dict(kernel_size=(3, 3), kernel_dilation=2, strides=2), (2, 9, 9, 4)),
    (dict(kernel_size=(3, 3), padding=((1, 2), (0, 1))), (2, 6, 6, 4)),   # padding pairs
    (dict(kernel_size=(3, 3), padding="CIRCULAR"), (2, 6, 6, 4)),
    (dict(kernel_size=(2, 2, 2), input_dilation=2, padding=1), (2, 4, 4, 4, 4)),  # 3-D
    (dict(kernel_size=(3, 3)), (3, 2, 6, 6, 4)),                          # two batch axes
])
def test_full_precision_binary_conv_is_nn_conv(kwargs, shape):
  """Without quantizers the layer is flax's conv, value for value, whatever the geometry."""
  x = randn.normal(jax.random.key(0), shape)
  ref = nn.Conv(4, **kwargs)
  v = ref.init(jax.random.key(1), x)
  ours = layers.BinaryConv(4, **kwargs)
  np.testing.assert_allclose(ours.apply(v, x), ref.apply(v, x), rtol=1e-5, atol=1e-5)


def test_binary_conv_geometry_binarizes_both_operands():
  """A grouped, dilated conv with sign quantizers: the conv of the two +-1 operands."""
  kw = dict(kernel_size=(3, 3), feature_group_count=2, kernel_dilation=2, use_bias=False)
  x = randn.normal(jax.random.key(0), (2, 9, 9, 4))
  layer = layers.BinaryConv(4, kernel_quantizer="ste", input_quantizer="ste", **kw)
  v = layer.init(jax.random.key(1), x, train=False)
  sign = lambda a: jnp.where(a >= 0, 1.0, -1.0)  # noqa: E731
  ref = nn.Conv(4, **kw).apply({"params": {"kernel": sign(v["params"]["kernel"])}}, sign(x))
  np.testing.assert_array_equal(layer.apply(v, x, train=False), ref)


def test_a_layer_called_the_plain_way_needs_its_mode_and_never_trains_through_zero():
  layer = layers.BinaryConv(4, (3, 3), kernel_quantizer="biper", input_quantizer="approx_sign")
  x = randn.normal(jax.random.key(0), (2, 6, 6, 3))
  with pytest.raises(ValueError, match="the mode is not given: pass train=True"):
    layer.init(jax.random.key(0), x)
  v = layer.init(jax.random.key(0), x, train=False)
  with pytest.raises(ValueError, match="the mode is not given"):
    jax.grad(lambda p: jnp.sum(layer.apply({"params": p}, x) ** 2))(v["params"])
  g = jax.grad(lambda p: jnp.sum(layer.apply({"params": p}, x, train=True) ** 2))(v["params"])
  assert float(jnp.abs(g["kernel"]).max()) > 0
  bound = layers.BinaryConv(4, (3, 3), kernel_quantizer="biper", train=True)  # bound mode
  g = jax.grad(lambda p: jnp.sum(bound.apply({"params": p}, x) ** 2))(v["params"])
  assert float(jnp.abs(g["kernel"]).max()) > 0


# ----------------------------------------------------------------------------- binarize


class ResNetBlock(nn.Module):
  """A flax-examples-style ResNet block (nn.Conv, nn.BatchNorm, projection shortcut; the
  activation a field, as in flax's examples/imagenet)."""
  filters: int
  strides: int = 1
  act: Callable = nn.relu
  axis_name: str | None = None

  @nn.compact
  def __call__(self, x, train: bool):
    norm = functools.partial(nn.BatchNorm, use_running_average=not train, momentum=0.9,
                             axis_name=self.axis_name)
    y = self.act(norm()(nn.Conv(self.filters, (3, 3), self.strides, use_bias=False)(x)))
    y = norm()(nn.Conv(self.filters, (3, 3), use_bias=False)(y))
    if x.shape != y.shape:
      x = norm()(nn.Conv(self.filters, (1, 1), self.strides, use_bias=False, name="proj")(x))
    return self.act(x + y)


class ResNet(nn.Module):
  """A small flax-examples-style ResNet, defined here, never edited to binarize it. A
  binary network takes hardtanh (`act`): sign after ReLU would see only +1s."""
  num_classes: int = 4
  act: Callable = nn.hard_tanh
  axis_name: str | None = None  # data parallelism: BatchNorm averages over it

  @nn.compact
  def __call__(self, x, train: bool = True):
    x = nn.Conv(16, (3, 3), use_bias=False, name="conv_init")(x)
    x = self.act(nn.BatchNorm(use_running_average=not train, axis_name=self.axis_name,
                              name="bn_init")(x))
    for i, (filters, strides) in enumerate([(16, 1), (32, 2)]):
      x = ResNetBlock(filters, strides, self.act, self.axis_name, name=f"block{i}")(x, train)
    return nn.Dense(self.num_classes, name="head")(x.mean((1, 2)))


def _data(n=64, shape=(8, 8, 3), classes=4, seed=0):
  rng = np.random.default_rng(seed)
  y = rng.integers(0, classes, n)
  templates = rng.normal(0, 1, (classes, *shape))
  return jnp.asarray(templates[y] + 0.3 * rng.normal(0, 1, (n, *shape)), jnp.float32), jnp.asarray(y)


def test_binarize_trains_an_unedited_flax_resnet_and_exports_it():
  x, y = _data()
  model = binarize(ResNet(), x[:1], **BIPER)
  assert model.spec.full_precision == ("conv_init", "head")  # first and last layer
  variables = model.init(jax.random.key(0), x[:1], train=False)
  original = ResNet().init(jax.random.key(0), x[:1], train=False)
  # the model's own parameter paths, plus the binary layers' learned scales
  flat = lambda t: {"/".join(k.key for k in p) for p, _ in jax.tree_util.tree_leaves_with_path(t)}  # noqa: E731
  assert flat(variables["params"]) - flat(original["params"]) == {
      f"{p}/scale" for p in trace.binary_layers(model, (8, 8, 3))}
  assert set(trace.binary_layers(model, (8, 8, 3))) == {
      "block0/Conv_0", "block0/Conv_1", "block1/Conv_0", "block1/Conv_1", "block1/proj"}
  tx = optax.adam(3e-3)
  opt = tx.init(variables["params"])

  @jax.jit
  def step(params, stats, opt, x, y):
    def loss(params):
      logits, upd = model.apply({"params": params, "batch_stats": stats}, x, train=True,
                                mutable=["batch_stats"])
      return optax.softmax_cross_entropy_with_integer_labels(logits, y).mean(), upd
    (value, upd), g = jax.value_and_grad(loss, has_aux=True)(params)
    updates, opt = tx.update(g, opt, params)
    return optax.apply_updates(params, updates), upd["batch_stats"], opt, value

  params, stats, losses = variables["params"], variables["batch_stats"], []
  for _ in range(12):
    params, stats, opt, value = step(params, stats, opt, x, y)
    losses.append(float(value))
  assert losses[-1] < 0.8 * losses[0], losses
  trained = {"params": params, "batch_stats": stats}
  packed = export.export(model, trained, (8, 8, 3))
  assert len(packed.header["layers"]) == 5 and packed.header["model"] is None
  ref = model.apply(trained, x, train=False)
  got = inference.Predictor(packed, model=model)(x)
  np.testing.assert_array_equal(np.argmax(got, -1), np.argmax(ref, -1))
  np.testing.assert_allclose(got, ref, rtol=1e-4, atol=1e-4)
  rows = {r.name: r for r in summary.summarize(model, (8, 8, 3)).rows}
  assert rows["block0/Conv_0"].kernel_bits == 1 and rows["conv_init"].kernel_bits == 32


def test_binarize_needs_examples_or_explicit_rules():
  with pytest.raises(ValueError, match="give example inputs"):
    binarize(ResNet(), kernel_quantizer="ste")
  model = binarize(ResNet(), kernel_quantizer="ste", full_precision=["conv_init", "head"],
                   include=["block1/*"])
  assert set(trace.binary_layers(model, (8, 8, 3))) == {"block1/Conv_0", "block1/Conv_1",
                                                          "block1/proj"}


# ----------------------------------------------------------------------------- factories


def make_model(num_classes, *, dtype=None, axis_name=None, quantizer="biper"):
  """A user's factory: the flax ResNet above, binarized by rule."""
  del dtype  # this model computes in float32
  return binarize(ResNet(num_classes, axis_name=axis_name), kernel_quantizer=quantizer,
                  input_quantizer="approx_sign", scaling="learned", prenorm=True,
                  full_precision=["conv_init", "head"])


def test_a_factory_model_trains_restores_and_exports_through_the_library(tmp_path):
  c = tiny.get_config()
  c.num_epochs, c.log_every_steps = 1, 4
  wd = str(tmp_path / "run")
  out = train.train_and_evaluate(c, wd, model=make_model)
  assert out["steps"] == 8
  run = runs.restore(wd)
  assert isinstance(run.model, models.FactoryModel)
  assert models.config(run.model)["name"] == f"{__name__}:make_model"
  assert set(trace.binary_layers(run.model, run.input_shape)) == {
      "block0/Conv_0", "block0/Conv_1", "block1/Conv_0", "block1/Conv_1", "block1/proj"}
  path = str(tmp_path / "model.safetensors")
  report = export_cli.export_run(wd, path)
  assert report["packed_layers"] == 5
  x = randn.normal(jax.random.key(1), (4, *run.input_shape))
  np.testing.assert_allclose(inference.Predictor(inference.load(path))(x),
                             run.model.apply(run.variables, x, train=False), rtol=1e-4, atol=1e-4)
  with pytest.raises(ValueError, match="cannot be imported by path"):
    train.train_and_evaluate(c, str(tmp_path / "lambda"), model=lambda n, **kw: make_model(n))
  with pytest.raises(ValueError, match=r"model='nowhere:make': module 'nowhere' cannot be"):
    models.create("nowhere:make", 4)


# ----------------------------------------------------------------------------- the ViT


def test_vit_counts_trains_summarises_and_exports(tmp_path):
  for quantization, count in (({}, 139_018), (BIPER, 140_810)):
    m = models.create("vit_tiny", 10, **quantization)
    shapes = jax.eval_shape(lambda m=m: m.init(jax.random.key(0), jnp.zeros((1, 28, 28, 1)),
                                               train=False))
    assert sum(a.size for a in jax.tree.leaves(shapes["params"])) == count  # the README's
  c = tiny.get_config()
  c.model, c.num_epochs, c.log_every_steps = "vit_tiny", 1, 4
  c.model_kwargs = {"depth": 1, "width": 32}  # architecture options of a zoo model
  wd = str(tmp_path / "vit")
  train.train_and_evaluate(c, wd)
  run = runs.restore(wd)
  assert (run.model.depth, run.model.width) == (1, 32)  # rebuilt with its options
  binary = trace.binary_layers(run.model, run.input_shape)
  assert len(binary) == 6 and not any(p.startswith(("stem", "head")) for p in binary)
  s = summary.summarize(run.model, run.input_shape)
  assert s.totals.macs_binary > 0.8 * s.totals.macs and s.totals.params_1bit == 4 * 32 * 32 + 2 * 32 * 64
  packed = export.export(run.model, run.variables, run.input_shape)
  x = randn.normal(jax.random.key(2), (3, *run.input_shape))
  np.testing.assert_allclose(inference.Predictor(packed)(x),
                             run.model.apply(run.variables, x, train=False), rtol=1e-4, atol=1e-4)


# ----------------------------------------------------------------------------- the wheel


_USER_SCRIPT = textwrap.dedent("""
    import importlib.util, sys
    import jax, jax.numpy as jnp, optax
    import flax.linen as nn
    import fda_biper_jax
    from fda_biper_jax import layers, training_step
    assert importlib.util.find_spec("tensorflow") is None  # the core needs no TensorFlow

    class Mine(nn.Module):
      @nn.compact
      def __call__(self, x, train):
        x = nn.Conv(8, (3, 3))(x)
        x = layers.BinaryConv(8, (3, 3), kernel_quantizer={"name": "fda", "noise": True},
                              input_quantizer="approx_sign", scaling="mean_abs")(x, train=train)
        return nn.Dense(2)(x.mean((1, 2)))

    y = jnp.arange(32) % 2
    templates = jax.random.normal(jax.random.key(3), (2, 8, 8, 3))
    x = templates[y] + 0.5 * jax.random.normal(jax.random.key(0), (32, 8, 8, 3))
    params = Mine().init(jax.random.key(1), x, train=False)["params"]
    tx = optax.adam(3e-3)
    opt = tx.init(params)

    @jax.jit
    def step(params, opt, i):
      def loss(p):
        with training_step(i, 20, 10):
          logits = Mine().apply({"params": p}, x, train=True)
        return optax.softmax_cross_entropy_with_integer_labels(logits, y).mean()
      value, g = jax.value_and_grad(loss)(params)
      updates, opt = tx.update(g, opt, params)
      return optax.apply_updates(params, updates), opt, value

    losses = []
    for i in range(20):
      params, opt, value = step(params, opt, i)
      losses.append(float(value))
    assert losses[-1] < 0.8 * losses[0], losses
    print("ok", fda_biper_jax.__version__, fda_biper_jax.__file__)
""")


@pytest.mark.install
def test_the_wheel_installs_alone_and_trains_a_users_model(tmp_path):
  """Build the wheel, install it with the core dependencies only into a fresh venv
  (versions from requirements.txt, the lock), train a user's model there."""
  src = installs.copy_sources(tmp_path / "src")
  dist = tmp_path / "dist"
  subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation",
                  "-q", "-w", str(dist), str(src)], check=True, capture_output=True, timeout=300)
  (wheel,) = dist.glob("fda_biper_jax-*.whl")
  names = subprocess.run([sys.executable, "-m", "zipfile", "-l", str(wheel)], check=True,
                         capture_output=True, text=True).stdout
  assert {line.split("/")[0].split()[0] for line in names.splitlines()[1:] if line.strip()} <= {
      "fda_biper_jax", f"{wheel.name.split('-')[0]}-{wheel.name.split('-')[1]}.dist-info"}
  python = installs.fresh_venv(tmp_path / "venv")
  installs.pip_install(python, str(wheel))
  out = subprocess.run([python, "-c", _USER_SCRIPT], cwd=tmp_path, capture_output=True,
                       text=True, timeout=600)
  assert out.returncode == 0, out.stderr[-3000:]
  venv = tmp_path / "venv"
  assert out.stdout.startswith("ok 0.2.0") and str(venv) in out.stdout
  # The console scripts: the summary runs; the analysis, without its extra, says what to install.
  summary = subprocess.run([str(venv / "bin" / "fda-biper-jax-summary"), "--model=tiny_cnn",
                            "--input_shape=8,8,3"], cwd=tmp_path, capture_output=True,
                           text=True, timeout=300)
  assert summary.returncode == 0 and summary.stdout.startswith("tiny_cnn stats"), summary.stderr
  analysis = subprocess.run([str(venv / "bin" / "fda-biper-jax-analysis"), "qe", "--out=figs"],
                            cwd=tmp_path, capture_output=True, text=True, timeout=300)
  assert (analysis.returncode, analysis.stderr.strip()) == (
      1, 'fda-biper-jax-analysis: error: the analysis needs matplotlib: '
         'pip install "fda_biper_jax[analysis]"')
  for script in ("fda-biper-jax-train", "fda-biper-jax-export"):
    assert os.access(venv / "bin" / script, os.X_OK), script
