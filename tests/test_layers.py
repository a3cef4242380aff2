"""BinaryConv / BinaryDense / BinarySpec, and the methods' learned parts inside a layer."""

import json
import re

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest

import randn  # tests/randn.py
from fda_biper_jax import layers, quantizers, xla_cpu
from fda_biper_jax.methods import schedule
from fda_biper_jax.methods import fda as fda_method

X = randn.normal(jax.random.key(1), (2, 6, 6, 5))
FDA = {"name": "fda", "n_terms": 12}  # constants: no training step needed
FDA_NOISE = {**FDA, "noise": True, "alpha": 0.05}
NOISE_CFG = fda_method.noise_config("test", "noise", True)


def run(layer, x, train, key=0):
  v = layer.init(jax.random.key(key), x, train=False)
  y, st = layer.apply(v, x, train=train, mutable=["intermediates", "losses"])
  return v, y, st


def sown(st, name):
  return np.asarray(st["intermediates"][name][0])


@pytest.mark.parametrize("kq", ["ste", "approx_sign", "biper", {"name": "bnn_pp", "beta": 5.0},
                                FDA, {"name": "ir_net", "t": 1.0},
                                {"name": "reste", "o": 2.0}])
@pytest.mark.parametrize("scaling", ["none", "mean_abs", "mean_abs_tensor", "learned"])
def test_eval_kernel_is_exactly_plus_minus_scale_and_inputs_plus_minus_one(kq, scaling):
  layer = layers.BinaryConv(4, kernel_quantizer=kq, input_quantizer="approx_sign",
                            scaling=scaling, prenorm=True)
  v, y, st = run(layer, X, train=False)
  w = np.asarray(v["params"]["kernel"])
  k, xq = sown(st, "kernel"), sown(st, "input")
  assert set(np.unique(xq)) == {-1.0, 1.0}
  # exactly one magnitude per output channel: the scale
  per_channel = np.abs(k).reshape(-1, 4)
  np.testing.assert_array_equal(per_channel, np.broadcast_to(per_channel[0], per_channel.shape))
  scale = {"mean_abs": np.abs(w).mean(axis=(0, 1, 2)),
           "mean_abs_tensor": np.full(4, np.abs(w).mean())}.get(scaling, np.ones(4))
  np.testing.assert_allclose(per_channel[0], scale, rtol=1e-6)
  # the layer computes with exactly these operands (and the learned scale on the output)
  ref = jax.lax.conv_general_dilated(jnp.asarray(xq), jnp.asarray(k), (1, 1), "SAME",
                                     dimension_numbers=("NHWC", "HWIO", "NHWC"))
  if scaling == "learned":
    ref = ref * v["params"]["scale"]
  np.testing.assert_allclose(y, ref, rtol=1e-6, atol=1e-6)


def test_biper_eval_kernel_is_the_square_wave():
  layer = layers.BinaryDense(3, kernel_quantizer={"name": "biper", "omega0": 20.0})
  v, _, st = run(layer, jnp.ones((2, 7)), train=False)
  w = np.asarray(v["params"]["kernel"], np.float64)
  np.testing.assert_array_equal(sown(st, "kernel"), np.where(np.sin(20 * w) >= 0, 1.0, -1.0))


def _normalised(x):
  return np.asarray(x) / np.sqrt(np.asarray(x).var(axis=(1, 2, 3), keepdims=True) + 1e-5)


def test_prenorm_divides_each_sample_by_its_std_where_the_deployed_form_needs_it():
  """Training always normalises; evaluation only when the deployed form depends on a
  positive scale (identity, BiPer's square wave, ReActNet's thresholds), never for sign."""
  x = X * jnp.array([1.0, 7.0])[:, None, None, None]
  layer = layers.BinaryConv(4, input_quantizer="identity", prenorm=True)
  _, _, st = run(layer, x, train=True)
  np.testing.assert_allclose(sown(st, "input"), _normalised(x), rtol=1e-5)
  _, _, st = run(layer, x, train=False)
  np.testing.assert_allclose(sown(st, "input"), _normalised(x), rtol=1e-5)
  layer = layers.BinaryConv(4, input_quantizer="approx_sign", prenorm=True)
  # the eval program holds no reduction: nothing is normalised
  v = layer.init(jax.random.key(0), x, train=False)
  text = jax.jit(lambda v, x: layer.apply(v, x, train=False)).lower(v, x).as_text()
  assert "reduce" not in text
  _, _, st = run(layer, x, train=False)
  np.testing.assert_array_equal(sown(st, "input"), np.where(np.asarray(x) >= 0, 1.0, -1.0))


