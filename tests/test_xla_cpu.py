"""The XLA:CPU forms equal the plain ones (to float32 rounding), values and gradients,
under jit, grad and vmap, in float32 and bfloat16; the compiler options are CPU-only."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import randn  # tests/randn.py
from fda_biper_jax import xla_cpu

SHAPES = [(4, 5, 6, 16), (3, 7, 32), (8, 64), (2, 3, 10), (5, 3)]


def _x(shape, dtype, seed=0):
  return randn.normal(jax.random.key(seed), shape, jnp.float32).astype(dtype)


def _close(a, b, dtype):
  tol = 1e-5 if dtype == jnp.float32 else 2e-2
  np.testing.assert_allclose(np.asarray(a, np.float32), np.asarray(b, np.float32),
                             rtol=tol, atol=tol * max(1.0, float(jnp.max(jnp.abs(b)))))


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
@pytest.mark.parametrize("shape", SHAPES)
def test_channel_sum_equals_sum_over_leading_axes(shape, dtype):
  x = _x(shape, dtype)
  plain = lambda x: jnp.sum(x, axis=tuple(range(x.ndim - 1)))
  got = jax.jit(xla_cpu.channel_sum)(x)
  assert got.shape == (shape[-1],) and got.dtype == plain(x).dtype
  _close(got, plain(x), dtype)
  w = _x(shape[-1:], jnp.float32, 1)
  g = jax.jit(jax.grad(lambda x: jnp.sum(xla_cpu.channel_sum(x) * w)))(x)
  _close(g, jax.grad(lambda x: jnp.sum(plain(x) * w))(x), dtype)
  _close(jax.vmap(xla_cpu.channel_sum)(jnp.stack([x, 2 * x])),
         jnp.stack([plain(x), plain(2 * x)]), dtype)


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
@pytest.mark.parametrize("shape", SHAPES)
def test_broadcast_channels_value_and_gradient(shape, dtype):
  v = _x(shape[-1:], dtype, 2)
  r = _x(shape, dtype, 3)
  got = jax.jit(xla_cpu.broadcast_channels, static_argnums=1)(v, shape)
  np.testing.assert_array_equal(np.asarray(got, np.float32),
                                np.asarray(jnp.broadcast_to(v, shape), np.float32))
  loss = lambda b: lambda v: jnp.sum((b(v) * r).astype(jnp.float32) ** 2)
  fast = jax.jit(jax.grad(loss(lambda v: xla_cpu.broadcast_channels(v, shape))))(v)
  plain = jax.grad(loss(lambda v: jnp.broadcast_to(v, shape)))(v)
  assert fast.dtype == plain.dtype and fast.shape == plain.shape
  _close(fast, plain, dtype)
  per_example = jax.vmap(jax.grad(loss(lambda v: xla_cpu.broadcast_channels(v, shape))))(
      jnp.stack([v, -v]))
  _close(per_example[1], jax.grad(loss(lambda v: jnp.broadcast_to(v, shape)))(-v), dtype)


def test_compiler_options_are_cpu_only_and_opt_out(monkeypatch):
  monkeypatch.delenv(xla_cpu.OPT_OUT_ENV, raising=False)
  monkeypatch.setenv("XLA_FLAGS", "--xla_force_host_platform_device_count=8")
  assert xla_cpu.compiler_options("cpu") == xla_cpu.CPU_COMPILER_OPTIONS
  assert xla_cpu.compiler_options("gpu") == xla_cpu.compiler_options("tpu") == {}
  monkeypatch.setenv(xla_cpu.OPT_OUT_ENV, "0")
  assert xla_cpu.compiler_options("cpu") == {}
  monkeypatch.delenv(xla_cpu.OPT_OUT_ENV)
  monkeypatch.setenv("XLA_FLAGS", "--xla_cpu_experimental_ynn_fusion_type=individual_dot")
  assert "xla_cpu_experimental_ynn_fusion_type" not in xla_cpu.compiler_options("cpu")


def test_init_compiler_options_add_the_init_level_on_cpu_only(monkeypatch):
  monkeypatch.delenv(xla_cpu.OPT_OUT_ENV, raising=False)
  monkeypatch.setenv("XLA_FLAGS", "--xla_force_host_platform_device_count=8")
  assert xla_cpu.init_compiler_options("cpu") == {**xla_cpu.CPU_COMPILER_OPTIONS,
                                                  **xla_cpu.INIT_COMPILER_OPTIONS}
  assert xla_cpu.init_compiler_options("gpu") == {}
  monkeypatch.setenv("XLA_FLAGS", "--xla_backend_optimization_level=3")
  assert "xla_backend_optimization_level" not in xla_cpu.init_compiler_options("cpu")
  monkeypatch.setenv(xla_cpu.OPT_OUT_ENV, "0")
  assert xla_cpu.init_compiler_options("cpu") == {}


@pytest.mark.parametrize("name,quantizer,scaling", [("tiny_cnn", "fda", "mean_abs"),
                                                    ("tiny_cnn", "biper", "learned"),
                                                    ("vit_tiny", "identity", "none")])
def test_init_compiler_options_keep_the_initial_values(name, quantizer, scaling):
  """create_state's program, compiled with the init options and with XLA's defaults, gives
  bit-identical parameters, statistics and optimizer state (FDA's noise modules, BiPer's
  learned scales, a transformer's initialisers; the whole zoo in benchmarks/NOTES.md)."""
  import optax

  from fda_biper_jax import models
  from fda_biper_jax.train import trainer

  model = models.create(name, 10, kernel_quantizer=quantizer, input_quantizer=quantizer,
                        scaling=scaling)
  tx = optax.sgd(0.1, momentum=0.9)
  state = trainer.create_state(model, tx, jax.random.key(3), (32, 32, 3))
  init = lambda k: model.init(k, jnp.zeros((1, 32, 32, 3)), train=False)
  default = jax.jit(init)(jax.random.key(3))
  assert jax.tree.structure(state.params) == jax.tree.structure(default["params"])
  for a, b in zip(jax.tree.leaves((state.params, state.batch_stats)),
                  jax.tree.leaves((default["params"], default.get("batch_stats", {})))):
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
  for a, b in zip(jax.tree.leaves(state.opt_state), jax.tree.leaves(tx.init(default["params"]))):
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b))


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
def test_the_tests_inputs_are_jax_random_normals_values(dtype):
  """randn.normal (compiled with the init options) gives jax.random.normal's bits."""
  for seed, shape in [(0, (4, 8, 8, 16)), (7, (3, 5))]:
    key = jax.random.key(seed)
    np.testing.assert_array_equal(np.asarray(randn.normal(key, shape, dtype)),
                                  np.asarray(jax.random.normal(key, shape, dtype)))


