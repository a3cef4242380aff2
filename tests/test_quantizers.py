"""Tests of `fda_biper_jax.quantizers`: forward values, custom gradients, transforms.

Every reference below is computed independently of the module, in float64
numpy, from the formulas of the module docstring (and of the papers):

  ste          sign(x);            backward 1, or 1[|x| <= clip]
  approx_sign  sign(x);            backward (2 - 2|x|) 1[|x| <= 1]
  sign_swish   sign(x);            backward b (2 - bx tanh(bx/2)) / (1 + cosh(bx))  (BNN+ form)
  fda          sign(x);            backward (4w/pi) sum_{i=0..n} cos((2i+1) w x) [1[|x| <= clip]]
  biper        sign(sin(w0 x));    backward w0 cos(w0 x)
  biper_sine   sin(w0 x);          backward w0 cos(w0 x)
  bnn_pp       SS_b(x);            backward SS_b'(x), SS_b(x) = 2 s (1 + bx (1 - s)) - 1, s = sigmoid(bx)
  identity     x;                  backward 1

with sign(0) = +1. Float tolerances: the module evaluates surrogate derivatives
in float32 (then casts to the input dtype), so a float32 result may differ from
the float64 formula by (a) float32 evaluation error, a small multiple of eps32
times the derivative's amplitude, and (b) the float32 rounding of the phase
w*x (or beta*x) fed to cos/sigmoid, whose effect is bounded here by
(amplitude of d/dphase) * |phase_f32 - phase_f64|, with the float32 phase
computed in numpy exactly as IEEE float32 arithmetic rounds it. Grid points at
large |x| (+-50, +-1e4, ...) are chosen so those phases are exact, so (b)
vanishes there. A bfloat16/float16 result may differ from the reference cast to
that dtype by one ulp of the dtype on top of that.

Conftest gives 8 fake CPU devices, used by chex's with_pmap variant and by
the shard_map tests.
"""

from __future__ import annotations

import dataclasses
import functools
import itertools
import json
import math
import re
from typing import Callable, Optional

from absl.testing import absltest
from absl.testing import parameterized
import chex
import jax
from jax.sharding import PartitionSpec as P
import jax.numpy as jnp
from jax.test_util import check_grads
import numpy as np

from fda_biper_jax import quantizers
from fda_biper_jax.methods import schedule

F32, BF16, F16 = jnp.float32, jnp.bfloat16, jnp.float16
DTYPES = (F32, BF16, F16)
DTYPE_PARAMS = [dict(testcase_name=jnp.dtype(d).name, dtype=d) for d in DTYPES]


# --------------------------------------------------------------------------
# float64 references
# --------------------------------------------------------------------------


def _np(a) -> np.ndarray:
  """Any array (jax, numpy, bfloat16) -> float64 numpy."""
  return np.asarray(a).astype(np.float64)


def _np_dtype(dtype) -> np.dtype:
  return jnp.dtype(dtype)  # numpy dtype (ml_dtypes for bfloat16)


def sign64(x):
  return np.where(x >= 0, 1.0, -1.0)


def ss64(x, b):
  """SS_b(x) = 2 sigmoid(bx)(1 + bx(1 - sigmoid(bx))) - 1, overflow-free sigmoid."""
  t = b * x
  s = 0.5 * (1.0 + np.tanh(0.5 * t))
  return 2.0 * s * (1.0 + t * (1.0 - s)) - 1.0


def ss_prime64(x, b):
  """BNN+'s form b (2 - bx tanh(bx/2)) / (1 + cosh(bx)) (0 where cosh overflows)."""
  t = b * x
  with np.errstate(over="ignore"):
    return b * (2.0 - t * np.tanh(0.5 * t)) / (1.0 + np.cosh(t))


def fda_prime64(x, w, n, clip=None):
  d = (4.0 * w / math.pi) * sum(np.cos((2 * i + 1) * w * x) for i in range(n + 1))
  return d if clip is None else np.where(np.abs(x) <= clip, d, 0.0)


def approx_sign_prime64(x):
  return np.where(np.abs(x) <= 1.0, 2.0 - 2.0 * np.abs(x), 0.0)


def ede_prime64(x, t):
  """IR-Net's EDE: k t (1 - tanh^2(t x)), k = max(1/t, 1)."""
  return max(1.0 / t, 1.0) * t * (1.0 - np.tanh(t * x) ** 2)


def reste_prime64(x, t, o):
  """ReSTE's backward as its public code writes it, mask by mask."""
  out = np.zeros_like(x)
  interval = 0.1
  m1 = (x <= t) & (x > interval)
  out[m1] = (1 / o) * np.power(x[m1], (1 - o) / o)
  m2 = (x >= -t) & (x < -interval)
  out[m2] = (1 / o) * np.power(-x[m2], (1 - o) / o)
  out[(x <= interval) & (x >= 0)] = math.pow(interval, 1 / o) / interval
  out[(x <= 0) & (x >= -interval)] = math.pow(interval, 1 / o) / interval
  return out


def _phase_error(x64, w, k=1):
  """Float32 error of the phase k w x: |fl32(k * fl32(fl32(w) * x)) - k w x|, or
  k |fl32(w) x - w x| when XLA contracts the product into an FMA (no rounding of
  w x, only of w itself); the larger of the two."""
  with np.errstate(over="ignore", invalid="ignore"):
    x32 = x64.astype(np.float32)
    wx32 = np.float32(w) * x32
    p32 = wx32 if k == 1 else np.float32(k) * wx32
    rounded = np.abs(p32.astype(np.float64) - k * w * x64)
    contracted = k * np.abs(float(np.float32(w)) * x32.astype(np.float64) - w * x64)
    err = np.maximum(rounded, contracted)
  return np.where(np.isfinite(err), err, np.inf)


# --------------------------------------------------------------------------
# The quantizers under test, each with its independent reference
# --------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class Case:
  name: str
  fn: Callable[[jax.Array], jax.Array]  # the quantizer, parameters bound
  forward: str  # 'identity' | 'sign' | 'square' | 'smooth'
  deriv64: Callable[[np.ndarray], np.ndarray]  # backward rule, float64
  amp: float  # max |backward rule|
  surrogate: Callable[[jax.Array], jax.Array]  # primitive whose derivative is the rule
  kinks: tuple = ()  # non-differentiable points of the surrogate
  clip: Optional[float] = None
  phase_slack: Callable[[np.ndarray], np.ndarray] = lambda x: np.zeros_like(x)
  fwd64: Optional[Callable[[np.ndarray], np.ndarray]] = None  # smooth forward, float64
  binary: bool = True  # forward takes exactly the values +-1


def _ss_jnp(x, b):
  t = b * x
  s = jax.nn.sigmoid(t)
  return 2.0 * s * (1.0 + t * (1.0 - s)) - 1.0


def _fda_series(x, w, n):
  """s_n(x) = 4/pi sum_{i=0..n} sin((2i+1) w x)/(2i+1), whose derivative is FDA's rule."""
  return (4.0 / math.pi) * sum(jnp.sin((2 * i + 1) * w * x) / (2 * i + 1) for i in range(n + 1))


def _approx_sign_primitive(x):
  y = jnp.clip(x, -1.0, 1.0)
  return 2.0 * y - y * jnp.abs(y)


def _reste_primitive(x, t, o):
  """sign(x) min(|x|, t)^(1/o), linear (the secant) on |x| <= 0.1."""
  a = jnp.abs(x)
  inside = (0.1 ** (1 / o) / 0.1) * x
  return jnp.where(a <= 0.1, inside, jnp.sign(x) * jnp.minimum(a, t) ** (1 / o))


def _fda_slack(w, n):
  def slack(x64):
    return (4.0 * w / math.pi) * sum(_phase_error(x64, w, 2 * i + 1) for i in range(n + 1))

  return slack


def _ss_slack(b):
  # |d SS_b'(x) / d(bx)| <= 2b; beyond |bx| = 60 the derivative is < 1e-20.
  def slack(x64):
    return 2.0 * b * np.where(np.abs(b * x64) < 60, _phase_error(x64, b), 0.0)

  return slack


