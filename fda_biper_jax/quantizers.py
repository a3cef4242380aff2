"""Binarizers as (forward, backward-surrogate) pairs, each a `jax.custom_vjp`.

ProxConnect++ (Lu et al., NeurIPS 2023) reads every binarizer as a pair: a
forward quantizer F (what the network computes) and a backward quantizer B
whose derivative replaces dF/dx in the chain rule. Each public function here is
one such pair:

=============  =========================  ==========================================
name           forward F(x)               backward: dF/dx is replaced by
=============  =========================  ==========================================
identity       x                          1 (the full-precision twin)
ste            sign(x)                    1, or 1[|x| <= clip]  (BinaryConnect, Larq)
approx_sign    sign(x)                    (2 - 2|x|) 1[|x| <= 1]  (Bi-Real Net)
sign_swish     sign(x)                    SS_beta'(x)  (BNN+, beta = 5)
fda            sign(x)                    s_n'(x) = 4w/pi sum_{i=0..n} cos((2i+1)wx)
                                          (FDA-BNN Eq. 10), optionally 1[|x| <= clip]
biper          sign(sin(w0 x))            w0 cos(w0 x)  (BiPer, CVPR 2024)
biper_sine     sin(w0 x)                  w0 cos(w0 x)  (BiPer stage 1, not binary)
bnn_pp         SS_beta(x)                 SS_beta'(x)  (BNN++, ProxConnect++)
=============  =========================  ==========================================

with the SignSwish map SS_beta(x) = 2 sigmoid(bx) (1 + bx (1 - sigmoid(bx))) - 1
and its derivative SS_beta'(x) = 2b s (1 - s) (2 + bx (1 - 2s)), s = sigmoid(bx),
which equals BNN+'s b (2 - bx tanh(bx/2)) / (1 + cosh(bx)) but never divides
an overflowed cosh. Both are evaluated as rational functions of
e = exp(-|bx|) (`sign_swish_map`, `sign_swish_derivative`).

Cost on XLA:CPU (benchmarks/train_step.py): the forward and the surrogate
derivative run on every binarized activation, so they are written for the
CPU compiler's fusion rules. `jnp.sin` / `jnp.cos` are scalar libm calls
there, about 10x a vectorised multiply-add, so the FDA series uses `vsin`,
a polynomial sine; a cheap elementwise result is recomputed inside every
consumer while an expensive one (divide, exp) is computed once, which
decides how SS_beta is written. Saving a derivative as a custom_vjp residual
changes nothing there: XLA merges the identical expressions of the forward
and backward and stores the shared part itself.

Conventions shared by every function:

* sign(0) = +1 (and sign(-0.0) = +1), so a binarized tensor holds exactly two
  values. The forward is `jnp.where(x >= 0, 1, -1)` in x's dtype, never
  `x + stop_gradient(...)`,
  which is not exact in bfloat16; values are exactly +1/-1 in float16,
  bfloat16, float32 and float64, and the output dtype is the input dtype.
* Surrogate derivatives are evaluated in at least float32 and the gradient is
  cast back to the input dtype.
* Parameters (omega, n_terms, beta, clip, ...) are array arguments of the
  custom_vjp, so training schedules may pass traced scalars without
  recompiling; they receive no gradient. Concrete values are validated and a
  bad one raises `ValueError` naming the value and what is allowed.

`get(name, **params)` returns a `Quantizer`: the function with its parameters
bound, its `binarize` deployment form, and a serialisable `config()`, for use
by layers and configs.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any, Callable, Mapping

import jax
import jax.numpy as jnp
import numpy as np

Array = jax.Array


# --------------------------------------------------------------------------
# Validation
# --------------------------------------------------------------------------


def _is_concrete(v) -> bool:
  return not isinstance(v, jax.core.Tracer)


def _check_float(fn: str, x) -> Array:
  x = jnp.asarray(x)
  if not jnp.issubdtype(x.dtype, jnp.floating):
    raise ValueError(
        f"{fn}: x has dtype {x.dtype}; a floating dtype (float16, bfloat16, "
        "float32, float64) is required")
  return x


def _check_positive(fn: str, name: str, v) -> None:
  """Raises if a concrete scalar parameter is not > 0 (traced ones pass)."""
  if v is None or not _is_concrete(v):
    return
  a = np.asarray(v)
  if a.ndim != 0 or not np.issubdtype(a.dtype, np.number):
    raise ValueError(f"{fn}: {name}={v!r} is not allowed; {name} must be a real scalar > 0")
  if not (a > 0 and np.isfinite(a)):
    raise ValueError(f"{fn}: {name}={float(a)!r} is not allowed; {name} must be finite and > 0")


def _check_n_terms(v, max_terms) -> int | None:
  """Validates n_terms (when concrete) and the optional static cap max_terms."""
  if _is_concrete(v):
    a = np.asarray(v)
    if (a.ndim != 0 or not np.issubdtype(a.dtype, np.number)
        or float(a) != math.floor(float(a))):
      raise ValueError(f"fda: n_terms={v!r} is not allowed; n_terms must be an integer >= 0")
    n = int(a)
    if n < 0:
      raise ValueError(f"fda: n_terms={n} is not allowed; n_terms must be an integer >= 0")
    if max_terms is None:
      return None
    if n > max_terms:
      raise ValueError(f"fda: n_terms={n} exceeds max_terms={max_terms}; "
                       "raise max_terms to the largest n the schedule produces")
  elif max_terms is None:
    return None
  if not isinstance(max_terms, int) or isinstance(max_terms, bool) or max_terms < 0:
    raise ValueError(f"fda: max_terms={max_terms!r} is not allowed; it must be a Python int >= 0")
  return max_terms


# --------------------------------------------------------------------------
# Forward maps and surrogate derivatives
# --------------------------------------------------------------------------


def _compute_dtype(dtype) -> jnp.dtype:
  """float16/bfloat16 -> float32; float32/float64 unchanged."""
  return jnp.promote_types(dtype, jnp.float32)


def sign(x: Array) -> Array:
  """sign with sign(0) = +1, exactly +-1 in x's dtype. No gradient rule."""
  return jnp.where(x >= 0, jnp.ones_like(x), -jnp.ones_like(x))