def test_mean_abs_scale_is_not_differentiated():
  layer = layers.BinaryDense(3, kernel_quantizer="ste", scaling="mean_abs")
  x = randn.normal(jax.random.key(2), (4, 5))
  v = layer.init(jax.random.key(0), x, train=False)
  g = randn.normal(jax.random.key(3), (4, 3))
  grad = jax.grad(lambda p: jnp.sum(layer.apply({"params": p}, x, train=True) * g))(v["params"])
  w = v["params"]["kernel"]
  # y = x @ (s * sign(w)), STE: dL/dw = s * x^T g, s held constant
  expected = jnp.abs(w).mean(axis=0) * (x.T @ g)
  np.testing.assert_allclose(grad["kernel"], expected, rtol=1e-5)


def test_learned_scale_initialised_uniform_in_unit_interval():
  layer = layers.BinaryConv(64, kernel_quantizer="biper", scaling="learned")
  s = np.asarray(layer.init(jax.random.key(0), X, train=False)["params"]["scale"])
  assert s.shape == (64,) and s.min() >= 0 and s.max() < 1 and s.std() > 0.1


def test_latent_weights_stay_float32_and_bf16_compute_is_exact():
  layer = layers.BinaryConv(4, kernel_quantizer="biper", input_quantizer="ste",
                            scaling="learned", dtype=jnp.bfloat16)
  v, y, st = run(layer, X, train=False)
  assert v["params"]["kernel"].dtype == jnp.float32
  assert y.dtype == jnp.bfloat16
  assert set(np.unique(sown(st, "kernel").astype(np.float32))) == {-1.0, 1.0}
  _, y, _ = run(layer, X, train=True)
  assert y.dtype == jnp.bfloat16


@pytest.mark.parametrize("options", [
    dict(kernel_quantizer="biper", input_quantizer="approx_sign", scaling="learned",
         prenorm=True),
    dict(kernel_quantizer={"name": "fda", "noise": True},
         input_quantizer={"name": "fda", "noise": True}, scaling="mean_abs"),
    dict(kernel_quantizer="bnn_pp", input_quantizer="bnn_pp"),
    dict(kernel_quantizer="ste", input_quantizer="rsign")])
def test_bf16_compute_keeps_operands_and_output_bf16_in_training(options):
  """A float32 scheduled value (alpha, beta at a traced step) or a float32 learned part
  (noise modules, thresholds) must not promote the bf16 operands."""
  layer = layers.BinaryConv(4, dtype=jnp.bfloat16, **options)
  v = layer.init(jax.random.key(0), X, train=False)

  def apply(v, step):
    with schedule.training_step(step, 100, 10):
      return layer.apply(v, X, train=True, mutable=["intermediates", "losses"])

  y, st = jax.jit(apply)(v, jnp.int32(30))
  assert y.dtype == jnp.bfloat16
  assert st["intermediates"]["input"][0].dtype == jnp.bfloat16
  assert st["intermediates"]["kernel"][0].dtype == jnp.bfloat16


def test_regularizer_is_sown_weighted_for_biper_kernels_only():
  for kq, tau in [({"name": "biper", "omega0": 20.0, "tau": 0.5}, 0.5),
                  ({"name": "biper", "omega0": 20.0}, None), ("ste", None)]:
    layer = layers.BinaryConv(4, kernel_quantizer=kq)
    v, _, st = run(layer, X, train=True)
    if tau is not None:
      w = np.asarray(v["params"]["kernel"], np.float64)
      np.testing.assert_allclose(st["losses"]["kernel_regularizer"][0],
                                 tau * np.mean(np.sin(20 * w) ** 2), rtol=1e-5)
    else:  # tau = 0 (the default) or no regulariser: nothing computed
      assert "losses" not in st or not st["losses"]