def _make_cases():
  w_fda, n_fda = 0.1, 9  # BiBench's omega, FDA's starting n
  w_fdc, n_fdc, c_fdc = 0.5, 4, 2.0
  w0, beta = 20.0, 5.0
  ste_clip = 0.5
  t_early, t_late = 0.5, 3.0
  reste_t, reste_o = 1.5, 2.0
  cases = [
      Case(
          "identity",
          quantizers.identity,
          "identity",
          lambda x: np.ones_like(x),
          1.0,
          lambda x: x,
          binary=False,
      ),
      Case("ste", quantizers.ste_sign, "sign", lambda x: np.ones_like(x), 1.0, lambda x: x),
      Case(
          "ste_clip",
          functools.partial(quantizers.ste_sign, clip=ste_clip),
          "sign",
          lambda x: (np.abs(x) <= ste_clip).astype(np.float64),
          1.0,
          lambda x: jnp.clip(x, -ste_clip, ste_clip),
          kinks=(-ste_clip, ste_clip),
          clip=ste_clip,
      ),
      Case(
          "approx_sign",
          quantizers.approx_sign,
          "sign",
          approx_sign_prime64,
          2.0,
          _approx_sign_primitive,
          kinks=(-1.0, 0.0, 1.0),
      ),
      Case(
          "sign_swish",
          functools.partial(quantizers.sign_swish, beta=beta),
          "sign",
          lambda x: ss_prime64(x, beta),
          beta,
          lambda x: _ss_jnp(x, beta),
          phase_slack=_ss_slack(beta),
      ),
      Case(
          "fda",
          lambda x: quantizers.fda(x, w_fda, n_fda),
          "sign",
          lambda x: fda_prime64(x, w_fda, n_fda),
          4 * w_fda / math.pi * (n_fda + 1),
          lambda x: _fda_series(x, w_fda, n_fda),
          phase_slack=_fda_slack(w_fda, n_fda),
      ),
      Case(
          "fda_clip",
          lambda x: quantizers.fda(x, w_fdc, n_fdc, clip=c_fdc),
          "sign",
          lambda x: fda_prime64(x, w_fdc, n_fdc, c_fdc),
          4 * w_fdc / math.pi * (n_fdc + 1),
          lambda x: _fda_series(jnp.clip(x, -c_fdc, c_fdc), w_fdc, n_fdc),
          kinks=(-c_fdc, c_fdc),
          clip=c_fdc,
          phase_slack=_fda_slack(w_fdc, n_fdc),
      ),
      Case(
          "biper",
          lambda x: quantizers.biper(x, w0),
          "square",
          lambda x: w0 * np.cos(w0 * x),
          w0,
          lambda x: jnp.sin(w0 * x),
          phase_slack=lambda x: w0 * _phase_error(x, w0),
      ),
      Case(
          "biper_sine",
          lambda x: quantizers.biper_sine(x, w0),
          "smooth",
          lambda x: w0 * np.cos(w0 * x),
          w0,
          lambda x: jnp.sin(w0 * x),
          phase_slack=lambda x: w0 * _phase_error(x, w0),
          fwd64=lambda x: np.sin(w0 * x),
          binary=False,
      ),
      Case(
          "bnn_pp",
          lambda x: quantizers.bnn_pp(x, beta),
          "smooth",
          lambda x: ss_prime64(x, beta),
          beta,
          lambda x: _ss_jnp(x, beta),
          phase_slack=_ss_slack(beta),
          fwd64=lambda x: ss64(x, beta),
          binary=False,
      ),
      # IR-Net early (t < 1: k = 1/t, an STE-like 1 - tanh^2) and late (t > 1: k = 1).
      Case(
          "ir_net_early",
          lambda x: quantizers.ir_net(x, t_early),
          "sign",
          lambda x: ede_prime64(x, t_early),
          1.0,
          lambda x: jnp.tanh(t_early * x) / t_early,
      ),
      Case(
          "ir_net_late",
          lambda x: quantizers.ir_net(x, t_late),
          "sign",
          lambda x: ede_prime64(x, t_late),
          t_late,
          lambda x: jnp.tanh(t_late * x),
      ),
      Case(
          "reste",
          lambda x: quantizers.reste(x, reste_t, reste_o),
          "sign",
          lambda x: reste_prime64(x, reste_t, reste_o),
          0.1 ** (1 / reste_o) / 0.1,
          lambda x: _reste_primitive(x, reste_t, reste_o),
          kinks=(-reste_t, -0.1, 0.1, reste_t),
          clip=reste_t,
      ),
      # RSign at threshold 0 is ApproxSign; thresholds are tested in test_methods.py.
      Case(
          "rsign",
          quantizers.rsign,
          "sign",
          approx_sign_prime64,
          2.0,
          _approx_sign_primitive,
          kinks=(-1.0, 0.0, 1.0),
      ),
  ]
  return {c.name: c for c in cases}


CASES = _make_cases()
CASE_PARAMS = [dict(testcase_name=n, case=n) for n in CASES]
SIGN_FORWARD = ("ste", "ste_clip", "approx_sign", "sign_swish", "fda", "fda_clip", "biper",
                "ir_net_early", "ir_net_late", "reste", "rsign")
BINARY_NAMES = ("ste", "approx_sign", "sign_swish", "fda", "biper", "bnn_pp", "ir_net", "reste",
                "rsign")


# --------------------------------------------------------------------------
# Input grids
# --------------------------------------------------------------------------


def _nextafter(v, toward, dtype):
  return float(jnp.nextafter(jnp.asarray(v, dtype), jnp.asarray(toward, dtype)).astype(F32))


GRID = 48  # every 1-D grid has this length, so compiled programs are shared between tests


def _pad(pts, dtype, negative_zero=False) -> np.ndarray:
  """pts and their negatives, padded to GRID with seeded values in [-3, 3]."""
  pts = sorted(set(pts))
  pts = pts + [-p for p in pts if p != 0 or negative_zero]
  assert len(pts) <= GRID, len(pts)
  fill = np.random.default_rng(0).uniform(-3, 3, GRID - len(pts))
  return np.concatenate([np.asarray(pts, np.float64), fill]).astype(_np_dtype(dtype))


def backward_grid(case: Case, dtype) -> np.ndarray:
  """0, +-1, +-clip, just inside/outside 1 and clip, +-50, +-1e4, a few others."""
  pts = [
      0.0,
      1.0,
      _nextafter(1, 0, dtype),
      _nextafter(1, 2, dtype),
      50.0,
      1e4,
      0.3,
      0.7,
      2.5,
      3.25,
      0.0625,
  ]
  if case.clip is not None:
    c = case.clip
    pts += [c, _nextafter(c, 0, dtype), _nextafter(c, 2 * c, dtype)]
  return _pad(pts, dtype)


def forward_grid(dtype, moderate_only=False) -> np.ndarray:
  """Zero (+0.0 and -0.0), huge and tiny magnitudes (normal, subnormal), ordinary values."""
  fi = jnp.finfo(dtype)
  pts = [0.0, 1.0, 0.5, 0.3, 0.7, 2.5, 1e-3, 3.0]
  if not moderate_only:
    pts += [6400.0, 1e4, float(fi.max), float(fi.tiny), float(fi.smallest_subnormal)]
    if dtype != F16:  # 1e-30 and 1e30 are representable in float32 and bfloat16
      pts += [1e-30, 1e30]
  return _pad(pts, dtype, negative_zero=True)


def _subnormals(x: np.ndarray, dtype) -> np.ndarray:
  x64 = _np(x)
  return (x64 != 0) & (np.abs(x64) < float(jnp.finfo(dtype).tiny))


def _negative_subnormals(x: np.ndarray, dtype) -> np.ndarray:
  return _subnormals(x, dtype) & (_np(x) < 0)


# --------------------------------------------------------------------------
# Assertions against the references
# --------------------------------------------------------------------------


def _base_tol(dtype) -> float:
  """Relative rounding of the result cast to `dtype` (1 ulp) and float32 evaluation."""
  return float(jnp.finfo(dtype).eps) if dtype != F32 else 4e-7


class QuantizerTestCase(chex.TestCase):

  def setUp(self):
    super().setUp()
    chex.clear_trace_counter()

  # ---- forward

  def assert_forward(self, case: Case, x: np.ndarray, y, dtype, smooth_ulps: float = 2.0):
    """Checks dtype, shape and values of q(x) against the float64 reference."""
    y_np = np.asarray(y)
    self.assertEqual(y_np.dtype, _np_dtype(dtype))
    self.assertEqual(y_np.shape, np.shape(x))
    x64, y64 = _np(x).ravel(), _np(y_np).ravel()
    if case.forward == "identity":
      # Exact, except that XLA:CPU may flush a subnormal to zero of the same sign (DAZ/FTZ;
      # seen under pmap on CPUs with AVX512-BF16 / AMX).
      flushed = _subnormals(x64, dtype) & (y64 == 0) & (np.signbit(y64) == np.signbit(x64))
      np.testing.assert_array_equal(y64[~flushed], x64[~flushed], err_msg=f"identity {dtype}")
      return
    if case.forward in ("sign", "square"):
      self.assert_two_values(y64, x64)
      if case.forward == "sign":
        ref = sign64(x64)
        # XLA:CPU treats subnormals as zero (DAZ), so -subnormal compares as -0 >= 0 and
        # maps to +1 in float32/bfloat16; any value of +-1 is binary and acceptable there.
        keep = ~_negative_subnormals(x64, dtype)
      else:
        w0 = 20.0
        with np.errstate(over="ignore", invalid="ignore"):
          s = np.sin(w0 * x64)
          ref = sign64(s)
          # away from zero crossings, where float32 phase rounding cannot flip the sign
          keep = np.abs(s) > 2 * _phase_error(x64, w0) + 1e-5
      np.testing.assert_array_equal(y64[keep], ref[keep], err_msg=f"{case.name} {dtype}")
      return
    ref = case.fwd64(x64)
    ref_cast = _np(ref.astype(_np_dtype(dtype)))
    eps = float(jnp.finfo(dtype).eps)
    tol = smooth_ulps * eps * np.maximum(np.abs(ref), 1.0) + 2 * case.phase_slack(x64) / case.amp
    if dtype == F32:
      tol = tol + 1e-5
    err = np.abs(y64 - ref_cast)
    self.assertTrue(
        np.all(err <= tol),
        f"{case.name} {dtype}: max err {np.max(err - tol)} over tol at "
        f"x={x64[np.argmax(err - tol)]}: got {y64[np.argmax(err - tol)]}, "
        f"want {ref_cast[np.argmax(err - tol)]}",
    )

  def assert_two_values(self, y64, x64=None):
    """Values in {-1, +1}; both of them whenever x has both signs (or x is not given)."""
    both = x64 is None or (np.any(_np(x64) < -1e-3) and np.any(_np(x64) >= 0))
    want = np.array([-1.0, 1.0])
    if both:
      np.testing.assert_array_equal(np.unique(y64), want, err_msg=f"not exactly +-1 for x={x64}")
    else:
      self.assertTrue(np.isin(np.unique(y64), want).all(), f"not +-1: {np.unique(y64)}")

  # ---- backward

  def assert_backward(self, case: Case, x: np.ndarray, cot: np.ndarray, g, dtype):
    """g must be cot * rule(x), the rule evaluated in float64 and cast to dtype."""
    g_np = np.asarray(g)
    self.assertEqual(g_np.dtype, _np_dtype(dtype))
    self.assertEqual(g_np.shape, np.shape(x))
    x64, c64, g64 = _np(x).ravel(), _np(cot).ravel(), _np(g_np).ravel()
    ref = c64 * case.deriv64(x64)
    ref_cast = _np(ref.astype(_np_dtype(dtype)))
    tol = _base_tol(dtype) * np.abs(ref) + np.abs(c64) * (
        1e-5 * case.amp + 2 * case.phase_slack(x64)
    )
    err = np.abs(g64 - ref_cast)
    bad = ~(err <= tol)
    self.assertFalse(
        np.any(bad),
        f"{case.name} {jnp.dtype(dtype).name}: gradient differs from cot*rule at "
        f"x={x64[bad]}: got {g64[bad]}, want {ref_cast[bad]} (tol {tol[bad]})",
    )


