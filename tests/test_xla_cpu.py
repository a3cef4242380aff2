"""The XLA:CPU compiler options are CPU-only, opt-out, and keep the values."""

import jax
import jax.numpy as jnp
import numpy as np

from fda_biper_jax import xla_cpu


def _x(shape, dtype, seed=0):
  return jax.random.normal(jax.random.key(seed), shape, jnp.float32).astype(dtype)


def _close(a, b, dtype):
  tol = 1e-5 if dtype == jnp.float32 else 2e-2
  np.testing.assert_allclose(np.asarray(a, np.float32), np.asarray(b, np.float32),
                             rtol=tol, atol=tol * max(1.0, float(jnp.max(jnp.abs(b)))))


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