def test_noise_adaptation_in_training_and_pure_sign_in_eval():
  layer = layers.BinaryConv(4, kernel_quantizer=FDA_NOISE,
                            input_quantizer={**FDA_NOISE, "noise": {"min_width": 2}})
  v = layer.init(jax.random.key(0), X, train=False)  # created in eval mode: the modules exist
  p = v["params"]
  assert p["kernel_noise"]["w1"].shape == (3 * 3 * 5, 4)  # d = 45 < 64: min_width, not 0
  assert p["input_noise"]["w1"].shape == (5, 2)
  _, st = layer.apply(v, X, train=True, mutable=["intermediates"])
  w = p["kernel"]
  rows = w.reshape(-1, 4).T
  e = fda_method.noise(p["kernel_noise"], rows, NOISE_CFG).T.reshape(w.shape)
  np.testing.assert_allclose(sown(st, "kernel"),
                             np.where(w >= 0, 1.0, -1.0) + 0.05 * np.asarray(e), rtol=1e-5,
                             atol=1e-6)
  _, st = layer.apply(v, X, train=False, mutable=["intermediates"])
  assert set(np.unique(sown(st, "kernel"))) == {-1.0, 1.0}


def test_input_noise_in_bf16_compute_runs_in_float32_and_returns_bf16():
  """sign(x) + alpha e(x) from the float32 value of the bf16 input, cast once to bf16."""
  layer = layers.BinaryDense(4, input_quantizer=FDA_NOISE, dtype=jnp.bfloat16)
  x = X.reshape(-1, 5) * 3.0
  v = layer.init(jax.random.key(0), x, train=False)
  _, st = layer.apply(v, x, train=True, mutable=["intermediates"])
  xb = x.astype(jnp.bfloat16).astype(jnp.float32)
  e = fda_method.noise(v["params"]["input_noise"], xb, NOISE_CFG)
  expected = (jnp.where(xb >= 0, 1.0, -1.0) + 0.05 * e).astype(jnp.bfloat16)
  xq = st["intermediates"]["input"][0]
  assert xq.dtype == jnp.bfloat16
  np.testing.assert_array_equal(np.asarray(xq, np.float32), np.asarray(expected, np.float32))
  gx = jax.grad(lambda x: jnp.sum(layer.apply(v, x, train=True)
                                  .astype(jnp.float32)))(x.astype(jnp.bfloat16))
  assert gx.dtype == jnp.bfloat16 and bool(jnp.all(jnp.isfinite(gx)))


def test_noise_modules_receive_gradients():
  layer = layers.BinaryConv(4, kernel_quantizer=FDA_NOISE, input_quantizer=FDA_NOISE)
  v = layer.init(jax.random.key(0), X, train=False)
  grads = jax.grad(lambda p: jnp.sum(layer.apply({"params": p}, X, train=True) ** 2))(
      v["params"])
  for mod in ("kernel_noise", "input_noise"):
    for leaf in jax.tree.leaves(grads[mod]):
      assert float(jnp.abs(leaf).max()) > 0


def test_a_schedule_needs_the_training_step():
  """No silent default: a scheduled parameter read in training without a bound step
  raises, naming the parameter and how to bind the step."""
  layer = layers.BinaryDense(3, kernel_quantizer={"name": "fda", "noise": True})
  v = layer.init(jax.random.key(0), jnp.ones((2, 4)), train=False)  # evaluation needs no step
  with pytest.raises(ValueError, match=r"'fda': \w+ follows a \w+ schedule, so training "
                                       r"needs the step: .*training_step"):
    layer.apply(v, jnp.ones((2, 4)), train=True)


def test_scheduled_values_follow_the_traced_step_without_recompiling():
  layer = layers.BinaryDense(3, kernel_quantizer={"name": "fda"},
                             input_quantizer={"name": "bnn_pp"})
  x = randn.normal(jax.random.key(0), (2, 4))
  v = layer.init(jax.random.key(0), x, train=False)

  @jax.jit
  @chex.assert_max_traces(n=1)
  def grad(v, step):
    with schedule.training_step(step, 100, 10):
      return jax.grad(lambda p: jnp.sum(layer.apply({"params": p}, x, train=True)))(v["params"])

  def fixed(n, beta):  # the same layer with the values the schedules give at that step
    layer_c = layers.BinaryDense(3, kernel_quantizer={"name": "fda", "n_terms": n},
                                 input_quantizer={"name": "bnn_pp", "beta": beta})
    return jax.grad(lambda p: jnp.sum(layer_c.apply({"params": p}, x, train=True)))(v["params"])

  chex.clear_trace_counter()
  g1, g2 = grad(v, jnp.int32(0)), grad(v, jnp.int32(99))
  assert not np.allclose(g1["kernel"], g2["kernel"])
  # step 0: n = 9, beta = 2; step 99 (the last): n = 9 + floor(9 * 10 / 10) = 18, beta = 200
  chex.assert_trees_all_close(g1, fixed(9, 2.0), rtol=1e-5, atol=1e-6)
  chex.assert_trees_all_close(g2, fixed(18, 200.0), rtol=1e-5, atol=1e-6)