def _cot_like(x: np.ndarray, seed=0) -> np.ndarray:
  rng = np.random.default_rng(seed)
  c = rng.uniform(0.5, 2.0, np.shape(x)) * rng.choice([-1.0, 1.0], np.shape(x))
  return np.asarray(c, dtype=np.asarray(x).dtype)


def _value_and_grad(q):
  """x, cot -> (q(x), grad of sum(q(x) * cot))."""

  def f(x, cot):
    return q(x), jax.grad(lambda x: jnp.sum(q(x) * cot))(x)

  return f


# --------------------------------------------------------------------------
# 1. chex variants: forward values, dtype and shape (and gradients) for every quantizer
# --------------------------------------------------------------------------


class VariantsTest(QuantizerTestCase):

  @chex.all_variants
  @parameterized.named_parameters(*CASE_PARAMS)
  def test_forward_dtype_shape_values(self, case):
    c = CASES[case]
    vg = _value_and_grad(c.fn)
    # biper_sine stays on moderate inputs: sin of an overflowed float32 phase (20 x at
    # bfloat16 max) is nan, and no finite answer is meaningful there.
    xs = [forward_grid(d, moderate_only=(case == "biper_sine")) for d in DTYPES]
    xs.append(backward_grid(c, F32))  # and the backward rule on its grid
    cots = [_cot_like(x, i) for i, x in enumerate(xs)]
    # one program for all dtypes; with_pmap broadcasts every input to the 8 devices
    outs = self.variant(lambda xs, cots: [vg(x, t) for x, t in zip(xs, cots)])(xs, cots)
    for dtype, x, cot, (y, g) in zip(DTYPES, xs, cots, outs):
      self.assert_forward(c, x, y, dtype)
      self.assertEqual(np.asarray(g).dtype, _np_dtype(dtype))
      self.assertEqual(np.shape(g), x.shape)
      if case in ("bnn_pp", "biper_sine", "identity"):  # grids without overflowing rules
        self.assert_backward(c, x, cot, g, dtype)
    self.assert_backward(c, xs[-1], cots[-1], outs[-1][1], F32)

  @chex.all_variants
  def test_binarize_two_values(self):
    xs = [forward_grid(d, moderate_only=True) for d in DTYPES]
    qs = {name: quantizers.get(name) for name in quantizers.NAMES}
    outs = self.variant(lambda xs: {n: [q.binarize(x) for x in xs] for n, q in qs.items()})(xs)
    for (name, q), dtype in itertools.product(qs.items(), range(len(DTYPES))):
      x, y, dtype = xs[dtype], np.asarray(outs[name][dtype]), DTYPES[dtype]
      self.assertEqual(y.dtype, _np_dtype(dtype))
      self.assertEqual(y.shape, x.shape)
      if name == "identity":
        np.testing.assert_array_equal(y, x)
      elif name == "biper_sine":
        self.assertFalse(q.is_binary)
        np.testing.assert_allclose(
            _np(y), np.sin(20.0 * _np(x)), atol=2 * float(jnp.finfo(dtype).eps) + 1e-5
        )
      else:
        self.assertIn(name, BINARY_NAMES)
        self.assertTrue(q.is_binary)
        self.assert_two_values(_np(y), x)
        ref = np.where(np.sin(20.0 * _np(x)) >= 0, 1.0, -1.0) if name == "biper" else sign64(_np(x))
        np.testing.assert_array_equal(_np(y), ref, err_msg=f"{name} {dtype}")


# --------------------------------------------------------------------------
# 2. Forward values
# --------------------------------------------------------------------------


class ForwardTest(QuantizerTestCase):

  @parameterized.named_parameters(*DTYPE_PARAMS)
  def test_sign_forward_exactly_two_values(self, dtype):
    rng = np.random.default_rng(0)
    grid = forward_grid(dtype)
    self.assertEqual(np.sum(_np(grid) == 0), 2)  # +0.0 and -0.0
    # ... and random inputs over eight decades
    randoms = [
        np.asarray(rng.normal(size=GRID) * 10 ** rng.uniform(-4, 4, GRID), _np_dtype(dtype))
        for _ in range(3)
    ]
    fi = jnp.finfo(dtype)
    extremes = [1e4, 6400.0, float(fi.max)] + ([1e-30, 1e30] if dtype != F16 else [])
    ext = np.asarray(extremes + [-v for v in extremes], _np_dtype(dtype))
    for name in SIGN_FORWARD:
      c = CASES[name]
      for x in [grid] + randoms:
        self.assert_forward(c, x, c.fn(x), dtype)
      y64 = _np(c.fn(grid))
      self.assertEqual(y64[_np(grid) == 0].tolist(), [1.0, 1.0])  # +0.0 and -0.0 -> +1
      if c.forward == "sign":
        np.testing.assert_array_equal(_np(c.fn(ext)), sign64(_np(ext)))

  def test_biper_equals_float64_square_wave(self):
    rng = np.random.default_rng(1)
    x = np.concatenate(
        [rng.uniform(-5, 5, 4000), rng.uniform(-300, 300, 1000), [0.0, 1e4, -1e4, 50.0, -50.0]]
    ).astype(np.float32)
    for w0 in (1.0, 20.0, 30.0):
      y = _np(jax.jit(quantizers.biper)(x, w0))
      x64 = _np(x)
      s = np.sin(w0 * x64)
      ref = np.where(s >= 0, 1.0, -1.0)
      keep = np.abs(s) > 2 * _phase_error(x64, w0) + 1e-5
      self.assertGreater(keep.mean(), 0.99)
      self.assertTrue(keep[-4:].all())  # +-1e4, +-50: exact float32 phases
      np.testing.assert_array_equal(y[keep], ref[keep])
      self.assertEqual(y[-5], 1.0)  # sign(sin(0)) = +1
      self.assert_two_values(y)

  @parameterized.named_parameters(*DTYPE_PARAMS)
  def test_bnn_pp_forward_equals_sign_swish_map(self, dtype):
    x64 = np.linspace(-3, 3, 601)
    x = x64.astype(_np_dtype(dtype))
    for beta in (1.0, 5.0, 20.0):
      c = dataclasses.replace(
          CASES["bnn_pp"],
          fn=lambda x: quantizers.bnn_pp(x, beta),
          fwd64=lambda x: ss64(x, beta),
          amp=beta,
          phase_slack=_ss_slack(beta),
      )
      self.assert_forward(c, x, quantizers.bnn_pp(x, beta), dtype)
      # ... and the module's own map agrees with the reference too
      np.testing.assert_allclose(
          _np(quantizers.sign_swish_map(x64.astype(np.float32), beta)),
          ss64(_np(x64.astype(np.float32)), beta),
          atol=1e-5,
      )

  def test_bnn_pp_tends_to_sign(self):
    x = np.concatenate(
        [np.linspace(-5, -0.01, 500), np.linspace(0.01, 5, 500), [1e4, -1e4, 1e30, -1e30]]
    ).astype(np.float32)
    y = _np(quantizers.bnn_pp(x, 1e4))
    np.testing.assert_allclose(y, sign64(_np(x)), rtol=0, atol=1e-6)
    # the distance to sign shrinks as beta grows (away from 0)
    far = np.abs(x) >= 0.5
    dist = [
        np.max(np.abs(_np(quantizers.bnn_pp(x, b))[far] - sign64(_np(x))[far]))
        for b in (1.0, 5.0, 20.0, 100.0)
    ]
    self.assertGreater(dist[0], 0.1)
    self.assertTrue(all(a > b for a, b in zip(dist, dist[1:])), dist)
    self.assertLess(dist[-1], 1e-6)
    # the training forward is not binary, and it is odd and bounded by max SS = 1.19968
    # (at beta x = 2.3994; the module docstring's "about (-1.1, 1.1)" understates it)
    y5 = _np(quantizers.bnn_pp(x[:1000], 5.0))
    self.assertGreater(len(np.unique(y5)), 10)
    self.assertLess(np.max(np.abs(y5)), np.max(ss64(np.linspace(0, 5, 100001), 1.0)) + 1e-6)
    np.testing.assert_allclose(y5, -y5[::-1], atol=1e-5)

  def test_identity_returns_x(self):
    for dtype in DTYPES:
      x = forward_grid(dtype)
      y = quantizers.identity(x)
      self.assertEqual(y.dtype, _np_dtype(dtype))
      np.testing.assert_array_equal(_np(y), _np(x))
      np.testing.assert_array_equal(_np(quantizers.get("identity").binarize(x)), _np(x))


