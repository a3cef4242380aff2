"""BinaryConv / BinaryDense / BinarySpec and the FDA noise adaptation module."""

import json

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from fda_biper_jax import layers, quantizers
from fda_biper_jax.noise_adapter import NoiseAdapter, hidden_width

X = jax.random.normal(jax.random.key(1), (2, 6, 6, 5))
FDA = {"name": "fda", "max_terms": 18}
SCHED = {"n_terms": jnp.int32(12), "alpha": jnp.float32(0.05)}


def run(layer, x, train, schedule=None, key=0):
  v = layer.init(jax.random.key(key), x)
  y, st = layer.apply(v, x, train=train, schedule=schedule,
                      mutable=["intermediates", "losses"])
  return v, y, st


def sown(st, name):
  return np.asarray(st["intermediates"][name][0])


@pytest.mark.parametrize("kq", ["ste", "approx_sign", "biper", "bnn_pp", FDA])
@pytest.mark.parametrize("scaling", ["none", "mean_abs", "learned"])
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
  scale = np.abs(w).mean(axis=(0, 1, 2)) if scaling == "mean_abs" else np.ones(4)
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


def test_prenorm_divides_each_sample_by_its_std_in_training_only():
  layer = layers.BinaryConv(4, input_quantizer="identity", prenorm=True)
  x = X * jnp.array([1.0, 7.0])[:, None, None, None]
  _, _, st = run(layer, x, train=True)
  xn = np.asarray(x) / np.sqrt(np.asarray(x).var(axis=(1, 2, 3), keepdims=True) + 1e-5)
  np.testing.assert_allclose(sown(st, "input"), xn, rtol=1e-5)
  _, _, st = run(layer, x, train=False)
  np.testing.assert_array_equal(sown(st, "input"), np.asarray(x))


def test_mean_abs_scale_is_not_differentiated():
  layer = layers.BinaryDense(3, kernel_quantizer="ste", scaling="mean_abs")
  x = jax.random.normal(jax.random.key(2), (4, 5))
  v = layer.init(jax.random.key(0), x)
  g = jax.random.normal(jax.random.key(3), (4, 3))
  grad = jax.grad(lambda p: jnp.sum(layer.apply({"params": p}, x, train=True) * g))(v["params"])
  w = v["params"]["kernel"]
  # y = x @ (alpha * sign(w)), STE: dL/dw = alpha * x^T g, alpha held constant
  expected = jnp.abs(w).mean(axis=0) * (x.T @ g)
  np.testing.assert_allclose(grad["kernel"], expected, rtol=1e-5)


def test_learned_scale_initialised_uniform_in_unit_interval():
  layer = layers.BinaryConv(64, kernel_quantizer="biper", scaling="learned")
  s = np.asarray(layer.init(jax.random.key(0), X)["params"]["scale"])
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


def test_regularizer_is_sown_for_biper_kernels_only():
  for kq, expected in [({"name": "biper", "omega0": 20.0}, True), ("ste", False)]:
    layer = layers.BinaryConv(4, kernel_quantizer=kq)
    v, _, st = run(layer, X, train=True)
    if expected:
      w = np.asarray(v["params"]["kernel"], np.float64)
      np.testing.assert_allclose(st["losses"]["kernel_regularizer"][0],
                                 np.mean(np.sin(20 * w) ** 2), rtol=1e-5)
    else:
      assert "losses" not in st or not st["losses"]


def test_noise_adaptation_in_training_and_pure_sign_in_eval():
  layer = layers.BinaryConv(4, kernel_quantizer=FDA, input_quantizer=FDA,
                            kernel_noise={}, input_noise={"min_width": 2})
  v = layer.init(jax.random.key(0), X)  # created in eval mode: modules exist
  p = v["params"]
  assert p["kernel_noise"]["w1"].shape == (3 * 3 * 5, 4)  # d = 45 < 64: min_width, not 0
  assert p["input_noise"]["w1"].shape == (5, 2)
  _, st = layer.apply(v, X, train=True, schedule=SCHED, mutable=["intermediates"])
  w = p["kernel"]
  rows = w.reshape(-1, 4).T
  e = NoiseAdapter(name=None).apply({"params": p["kernel_noise"]}, rows).T.reshape(w.shape)
  np.testing.assert_allclose(sown(st, "kernel"),
                             np.where(w >= 0, 1.0, -1.0) + 0.05 * np.asarray(e), rtol=1e-5,
                             atol=1e-6)
  _, st = layer.apply(v, X, train=False, mutable=["intermediates"])
  assert set(np.unique(sown(st, "kernel"))) == {-1.0, 1.0}