def test_callable_quantizer():
  layer = layers.BinaryDense(3, kernel_quantizer=lambda w: jnp.round(w * 4) / 4)
  _, y, st = run(layer, jnp.ones((2, 4)), train=False)
  k = sown(st, "kernel")
  np.testing.assert_array_equal(k * 4, np.round(k * 4))
  with pytest.raises(ValueError, match="cannot be saved"):
    quantizers.get(layer.kernel_quantizer).config()


def test_binary_spec_config_round_trip():
  spec = layers.BinarySpec.create(kernel_quantizer={"name": "biper", "omega0": 7.0},
                                  input_quantizer={"name": "fda", "n_terms": 3,
                                                   "noise": {"a": 0.2}},
                                  scaling="learned", prenorm=True)
  cfg = json.loads(json.dumps(spec.config()))
  assert layers.BinarySpec.create(**cfg) == spec
  assert cfg["kernel_quantizer"] == {"name": "biper", "omega0": 7.0, "tau": 0.0}
  assert cfg["input_quantizer"]["noise"] == {"reduction": 64, "min_width": 4, "shortcut": "sin",
                                             "a": 0.2}
  assert cfg["input_quantizer"]["alpha"] == {"schedule": "cosine", "start": 0.1, "end": 0.0,
                                             "per": "step"}


@pytest.mark.parametrize("kwargs, match", [
    (dict(scaling="max"), "scaling='max' is not allowed"),
    (dict(kernel_quantizer="sgn"), "unknown quantizer 'sgn'"),
    (dict(prenorm="yes"), "prenorm='yes' is not allowed"),
    (dict(kernel_quantizer={"name": "fda", "noise": {"k": 64}}),
     r"^fda: noise takes no option \['k'\]"),
    (dict(input_quantizer={"name": "fda", "noise": {"shortcut": "cos"}}),
     "noise.shortcut='cos' is not allowed"),
    (dict(input_quantizer={"name": "fda", "noise": {"reduction": 0}}),
     "noise.reduction=0 is not allowed"),
    (dict(input_quantizer={"name": "fda", "alpha": 0.1}),
     "alpha weights the noise adapter's term, which is off"),
    (dict(kernel_quantizer="rsign"), r"'rsign' binarizes \['input'\] only, not the kernel"),
    (dict(kernel_noise={}), "kernel_noise was removed: FDA.s noise module"),
])
def test_bad_spec_values(kwargs, match):
  with pytest.raises(ValueError, match=match):
    layers.BinarySpec.create(**kwargs)


def test_bad_scaling_on_a_layer():
  with pytest.raises(ValueError, match="scaling='x' is not allowed"):
    layers.BinaryDense(3, scaling="x").init(jax.random.key(0), jnp.ones((1, 2)), train=False)


# ----------------------------------------------------------------------------- noise adapter

@pytest.mark.parametrize("d, k, m, expected", [(640, 64, 4, 10), (45, 64, 4, 4),
                                               (16, 64, 1, 1), (128, 16, 4, 8)])
def test_hidden_width(d, k, m, expected):
  assert fda_method.hidden_width(d, k, m) == expected


@pytest.mark.parametrize("shape", [(3, 128), (2, 3, 4, 64)])  # kernel rows; activations, per pixel
@pytest.mark.parametrize("shortcut", ["sin", "linear", "none"])
def test_noise_adapter_formula(shortcut, shape):
  cfg = fda_method.noise_config("test", "noise", {"shortcut": shortcut, "a": 0.1})
  t = randn.normal(jax.random.key(0), shape)
  p = fda_method.init_noise(jax.random.key(1), shape[-1], cfg)
  assert set(p) == {"w1", "w2"}  # bias-free
  w1, w2 = p["w1"], p["w2"]
  eta = {"sin": 0.1 * jnp.sin(t), "linear": 0.1 * t, "none": 0.0}[shortcut]
  np.testing.assert_allclose(fda_method.noise(p, t, cfg), jax.nn.relu(t @ w1) @ w2 + eta,
                             rtol=1e-5, atol=1e-6)