# --------------------------------------------------------------------------
# 3. Backward equals the analytic rule times the cotangent
# --------------------------------------------------------------------------


class BackwardTest(QuantizerTestCase):

  @parameterized.named_parameters(
      *[
          dict(testcase_name=f"{n}_{jnp.dtype(d).name}", case=n, dtype=d)
          for n, d in itertools.product(CASES, DTYPES)
      ]
  )
  def test_grad_and_vjp_equal_rule(self, case, dtype):
    c = CASES[case]
    x = backward_grid(c, dtype)
    cot = _cot_like(x, 2)
    g = jax.grad(lambda x: jnp.sum(c.fn(x) * cot))(x)
    self.assert_backward(c, x, cot, g, dtype)
    # vjp: the same cotangent-times-rule, and the primal is the forward
    y, vjp_fn = jax.vjp(c.fn, jnp.asarray(x))
    (g_vjp,) = vjp_fn(jnp.asarray(cot))
    self.assert_backward(c, x, cot, g_vjp, dtype)
    np.testing.assert_array_equal(_np(y), _np(c.fn(x)))
    # a unit cotangent gives the rule itself (not a constant multiple of it)
    ones = np.ones_like(x)
    self.assert_backward(c, x, ones, jax.grad(lambda x: jnp.sum(c.fn(x)))(x), dtype)

  def test_rules_at_named_points(self):
    """Spot values that pin the formulas (sum includes i = n, clip inclusive, ...)."""
    g = lambda q, x: float(jax.grad(q)(jnp.float32(x)))
    self.assertEqual(g(quantizers.ste_sign, 123.0), 1.0)
    self.assertEqual(g(lambda x: quantizers.ste_sign(x, 0.5), 0.5), 1.0)
    self.assertEqual(g(lambda x: quantizers.ste_sign(x, 0.5), 0.5000001), 0.0)
    self.assertEqual(g(quantizers.approx_sign, 0.0), 2.0)
    self.assertEqual(g(quantizers.approx_sign, -0.5), 1.0)
    self.assertEqual(g(quantizers.approx_sign, 1.0), 0.0)
    self.assertEqual(g(quantizers.approx_sign, 1.5), 0.0)
    for n in (0, 1, 9):  # at x = 0 every cosine is 1: (4w/pi)(n+1)
      self.assertAlmostEqual(
          g(lambda x: quantizers.fda(x, 0.1, n), 0.0), 0.4 / math.pi * (n + 1), places=6
      )
    self.assertEqual(g(lambda x: quantizers.fda(x, 0.1, 9, 1.0), 1.0001), 0.0)
    self.assertAlmostEqual(g(lambda x: quantizers.biper(x, 20.0), 0.0), 20.0, places=5)
    self.assertAlmostEqual(g(lambda x: quantizers.biper(x, 20.0), math.pi / 20), -20.0, places=4)
    for b in (1.0, 5.0):  # SS_b'(0) = b
      self.assertAlmostEqual(g(lambda x: quantizers.sign_swish(x, b), 0.0), b, places=5)
      self.assertAlmostEqual(g(lambda x: quantizers.bnn_pp(x, b), 0.0), b, places=5)
    self.assertEqual(g(quantizers.identity, -7.0), 1.0)

  def test_module_sigmoid_form_equals_bnn_plus_form(self):
    x = np.linspace(-20, 20, 4001)
    for b in (0.5, 1.0, 5.0, 20.0):
      np.testing.assert_allclose(
          _np(quantizers.sign_swish_derivative(x.astype(np.float32), b)),
          ss_prime64(_np(x.astype(np.float32)), b),
          rtol=0,
          atol=2e-5 * b,
      )


# --------------------------------------------------------------------------
# 4. check_grads: the custom rule against finite differences of the surrogate
# --------------------------------------------------------------------------


def _with_surrogate_forward(q, surrogate):
  """Forward = surrogate(x); gradient = q's custom rule."""

  def g(x):
    return q(x) - jax.lax.stop_gradient(q(x)) + jax.lax.stop_gradient(surrogate(x))

  return g


def _smooth_points(case: Case, n=24, seed=3) -> jax.Array:
  rng = np.random.default_rng(seed)
  x = rng.uniform(-3, 3, 4 * n)
  for k in case.kinks:
    x = x[np.abs(x - k) > 0.05]
  return jnp.asarray(x[:n], F32)


class CheckGradsTest(QuantizerTestCase):

  @parameterized.named_parameters(*CASE_PARAMS)
  def test_rule_matches_surrogate_finite_differences(self, case):
    c = CASES[case]
    x = _smooth_points(c)
    tol = dict(atol=1e-2, rtol=1e-2, eps=1e-3)
    if case in ("bnn_pp", "biper_sine", "identity"):
      check_grads(c.fn, (x,), order=1, modes=("rev",), **tol)  # smooth forward: itself
    check_grads(_with_surrogate_forward(c.fn, c.surrogate), (x,), order=1, modes=("rev",), **tol)
    # negative control: the same check rejects a surrogate 20% off
    wrong = _with_surrogate_forward(c.fn, lambda x: 1.2 * c.surrogate(x))
    with self.assertRaises(AssertionError):
      check_grads(wrong, (x,), order=1, modes=("rev",), **tol)

  def test_fda_series_has_n_plus_one_terms(self):
    """The rule is the derivative of s_n with i = 0..n, not of s_{n-1} or s_{n+1}."""
    x = jnp.linspace(-2.9, 2.9, 24, dtype=F32)
    tol = dict(atol=1e-3, rtol=1e-3, eps=1e-3)
    for w, n in ((0.5, 2), (0.3, 9)):
      q = lambda x: quantizers.fda(x, w, n)
      for m in (n, n - 1, n + 1):
        g = jax.jit(_with_surrogate_forward(q, lambda x: _fda_series(x, w, m)))
        if m == n:
          check_grads(g, (x,), 1, modes=("rev",), **tol)
        else:
          with self.assertRaises(AssertionError):
            check_grads(g, (x,), 1, modes=("rev",), **tol)


# --------------------------------------------------------------------------
# 5. Transforms: vmap, checkpoint, jit of grad, shapes
# --------------------------------------------------------------------------


class TransformsTest(QuantizerTestCase):

  @parameterized.named_parameters(*CASE_PARAMS)
  def test_vmap_jit_checkpoint_shapes(self, case):
    c = CASES[case]
    rng = np.random.default_rng(4)
    xs = np.asarray(rng.uniform(-3, 3, (4, GRID)), np.float32)
    xs[0, :8] = [0.0, 1.0, -1.0, 0.5, -0.5, 2.0, -2.0, 50.0]
    cots = _cot_like(xs, 5)
    vg = _value_and_grad(c.fn)
    # vmap over a batch axis == row by row (jit of grad, one program for every row)
    y_v, g_v = jax.jit(jax.vmap(vg))(xs, cots)
    vg_jit = jax.jit(vg)
    rows = [vg_jit(xs[i], cots[i]) for i in range(xs.shape[0])]
    np.testing.assert_allclose(_np(y_v), np.stack([_np(r[0]) for r in rows]), rtol=1e-6, atol=1e-6)
    np.testing.assert_allclose(
        _np(g_v), np.stack([_np(r[1]) for r in rows]), rtol=1e-6, atol=1e-6 * c.amp
    )
    self.assert_forward(c, xs, y_v, F32)
    self.assert_backward(c, xs, cots, g_v, F32)
    # vmap over the second axis as well
    y_t, g_t = jax.jit(jax.vmap(vg, in_axes=1, out_axes=1))(xs, cots)
    chex.assert_trees_all_close((y_t, g_t), (y_v, g_v), rtol=1e-6, atol=1e-6 * c.amp)

    # checkpoint (remat) around the quantizer, inside grad, with the value reused after
    def loss(x, cot, remat):
      qf = jax.checkpoint(c.fn) if remat else c.fn
      y = qf(x * 1.5)
      return jnp.sum(y * cot * jnp.cos(x))

    g_r, g_n = jax.jit(lambda x, t: (jax.grad(loss)(x, t, True), jax.grad(loss)(x, t, False)))(
        xs, cots
    )
    # (XLA may fold 1.5 into the phase constant after remat: a float32-rounding difference)
    np.testing.assert_allclose(_np(g_r), _np(g_n), rtol=1e-4, atol=1e-4 * c.amp)
    x15 = np.float32(1.5) * xs
    ref = _np(c.fn(x15)) * _np(cots) * -np.sin(_np(xs)) + _np(cots) * np.cos(
        _np(xs)
    ) * 1.5 * c.deriv64(_np(x15))
    np.testing.assert_allclose(_np(g_r), ref, rtol=1e-4, atol=1e-4 * c.amp)
    # arbitrary shapes, in one program
    shapes = ((), (7,), (2, 3, 5, 4))
    xs_s = [np.asarray(rng.uniform(-3, 3, shape), np.float32) for shape in shapes]
    xs_s[1][:3] = [0.0, 1.0, -1.0]
    cots_s = [_cot_like(x, 6) for x in xs_s]
    outs = jax.jit(lambda xs, ts: [vg(x, t) for x, t in zip(xs, ts)])(xs_s, cots_s)
    for shape, x, cot, (y, g) in zip(shapes, xs_s, cots_s, outs):
      self.assertEqual(np.shape(y), shape)
      self.assertEqual(np.shape(g), shape)
      self.assert_forward(c, x, y, F32)
      self.assert_backward(c, x, cot, g, F32)

  def test_vmap_over_parameters(self):
    rng = np.random.default_rng(7)
    xs = np.asarray(rng.uniform(-2, 2, (3, 8)), np.float32)
    xs[:, 0] = 0.0
    cots = _cot_like(xs, 8)

    def check(qfn, params, in_axes, ref_fn):
      vg = lambda x, cot, *p: (qfn(x, *p), jax.grad(lambda x: jnp.sum(qfn(x, *p) * cot))(x))
      y, g = jax.jit(jax.vmap(vg, in_axes=(0, 0) + in_axes))(xs, cots, *params)
      for i in range(xs.shape[0]):
        p_i = [p[i] if a == 0 else p for p, a in zip(params, in_axes)]
        y_ref, d_ref = ref_fn(_np(xs[i]), *[_np(p) for p in p_i])
        np.testing.assert_allclose(_np(y[i]), y_ref, atol=1e-5)
        np.testing.assert_allclose(
            _np(g[i]), _np(cots[i]) * d_ref, rtol=1e-4, atol=1e-4 * float(np.max(np.abs(d_ref)) + 1)
        )

    w0 = np.asarray([1.0, 5.0, 20.0], np.float32)
    check(
        quantizers.biper,
        (w0,),
        (0,),
        lambda x, w: (np.where(np.sin(w * x) >= 0, 1.0, -1.0), w * np.cos(w * x)),
    )
    beta = np.asarray([0.5, 5.0, 20.0], np.float32)
    check(quantizers.sign_swish, (beta,), (0,), lambda x, b: (sign64(x), ss_prime64(x, b)))
    check(quantizers.bnn_pp, (beta,), (0,), lambda x, b: (ss64(x, b), ss_prime64(x, b)))
    clip = np.asarray([0.25, 1.0, 1.5], np.float32)
    check(
        quantizers.ste_sign, (clip,), (0,), lambda x, c: (sign64(x), (np.abs(x) <= c).astype(float))
    )
    omega = np.asarray([0.1, 0.5, 1.0], np.float32)
    ns = np.asarray([0, 3, 9], np.int32)
    check(
        lambda x, w, n: quantizers.fda(x, w, n, max_terms=9),
        (omega, ns),
        (0, 0),
        lambda x, w, n: (sign64(x), fda_prime64(x, w, int(n))),
    )
    check(
        lambda x, w, n: quantizers.fda(x, w, n, 1.0, max_terms=9),
        (omega, np.int32(4)),
        (0, None),
        lambda x, w, n: (sign64(x), fda_prime64(x, w, int(n), 1.0)),
    )