def square_wave(x: Array, omega0) -> Array:
  """BiPer's forward sign(sin(omega0 x)) (paper Eq. 4), sign(0) = +1."""
  t = jnp.sin(omega0 * x.astype(_compute_dtype(x.dtype)))
  return jnp.where(t >= 0, jnp.ones_like(x), -jnp.ones_like(x))


# |beta x| beyond this is saturated: exp(-|beta x|) is 0 in float32 there, and
# clipping keeps |beta x| * exp(-|beta x|) = inf * 0 from producing nan.
_SIGN_SWISH_SATURATION = 100.0


def _sign_swish_parts(x: Array, beta) -> tuple[Array, Array]:
  """(bx, a): beta x clipped to the saturation, and a = |bx|.

  With e = exp(-a), s = sigmoid(a) = 1 / (1 + e), 1 - s = e / (1 + e) and
  1 - 2s = (e - 1) / (1 + e), so SS_beta (odd) and SS_beta' (even) are
  rational functions of e in (0, 1]: no overflow, and no cancellation in
  1 - s.
  """
  bx = jnp.clip(beta * x, -_SIGN_SWISH_SATURATION, _SIGN_SWISH_SATURATION)
  return bx, jnp.abs(bx)


def sign_swish_map(x: Array, beta) -> Array:
  """SS_beta(x) = 2 sigmoid(bx)(1 + bx(1 - sigmoid(bx))) - 1 (BNN+ Eq. 4),

  evaluated as +-(1 + 2 a e - e^2) / (1 + e)^2 with a = |bx|, e = exp(-a)
  and +- the sign of bx: one exponential, and the last operation a division, which
  XLA:CPU computes once and stores, where a cheap last operation would be
  recomputed (with the whole input) inside every consumer, as the transposed
  copy of the weight-gradient convolution.
  """
  bx, a = _sign_swish_parts(x, beta)
  e = jnp.exp(-a)
  return (jnp.where(bx < 0, -1.0, 1.0) * (1.0 + (2.0 * a - e) * e)) / jnp.square(1.0 + e)