def test_compiler_options_keep_the_convolution_values():
  """A conv's value and both gradients compiled with the options equal XLA's defaults'."""
  x, k = _x((8, 12, 12, 16), jnp.float32), _x((3, 3, 16, 16), jnp.float32, 1)

  def loss(x, k):
    y = jax.lax.conv_general_dilated(x, k, (1, 1), [(1, 1)] * 2,
                                     dimension_numbers=("NHWC", "HWIO", "NHWC"))
    return jnp.sum(y * y)

  f = jax.value_and_grad(loss, argnums=(0, 1))
  with_options = jax.jit(f, compiler_options=xla_cpu.compiler_options())(x, k)
  default = jax.jit(f)(x, k)
  for a, b in zip(jax.tree.leaves(with_options), jax.tree.leaves(default)):
    _close(a, b, jnp.float32)


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
@pytest.mark.parametrize("shape", [(8, 6, 6, 16), (16, 64), (4, 5, 5, 10)])
@pytest.mark.parametrize("train", [True, False])
def test_batch_norm_equals_flax(shape, dtype, train):
  """models.blocks.BatchNorm against flax's nn.BatchNorm: outputs, running statistics and
  the gradients of x, scale and bias, in training and evaluation."""
  from flax import linen as nn

  from fda_biper_jax.models import blocks

  kw = dict(use_running_average=not train, momentum=0.9, epsilon=1e-5, dtype=dtype,
            scale_init=nn.initializers.constant(0.5))
  ours, flax_bn = blocks.BatchNorm(**kw), nn.BatchNorm(**kw)
  x = _x(shape, dtype) * 3 + 1
  variables = flax_bn.init(jax.random.key(0), x)
  variables = {"params": jax.tree.map(lambda p: p + _x(p.shape, p.dtype, 5), variables["params"]),
               "batch_stats": {"mean": _x(shape[-1:], jnp.float32, 6),
                               "var": 1 + jnp.abs(_x(shape[-1:], jnp.float32, 7))}}
  assert jax.tree.structure(ours.init(jax.random.key(0), x)) == jax.tree.structure(variables)
  r = _x(shape, jnp.float32, 8)

  def run(module):
    def loss(params, x):
      y, mut = module.apply({"params": params, "batch_stats": variables["batch_stats"]}, x,
                            mutable=["batch_stats"])
      return jnp.sum(y.astype(jnp.float32) * r), (y, mut)
    return jax.jit(jax.grad(loss, argnums=(0, 1), has_aux=True))(variables["params"], x)

  (gp, gx), (y, mut) = run(ours)
  (gp_ref, gx_ref), (y_ref, mut_ref) = run(flax_bn)
  assert y.dtype == y_ref.dtype and gx.dtype == gx_ref.dtype
  _close(y, y_ref, dtype)
  _close(gx, gx_ref, dtype)
  for a, b in zip(jax.tree.leaves((gp, mut)), jax.tree.leaves((gp_ref, mut_ref))):
    _close(a, b, dtype)