# --------------------------------------------------------------------------
# 6. shard_map over 8 devices == one device
# --------------------------------------------------------------------------


def _mesh():
  return jax.make_mesh((8,), ("batch",), axis_types=(jax.sharding.AxisType.Auto,))


class ShardMapTest(QuantizerTestCase):

  def setUp(self):
    super().setUp()
    self.assertEqual(jax.device_count(), 8)
    rng = np.random.default_rng(9)
    x = rng.uniform(-3, 3, (8 * 2, 5))
    x[0, :4] = [0.0, 1.0, -1.0, 50.0]
    self.x = np.asarray(x, np.float32)
    self.cot = _cot_like(self.x, 10)

  def _assert_sharded(self, arr):
    self.assertEqual(len(arr.addressable_shards), 8)
    self.assertEqual({s.data.shape for s in arr.addressable_shards}, {(2, 5)})

  def test_shard_map_equals_single_device(self):
    """Every quantizer, values and gradients, in one shard_map program."""

    def body(x, cot):
      return {name: _value_and_grad(c.fn)(x, cot) for name, c in CASES.items()}

    sharded = jax.jit(
        jax.shard_map(body, mesh=_mesh(), in_specs=(P("batch"), P("batch")), out_specs=P("batch"))
    )
    out_s = sharded(self.x, self.cot)
    out_1 = jax.jit(body)(self.x, self.cot)
    for name, c in CASES.items():
      with self.subTest(name):
        y_s, g_s = out_s[name]
        self._assert_sharded(y_s)
        self._assert_sharded(g_s)
        # Forwards exactly; gradients to float32 rounding: XLA:CPU may vectorise a
        # transcendental (SignSwish's exp) differently for the shard's shape than for
        # the whole batch (1 ulp on AVX-512 machines).
        chex.assert_trees_all_equal(y_s, out_1[name][0])
        chex.assert_trees_all_close(g_s, out_1[name][1], rtol=1e-5, atol=1e-6 * c.amp)
        self.assert_forward(c, self.x, y_s, F32)
        self.assert_backward(c, self.x, self.cot, g_s, F32)

  @parameterized.named_parameters(
      dict(
          testcase_name="fda_n_terms",
          q=lambda x, n: quantizers.fda(x, 0.1, n, max_terms=18),
          params=(9, 12, 18),
          pdtype=np.int32,
          deriv=lambda x, n: fda_prime64(x, 0.1, int(n)),
      ),
      dict(
          testcase_name="fda_clip_n_terms",
          q=lambda x, n: quantizers.get("fda", max_terms=18)(x, n_terms=n),
          params=(9, 18),
          pdtype=np.int32,
          deriv=lambda x, n: fda_prime64(x, 0.1, int(n), 1.0),
      ),
      dict(
          testcase_name="bnn_pp_beta",
          q=quantizers.bnn_pp,
          params=(1.0, 5.0, 20.0),
          pdtype=np.float32,
          deriv=ss_prime64,
      ),
      dict(
          testcase_name="sign_swish_beta",
          q=quantizers.sign_swish,
          params=(2.0, 5.0),
          pdtype=np.float32,
          deriv=ss_prime64,
      ),
      dict(
          testcase_name="biper_omega0",
          q=quantizers.biper,
          params=(1.0, 20.0),
          pdtype=np.float32,
          deriv=lambda x, w: w * np.cos(w * x),
      ),
  )
  def test_shard_map_replicated_traced_parameter(self, q, params, pdtype, deriv):
    def body(x, cot, p):
      y, g = _value_and_grad(lambda x: q(x, p))(x, cot)
      # a replicated parameter gets no gradient, even summed over the axis
      gp = jax.grad(lambda p: jnp.sum(q(x, p) * cot))(p) if pdtype == np.float32 else 0.0
      return y, g, gp

    sharded = jax.jit(
        jax.shard_map(
            body,
            mesh=_mesh(),
            in_specs=(P("batch"), P("batch"), P()),
            out_specs=(P("batch"), P("batch"), P()),
        )
    )
    single = jax.jit(body)
    grads = []
    for p in params:
      p = np.asarray(p, pdtype)
      out_s, out_1 = sharded(self.x, self.cot, p), single(self.x, self.cot, p)
      chex.assert_trees_all_equal((out_s[0], out_s[2]), (out_1[0], out_1[2]))
      chex.assert_trees_all_close(out_s[1], out_1[1], rtol=1e-5, atol=1e-6 * (1 + float(p)))
      np.testing.assert_allclose(
          _np(out_s[1]),
          _np(self.cot) * deriv(_np(self.x), p),
          rtol=1e-4,
          atol=1e-4 * (1 + float(p)),
      )
      self.assertEqual(float(out_s[2]), 0.0)
      grads.append(_np(out_s[1]))
    for a, b in itertools.combinations(grads, 2):
      self.assertFalse(np.allclose(a, b))
    self.assertEqual(sharded._cache_size(), 1)  # one compilation for every value


# --------------------------------------------------------------------------
# 7. Scheduled parameters (traced) compile once
# --------------------------------------------------------------------------


class ScheduleTest(QuantizerTestCase):

  def setUp(self):
    super().setUp()
    self.x = np.linspace(-1.0, 1.0, 33, dtype=np.float32)
    self.cot = _cot_like(self.x, 11)

  def _check_schedule(self, f, values, to_arg, deriv, fwd):
    grads = []
    for v in values:
      y, g = f(self.x, to_arg(v))
      np.testing.assert_allclose(_np(y), fwd(_np(self.x), v), atol=1e-5)
      np.testing.assert_allclose(
          _np(g), _np(self.cot) * deriv(_np(self.x), v), rtol=1e-4, atol=1e-4 * (1 + v)
      )
      grads.append(_np(g))
    for a, b in itertools.combinations(grads, 2):
      self.assertFalse(np.allclose(a, b, rtol=1e-3, atol=1e-3), "gradients equal across values")
    self.assertEqual(f._cache_size(), 1)
    # the trace counter does fire: a new input shape retraces, and that is the 2nd trace
    with self.assertRaisesRegex(AssertionError, "traced > 1 times"):
      f(self.x[:5], to_arg(values[0]))

  def test_fda_traced_n_terms_compiles_once(self):
    cot = self.cot

    @jax.jit
    @chex.assert_max_traces(n=1)
    def fda_step(x, n_terms):
      q = lambda x: quantizers.fda(x, 0.1, n_terms, max_terms=18)
      return q(x), jax.grad(lambda x: jnp.sum(q(x) * cot))(x)

    self._check_schedule(
        fda_step,
        (9, 12, 18),
        jnp.int32,
        lambda x, n: fda_prime64(x, 0.1, n),
        lambda x, n: sign64(x),
    )

  def test_fda_registry_traced_n_terms_compiles_once(self):
    cot = self.cot
    q = quantizers.get("fda", max_terms=18)

    @jax.jit
    @chex.assert_max_traces(n=1)
    def fda_get_step(x, n_terms):
      return (q(x, n_terms=n_terms), jax.grad(lambda x: jnp.sum(q(x, n_terms=n_terms) * cot))(x))

    self._check_schedule(
        fda_get_step,
        (9, 12, 18),
        jnp.int32,
        lambda x, n: fda_prime64(x, 0.1, n, 1.0),
        lambda x, n: sign64(x),
    )
    # a concrete n_terms gives the same gradient as the traced one
    g_static = jax.grad(lambda x: jnp.sum(q(x, n_terms=12) * cot))(self.x)
    g_traced = fda_get_step(self.x, jnp.int32(12))[1]
    np.testing.assert_allclose(_np(g_static), _np(g_traced), rtol=1e-6, atol=1e-7)

  def test_bnn_pp_traced_beta_compiles_once(self):
    cot = self.cot

    @jax.jit
    @chex.assert_max_traces(n=1)
    def bnn_pp_step(x, beta):
      q = lambda x: quantizers.bnn_pp(x, beta)
      return q(x), jax.grad(lambda x: jnp.sum(q(x) * cot))(x)

    self._check_schedule(bnn_pp_step, (1.0, 5.0, 20.0), jnp.float32, ss_prime64, ss64)

  def test_bnn_pp_registry_traced_beta_compiles_once(self):
    cot = self.cot
    q = quantizers.get("bnn_pp")

    @jax.jit
    @chex.assert_max_traces(n=1)
    def bnn_pp_get_step(x, beta):
      return q(x, beta=beta), jax.grad(lambda x: jnp.sum(q(x, beta=beta) * cot))(x)

    self._check_schedule(bnn_pp_get_step, (1.0, 5.0, 20.0), jnp.float32, ss_prime64, ss64)

  def test_traced_n_terms_above_max_terms_truncates(self):
    g = jax.jit(jax.grad(lambda x, n: quantizers.fda(x, 0.1, n, max_terms=5).sum()))
    np.testing.assert_allclose(
        _np(g(self.x, jnp.int32(40))), fda_prime64(_np(self.x), 0.1, 5), rtol=1e-5, atol=1e-6
    )