def sign_swish_derivative(x: Array, beta) -> Array:
  """d/dx SS_beta(x) = 2 b s(1-s)(2 + bx(1-2s)) = b(2 - bx tanh(bx/2))/(1+cosh bx),

  evaluated as 2 b e (2 (1 + e) + a (e - 1)) / (1 + e)^3 with a = |bx| and
  e = h^2, h = exp(-a / 2). Not exp(-a) as in `sign_swish_map`: XLA would
  merge the two identical exponentials of BNN++'s forward and backward into
  one stored tensor (a write and two reads of every binarized activation,
  18% more bytes per ResNet-20 step) where the backward can recompute it
  from x inside its own fusion, for one vectorised exponential.
  """
  _, a = _sign_swish_parts(x, beta)
  h = jnp.exp(-0.5 * a)
  e = h * h
  return (2.0 * beta * e * (2.0 * (1.0 + e) + a * (e - 1.0))) / ((1.0 + e) * jnp.square(1.0 + e))


def fda_series_derivative(x: Array, omega, n_terms, max_terms: int | None = None) -> Array:
  """s_n'(x) = (4 omega / pi) sum_{i=0..n} cos((2i+1) omega x)  (FDA-BNN Eq. 10).

  The sum is evaluated in closed form, as a Dirichlet kernel:
  sum_{i=0..n} cos((2i+1) t) = sin(2(n+1) t) / (2 sin t), t = omega x. The
  sum flips sign every half period, so t is first reduced to
  r = t - k pi in [-pi/2, pi/2] (a factor (-1)^k), with pi split in three
  parts (Cody-Waite) so that k pi is exact for |t| < 2^15 pi: near t = k pi
  both sines are small and only an exact r keeps their ratio accurate. At
  r = 0 the value is the limit n + 1. Two sines per element whatever n is,
  where summing the n + 1 cosines costs n + 1 (19 for FDA's n = 18, on every
  activation of every binary layer), and as accurate (tested against float64
  summation). The two sines are `vsin`'s polynomials, not `jnp.sin`: XLA:CPU
  calls a scalar libm sine per element, which made this derivative 14% of a
  ResNet-20 training step (see `vsin`). n_terms may be traced, so a schedule
  never recompiles; `max_terms`, if given, caps it.
  """
  n = n_terms if max_terms is None else jnp.minimum(n_terms, max_terms)
  t = omega * x
  k, r = _reduce_pi(t)
  sin_r = _sin_reduced(r)
  at_zero = sin_r == 0
  kernel = jnp.where(at_zero, n + 1.0,
                     vsin(2.0 * (n + 1.0) * r) / (2.0 * jnp.where(at_zero, 1.0, sin_r)))
  return (4.0 * omega / math.pi) * _parity(k) * kernel


# pi = _PI_A + _PI_B + _PI_C with few significant bits in the first two parts,
# so k * _PI_A and k * _PI_B (8 and 9 significant bits) are exact in float32 for
# |k| < 2^15, and so are the two subtractions (Sterbenz).
_PI_A = 3.140625
_PI_B = 0.0009670257568359375
_PI_C = math.pi - _PI_A - _PI_B

# Minimax-fitted (relative error, then rounded to float32) on |r| <= pi/2:
# sin r = r (1 + r^2 (S1 + r^2 (S2 + ...))): 5.3e-9 relative in exact arithmetic, at most
# 2.6 ulp when evaluated in float32; cos r = 1 + r^2 (C1 + ...): 1.5e-7 absolute in float32.
_SIN_COEFFS = (-0.16666656732559204, 0.008333025500178337, -0.00019807417993433774,
               2.6019026790891076e-06)
