"""Numerics and compiler options written for XLA:CPU; values identical to the plain forms.

Four rules of XLA:CPU decide how the training step's elementwise work and
reductions are written and which kernels its convolutions run on
(measurements in benchmarks/NOTES.md):

1. `jnp.sin` and `jnp.cos` lower to a scalar libm call per element, about ten
   times a vectorised multiply-add (`exp` and `tanh` are vectorised
   polynomials). `vsin` / `vcos` are polynomial sines from multiplies and adds
   after an exact Cody-Waite reduction, so XLA vectorises them.
2. A cheap elementwise value (add, multiply, clamp, select, ...) is recomputed
   inside every consumer fusion that can take it, rather than stored once;
   "expensive" operations (divide, exp, ...) are computed once. `materialize`
   stores a value once by ending it with an exact division by one.
3. A reduction over every axis but a narrow last one (a per-channel sum over
   [batch, H, W, C], C = 16 to 64) is vectorised C floats wide and split
   into windows; `channel_sum` reads the same tensor as a matrix 128 floats
   wide (several times faster), and `broadcast_channels` makes the gradient
   of a per-channel broadcast such a sum (BatchNorm's backward).
4. XLA:CPU hands some convolutions to YNNPACK (`__ynn_fusion`), which runs
   each on one thread, while its own Eigen convolution kernels use every
   core of the intra-op thread pool. `compiler_options()` is what the
   library's jitted steps pass to `jax.jit(compiler_options=...)`: on the
   CPU backend it turns the YNNPACK convolutions off (Eigen computes the
   same convolutions, to float32 rounding). `init_compiler_options()` adds
   LLVM's level 1 for the one-off initialisation: it compiles 2-3.5x faster
   and gives the same bits.

All are exact, accurate to a few ulp, or (the sums and the kernels) equal to
float32 rounding, and cost nothing on other backends: `materialize` is the
identity there, `channel_sum` and `broadcast_channels` are the plain forms
and `compiler_options()` is empty; `vsin` is used everywhere (its float64
path is `jnp.sin`).
"""

from __future__ import annotations

import functools
import math
import os
from typing import Any, Sequence

import jax
import jax.numpy as jnp

Array = jax.Array

# pi = PI_A + PI_B + PI_C with few significant bits in the first two parts, so k * PI_A and
# k * PI_B (8 and 9 significant bits) are exact in float32 for |k| < 2^15, and so are the
# two subtractions (Sterbenz).
PI_A = 3.140625
PI_B = 0.0009670257568359375
PI_C = math.pi - PI_A - PI_B

# Minimax-fitted (relative error, then rounded to float32) on |r| <= pi/2:
# sin r = r (1 + r^2 (S1 + r^2 (S2 + ...))): 5.3e-9 relative in exact arithmetic, at most
# 2.6 ulp when evaluated in float32; cos r = 1 + r^2 (C1 + ...): 1.5e-7 absolute in float32.
SIN_COEFFS = (-0.16666656732559204, 0.008333025500178337, -0.00019807417993433774,
              2.6019026790891076e-06)
COS_COEFFS = (-0.4999999701976776, 0.04166660085320473, -0.0013887989334762096,
              2.4744034817558713e-05, -2.5803961989367963e-07)


def compute_dtype(dtype) -> jnp.dtype:
  """float16/bfloat16 -> float32; float32/float64 unchanged."""
  return jnp.promote_types(dtype, jnp.float32)


def reduce_pi(t: Array) -> tuple[Array, Array]:
  """(k, r): t = k pi + r with k integral and r in [-pi/2, pi/2] (Cody-Waite, exact r
  for |k| < 2^15 in float32)."""
  k = jnp.round(t * (1.0 / math.pi))
  return k, ((t - k * PI_A) - k * PI_B) - k * PI_C


def parity(k: Array) -> Array:
  """(-1)^k for integral float k: two multiply-adds and a floor, no remainder."""
  return 1.0 - 2.0 * (k - 2.0 * jnp.floor(0.5 * k))


def horner(u: Array, coeffs) -> Array:
  acc = coeffs[-1]
  for c in coeffs[-2::-1]:
    acc = acc * u + c
  return acc


def sin_reduced(r: Array) -> Array:
  """sin r for |r| <= pi/2: an odd polynomial, so exactly 0 at r = 0 and of r's sign."""
  if r.dtype == jnp.float64:
    return jnp.sin(r)
  u = r * r
  return r + r * (u * horner(u, SIN_COEFFS))