def test_noise_modules_receive_gradients():
  layer = layers.BinaryConv(4, kernel_quantizer=FDA, input_quantizer=FDA,
                            kernel_noise={}, input_noise={})
  v = layer.init(jax.random.key(0), X)
  grads = jax.grad(lambda p: jnp.sum(layer.apply({"params": p}, X, train=True,
                                                 schedule=SCHED) ** 2))(v["params"])
  for mod in ("kernel_noise", "input_noise"):
    for leaf in jax.tree.leaves(grads[mod]):
      assert float(jnp.abs(leaf).max()) > 0


def test_noise_needs_alpha_in_training():
  layer = layers.BinaryDense(3, kernel_quantizer=FDA, kernel_noise={})
  v = layer.init(jax.random.key(0), jnp.ones((2, 4)))
  with pytest.raises(ValueError, match=r"schedule\['alpha'\]"):
    layer.apply(v, jnp.ones((2, 4)), train=True, schedule={"n_terms": 9})


def test_schedule_values_reach_the_quantizer_without_recompiling():
  layer = layers.BinaryDense(3, kernel_quantizer=FDA, input_quantizer={"name": "bnn_pp"})
  x = jax.random.normal(jax.random.key(0), (2, 4))
  v = layer.init(jax.random.key(0), x)

  @jax.jit
  @chex.assert_max_traces(n=1)
  def grad(v, n, beta):
    return jax.grad(lambda p: jnp.sum(layer.apply(
        {"params": p}, x, train=True, schedule={"n_terms": n, "beta": beta})))(v["params"])

  chex.clear_trace_counter()
  g1 = grad(v, jnp.int32(9), jnp.float32(1.0))
  g2 = grad(v, jnp.int32(18), jnp.float32(30.0))
  assert not np.allclose(g1["kernel"], g2["kernel"])


def test_callable_quantizer():
  layer = layers.BinaryDense(3, kernel_quantizer=lambda w: jnp.round(w * 4) / 4)
  _, y, st = run(layer, jnp.ones((2, 4)), train=False)
  k = sown(st, "kernel")
  np.testing.assert_array_equal(k * 4, np.round(k * 4))
  with pytest.raises(ValueError, match="cannot be saved"):
    quantizers.get(layer.kernel_quantizer).config()


def test_binary_spec_config_round_trip():
  spec = layers.BinarySpec.create(kernel_quantizer={"name": "biper", "omega0": 7.0},
                                  input_quantizer={"name": "fda", "n_terms": 3},
                                  scaling="learned", prenorm=True, kernel_noise={"a": 0.2})
  cfg = json.loads(json.dumps(spec.config()))
  assert layers.BinarySpec.create(**cfg) == spec
  assert cfg["kernel_quantizer"] == {"name": "biper", "omega0": 7.0}


@pytest.mark.parametrize("kwargs, match", [
    (dict(scaling="max"), "scaling='max' is not allowed"),
    (dict(kernel_quantizer="sgn"), "unknown quantizer 'sgn'"),
    (dict(prenorm="yes"), "prenorm='yes' is not allowed"),
    (dict(kernel_noise={"k": 64}), r"noise adapter takes no option \['k'\]"),
    (dict(input_noise={"shortcut": "cos"}), "shortcut='cos' is not allowed"),
    (dict(input_noise={"reduction": 0}), "reduction=0"),
])
def test_bad_spec_values(kwargs, match):
  with pytest.raises(ValueError, match=match):
    layers.BinarySpec.create(**kwargs)


def test_bad_scaling_on_a_layer():
  with pytest.raises(ValueError, match="scaling='x' is not allowed"):
    layers.BinaryDense(3, scaling="x").init(jax.random.key(0), jnp.ones((1, 2)))


# ----------------------------------------------------------------------------- noise adapter

@pytest.mark.parametrize("d, k, m, expected", [(640, 64, 4, 10), (45, 64, 4, 4),
                                               (16, 64, 1, 1), (128, 16, 4, 8)])
def test_hidden_width(d, k, m, expected):
  assert hidden_width(d, k, m) == expected


@pytest.mark.parametrize("shortcut", ["sin", "linear", "none"])
def test_noise_adapter_formula(shortcut):
  mod = NoiseAdapter(shortcut=shortcut, a=0.1)
  t = jax.random.normal(jax.random.key(0), (3, 128))
  v = mod.init(jax.random.key(1), t)
  assert set(v["params"]) == {"w1", "w2"}  # bias-free
  w1, w2 = v["params"]["w1"], v["params"]["w2"]
  eta = {"sin": 0.1 * jnp.sin(t), "linear": 0.1 * t, "none": 0.0}[shortcut]
  np.testing.assert_allclose(mod.apply(v, t), jax.nn.relu(t @ w1) @ w2 + eta, rtol=1e-5,
                             atol=1e-6)


def test_noise_adapter_initialisation_is_zero_mean():
  v = NoiseAdapter().init(jax.random.key(0), jnp.ones((1, 4096)))
  for w in (v["params"]["w1"], v["params"]["w2"]):
    assert abs(float(w.mean())) < 0.1 * float(w.std())