_COS_COEFFS = (-0.4999999701976776, 0.04166660085320473, -0.0013887989334762096,
               2.4744034817558713e-05, -2.5803961989367963e-07)


def _reduce_pi(t: Array) -> tuple[Array, Array]:
  """(k, r): t = k pi + r with k integral and r in [-pi/2, pi/2] (Cody-Waite, exact r
  for |k| < 2^15 in float32)."""
  k = jnp.round(t * (1.0 / math.pi))
  return k, ((t - k * _PI_A) - k * _PI_B) - k * _PI_C


def _parity(k: Array) -> Array:
  """(-1)^k for integral float k: two multiply-adds and a floor, no remainder."""
  return 1.0 - 2.0 * (k - 2.0 * jnp.floor(0.5 * k))


def _horner(u: Array, coeffs) -> Array:
  acc = coeffs[-1]
  for c in coeffs[-2::-1]:
    acc = acc * u + c
  return acc


def _sin_reduced(r: Array) -> Array:
  """sin r for |r| <= pi/2: an odd polynomial, so exactly 0 at r = 0 and of r's sign."""
  if r.dtype == jnp.float64:
    return jnp.sin(r)
  u = r * r
  return r + r * (u * _horner(u, _SIN_COEFFS))


def _cos_reduced(r: Array) -> Array:
  if r.dtype == jnp.float64:
    return jnp.cos(r)
  u = r * r
  return 1.0 + u * _horner(u, _COS_COEFFS)


def _vsin(x: Array) -> Array:
  k, r = _reduce_pi(x)
  return _parity(k) * _sin_reduced(r)


def _vcos(x: Array) -> Array:
  k, r = _reduce_pi(x)
  return _parity(k) * _cos_reduced(r)


def _polynomial_or_exact(polynomial, exact, x: Array) -> Array:
  """polynomial(x) in float32 (16-bit inputs computed in float32, cast back);
  exact(x) for float64, where the polynomial is not accurate enough."""
  x = jnp.asarray(x)
  if x.dtype == jnp.float64:
    return exact(x)
  return polynomial(x.astype(_compute_dtype(x.dtype))).astype(x.dtype)


@jax.custom_jvp
def vsin(x: Array) -> Array:
  """sin(x) from multiplies and adds only, so XLA vectorises it; derivative `vcos`.

  XLA:CPU lowers `jnp.sin` and `jnp.cos` to a scalar libm call per element:
  13 ms for 2M float32 elements on a 2-core machine, against 1.2 ms for an
  `exp` or a multiply-add over the same array (XLA's exp and tanh are
  vectorised polynomials). This sine reduces x to r = x - k pi in
  [-pi/2, pi/2] as `fda_series_derivative` does (exact for |x| < 2^15 pi,
  about 1e5; wrong beyond about 1e6, so not for arbitrary arguments) and
  evaluates a degree-9 odd polynomial: within 3 ulp of the float64 sine of
  the float32 argument there, exactly 0 at x = 0, and odd. Computed in
  float32 for 16-bit inputs (then cast back) and with `jnp.sin` in float64.
  A product fed to it (omega x) may be contracted by XLA into the
  reduction's first multiply-add, so its value can differ by the rounding of
  that product between two compilations.
  """
  return _polynomial_or_exact(_vsin, jnp.sin, x)


@vsin.defjvp
def _vsin_jvp(primals, tangents):
  (x,), (dx,) = primals, tangents
  return vsin(x), vcos(x) * dx


@jax.custom_jvp
def vcos(x: Array) -> Array:
  """cos(x) as `vsin` (an even degree-10 polynomial after the same reduction, within
  1.5e-7 of the float64 cosine for |x| < 2^15 pi); derivative -vsin."""
  return _polynomial_or_exact(_vcos, jnp.cos, x)