# --------------------------------------------------------------------------
# 8. Parameters receive no gradient
# --------------------------------------------------------------------------


class ParameterGradientTest(QuantizerTestCase):

  @parameterized.named_parameters(
      dict(testcase_name="biper_omega0", f=lambda x, p: quantizers.biper(x, p), p=20.0),
      dict(testcase_name="biper_sine_omega0", f=lambda x, p: quantizers.biper_sine(x, p), p=20.0),
      dict(testcase_name="sign_swish_beta", f=lambda x, p: quantizers.sign_swish(x, p), p=5.0),
      dict(testcase_name="bnn_pp_beta", f=lambda x, p: quantizers.bnn_pp(x, p), p=5.0),
      dict(testcase_name="fda_omega", f=lambda x, p: quantizers.fda(x, p, 9), p=0.1),
      dict(testcase_name="fda_clip", f=lambda x, p: quantizers.fda(x, 0.1, 9, p), p=1.0),
      dict(testcase_name="ste_clip", f=lambda x, p: quantizers.ste_sign(x, p), p=1.0),
  )
  def test_parameter_gets_zero_gradient(self, f, p):
    x = jnp.asarray(forward_grid(F32, moderate_only=True))
    cot = jnp.asarray(_cot_like(np.asarray(x), 12))
    gp = jax.grad(lambda p: jnp.sum(f(x, p) * cot))(p)
    self.assertEqual(float(gp), 0.0)
    gx, gp2 = jax.jit(jax.grad(lambda x, p: jnp.sum(f(x, p) * cot), argnums=(0, 1)))(x, p)
    self.assertEqual(float(gp2), 0.0)
    self.assertGreater(float(jnp.max(jnp.abs(gx))), 0.0)  # x still gets its gradient


# --------------------------------------------------------------------------
# 9. Every ValueError
# --------------------------------------------------------------------------


ALL_FUNCTIONS = {
    "identity": quantizers.identity,
    "ste_sign": quantizers.ste_sign,
    "ste_sign_clip": lambda x: quantizers.ste_sign(x, 1.0),
    "approx_sign": quantizers.approx_sign,
    "sign_swish": quantizers.sign_swish,
    "fda": lambda x: quantizers.fda(x, 0.1, 9),
    "fda_clip": lambda x: quantizers.fda(x, 0.1, 9, 1.0),
    "biper": lambda x: quantizers.biper(x, 20.0),
    "biper_sine": lambda x: quantizers.biper_sine(x, 20.0),
    "bnn_pp": lambda x: quantizers.bnn_pp(x, 5.0),
    "ir_net": lambda x: quantizers.ir_net(x, 1.0),
    "reste": quantizers.reste,
    "rsign": quantizers.rsign,
}


class ErrorsTest(QuantizerTestCase):

  x = np.zeros((3,), np.float32)

  def test_non_float_x(self):
    for dtype in (np.int32, np.bool_):
      x = np.zeros((3,), dtype)
      dname = jnp.dtype(dtype).name
      for label, fn in ALL_FUNCTIONS.items():
        fname = label.replace("_clip", "")
        with self.subTest(fn=label, dtype=dname):
          with self.assertRaisesRegex(
              ValueError, rf"^{fname}: x has dtype {dname}; a floating dtype .*required"
          ):
            fn(x)
          with self.assertRaisesRegex(ValueError, rf"x has dtype {dname}"):
            jax.jit(fn)(x)
      for name in quantizers.NAMES:
        with self.subTest(get=name, dtype=dname):
          with self.assertRaisesRegex(ValueError, rf"x has dtype {dname}; a floating"):
            quantizers.get(name)(x)
          with self.assertRaisesRegex(ValueError, rf"^{name}: x has dtype {dname}"):
            quantizers.get(name).binarize(x)

  @parameterized.named_parameters(
      dict(
          testcase_name="fda_omega_zero",
          call=lambda x: quantizers.fda(x, 0.0, 9),
          msg=r"^fda: omega=0\.0 is not allowed; omega must be finite and > 0$",
      ),
      dict(
          testcase_name="fda_omega_negative",
          call=lambda x: quantizers.fda(x, -0.5, 9),
          msg=r"^fda: omega=-0\.5 is not allowed; omega must be finite and > 0$",
      ),
      dict(
          testcase_name="fda_omega_nan",
          call=lambda x: quantizers.fda(x, float("nan"), 9),
          msg=r"^fda: omega=nan is not allowed; omega must be finite and > 0$",
      ),
      dict(
          testcase_name="fda_omega_inf",
          call=lambda x: quantizers.fda(x, float("inf"), 9),
          msg=r"^fda: omega=inf is not allowed; omega must be finite and > 0$",
      ),
      dict(
          testcase_name="bnn_pp_beta_inf",
          call=lambda x: quantizers.bnn_pp(x, float("inf")),
          msg=r"^bnn_pp: beta=inf is not allowed; beta must be finite and > 0$",
      ),
      dict(
          testcase_name="biper_omega0_zero",
          call=lambda x: quantizers.biper(x, 0.0),
          msg=r"^biper: omega0=0\.0 is not allowed; omega0 must be finite and > 0$",
      ),
      dict(
          testcase_name="biper_omega0_negative",
          call=lambda x: quantizers.biper(x, -20),
          msg=r"^biper: omega0=-20\.0 is not allowed; omega0 must be finite and > 0$",
      ),
      dict(
          testcase_name="biper_omega0_vector",
          call=lambda x: quantizers.biper(x, np.array([1.0, 2.0])),
          msg=r"^biper: omega0=array\(\[1\., 2\.\]\) is not allowed; omega0 must be a real "
          r"scalar > 0$",
      ),
      dict(
          testcase_name="biper_sine_omega0",
          call=lambda x: quantizers.biper_sine(x, -1.0),
          msg=r"^biper_sine: omega0=-1\.0 is not allowed; omega0 must be finite and > 0$",
      ),
      dict(
          testcase_name="fda_n_terms_negative",
          call=lambda x: quantizers.fda(x, 0.1, -1),
          msg=r"^fda: n_terms=-1 is not allowed; n_terms must be an integer >= 0$",
      ),
      dict(
          testcase_name="fda_n_terms_fraction",
          call=lambda x: quantizers.fda(x, 0.1, 2.5),
          msg=r"^fda: n_terms=2\.5 is not allowed; n_terms must be an integer >= 0$",
      ),
      dict(
          testcase_name="fda_n_terms_string",
          call=lambda x: quantizers.fda(x, 0.1, "9"),
          msg=r"^fda: n_terms='9' is not allowed; n_terms must be an integer >= 0$",
      ),
      dict(
          testcase_name="fda_n_terms_above_max",
          call=lambda x: quantizers.fda(x, 0.1, 19, max_terms=18),
          msg=r"^fda: n_terms=19 exceeds max_terms=18; raise max_terms",
      ),
      dict(
          testcase_name="fda_max_terms_float",
          call=lambda x: quantizers.fda(x, 0.1, 3, max_terms=5.0),
          msg=r"^fda: max_terms=5\.0 is not allowed; it must be a Python int >= 0$",
      ),
      dict(
          testcase_name="sign_swish_beta_zero",
          call=lambda x: quantizers.sign_swish(x, 0.0),
          msg=r"^sign_swish: beta=0\.0 is not allowed; beta must be finite and > 0$",
      ),
      dict(
          testcase_name="sign_swish_beta_negative",
          call=lambda x: quantizers.sign_swish(x, -5.0),
          msg=r"^sign_swish: beta=-5\.0 is not allowed; beta must be finite and > 0$",
      ),
      dict(
          testcase_name="bnn_pp_beta_zero",
          call=lambda x: quantizers.bnn_pp(x, 0.0),
          msg=r"^bnn_pp: beta=0\.0 is not allowed; beta must be finite and > 0$",
      ),
      dict(
          testcase_name="bnn_pp_beta_negative",
          call=lambda x: quantizers.bnn_pp(x, -1),
          msg=r"^bnn_pp: beta=-1\.0 is not allowed; beta must be finite and > 0$",
      ),
      dict(
          testcase_name="ste_clip_zero",
          call=lambda x: quantizers.ste_sign(x, 0.0),
          msg=r"^ste_sign: clip=0\.0 is not allowed; clip must be finite and > 0$",
      ),
      dict(
          testcase_name="ste_clip_negative",
          call=lambda x: quantizers.ste_sign(x, -1.0),
          msg=r"^ste_sign: clip=-1\.0 is not allowed; clip must be finite and > 0$",
      ),
      dict(
          testcase_name="fda_clip_zero",
          call=lambda x: quantizers.fda(x, 0.1, 9, 0.0),
          msg=r"^fda: clip=0\.0 is not allowed; clip must be finite and > 0$",
      ),
      dict(
          testcase_name="fda_clip_negative",
          call=lambda x: quantizers.fda(x, 0.1, 9, -2.0),
          msg=r"^fda: clip=-2\.0 is not allowed; clip must be finite and > 0$",
      ),
      dict(
          testcase_name="get_unknown_name",
          call=lambda x: quantizers.get("sine"),
          msg=r"^unknown quantizer 'sine'; allowed names: "
          + re.escape(str(list(quantizers.NAMES)))
          + "$",
      ),
      dict(
          testcase_name="get_unknown_parameter",
          call=lambda x: quantizers.get("biper", omega=3.0),
          msg=r"^quantizer 'biper' takes no parameter \['omega'\]; allowed: \['omega0', 'tau'\]$",
      ),
      dict(
          testcase_name="get_parameter_of_parameterless",
          call=lambda x: quantizers.get("approx_sign", clip=1.0),
          msg=r"^quantizer 'approx_sign' takes no parameter \['clip'\]; allowed: none$",
      ),
      dict(
          testcase_name="get_bad_value_validated_eagerly",
          call=lambda x: quantizers.get("fda", n_terms=30, max_terms=18),
          msg=r"^fda: n_terms=30 exceeds max_terms=18",
      ),
      dict(
          testcase_name="get_bad_beta",
          call=lambda x: quantizers.get("bnn_pp", beta=0),
          msg=r"^bnn_pp: beta=0\.0 is not allowed; beta must be finite and > 0$",
      ),
      dict(
          testcase_name="override_non_schedulable",
          call=lambda x: quantizers.get("biper")(x, omega0=3.0),
          msg=r"^quantizer 'biper': cannot override \['omega0'\] per call; schedulable "
          r"parameters are \['tau'\]$",
      ),
      dict(
          testcase_name="override_fda_omega",
          call=lambda x: quantizers.get("fda")(x, omega=0.2),
          msg=r"^quantizer 'fda': cannot override \['omega'\] per call; schedulable "
          r"parameters are \['n_terms'\]$",
      ),
      dict(
          testcase_name="config_without_name",
          call=lambda x: quantizers.get({"omega0": 20.0}),
          msg=r"^get: quantizer config \{'omega0': 20\.0\} has no 'name'; allowed names: "
          + re.escape(str(list(quantizers.NAMES)))
          + "$",
      ),
      dict(
          testcase_name="quantizer_with_parameters",
          call=lambda x: quantizers.get(quantizers.get("ste"), clip=1.0),
          msg=r"^get: a Quantizer was given together with parameters \['clip'\]$",
      ),
  )
  def test_value_error(self, call, msg):
    with self.assertRaisesRegex(ValueError, msg):
      call(self.x)

  def test_unknown_name_lists_every_allowed_name(self):
    with self.assertRaises(ValueError) as cm:
      quantizers.get("nope")
    for name in ("identity", "ste", "approx_sign", "sign_swish", "fda", "biper", "bnn_pp"):
      self.assertIn(repr(name), str(cm.exception))

  def test_valid_values_do_not_raise(self):
    x = self.x
    quantizers.fda(x, 0.1, 0)
    quantizers.fda(x, 0.1, 9.0)  # an integral float is an integer
    quantizers.fda(x, 0.1, np.int64(18), max_terms=18)
    quantizers.fda(x, 0.1, jnp.int32(3), max_terms=18)  # concrete array
    quantizers.ste_sign(x, None)
    jax.jit(lambda x, n: quantizers.fda(x, 0.1, n, max_terms=4))(x, jnp.int32(2))
    jax.jit(lambda x, b: quantizers.bnn_pp(x, b))(x, -1.0)  # traced values are not checked