def test_noise_adapter_initialisation_is_zero_mean():
  p = fda_method.init_noise(jax.random.key(0), 4096, NOISE_CFG)
  for w in (p["w1"], p["w2"]):
    assert abs(float(w.mean())) < 0.1 * float(w.std())


# ----------------------------------------------------------------------------- CPU step cost
# (benchmarks/train_step.py: what these protect and why)


def _fusions(compiled_text):
  """[(fusion name, its operand shapes, its fused computation's text)] of an XLA:CPU program."""
  comps = {m.group(1): m.group(2) for m in re.finditer(
      r"^%(\S+) .*?\{\n(.*?)\n\}", compiled_text, re.M | re.S)}
  entry = compiled_text[compiled_text.index("ENTRY"):]
  shapes = {m.group(1): m.group(2) for m in re.finditer(r"^\s*%(\S+) = (\S+?)[{ ]", entry, re.M)}
  out = []
  for m in re.finditer(r"^\s*%(\S+) = \S+ fusion\((.*?)\), kind=\w+, calls=%([\w.\-]+)", entry,
                       re.M):
    operands = [shapes.get(a.strip().split()[-1].lstrip("%"), "")
                for a in re.sub(r"/\*[^*]*\*/", "", m.group(2)).split(",")]
    out.append((m.group(1), operands, comps.get(m.group(3), "")))
  return out


def test_materialize_is_exact_with_identity_gradient():
  x = jnp.array([0.0, -0.0, 1.5, -3.25, 1e30, -1e-30, jnp.inf, -jnp.inf, jnp.nan], jnp.float32)
  y = jax.jit(xla_cpu.materialize)(x)
  np.testing.assert_array_equal(np.asarray(y), np.asarray(x))
  assert np.signbit(np.asarray(y)[1]) and not np.signbit(np.asarray(y)[0])
  g = jax.grad(lambda x: jnp.sum(xla_cpu.materialize(x) * jnp.arange(9.0)))(x)
  np.testing.assert_array_equal(g, np.arange(9.0))
  xb = x.astype(jnp.bfloat16)
  assert xla_cpu.materialize(xb).dtype == jnp.bfloat16
  np.testing.assert_array_equal(np.asarray(xla_cpu.materialize(xb), np.float32),
                                np.asarray(xb, np.float32))


def _residual_chain_grad_hlo(depth=6):
  """The compiled gradient of a Bi-Real chain x <- hardtanh(BN-like(conv(x)) + x)."""
  convs = [layers.BinaryConv(8, name=f"c{i}") for i in range(depth)]
  x = randn.normal(jax.random.key(0), (4, 8, 8, 8))
  params = [c.init(jax.random.key(i), x, train=False)["params"] for i, c in enumerate(convs)]

  def loss(params, x):
    for c, p in zip(convs, params):
      y = c.apply({"params": p}, x, train=True)
      x = jnp.clip(y * 0.5 + 0.1 + x, -1.0, 1.0)
    return jnp.sum(x ** 2)

  return jax.jit(jax.grad(loss)).lower(params, x).compile().as_text()


def test_layer_inputs_are_computed_once_not_in_every_consumer(monkeypatch):
  """Without `materialize`, XLA:CPU recomputes every layer input from the whole chain of
  conv outputs inside the transposing copy that lays it out for the weight-gradient
  convolution: the activation-sized operands those copies read grow with the depth
  squared (6 layers: 30), against about one per copy (15) when each input is stored."""
  act = "f32[4,8,8,8]"

  def transposed_reads(text):
    return sum(sum(s.startswith(act) for s in ops) for _, ops, body in _fusions(text)
               if " transpose(" in body)

  assert transposed_reads(_residual_chain_grad_hlo()) <= 18
  monkeypatch.setattr(xla_cpu, "_materialized", lambda x: x)
  assert transposed_reads(_residual_chain_grad_hlo()) >= 25  # the test sees the difference


def _prenorm_reference(x):
  return x / jnp.sqrt(jnp.var(x, axis=(1, 2, 3), keepdims=True) + layers.PRENORM_EPS)