@vcos.defjvp
def _vcos_jvp(primals, tangents):
  (x,), (dx,) = primals, tangents
  return vcos(x), -vsin(x) * dx



def _clip_mask(x: Array, clip, d: Array) -> Array:
  return d if clip is None else jnp.where(jnp.abs(x) <= clip, d, 0.0)


# --------------------------------------------------------------------------
# custom_vjp construction
# --------------------------------------------------------------------------


def _pair(forward: Callable, derivative: Callable, static_argnums=()):
  """Builds the custom_vjp of the pair (F, B): value F(x), gradient g * B'(x).

  `forward(x, *params)` and `derivative(x, *params)`; params after x are
  array-like (traced allowed) except those listed in `static_argnums`
  (indices into the full argument list), which must be hashable Python values.
  Parameters receive a zero cotangent.
  """
  nondiff = tuple(static_argnums)

  def f(x, *params):
    return forward(x, *params)

  f = jax.custom_vjp(f, nondiff_argnums=nondiff)

  def fwd(*args):
    return f(*args), tuple(a for i, a in enumerate(args) if i not in nondiff)

  def bwd(*args):
    static, (res, g) = args[:-2], args[-2:]
    x, dyn = res[0], list(res[1:])
    full, it_s, it_d = [], iter(static), iter(dyn)
    for i in range(1, 1 + len(static) + len(dyn)):
      full.append(next(it_s) if i in nondiff else next(it_d))
    xc = x.astype(_compute_dtype(x.dtype))
    dx = (g.astype(xc.dtype) * derivative(xc, *full)).astype(x.dtype)
    return (dx,) + (None,) * len(dyn)

  f.defvjp(fwd, bwd)
  return f


_identity_vjp = _pair(lambda x: x, lambda x: jnp.ones_like(x))
_ste_vjp = _pair(lambda x: sign(x), lambda x: jnp.ones_like(x))
_ste_clip_vjp = _pair(lambda x, clip: sign(x),
                      lambda x, clip: _clip_mask(x, clip, jnp.ones_like(x)))
_approx_sign_vjp = _pair(
    lambda x: sign(x),
    lambda x: jnp.where(jnp.abs(x) <= 1.0, 2.0 - 2.0 * jnp.abs(x), 0.0))
_sign_swish_vjp = _pair(lambda x, beta: sign(x), sign_swish_derivative)
_biper_vjp = _pair(square_wave, lambda x, w0: w0 * jnp.cos(w0 * x))
_biper_sine_vjp = _pair(lambda x, w0: jnp.sin(w0 * x.astype(_compute_dtype(x.dtype))).astype(x.dtype),
                        lambda x, w0: w0 * jnp.cos(w0 * x))

_bnn_pp_vjp = _pair(
    lambda x, beta: sign_swish_map(x.astype(_compute_dtype(x.dtype)), beta).astype(x.dtype),
    sign_swish_derivative)
_fda_vjp = _pair(
    lambda x, omega, n, max_terms: sign(x),
    lambda x, omega, n, max_terms: fda_series_derivative(x, omega, n, max_terms),
    static_argnums=(3,))
_fda_clip_vjp = _pair(
    lambda x, omega, n, clip, max_terms: sign(x),
    lambda x, omega, n, clip, max_terms: _clip_mask(
        x, clip, fda_series_derivative(x, omega, n, max_terms)),
    static_argnums=(4,))


# --------------------------------------------------------------------------
# Public functions
# --------------------------------------------------------------------------


def identity(x: Array) -> Array:
  """The full-precision twin: F(x) = x, gradient 1."""
  return _identity_vjp(_check_float("identity", x))


def ste_sign(x: Array, clip=None) -> Array:
  """sign(x) with the straight-through estimator (BinaryConnect; Larq `ste_sign`).

  Backward: identity if `clip` is None, else 1 where |x| <= clip and 0 elsewhere.
  """
  x = _check_float("ste_sign", x)
  if clip is None:
    return _ste_vjp(x)
  _check_positive("ste_sign", "clip", clip)
  return _ste_clip_vjp(x, clip)