def cos_reduced(r: Array) -> Array:
  if r.dtype == jnp.float64:
    return jnp.cos(r)
  u = r * r
  return 1.0 + u * horner(u, COS_COEFFS)


def polynomial_or_exact(polynomial, exact, x: Array) -> Array:
  """polynomial(x) in float32 (16-bit inputs computed in float32, cast back);
  exact(x) for float64, where the polynomial is not accurate enough."""
  x = jnp.asarray(x)
  if x.dtype == jnp.float64:
    return exact(x)
  return polynomial(x.astype(compute_dtype(x.dtype))).astype(x.dtype)


def _vsin_poly(x: Array) -> Array:
  k, r = reduce_pi(x)
  return parity(k) * sin_reduced(r)


def _vcos_poly(x: Array) -> Array:
  k, r = reduce_pi(x)
  return parity(k) * cos_reduced(r)


@jax.custom_jvp
def vsin(x: Array) -> Array:
  """sin(x) from multiplies and adds only, so XLA vectorises it; derivative `vcos`.

  x is reduced to r = x - k pi in [-pi/2, pi/2] (exact for |x| < 2^15 pi,
  about 1e5; wrong beyond about 1e6, so not for arbitrary arguments) and a
  degree-9 odd polynomial is evaluated: within 3 ulp of the float64 sine of
  the float32 argument there, exactly 0 at x = 0, and odd. Computed in
  float32 for 16-bit inputs (then cast back) and with `jnp.sin` in float64.
  A product fed to it (omega x) may be contracted by XLA into the
  reduction's first multiply-add, so its value can differ by the rounding of
  that product between two compilations.
  """
  return polynomial_or_exact(_vsin_poly, jnp.sin, x)


@vsin.defjvp
def _vsin_jvp(primals, tangents):
  (x,), (dx,) = primals, tangents
  return vsin(x), vcos(x) * dx


@jax.custom_jvp
def vcos(x: Array) -> Array:
  """cos(x) as `vsin` (an even degree-10 polynomial after the same reduction, within
  1.5e-7 of the float64 cosine for |x| < 2^15 pi); derivative -vsin."""
  return polynomial_or_exact(_vcos_poly, jnp.cos, x)


@vcos.defjvp
def _vcos_jvp(primals, tangents):
  (x,), (dx,) = primals, tangents
  return vcos(x), -vsin(x) * dx


@jax.custom_vjp
def _materialized(x: Array) -> Array:
  one = jnp.maximum(jnp.abs(jnp.sign(x)), 1).astype(x.dtype)  # 1 (nan for nan), not a constant
  return x / one


def _materialized_fwd(x):
  return _materialized(x), None


def _materialized_bwd(_, g):
  return (g,)


_materialized.defvjp(_materialized_fwd, _materialized_bwd)


def materialize(x: Array) -> Array:
  """x, exactly, computed once into its own buffer on XLA:CPU; identity gradient.

  Rule 2 of the module docstring: in a Bi-Real ResNet each binary layer's
  input is hardtanh(BN(conv) + shortcut), the shortcut being the previous
  such input, so without this every consumer (the conv, and the transposed
  copies that lay the input out for the weight-gradient convolution)
  recomputes the whole chain of BatchNorms back to the stage's first layer.
  Dividing by a one XLA cannot fold, max(|sign(x)|, 1), is exact
  (x / 1 = x for every float, -0, inf and nan included) and makes x a divide,
  computed once. On other backends x is returned as is.
  """
  if jax.default_backend() != "cpu":
    return x
  return _materialized(x)


# The XLA:CPU options of rule 4, by DebugOptions field name. The empty YNN fusion list takes
# every operation, the convolutions included, away from YNNPACK.
CPU_COMPILER_OPTIONS: dict[str, Any] = {"xla_cpu_experimental_ynn_fusion_type": ""}
# Set to 0 to compile the library's steps with XLA's own defaults.
OPT_OUT_ENV = "FDA_BIPER_JAX_XLA_CPU_OPTIONS"


