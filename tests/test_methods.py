"""Method definitions: schedules in the quantizer's config, the new estimators (IR-Net,
ReSTE, ReActNet), and a user's own method registered from outside the package and taken
through training, checkpoints, summary and export."""

import io
import json
import math
import os
import re
import tokenize

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import linen as nn
from jax.sharding import PartitionSpec as P

from experiments.configs import quick, recipes, tiny
import randn  # tests/randn.py
from fda_biper_jax import layers, methods, models, quantizers, summary, train, trace
from fda_biper_jax.cli import export as export_cli
from fda_biper_jax.deploy import inference
from fda_biper_jax.train import runs
from fda_biper_jax.methods import schedule
from fda_biper_jax.methods import ir_net as ir_net_lib
from fda_biper_jax.methods import reactnet

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def at(q, step, total=100, per_epoch=10, **kw):
  """q's value and gradient at x, with the training step bound."""
  x = kw.pop("x")
  with schedule.training_step(step, total, per_epoch):
    return q(x), jax.grad(lambda x: jnp.sum(q(x)))(x)


# ----------------------------------------------------------------------------- schedules


@pytest.mark.parametrize("per", ["step", "epoch"])
def test_schedule_shapes_equal_their_formulas(per):
  total, spe = 50, 10
  for step in (0, 7, 23, 41, 49):
    p = step / (total - 1) if per == "step" else (step // spe) / (total // spe)
    expected = {
        "linear": 2 + (8 - 2) * p,
        "cosine": 8 + (2 - 8) * (1 + math.cos(math.pi * p)) / 2,
        "quarter_cosine": 2 + (8 - 2) * (1 - math.cos(math.pi * p / 2)),
        "geometric": 2 * (8 / 2) ** p,
        "stepwise": min(2 + math.floor(p * 7 + 1e-12), 8),
    }
    for shape, want in expected.items():
      got = schedule.at({"schedule": shape, "start": 2, "end": 8, "per": per}, step, total, spe)
      assert got == pytest.approx(want, rel=1e-6), (shape, step)


def test_step_schedules_end_exactly_at_the_end_value():
  for shape in ("linear", "cosine", "geometric", "quarter_cosine"):
    assert schedule.at({"schedule": shape, "start": 0.5, "end": 3.0}, 99, 100) == \
        pytest.approx(3.0, rel=1e-6)
  assert schedule.at({"schedule": "cosine", "start": 0.1, "end": 0.0}, 99, 100) == 0.0


def test_stepwise_is_integer_arithmetic_at_every_boundary():
  """FDA's n(e) = n_s + floor(e (n_e - n_s + 1) / E), exactly, for every epoch of many Es."""
  for epochs in (1, 3, 7, 10, 30, 400):
    for e in range(epochs):
      got = schedule.at({"schedule": "stepwise", "start": 9, "end": 18}, e * 5, epochs * 5, 5)
      assert got == min(9 + (e * 10) // epochs, 18), (epochs, e)


@pytest.mark.parametrize("spec, match", [
    ({"schedule": "exp", "start": 1, "end": 2}, r"schedule='exp' is not allowed; allowed:"),
    ({"schedule": "linear", "start": 1}, r"a linear schedule needs \['end'\]"),
    ({"schedule": "geometric", "start": 0, "end": 2}, "start > 0 and end > 0"),
    ({"schedule": "stepwise", "start": 9.5, "end": 18}, "integers start <= end"),
    ({"schedule": "linear", "start": 1, "end": 2, "every": 3}, r"\['every'\] are not allowed"),
    ({"schedule": "linear", "start": 1, "end": 2, "per": "batch"}, "per='batch' is not allowed"),
    ({"schedule": "linear", "start": "a", "end": 2}, "start='a' is not allowed"),
])
def test_bad_schedules_get_one_line(spec, match):
  with pytest.raises(ValueError, match=match):
    quantizers.get("bnn_pp", beta=spec)


def test_only_schedulable_parameters_follow_schedules_and_their_ends_are_validated():
  with pytest.raises(ValueError, match="biper: omega0 cannot follow a schedule"):
    quantizers.get("biper", omega0={"schedule": "linear", "start": 1, "end": 2})
  with pytest.raises(ValueError, match=r"bnn_pp: beta=-1\.0 is not allowed"):
    quantizers.get("bnn_pp", beta={"schedule": "linear", "start": -1, "end": 2})
  with pytest.raises(ValueError, match=r"fda: n_terms=-2 is not allowed"):
    quantizers.get("fda", n_terms={"schedule": "stepwise", "start": -2, "end": 3})
  with pytest.raises(ValueError, match="total_steps=0 is not allowed"):
    schedule.Progress(0, 0, 1)


def test_one_compilation_for_every_step():
  q = quantizers.get("ir_net")
  x = jnp.linspace(-2, 2, 41)

  @jax.jit
  @chex.assert_max_traces(n=1)
  def grad(step):
    with schedule.training_step(step, 100, 10):
      return jax.grad(lambda x: jnp.sum(q(x)))(x)

  chex.clear_trace_counter()
  g = [grad(jnp.int32(s)) for s in (0, 35, 99)]
  assert not np.allclose(g[0], g[1]) and not np.allclose(g[1], g[2])


# ----------------------------------------------------------------------------- IR-Net


def test_ir_net_t_follows_the_public_code_per_epoch():
  """t = T_min 10^(e/E log10(T_max/T_min)), k = max(1/t, 1): the gradient at 0 is k t."""
  q = quantizers.get("ir_net")
  x = jnp.zeros((1,))
  epochs = 10
  for e in range(epochs):
    t = 0.1 * 10 ** (e / epochs * math.log10(10 / 0.1))
    _, g = at(q, e * 7 + 3, total=70, per_epoch=7, x=x)
    np.testing.assert_allclose(g, [max(1 / t, 1.0) * t], rtol=1e-5)
  assert quantizers.get("ir_net").scheduled == ("t",)


def _balanced_ref(w):
  c = w - w.reshape(-1, w.shape[-1]).mean(0)
  return c / c.reshape(-1, w.shape[-1]).std(0, ddof=1)


def test_ir_net_balance_standardises_each_output_channel_with_a_gradient_through_it():
  w = randn.normal(jax.random.key(0), (3, 3, 4, 6)) * 0.2 + 0.05
  q = quantizers.get("ir_net", t=2.0, balance=True)
  np.testing.assert_allclose(ir_net_lib.balance(w), _balanced_ref(w), rtol=1e-5, atol=1e-6)
  np.testing.assert_array_equal(q.binarize(w, role="kernel"),
                                np.where(_balanced_ref(np.asarray(w)) >= 0, 1.0, -1.0))
  cot = randn.normal(jax.random.key(1), w.shape)
  got = jax.grad(lambda w: jnp.sum(q.quantize(w, role="kernel") * cot))(w)
  ref = jax.grad(lambda w: jnp.sum(quantizers.ir_net(_balanced_ref(w), 2.0) * cot))(w)
  np.testing.assert_allclose(got, ref, rtol=1e-4, atol=1e-5 * float(jnp.abs(ref).max()))
  with pytest.raises(ValueError, match="balance=True .* applies to weights"):
    q.quantize(w, role="input")


# ----------------------------------------------------------------------------- ReSTE


def test_reste_o_follows_a_quarter_cosine_per_epoch_and_is_an_ste_at_one():
  q = quantizers.get("reste")
  x = jnp.array([0.5, 1.2])  # inside (0.1, t]: the gradient is (1/o) |x|^(1/o - 1)
  epochs = 8
  for e in range(epochs):
    o = 1 + (3 - 1) * (1 - math.cos(math.pi / 2 * e / epochs))
    _, g = at(q, e * 4, total=32, per_epoch=4, x=x)
    np.testing.assert_allclose(g, (1 / o) * np.abs(np.asarray(x)) ** (1 / o - 1), rtol=1e-5)
  g = jax.grad(lambda x: jnp.sum(quantizers.reste(x, 1.5, 1.0)))(jnp.array([-2., -1., 0.05, 1.4]))
  np.testing.assert_allclose(g, [0.0, 1.0, 1.0, 1.0], rtol=1e-6)  # o = 1: STE clipped at t


# ----------------------------------------------------------------------------- ReActNet


def test_rsign_per_channel_thresholds_forward_and_gradients():
  x = randn.normal(jax.random.key(0), (2, 3, 3, 4))
  a = jnp.array([0.3, -0.2, 0.0, 0.7])
  cot = randn.normal(jax.random.key(1), x.shape)
  for dtype in (jnp.float32, jnp.bfloat16):
    y = quantizers.rsign(x.astype(dtype), a)
    assert y.dtype == dtype
    np.testing.assert_array_equal(np.asarray(y, np.float32),
                                  np.where(np.asarray(x.astype(dtype), np.float32)
                                           - np.asarray(a) >= 0, 1.0, -1.0))
  gx, ga = jax.grad(lambda x, a: jnp.sum(quantizers.rsign(x, a) * cot), argnums=(0, 1))(x, a)
  d = np.asarray(x) - np.asarray(a)
  slope = np.where(np.abs(d) <= 1, 2 - 2 * np.abs(d), 0.0)
  np.testing.assert_allclose(gx, np.asarray(cot) * slope, rtol=1e-5, atol=1e-6)
  np.testing.assert_allclose(ga, -(np.asarray(cot) * slope).sum(axis=(0, 1, 2)), rtol=1e-5,
                             atol=1e-5)


def test_rsign_thresholds_are_learned_parameters_of_the_layer():
  layer = layers.BinaryConv(6, kernel_quantizer={"name": "ste", "clip": 1.0},
                            input_quantizer="rsign", scaling="mean_abs")
  x = randn.normal(jax.random.key(0), (2, 5, 5, 4))
  v = layer.init(jax.random.key(1), x, train=False)
  assert v["params"]["input_threshold"]["alpha"].shape == (4,)
  np.testing.assert_array_equal(v["params"]["input_threshold"]["alpha"], 0.0)
  p = jax.tree.map(lambda a: a, v["params"])
  p["input_threshold"] = {"alpha": jnp.array([0.5, -0.5, 0.1, 0.0])}
  _, st = layer.apply({"params": p}, x, train=False, mutable=["intermediates"])
  np.testing.assert_array_equal(st["intermediates"]["input"][0],
                                np.where(np.asarray(x) - np.asarray(p["input_threshold"]["alpha"])
                                         >= 0, 1.0, -1.0))
  g = jax.grad(lambda p: jnp.sum(layer.apply({"params": p}, x, train=True) ** 2))(p)
  assert float(jnp.abs(g["input_threshold"]["alpha"]).max()) > 0


def test_rsign_thresholds_under_shard_map_equal_one_device():
  """The threshold is a replicated parameter: its gradient is the mean over 8 devices."""
  mesh = jax.make_mesh((8,), ("batch",), axis_types=(jax.sharding.AxisType.Auto,))
  layer = layers.BinaryDense(3, input_quantizer="rsign", kernel_quantizer="ste")
  x = randn.normal(jax.random.key(0), (16, 5))
  v = layer.init(jax.random.key(1), x, train=False)
  v["params"]["input_threshold"] = {"alpha": jnp.linspace(-0.4, 0.4, 5)}

  def loss(p, x):
    return jnp.mean(layer.apply({"params": p}, x, train=True) ** 2)

  def per_device(p, x):
    return jax.grad(lambda p: jax.lax.pmean(loss(p, x), "batch"))(p)

  sharded = jax.jit(jax.shard_map(per_device, mesh=mesh, in_specs=(P(), P("batch")),
                                  out_specs=P()))(v["params"], x)
  single = jax.grad(loss)(v["params"], x)
  chex.assert_trees_all_close(sharded, single, rtol=1e-5, atol=1e-6)


def test_rprelu_formula_and_resnet20_uses_it_after_every_binary_unit():
  m = reactnet.RPReLU()
  x = randn.normal(jax.random.key(0), (2, 3, 4))
  v = {"params": {"gamma": jnp.array([0.1, -0.2, 0.3, 0.0]),
                  "beta": jnp.array([0.25, 0.5, 0.1, 1.0]),
                  "zeta": jnp.array([0.0, 0.1, -0.1, 0.2])}}
  y = x - v["params"]["gamma"]
  ref = jnp.where(y >= 0, y, v["params"]["beta"] * y) + v["params"]["zeta"]
  np.testing.assert_allclose(m.apply(v, x), ref, rtol=1e-6)
  model = models.create("resnet20", 10, **recipes.usage("rsign"))
  shapes = jax.eval_shape(lambda: model.init(jax.random.key(0), jnp.zeros((1, 32, 32, 3))))
  acts = [p for p, _ in jax.tree_util.tree_leaves_with_path(shapes["params"])
          if p[-2].key == "act" and p[-1].key == "gamma"]
  assert len(acts) == 18  # one RPReLU per Bi-Real unit (each binary conv)


# ----------------------------------------------------------------------------- register


class TanhSTE(methods.Method):
  """A user's estimator: sign, backward s (1 - tanh^2(s x)) with s growing linearly."""
  name = "tanh_ste_test"
  summary = "sign, tanh backward (a test's own method)"
  params = {"s": methods.Param({"schedule": "linear", "start": 1.0, "end": 3.0},
                               methods.base.positive, schedulable=True)}
  usage = {"kernel_quantizer": {"name": "tanh_ste_test"},
           "input_quantizer": {"name": "tanh_ste_test"}, "scaling": "mean_abs",
           "prenorm": False}

  def forward(self, x, p):
    return _tanh_ste(x, p["s"])


_tanh_ste = methods.base.surrogate(lambda x, s: methods.sign(x),
                                   lambda x, s: s * (1 - jnp.tanh(s * x) ** 2))


@pytest.fixture
def registered():
  methods.register(TanhSTE)
  try:
    yield TanhSTE.name
  finally:
    del methods.base.REGISTRY[TanhSTE.name]


def test_register_rejects_duplicates_and_bad_definitions(registered):
  with pytest.raises(ValueError, match="already registered"):
    methods.register(TanhSTE)

  class Nameless(methods.Method):
    pass

  with pytest.raises(ValueError, match="name='' is not allowed"):
    methods.register(Nameless)

  class BadRoles(TanhSTE):
    name = "bad_roles_test"
    roles = ("weights",)

  with pytest.raises(ValueError, match="roles=.*is not allowed"):
    methods.register(BadRoles)


def test_a_registered_method_trains_checkpoints_restores_summarises_and_exports(
    registered, tmp_path):
  name = registered
  assert name in quantizers.NAMES and name in recipes.quick_methods()
  assert quick.get_config(name).quantization.kernel_quantizer.name == name
  c = tiny.get_config()
  c.quantization = recipes.usage(name)
  c.num_epochs, c.log_every_steps = 1, 4
  wd = str(tmp_path / "run")
  out = train.train_and_evaluate(c, wd)
  with open(os.path.join(wd, "metrics.jsonl")) as f:
    first = json.loads(f.readline())
  assert first[f"kernel/{name}/s"] == pytest.approx(1.0 + 2.0 * 3 / 7, rel=1e-5)
  # restore without the trainer's optimizer state, rebuild the model from the checkpoint
  run = runs.restore(wd)
  model, variables, shape = run.model, run.variables, run.input_shape
  assert run.step == out["steps"] == 8
  assert models.config(model)["kernel_quantizer"] == {
      "name": name, "s": {"schedule": "linear", "start": 1.0, "end": 3.0, "per": "step"}}
  rows = {r.name: r for r in summary.summarize(model, shape).rows}
  assert rows["unit1/conv"].kernel_bits == rows["unit1/conv"].input_bits == 1
  assert set(trace.binary_layers(model, shape)) == {"unit1/conv", "unit2/conv"}
  packed = inference.load(_export(wd, tmp_path))
  x = randn.normal(jax.random.key(3), (4, *shape))
  ref = model.apply(variables, x, train=False)
  np.testing.assert_allclose(inference.Predictor(packed)(x), ref, rtol=1e-4, atol=1e-4)


def _export(wd, tmp_path):
  out = str(tmp_path / "model.safetensors")
  export_cli.export_run(wd, out)
  return out


# ----------------------------------------------------------------------------- one place


METHOD_WORDS = {"n_terms", "beta", "alpha", "omega", "omega0", "tau", "noise", "fda", "biper",
                "biper_sine", "bnn_pp", "sign_swish", "approx_sign", "ir_net", "reste", "rsign",
                "ste"}
# (the summary command, cli/summary.py, defaults to BiPer's setting, by name, as an example;
# analysis.py and plots.py reproduce the BiPer and FDA papers' figures.)
GENERIC_FILES = ["fda_biper_jax/train/trainer.py", "fda_biper_jax/train/runs.py",
                 "fda_biper_jax/nn/linen.py", "fda_biper_jax/trace.py",
                 "fda_biper_jax/deploy/inference.py", "fda_biper_jax/deploy/export.py",
                 "fda_biper_jax/deploy/packed.py"] + [
    f"fda_biper_jax/models/{f}" for f in sorted(os.listdir(os.path.join(ROOT, "fda_biper_jax",
                                                                         "models")))
    if f.endswith(".py")]


def _code_words(path: str) -> set[str]:
  """Identifiers and the words of string literals in code: docstrings and comments
  (which cite the papers) are left out."""
  with open(os.path.join(ROOT, path)) as f:
    tokens = list(tokenize.generate_tokens(io.StringIO(f.read()).readline))
  words, previous = set(), tokenize.NEWLINE
  for tok in tokens:
    if tok.type == tokenize.NAME:
      words.add(tok.string)
    elif tok.type == tokenize.STRING and previous not in (tokenize.NEWLINE, tokenize.INDENT,
                                                          tokenize.DEDENT, tokenize.NL):
      words |= set(re.findall(r"[A-Za-z_][A-Za-z_0-9]*", tok.string))
    if tok.type not in (tokenize.COMMENT, tokenize.NL):
      previous = tok.type
  return words


@pytest.mark.parametrize("path", GENERIC_FILES)
def test_the_trainer_layers_models_and_deployment_name_no_method(path):
  assert not _code_words(path) & METHOD_WORDS, sorted(_code_words(path) & METHOD_WORDS)


@pytest.mark.parametrize("name", [n for n in methods.names()])
def test_every_method_trains_by_name_through_the_configs(name):
  """Its own usage in `baselines.py:NAME,MODEL` and `quick.py:NAME`, and every variant."""
  from experiments.configs import baselines  # noqa: PLC0415
  for c in (baselines.get_config(f"{name},resnet20"), quick.get_config(name),
            *(quick.get_config(f"{name}/{v}") for v in methods.lookup(name).variants)):
    train.validate(c, data=False)
    assert c.quantization.to_dict() in [recipes.usage(name),
                                        *map(lambda v: recipes.usage(name, v),
                                             methods.lookup(name).variants)]
  with pytest.raises(ValueError, match="variant='nope'"):
    quick.get_config(f"{name}/nope")


# ----------------------------------------------------------------------------- compiled binarize


class _ScaledSign(methods.Method):
  """a sign(x) deployed, a schedulable: a deployed form that reads a schedule."""
  name = "scaled_sign_test"
  summary = "a sign(x) (a test's own method)"
  binary = False
  params = {"a": methods.Param(1.0, methods.base.positive, schedulable=True)}
  usage = {"kernel_quantizer": {"name": "scaled_sign_test"}, "scaling": "none", "prenorm": False}

  def forward(self, x, p):
    return p["a"] * methods.sign(x)

  def deploy(self, x, p, aux=None, role="input"):
    return p["a"] * methods.sign(x)


class _NegatedSign(_ScaledSign):
  def deploy(self, x, p, aux=None, role="input"):
    return -p["a"] * methods.sign(x)


def test_binarize_compiled_equals_binarize_and_reads_schedules_and_registrations():
  x = randn.normal(jax.random.key(4), (3, 3, 4, 6))
  shift = {"alpha": jnp.linspace(-0.5, 0.5, 6)}
  for q, aux in [(methods.get("biper"), None), (methods.get("ste"), None),
                 (methods.get("fda"), None), (methods.get("rsign"), shift),
                 (methods.CallableQuantizer(jnp.tanh, False), None)]:
    np.testing.assert_array_equal(np.asarray(methods.binarize_compiled(q, x, aux)),
                                  np.asarray(q.binarize(x, aux)), err_msg=q.name)
  methods.register(_ScaledSign)
  try:
    scheduled = methods.get("scaled_sign_test", a={"schedule": "linear", "start": 1.0, "end": 3.0})
    got = {}
    for step in (0, 50):
      with schedule.training_step(step, 100, 10):
        got[step] = np.asarray(methods.binarize_compiled(scheduled, x))
        np.testing.assert_array_equal(got[step], np.asarray(scheduled.binarize(x)))
    np.testing.assert_array_equal(np.abs(got[0]), 1.0)
    assert np.all(np.abs(got[50]) > 1.5)  # the step's value, not the first call's
    constant = methods.get("scaled_sign_test", a=2.0)
    first = np.asarray(methods.binarize_compiled(constant, x))
    del methods.base.REGISTRY[_ScaledSign.name]
    methods.register(_NegatedSign)  # same name: an equal Quantizer, another method
    np.testing.assert_array_equal(np.asarray(methods.binarize_compiled(constant, x)), -first)
  finally:
    methods.base.REGISTRY.pop(_ScaledSign.name, None)