def approx_sign(x: Array) -> Array:
  """sign(x); backward 2 - 2|x| on |x| <= 1, else 0 (Bi-Real Net ApproxSign)."""
  return _approx_sign_vjp(_check_float("approx_sign", x))


def sign_swish(x: Array, beta=5.0) -> Array:
  """sign(x); backward the SignSwish derivative SS_beta'(x) (BNN+, Darabi et al.)."""
  x = _check_float("sign_swish", x)
  _check_positive("sign_swish", "beta", beta)
  return _sign_swish_vjp(x, beta)


def fda(x: Array, omega, n_terms, clip=None, *, max_terms: int | None = None) -> Array:
  """sign(x); backward the truncated Fourier series derivative (FDA-BNN Eq. 10).

  s_n'(x) = (4 omega / pi) sum_{i=0..n_terms} cos((2i+1) omega x), i.e. the
  derivative of the n-th partial sum of sign's Fourier series with period
  2 pi / omega; zeroed outside |x| <= clip when clip is given (the BiBench
  port uses omega = 0.1, clip = 1).

  n_terms may be a traced integer (a schedule growing n from 9 to 18): the
  series is summed in closed form (`fda_series_derivative`), so the program
  compiles once for every n. `max_terms`, an optional static Python int, caps
  a traced n_terms (a concrete n_terms above it is an error).
  """
  x = _check_float("fda", x)
  _check_positive("fda", "omega", omega)
  _check_positive("fda", "clip", clip)
  max_terms = _check_n_terms(n_terms, max_terms)
  if clip is None:
    return _fda_vjp(x, omega, n_terms, max_terms)
  return _fda_clip_vjp(x, omega, n_terms, clip, max_terms)


def biper(x: Array, omega0) -> Array:
  """Binary periodic function (BiPer, Vargas et al. CVPR 2024, Eq. 4-5).

  Forward: the square wave sign(sin(omega0 x)); backward through its
  fundamental sin(omega0 x): gradient g * omega0 cos(omega0 x), unclipped.
  """
  x = _check_float("biper", x)
  _check_positive("biper", "omega0", omega0)
  return _biper_vjp(x, omega0)


def biper_sine(x: Array, omega0) -> Array:
  """BiPer stage 1: the real periodic weights sin(omega0 x), exact gradient.

  The first of BiPer's two training stages trains the latent weights through
  the fundamental sin(omega0 w) with binary activations; stage 2 switches the
  kernel quantizer to `biper` (the square wave) from stage 1's weights.
  """
  x = _check_float("biper_sine", x)
  _check_positive("biper_sine", "omega0", omega0)
  return _biper_sine_vjp(x, omega0)


def biper_regularizer(w: Array, omega0) -> Array:
  """mean(sin^2(omega0 w)): the weight regulariser of the public BiPer code.

  The reference training loop adds tau * mean(0.5 - 0.5 cos(2 omega0 W)) =
  tau * mean(sin^2(omega0 W)) per binarized layer to the loss, with tau
  constant within a stage (0.037 in stage 1, 0.0468 in stage 2 of its
  CIFAR-10 scripts); the paper does not describe it. Minimising it pulls
  latent weights toward the zeros of sin(omega0 w), the switching points of
  the square wave. The trainer multiplies it by config.regularizer_tau.
  """
  return jnp.mean(jnp.square(jnp.sin(omega0 * w.astype(_compute_dtype(w.dtype)))))


