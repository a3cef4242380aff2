"""FDA (Xu et al., NeurIPS 2021): the sign's truncated Fourier series as backward,
and the learned noise adaptation module.

sign(t) on |t| < pi/omega equals the square wave
s(t) = 4/pi sum_{i>=0} sin((2i+1) omega t) / (2i+1); the method's forward is
sign(t) and its backward the derivative of the n-th partial sum (Eq. 10),

    s_n'(t) = (4 omega / pi) sum_{i=0..n} cos((2i+1) omega t),

optionally zeroed outside |t| <= clip (the BiBench port: omega = 0.1,
clip = 1). n grows over training (Sec. 3.2, "setting 3", the best): from
n_s = 9 to 2 n_s, stepwise per epoch (BiBench: n = 9 + int(9 e / E)).

Noise adaptation (Sec. 3.3, Eq. 13-14): the series' error r(t) = sign(t) - s_n(t)
is learned by a bias-free MLP with a fixed shortcut,

    e(t) = relu(t W1) W2 + eta(t),   W1: d x h,  W2: h x d,  h = max(d // k, m),
    eta(t) = a sin(t)   (a = 0.1, the best shortcut of Table 4; or a t, or none),

and in training a binarized operand is sign(t) + alpha e(t) (as BiBench; the
backward is the same as with the paper's s_n(t) + alpha e(t)), alpha
decaying to exactly 0 at the end (cosine), so that inference is pure sign.
The module sees a kernel with one row per output channel (d = C_in kh kw)
and an activation per pixel across channels (d = C_in). Differences from
BiBench, on purpose: h never drops to 0 (d // 64 = 0 for C_in < 64 there),
and the modules are the layer's own parameters, trained with the rest (the
port creates the activation module after the optimizer, so it never trains).
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
from flax.core import FrozenDict

from fda_biper_jax.methods.base import (Array, Method, Param, check_float, clip_mask, integer,
                                        nonnegative, optional, positive, sign, surrogate)
from fda_biper_jax.xla_cpu import parity, reduce_pi, sin_reduced, vsin

SHORTCUTS = ("sin", "linear", "none")
NOISE_DEFAULTS = {"reduction": 64, "min_width": 4, "shortcut": "sin", "a": 0.1}


# --------------------------------------------------------------------------
# The surrogate
# --------------------------------------------------------------------------


def fda_series_derivative(x: Array, omega, n_terms, max_terms: int | None = None) -> Array:
  """s_n'(x) = (4 omega / pi) sum_{i=0..n} cos((2i+1) omega x)  (Eq. 10), in closed form.

  The sum is a Dirichlet kernel: sum_{i=0..n} cos((2i+1) t) = sin(2(n+1) t) / (2 sin t),
  t = omega x. It flips sign every half period, so t is first reduced to
  r = t - k pi in [-pi/2, pi/2] (a factor (-1)^k) with an exact Cody-Waite
  reduction: near t = k pi both sines are small and only an exact r keeps
  their ratio accurate. At r = 0 the value is the limit n + 1. Two sines per
  element whatever n is (tested against float64 summation), polynomial ones
  (`xla_cpu.vsin`). n_terms may be traced, so a schedule never recompiles;
  `max_terms`, if given, caps it.
  """
  n = n_terms if max_terms is None else jnp.minimum(n_terms, max_terms)
  t = omega * x
  k, r = reduce_pi(t)
  sin_r = sin_reduced(r)
  at_zero = sin_r == 0
  kernel = jnp.where(at_zero, n + 1.0,
                     vsin(2.0 * (n + 1.0) * r) / (2.0 * jnp.where(at_zero, 1.0, sin_r)))
  return (4.0 * omega / math.pi) * parity(k) * kernel


_fda = surrogate(lambda x, omega, n, max_terms: sign(x),
                 lambda x, omega, n, max_terms: fda_series_derivative(x, omega, n, max_terms),
                 static_argnums=(3,))
_fda_clip = surrogate(
    lambda x, omega, n, clip, max_terms: sign(x),
    lambda x, omega, n, clip, max_terms: clip_mask(x, clip,
                                                   fda_series_derivative(x, omega, n, max_terms)),
    static_argnums=(4,))


def _check_n_terms(v, max_terms) -> int | None:
  max_terms = optional(integer(0))("fda", "max_terms", max_terms)
  if max_terms is not None and not isinstance(max_terms, int):
    raise ValueError(f"fda: max_terms={max_terms!r} is not allowed; it must be a Python int >= 0")
  n = integer(0)("fda", "n_terms", v)
  if isinstance(n, int) and max_terms is not None and n > max_terms:
    raise ValueError(f"fda: n_terms={n} exceeds max_terms={max_terms}; "
                     "raise max_terms to the largest n the schedule produces")
  return max_terms


def fda(x: Array, omega, n_terms, clip=None, *, max_terms: int | None = None) -> Array:
  """sign(x); backward s_n'(x) (Eq. 10), zeroed outside |x| <= clip when clip is given.

  n_terms may be a traced integer (a schedule growing n from 9 to 18): the
  series is summed in closed form (`fda_series_derivative`), so the program
  compiles once for every n. `max_terms`, an optional static Python int,
  caps a traced n_terms (a concrete n_terms above it is an error).
  """
  x = check_float("fda", x)
  positive("fda", "omega", omega)
  if clip is not None:
    positive("fda", "clip", clip)
  if isinstance(max_terms, float):
    raise ValueError(f"fda: max_terms={max_terms!r} is not allowed; it must be a Python int >= 0")
  max_terms = _check_n_terms(n_terms, max_terms)
  if clip is None:
    return _fda(x, omega, n_terms, max_terms)
  return _fda_clip(x, omega, n_terms, clip, max_terms)


# --------------------------------------------------------------------------
# The noise adaptation module, as pure functions of its parameters
# --------------------------------------------------------------------------


def hidden_width(d: int, reduction: int, min_width: int) -> int:
  """Width of the MLP's hidden layer: d // reduction, never below min_width."""
  return max(d // reduction, min_width)


def noise_config(where: str, name: str, v) -> FrozenDict | None:
  """Validates the noise module's options: None/False (off), True (defaults) or a
  mapping of `NOISE_DEFAULTS`' fields; returns the full options or None."""
  if v is None or v is False:
    return None
  cfg = {} if v is True else dict(v) if hasattr(v, "keys") else None
  if cfg is None:
    raise ValueError(f"{where}: {name}={v!r} is not allowed; None, True or a mapping of "
                     f"{list(NOISE_DEFAULTS)}")
  bad = set(cfg) - set(NOISE_DEFAULTS)
  if bad:
    raise ValueError(f"{where}: {name} takes no option {sorted(bad)}; "
                     f"allowed: {list(NOISE_DEFAULTS)}")
  cfg = {**NOISE_DEFAULTS, **cfg}
  for key in ("reduction", "min_width"):
    cfg[key] = integer(1)(where, f"{name}.{key}", cfg[key])
  if cfg["shortcut"] not in SHORTCUTS:
    raise ValueError(f"{where}: {name}.shortcut={cfg['shortcut']!r} is not allowed; "
                     f"allowed: {list(SHORTCUTS)}")
  cfg["a"] = nonnegative(where, f"{name}.a", cfg["a"])
  return FrozenDict(cfg)


_init = jax.nn.initializers.variance_scaling(1.0 / 3.0, "fan_in", "uniform")


def init_noise(key, d: int, cfg) -> dict[str, Array]:
  """{'w1': [d, h], 'w2': [h, d]}, zero-mean fan-in uniform (torch.nn.Linear's
  default, bias-free)."""
  h = hidden_width(d, cfg["reduction"], cfg["min_width"])
  k1, k2 = jax.random.split(key)
  return {"w1": _init(k1, (d, h), jnp.float32), "w2": _init(k2, (h, d), jnp.float32)}


def noise(params, t: Array, cfg) -> Array:
  """e(t) = relu(t W1) W2 + eta(t) over the last axis of t (Eq. 13-14).

  The products run on one [rows, d] matrix, which XLA:CPU computes faster
  than on t's [B, H, W, d] directly (same values).
  """
  d = t.shape[-1]
  rows = t.reshape(-1, d)
  w1, w2 = params["w1"].astype(t.dtype), params["w2"].astype(t.dtype)
  e = jnp.dot(jax.nn.relu(jnp.dot(rows, w1)), w2).reshape(t.shape)
  if cfg["shortcut"] == "sin":
    e = e + cfg["a"] * vsin(t)
  elif cfg["shortcut"] == "linear":
    e = e + cfg["a"] * t
  return e


def kernel_rows(w: Array) -> Array:
  """A kernel [..., Cout] as one row per output channel, [Cout, prod(...)]."""
  return w.reshape(-1, w.shape[-1]).T


# --------------------------------------------------------------------------
# The method
# --------------------------------------------------------------------------

class FDA(Method):
  name = "fda"
  summary = "sign, Fourier-series backward (FDA), optional noise adaptation"
  params = {
      "omega": Param(0.1, positive, doc="frequency of the series (period 2 pi / omega)"),
      "n_terms": Param({"schedule": "stepwise", "start": 9, "end": 18}, integer(0),
                       schedulable=True, integer=True, doc="terms of the series, n + 1 cosines"),
      "clip": Param(1.0, optional(positive), doc="zero the gradient where |x| > clip"),
      "max_terms": Param(None, optional(integer(0)), doc="static cap of a traced n_terms"),
      "noise": Param(None, noise_config, doc="the noise adaptation module's options"),
      "alpha": Param({"schedule": "cosine", "start": 0.1, "end": 0.0}, nonnegative,
                     schedulable=True, doc="weight of the learned error term"),
  }
  aux_name = "noise"
  usage = {"kernel_quantizer": {"name": "fda", "noise": NOISE_DEFAULTS},
           "input_quantizer": {"name": "fda", "noise": NOISE_DEFAULTS},
           "scaling": "mean_abs", "prenorm": False}

  def check(self, params, given):
    if params["noise"] is None:
      if "alpha" in given:
        raise ValueError("fda: alpha weights the noise adapter's term, which is off; set "
                         "noise={...} (e.g. True for the paper's module) or drop alpha")
      params = {k: v for k, v in params.items() if k != "alpha"}
    n, cap = params["n_terms"], params["max_terms"]
    if cap is not None:
      top = n.bounds[1] if hasattr(n, "bounds") else n
      if top > cap:
        raise ValueError(f"fda: n_terms={int(top)} exceeds max_terms={cap}; "
                         "raise max_terms to the largest n the schedule produces")
    return params

  def forward(self, x, p):
    return fda(x, p["omega"], p["n_terms"], p["clip"], max_terms=p["max_terms"])

  def has_aux(self, p, role):
    return p["noise"] is not None

  def init_aux(self, key, role, shape, p):
    d = math.prod(shape[:-1]) if role == "kernel" else shape[-1]
    return init_noise(key, d, p["noise"])

  def quantize(self, x, p, aux=None, role="input"):
    y = self.forward(x, p)
    if aux is None:
      return y
    if role == "kernel":
      e = noise(aux, kernel_rows(x), p["noise"]).T.reshape(x.shape)
    else:
      e = noise(aux, x, p["noise"])
    return y + p["alpha"] * e