def compiler_options(backend: str | None = None) -> dict[str, Any]:
  """The compiler options of the library's jitted steps (`jax.jit(compiler_options=...)`).

  `CPU_COMPILER_OPTIONS` when `backend` (default: JAX's default backend) is
  'cpu'; {} on every other backend, and when the environment variable
  FDA_BIPER_JAX_XLA_CPU_OPTIONS is '0'. An option also named in XLA_FLAGS is
  left out, so a user's own flag wins. The options change which kernels run,
  not the program's values beyond float32 rounding.
  """
  return _on_cpu(CPU_COMPILER_OPTIONS, backend)


def _on_cpu(options: dict[str, Any], backend: str | None) -> dict[str, Any]:
  """`options` on the CPU backend without the opt-out, less those named in XLA_FLAGS."""
  if (backend or jax.default_backend()) != "cpu" or os.environ.get(OPT_OUT_ENV, "1") == "0":
    return {}
  flags = os.environ.get("XLA_FLAGS", "")
  return {k: v for k, v in options.items() if f"--{k}=" not in flags}


# Parameter initialisation (threefry random bits, integer arithmetic, and their exact or
# elementwise float transforms) runs once: LLVM's level 1 compiles it 2-3.5x faster than
# level 2, with the same values for every model of the zoo (measured in benchmarks/NOTES.md;
# tests/test_xla_cpu.py checks three programs bit for bit). Level 0 changes values.
INIT_COMPILER_OPTIONS: dict[str, Any] = {"xla_backend_optimization_level": 1}


def init_compiler_options(backend: str | None = None) -> dict[str, Any]:
  """The compiler options of the library's jitted initialisation (`create_state`).

  `compiler_options(backend)` plus, on CPU, `INIT_COMPILER_OPTIONS`, which
  shortens the first step's compile and leaves the initial values unchanged
  (the same opt-out and XLA_FLAGS rules apply).
  """
  return _on_cpu({**CPU_COMPILER_OPTIONS, **INIT_COMPILER_OPTIONS}, backend)


def _channel_rows(x: Array) -> tuple[int, int]:
  """(rows, lanes): x [..., C] read as a [rows, lanes * C] matrix whose width is a
  multiple of 128 floats (lanes = lcm(C, 128) / C), or (0, 0) when x's leading size
  is not a multiple of lanes."""
  c = x.shape[-1]
  n = math.prod(x.shape[:-1])
  lanes = math.lcm(c, 128) // c
  return (n // lanes, lanes) if c and n % lanes == 0 and n >= lanes else (0, 0)


def _wide_channel_sum(x: Array) -> Array:
  rows, lanes = _channel_rows(x)
  if not rows:
    return jnp.sum(x, axis=tuple(range(x.ndim - 1)))
  return jnp.sum(jnp.sum(x.reshape(rows, lanes * x.shape[-1]), axis=0).reshape(lanes, -1),
                 axis=0)


def channel_sum(x: Array) -> Array:
  """sum(x) over every axis but the last, [C], to float32 rounding (another order).

  XLA:CPU vectorises a reduction along the kept axis, C floats wide (16 to 64
  in the CIFAR ResNets), and splits it into windows; read as a
  [rows, lanes * C] matrix (lanes * C a multiple of 128) the same sum is one
  wide column reduction, several times faster, then lanes partial sums per
  channel are added. Other backends: `jnp.sum`.
  """
  if jax.default_backend() != "cpu":
    return jnp.sum(x, axis=tuple(range(x.ndim - 1)))
  return _wide_channel_sum(x)


@functools.partial(jax.custom_vjp, nondiff_argnums=(1,))
def _broadcast_channels(v: Array, shape: tuple[int, ...]) -> Array:
  return jnp.broadcast_to(v, shape)


def _broadcast_channels_fwd(v, shape):
  return jnp.broadcast_to(v, shape), None


def _broadcast_channels_bwd(shape, _, g):
  return (_wide_channel_sum(g).reshape((1,) * (len(shape) - 1) + (-1,)),)


_broadcast_channels.defvjp(_broadcast_channels_fwd, _broadcast_channels_bwd)


def broadcast_channels(v: Array, shape: Sequence[int]) -> Array:
  """v [C] (or [1, ..., 1, C]) broadcast to `shape` [..., C]; its gradient is
  `channel_sum` of the incoming one. Other backends: `jnp.broadcast_to`."""
  v = jnp.reshape(v, (1,) * (len(shape) - 1) + (shape[-1],))
  if jax.default_backend() != "cpu":
    return jnp.broadcast_to(v, tuple(shape))
  return _broadcast_channels(v, tuple(shape))