def bnn_pp(x: Array, beta) -> Array:
  """BNN++ (ProxConnect++, Lu et al. NeurIPS 2023): SS_beta forward and backward.

  Reading of the paper: PC++ requires the forward quantizer to be a proximal
  map composed with the backward one, F = P o B. BNN++ takes B = the
  SignSwish map SS_beta and applies it in the forward pass too, so during
  training the network sees the smooth SS_beta(x) (values in [-1.2, 1.2]:
  its extrema are +-1.19968), and anneals beta upward over training so that
  SS_beta -> sign pointwise. The gradient is SS_beta'(x). Training output is therefore not
  binary; the deployed network uses sign (`Quantizer.binarize`), the limit
  beta -> inf. beta may be traced, so an annealing schedule never recompiles.
  """
  x = _check_float("bnn_pp", x)
  _check_positive("bnn_pp", "beta", beta)
  return _bnn_pp_vjp(x, beta)


# --------------------------------------------------------------------------
# Registry
# --------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class _Spec:
  fn: Callable
  defaults: Mapping[str, Any]          # every parameter with its default
  deploy: Callable[..., Array]  # exact forward used at inference, no custom gradient
  binary: bool = True  # whether `deploy` takes exactly two values
  schedulable: frozenset = frozenset()  # parameters a schedule may pass per call
  doc: str = ""
  regularizer: Callable[..., Array] | None = None  # r(w, **params), per binarized kernel


_REGISTRY: dict[str, _Spec] = {
    "identity": _Spec(identity, {}, lambda x: x, binary=False, doc="full precision"),
    "ste": _Spec(ste_sign, {"clip": None}, lambda x, **_: sign(x),
                 doc="sign, straight-through (optionally clipped)"),
    "approx_sign": _Spec(approx_sign, {}, lambda x, **_: sign(x),
                         doc="sign, Bi-Real ApproxSign backward"),
    "sign_swish": _Spec(sign_swish, {"beta": 5.0}, lambda x, **_: sign(x),
                        doc="sign, SignSwish backward (BNN+)"),
    "fda": _Spec(fda, {"omega": 0.1, "n_terms": 9, "clip": 1.0, "max_terms": None},
                 lambda x, **_: sign(x), schedulable=frozenset({"n_terms"}),
                 doc="sign, Fourier-series backward (FDA)"),
    "biper": _Spec(biper, {"omega0": 20.0},
                   lambda x, omega0, **_: square_wave(x, omega0),
                   doc="square wave sign(sin(w0 x)), sin backward (BiPer)",
                   regularizer=biper_regularizer),
    "biper_sine": _Spec(biper_sine, {"omega0": 20.0},
                        lambda x, omega0: jnp.sin(omega0 * x.astype(_compute_dtype(x.dtype))
                                                  ).astype(x.dtype),
                        binary=False,
                        doc="real weights sin(w0 x): BiPer stage 1",
                        regularizer=biper_regularizer),
    "bnn_pp": _Spec(bnn_pp, {"beta": 5.0}, lambda x, **_: sign(x),
                    schedulable=frozenset({"beta"}),
                    doc="SignSwish forward and backward, annealed to sign (BNN++)"),
}

NAMES: tuple[str, ...] = tuple(_REGISTRY)