# --------------------------------------------------------------------------
# 10. Registry and config round trip
# --------------------------------------------------------------------------


class RegistryTest(QuantizerTestCase):

  def test_names(self):
    # Every built-in method, in registration order ('biper_sine' is BiPer's stage 1).
    # The set is asserted exactly, so adding or dropping a name must update this test.
    self.assertEqual(
        quantizers.NAMES,
        ("identity", "ste", "approx_sign", "sign_swish", "fda", "biper", "biper_sine", "bnn_pp",
         "ir_net", "reste", "rsign"),
    )
    self.assertTrue(
        {"identity", "ste", "approx_sign", "sign_swish", "fda", "biper", "bnn_pp"}
        <= set(quantizers.NAMES)
    )

  @parameterized.named_parameters(*[dict(testcase_name=n, name=n) for n in quantizers.NAMES])
  def test_config_round_trip(self, name):
    q = quantizers.get(name)
    cfg = q.config()
    self.assertEqual(cfg["name"], name)
    self.assertEqual(quantizers.get(cfg), q)
    self.assertEqual(quantizers.get(**cfg), q)
    self.assertIs(quantizers.get(q), q)
    text = json.dumps(cfg)
    self.assertEqual(quantizers.get(json.loads(text)), q)
    self.assertEqual(json.loads(text), cfg)

  def test_non_default_config_round_trip(self):
    for q in (
        quantizers.get("ste", clip=1.5),
        quantizers.get("fda", omega=0.5, n_terms=3, clip=2.0, max_terms=18),
        quantizers.get("biper", omega0=30),
        quantizers.get("bnn_pp", beta=2),
        quantizers.get("sign_swish", beta=10.0),
    ):
      cfg = json.loads(json.dumps(q.config()))
      self.assertEqual(quantizers.get(cfg), q)
      self.assertNotEqual(q, quantizers.get(q.name))
    self.assertEqual(quantizers.get("biper", omega0=30).kwargs, {"omega0": 30.0, "tau": 0.0})
    self.assertEqual(quantizers.get("fda", n_terms=12).kwargs["n_terms"], 12)

  def test_registry_defaults_match_functions(self):
    """The defaults, schedules included: at epoch 4 of 10 (step 40 of 100, 10 per epoch)
    FDA's n is 9 + floor(4 * 10 / 10) = 13, BNN++'s beta 2 (200/2)^(40/99), IR-Net's t
    0.1 * 10^(4/10 * 2), ReSTE's o 1 + 2 (1 - cos(pi/2 * 4/10))."""
    x = forward_grid(F32, moderate_only=True)
    beta = 2.0 * 100.0 ** (40 / 99)
    pairs = {
        "identity": quantizers.identity,
        "ste": quantizers.ste_sign,
        "approx_sign": quantizers.approx_sign,
        "sign_swish": lambda x: quantizers.sign_swish(x, 5.0),
        "fda": lambda x: quantizers.fda(x, 0.1, 13, 1.0),
        "biper": lambda x: quantizers.biper(x, 20.0),
        "biper_sine": lambda x: quantizers.biper_sine(x, 20.0),
        "bnn_pp": lambda x: quantizers.bnn_pp(x, beta),
        "ir_net": lambda x: quantizers.ir_net(x, 0.1 * 10 ** 0.8),
        "reste": lambda x: quantizers.reste(x, 1.5, 1 + 2 * (1 - math.cos(math.pi / 2 * 0.4))),
        "rsign": quantizers.rsign,
    }
    self.assertEqual(set(pairs), set(quantizers.NAMES))
    cot = _cot_like(x, 13)

    def both(x, t):
      with schedule.training_step(jnp.int32(40), 100, 10):
        return {n: (_value_and_grad(quantizers.get(n))(x, t), _value_and_grad(fn)(x, t))
                for n, fn in pairs.items()}

    outs = jax.jit(both)(x, cot)
    for name, (from_get, from_fn) in outs.items():
      chex.assert_trees_all_close(from_get, from_fn, rtol=2e-6, atol=1e-6)
      case = CASES.get(name, CASES["ste"])
      self.assert_forward(case, x, from_get[0], F32) if name != "bnn_pp" else None
    self.assertEqual(quantizers.get("fda").schedulable, frozenset({"n_terms"}))
    self.assertEqual(quantizers.get("fda", noise=True).schedulable,
                     frozenset({"n_terms", "alpha"}))
    self.assertEqual(quantizers.get("bnn_pp").schedulable, frozenset({"beta"}))
    self.assertEqual(quantizers.get("biper").schedulable, frozenset({"tau"}))
    self.assertEqual(quantizers.get("ir_net").scheduled, ("t",))
    self.assertEqual(quantizers.get("reste").scheduled, ("o",))


# --------------------------------------------------------------------------
# Regressions: defects found in quantizers.py by this suite (now fixed)
# --------------------------------------------------------------------------