def test_prenormalize_value_and_gradient_equal_autodiff_of_the_formula():
  scale = jnp.array([1.0, 3.0, 0.01, 50.0])[:, None, None, None]
  shift = jnp.array([0.0, 2.0, 5.0, -100.0])[:, None, None, None]
  x = randn.normal(jax.random.key(0), (4, 6, 6, 16)) * scale + shift
  cot = randn.normal(jax.random.key(1), x.shape)
  np.testing.assert_allclose(layers.prenormalize(x), _prenorm_reference(x), rtol=2e-6, atol=1e-6)
  g = jax.grad(lambda x: jnp.sum(layers.prenormalize(x) * cot))(x)
  ref = jax.grad(lambda x: jnp.sum(_prenorm_reference(x) * cot))(x)
  for i in range(4):  # per sample, relative to its largest entry (mean / std up to 500 here)
    np.testing.assert_allclose(g[i], ref[i], rtol=0, atol=2e-5 * float(jnp.abs(ref[i]).max()))
  gb = jax.grad(lambda x: jnp.sum(layers.prenormalize(x) * cot))(x.astype(jnp.bfloat16))
  assert gb.dtype == jnp.bfloat16


def test_prenormalize_takes_fewer_passes_than_autodiff_of_the_formula():
  """One reduction in the backward (sum(h x)) where autodiff of jnp.var takes two, and one
  fewer activation-sized temporary."""
  x = randn.normal(jax.random.key(0), (4, 8, 8, 16))

  def passes(f):
    text = jax.jit(jax.grad(lambda x: jnp.sum(f(x) ** 3))).lower(x).compile().as_text()
    entry = text[text.index("ENTRY"):]
    stored = len(re.findall(r"= f32\[4,8,8,16\][^ ]* fusion\(", entry))
    sums = len(re.findall(r"= f32\[4(?:,1,1,1)?\][^ ]* fusion\(", entry))
    return stored, sums

  (stored, sums), (ref_stored, ref_sums) = passes(layers.prenormalize), passes(_prenorm_reference)
  assert stored < ref_stored and sums < ref_sums, ((stored, sums), (ref_stored, ref_sums))


def test_learned_scale_is_folded_into_the_kernel_in_training_only():
  layer = layers.BinaryConv(4, kernel_quantizer="biper", input_quantizer="approx_sign",
                            scaling="learned", prenorm=True)
  v = layer.init(jax.random.key(0), X, train=False)
  scale = v["params"]["scale"]

  def unfolded(p, x):  # the reference: scale the conv's output
    _, st = layer.apply({"params": p}, x, train=True, mutable=["intermediates"])
    y = jax.lax.conv_general_dilated(sown(st, "input"), sown(st, "kernel"), (1, 1), "SAME",
                                     dimension_numbers=("NHWC", "HWIO", "NHWC"))
    return y * p["scale"]

  y = layer.apply(v, X, train=True)
  np.testing.assert_allclose(y, unfolded(v["params"], X), rtol=1e-5, atol=1e-5)
  cot = randn.normal(jax.random.key(5), y.shape)
  g = jax.grad(lambda p: jnp.sum(layer.apply({"params": p}, X, train=True) * cot))(v["params"])
  # d/d scale_c = sum over the output of cot * conv(x, k)_c
  _, st = layer.apply(v, X, train=True, mutable=["intermediates"])
  conv = jax.lax.conv_general_dilated(sown(st, "input"), sown(st, "kernel"), (1, 1), "SAME",
                                      dimension_numbers=("NHWC", "HWIO", "NHWC"))
  np.testing.assert_allclose(g["scale"], jnp.sum(cot * conv, axis=(0, 1, 2)), rtol=1e-5,
                             atol=1e-5)
  assert float(jnp.abs(g["kernel"]).max()) > 0
  # evaluation scales the output (as the deployed model): unchanged
  _, y_eval, st = run(layer, X, train=False)
  ref = jax.lax.conv_general_dilated(jnp.asarray(sown(st, "input")),
                                     jnp.asarray(sown(st, "kernel")), (1, 1), "SAME",
                                     dimension_numbers=("NHWC", "HWIO", "NHWC"))
  np.testing.assert_allclose(y_eval, ref * scale, rtol=1e-6, atol=1e-6)