@dataclasses.dataclass(frozen=True)
class Quantizer:
  """A registered binarizer with its parameters bound.

  `q(x)` is the training forward with the custom gradient; schedulable
  parameters (FDA `n_terms`, BNN++ `beta`) may be overridden per call with
  traced values, `q(x, n_terms=n)`. `q.binarize(x)` is the exact deployed
  forward (no custom gradient), e.g. sign(x) for BNN++. `q.config()` is a
  plain dict that `get(**config)` turns back into an equal quantizer, so a
  checkpoint carries the values it was trained with.
  """
  name: str
  params: tuple[tuple[str, Any], ...]

  @property
  def kwargs(self) -> dict[str, Any]:
    return dict(self.params)

  @property
  def is_binary(self) -> bool:
    """Whether the deployed forward has exactly two values."""
    return _REGISTRY[self.name].binary

  @property
  def schedulable(self) -> frozenset:
    return _REGISTRY[self.name].schedulable

  def __call__(self, x: Array, **overrides) -> Array:
    bad = set(overrides) - self.schedulable
    if bad:
      raise ValueError(f"quantizer {self.name!r}: cannot override {sorted(bad)} per call; "
                       f"schedulable parameters are {sorted(self.schedulable)}")
    kw = self.kwargs
    kw.update(overrides)
    return _REGISTRY[self.name].fn(x, **kw)

  def scheduled(self, values: Mapping[str, Any] | None) -> dict[str, Any]:
    """The entries of a schedule-values mapping that this quantizer consumes."""
    if not values:
      return {}
    return {k: v for k, v in values.items() if k in self.schedulable}

  def binarize(self, x: Array) -> Array:
    """The exact deployed forward: two values for binary quantizers."""
    return _REGISTRY[self.name].deploy(_check_float(self.name, x), **self.kwargs)

  def regularizer(self, w: Array) -> Array | None:
    """The method's own weight regulariser of a latent kernel, or None."""
    reg = _REGISTRY[self.name].regularizer
    return None if reg is None else reg(w, **self.kwargs)

  def config(self) -> dict[str, Any]:
    return {"name": self.name, **self.kwargs}


@dataclasses.dataclass(frozen=True)
class CallableQuantizer:
  """A user's own function used as a quantizer: same forward in training and
  evaluation (its own gradient), no schedulable parameters. It cannot be saved
  in a config: register a named pair to make a model restorable."""
  fn: Callable[[Array], Array]
  is_binary: bool = True
  schedulable: frozenset = frozenset()

  @property
  def name(self) -> str:
    return getattr(self.fn, "__name__", repr(self.fn))

  def __call__(self, x: Array) -> Array:
    return self.fn(x)

  binarize = __call__

  def scheduled(self, values) -> dict[str, Any]:
    return {}

  def regularizer(self, w: Array) -> None:
    return None

  def config(self) -> dict[str, Any]:
    raise ValueError(f"quantizer {self.name!r} is a Python callable and cannot be saved; "
                     f"use a registered name: {list(NAMES)}")


def get(name: str | Mapping[str, Any] | Quantizer | Callable, **params) -> Quantizer:
  """Returns the named quantizer with `params` bound (defaults for the rest).

  `name` may also be a config mapping {'name': ..., **params} (as saved by
  `Quantizer.config()`) or a `Quantizer`, returned unchanged. Raises
  ValueError for an unknown name or parameter, or a bad parameter value. A
  plain callable is wrapped as a `CallableQuantizer`.
  """
  if isinstance(name, (Quantizer, CallableQuantizer)):
    if params:
      raise ValueError(f"get: a Quantizer was given together with parameters {sorted(params)}")
    return name
  if isinstance(name, Mapping):
    cfg = dict(name)
    if "name" not in cfg:
      raise ValueError(f"get: quantizer config {cfg!r} has no 'name'; allowed names: {list(NAMES)}")
    name = cfg.pop("name")
    params = {**cfg, **params}
  elif callable(name):
    if params:
      raise ValueError(f"get: a callable quantizer takes no parameters, got {sorted(params)}")
    return CallableQuantizer(name)
  if name not in _REGISTRY:
    raise ValueError(f"unknown quantizer {name!r}; allowed names: {list(NAMES)}")
  spec = _REGISTRY[name]
  bad = set(params) - set(spec.defaults)
  if bad:
    raise ValueError(f"quantizer {name!r} takes no parameter {sorted(bad)}; "
                     f"allowed: {sorted(spec.defaults) or 'none'}")
  kw = {**spec.defaults, **params}
  kw = {k: (float(v) if isinstance(v, (int, float)) and not isinstance(v, bool)
            and k not in ("n_terms", "max_terms") else v) for k, v in kw.items()}
  q = Quantizer(name, tuple(sorted(kw.items())))
  # Validate every parameter now, on a tiny input, before any work starts.
  q(jnp.zeros((1,), jnp.float32))
  return q