class RegressionTest(QuantizerTestCase):
  """Each test failed on the first version of quantizers.py, for the reason given."""

  # A: bnn_pp's forward evaluated SS_beta in the input dtype rather than in float32
  # (`sign_swish_map(x, beta).astype(x.dtype)` on the bfloat16/float16 x: with a
  # Python-float beta the map ran in bfloat16/float16 and the `.astype` was a no-op).
  # It was off by up to 0.039 (5 ulps of 1) in bfloat16, 7 ulps in float16, and depended
  # on the *type* of beta (a float32 array beta, as a schedule passes, promoted to float32).
  def test_bnn_pp_forward_low_precision_within_one_ulp(self):
    for dtype in (BF16, F16):
      x = np.linspace(-3, 3, 601).astype(_np_dtype(dtype))
      ref = _np(ss64(_np(x), 5.0).astype(_np_dtype(dtype)))
      eps = float(jnp.finfo(dtype).eps)
      for beta in (5.0, jnp.float32(5.0)):  # a Python float and a float32 schedule value
        y = _np(quantizers.bnn_pp(x, beta))
        np.testing.assert_allclose(
            y, ref, rtol=0, atol=eps, err_msg=f"{jnp.dtype(dtype).name} beta={beta!r}"
        )

  # A, float16 consequence: beta*x was formed in float16, so once |beta x| > 65504 it
  # was inf and SS = 2 s (1 + inf * 0) - 1 = nan: with beta = 5 for every |x| > 13101, and
  # with an annealed beta = 1000 already for every |x| > 65.5.
  def test_bnn_pp_forward_float16_does_not_overflow(self):
    for xs, beta in (([100.0, -100.0, 2e4, -2e4], 1000.0), ([2e4, -2e4], 5.0)):
      y = _np(quantizers.bnn_pp(np.asarray(xs, np.float16), beta))
      np.testing.assert_array_equal(y, sign64(np.asarray(xs)), err_msg=f"beta={beta}")

  # B: SS_beta(x) = 2 s (1 + bx (1 - s)) - 1 and SS_beta'(x) = 2 b s (1 - s)(2 +
  # bx (1 - 2s)) were nan once bx overflowed float32 (s (1 - s) = 0 times bx = inf); the
  # limits are sign(x) and 0. Reachable from finite float32/bfloat16 inputs: |x| > 6.8e37
  # with beta = 5, |x| > 3.4e34 with beta = 1e4 (sign_swish's gradient, bnn_pp's value
  # and gradient).
  def test_sign_swish_finite_when_beta_x_overflows(self):
    for dtype in (F32, BF16):
      big = float(jnp.finfo(dtype).max)
      x = np.asarray([big, -big], _np_dtype(dtype))
      np.testing.assert_array_equal(
          _np(quantizers.bnn_pp(x, 5.0)), [1.0, -1.0], err_msg=f"bnn_pp value {dtype}"
      )
      for q in (quantizers.sign_swish, quantizers.bnn_pp):
        g = _np(jax.grad(lambda x: jnp.sum(q(x, 5.0)))(x))
        np.testing.assert_array_equal(g, [0.0, 0.0], err_msg=f"{q.__name__} grad {dtype}")


class FdaClosedFormTest(absltest.TestCase):
  """The series derivative is summed in closed form (a Dirichlet kernel)."""

  def test_matches_float64_summation_near_multiples_of_pi(self):
    for omega, n in ((0.1, 9), (1.0, 18), (3.0, 0)):
      ks = np.arange(-40, 41)
      x = np.concatenate([ks * np.pi / omega, ks * np.pi / omega + 1e-3,
                          np.linspace(-30, 30, 2001)]).astype(np.float32)
      t = (np.float32(omega) * x).astype(np.float64)  # the phase float32 forms
      ref = 4 * omega / np.pi * np.cos((2 * np.arange(n + 1)[:, None] + 1) * t).sum(0)
      got = np.asarray(jax.jit(quantizers.fda_series_derivative, static_argnums=(2,))(
          jnp.asarray(x), omega, n))
      np.testing.assert_allclose(got, ref, rtol=0, atol=1e-6 * 4 * omega / np.pi * (n + 1))

  def test_traced_n_terms_needs_no_max_terms_and_compiles_once(self):
    x = jnp.linspace(-1.0, 1.0, 41)

    @jax.jit
    @chex.assert_max_traces(n=1)
    def grad(x, n):
      return jax.grad(lambda x: jnp.sum(quantizers.fda(x, 0.1, n, 1.0)))(x)

    chex.clear_trace_counter()
    for n in (0, 9, 18, 40):
      np.testing.assert_allclose(
          grad(x, jnp.int32(n)),
          jax.grad(lambda x: jnp.sum(quantizers.fda(x, 0.1, n, 1.0)))(x), rtol=1e-6)

  def test_max_terms_caps_a_traced_n_terms(self):
    x = jnp.linspace(-1.0, 1.0, 41)
    capped = jax.jit(lambda x, n: jax.grad(
        lambda x: jnp.sum(quantizers.fda(x, 0.1, n, max_terms=12)))(x))(x, jnp.int32(30))
    np.testing.assert_allclose(capped, jax.grad(
        lambda x: jnp.sum(quantizers.fda(x, 0.1, 12)))(x), rtol=1e-6)


class VectorisedSineTest(absltest.TestCase):
  """`vsin` / `vcos`: polynomial sine and cosine that XLA:CPU vectorises."""

  def test_within_three_ulp_of_float64_where_the_reduction_is_exact(self):
    x = np.concatenate([np.linspace(-1e5, 1e5, 400001), np.linspace(-4, 4, 80001),
                        np.arange(-30000, 30001) * np.pi]).astype(np.float32)
    x64 = x.astype(np.float64)
    s, c = (_np(jax.jit(f)(x)) for f in (quantizers.vsin, quantizers.vcos))
    np.testing.assert_allclose(s, np.sin(x64), rtol=0, atol=3e-7)
    np.testing.assert_allclose(c, np.cos(x64), rtol=0, atol=3e-7)
    small = np.abs(x64) <= np.pi / 2  # no reduction: relative accuracy of the polynomial
    ulp = np.spacing(np.abs(np.sin(x64[small])).astype(np.float32)).astype(np.float64)
    self.assertLessEqual(np.max(np.abs(s[small] - np.sin(x64[small])) / np.maximum(ulp, 1e-45)), 3)

  def test_zero_odd_even_dtype(self):
    x = np.linspace(-7, 7, 1001).astype(np.float32)
    np.testing.assert_array_equal(_np(quantizers.vsin(-x)), -_np(quantizers.vsin(x)))
    np.testing.assert_array_equal(_np(quantizers.vcos(-x)), _np(quantizers.vcos(x)))
    self.assertEqual(float(quantizers.vsin(jnp.float32(0.0))), 0.0)
    for dtype in (BF16, F16):
      y = quantizers.vsin(jnp.asarray(x, dtype))
      self.assertEqual(y.dtype, dtype)
      np.testing.assert_allclose(_np(y), np.sin(_np(jnp.asarray(x, dtype))), rtol=0,
                                 atol=float(jnp.finfo(dtype).eps))

  def test_derivatives(self):
    x = jnp.linspace(-20.0, 20.0, 401)
    np.testing.assert_allclose(jax.vmap(jax.grad(quantizers.vsin))(x), np.cos(_np(x)), atol=3e-7)
    np.testing.assert_allclose(jax.vmap(jax.grad(quantizers.vcos))(x), -np.sin(_np(x)), atol=3e-7)

  def test_fda_backward_calls_no_scalar_sine(self):
    """XLA:CPU emits `sine`/`cosine` as a libm call per element (10x a multiply-add)."""
    grad = jax.jit(jax.grad(lambda x, n: jnp.sum(quantizers.fda(x, 0.1, n, 1.0))))
    text = grad.lower(jnp.ones((64,), F32), jnp.int32(9)).compile().as_text()
    self.assertNotIn(" sine(", text)
    self.assertNotIn(" cosine(", text)


class SignSwishEvaluationTest(absltest.TestCase):
  """SS_beta and SS_beta' evaluated from e = exp(-|beta x|): the same functions."""

  def test_map_and_derivative_equal_the_sigmoid_forms_for_annealed_betas(self):
    x = np.concatenate([np.linspace(-3, 3, 6001), [0.0, 1e-8, -1e-8, 50.0, -50.0, 1e30, -1e30]])
    x32 = x.astype(np.float32)
    for b in (0.5, 2.0, 5.0, 20.0, 200.0):
      np.testing.assert_allclose(_np(quantizers.sign_swish_map(x32, b)), ss64(_np(x32), b),
                                 rtol=0, atol=5e-7, err_msg=f"beta={b}")
      np.testing.assert_allclose(_np(quantizers.sign_swish_derivative(x32, b)),
                                 ss_prime64(_np(x32), b), rtol=0, atol=2e-6 * b,
                                 err_msg=f"beta={b}")
      g = jax.grad(lambda x: jnp.sum(quantizers.bnn_pp(x, b)))(jnp.asarray(x32))
      np.testing.assert_allclose(_np(g), ss_prime64(_np(x32), b), rtol=0, atol=2e-6 * b)

  def test_forward_and_backward_exponentials_are_not_shared(self):
    """Forward exp(-a), backward exp(-a/2)^2: XLA keeps one exponential per pass, computed
    in the pass's own fusion, rather than one stored tensor read by both (one write and two
    reads of every binarized activation, +18% bytes per ResNet-20 step). A custom_vjp
    saving SS' (or the sigmoid) as a residual compiles to the stored-tensor program."""
    f = jax.jit(jax.value_and_grad(lambda x: jnp.sum(quantizers.bnn_pp(x, 5.0) ** 2)))
    text = f.lower(jnp.ones((256,), F32)).compile().as_text()
    self.assertEqual(len(re.findall(r" exponential\(", text)), 2)


if __name__ == "__main__":
  absltest.main()
