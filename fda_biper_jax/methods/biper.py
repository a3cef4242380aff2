"""BiPer (Vargas et al., CVPR 2024): the binary periodic function.

Forward the square wave sign(sin(omega0 x)) (Eq. 4), sign(0) = +1; backward
through its fundamental sin(omega0 x): the gradient is g omega0 cos(omega0 x),
unclipped (Eq. 5). The public code uses omega0 = 20 in every run script.

Two stages (the public CIFAR code): stage 1 trains the real periodic weights
sin(omega0 w) (`biper_sine`, not binary) with binary activations; stage 2
binarizes them with the square wave (`biper`) from stage 1's weights. The
public code adds tau mean(sin^2(omega0 W)) per binarized layer to the loss
(`regularizer`; the paper does not describe it), pulling latent weights
toward the switching points of the square wave: tau = 0.037 in stage 1 and
0.0468 in stage 2 of its CIFAR scripts, none in its ImageNet code (the
default here is 0: the recipes set it).

Quantization error (paper Eq. 1-4). The best scaled binary approximation
alpha sign(u) of the fundamental u = sin(omega0 w) has error Var|u|; for
w ~ Laplace(0, b) and x = b omega0 (the Laplace characteristic function
E cos(t w) = 1 / (1 + b^2 t^2) and the Laplace transform of |sin|):

    E[sin^2(omega0 w)] = 2x^2 / (1 + 4x^2),   E|sin(omega0 w)| = x coth(pi / (2x)) / (1 + x^2),
    QE(x) = 2x^2/(1 + 4x^2) - x^2 coth^2(pi/(2x)) / (1 + x^2)^2,

0 at x = 0, 1/2 - 4/pi^2 as x -> inf, maximum 0.1028346 at x* = 0.954882.
"""

from __future__ import annotations

import jax.numpy as jnp
import numpy as np

from fda_biper_jax.methods.base import (Array, Method, Param, check_float, get, nonnegative,
                                        positive, surrogate)
from fda_biper_jax.xla_cpu import compute_dtype


def square_wave(x: Array, omega0) -> Array:
  """sign(sin(omega0 x)) (Eq. 4), sign(0) = +1, exactly +-1 in x's dtype."""
  t = jnp.sin(omega0 * x.astype(compute_dtype(x.dtype)))
  return jnp.where(t >= 0, jnp.ones_like(x), -jnp.ones_like(x))


def sine(x: Array, omega0) -> Array:
  """sin(omega0 x) in x's dtype (computed in at least float32)."""
  return jnp.sin(omega0 * x.astype(compute_dtype(x.dtype))).astype(x.dtype)


def _fundamental_derivative(x, omega0):
  return omega0 * jnp.cos(omega0 * x)


_biper = surrogate(square_wave, _fundamental_derivative)
_biper_sine = surrogate(sine, _fundamental_derivative)


def biper(x: Array, omega0) -> Array:
  """The square wave sign(sin(omega0 x)); backward g omega0 cos(omega0 x)."""
  x = check_float("biper", x)
  positive("biper", "omega0", omega0)
  return _biper(x, omega0)


def biper_sine(x: Array, omega0) -> Array:
  """BiPer stage 1: the real periodic weights sin(omega0 x), exact gradient."""
  x = check_float("biper_sine", x)
  positive("biper_sine", "omega0", omega0)
  return _biper_sine(x, omega0)


def biper_regularizer(w: Array, omega0) -> Array:
  """mean(sin^2(omega0 w)) = mean(0.5 - 0.5 cos(2 omega0 w)): the public code's term."""
  return jnp.mean(jnp.square(jnp.sin(omega0 * w.astype(compute_dtype(w.dtype)))))


# --------------------------------------------------------------------------
# Quantization error of Laplace weights, in closed form
# --------------------------------------------------------------------------


def check_scale(fn: str, b, omega0) -> tuple[np.ndarray, np.ndarray]:
  b = np.asarray(b, np.float64)
  omega0 = np.asarray(omega0, np.float64)
  if np.any(np.isnan(b)) or np.any(b < 0):
    raise ValueError(f"{fn}: b={b.tolist()!r} is not allowed; the Laplace scale b must be >= 0")
  if np.any(np.isnan(omega0)) or np.any(omega0 <= 0):
    raise ValueError(f"{fn}: omega0={omega0.tolist()!r} is not allowed; omega0 must be > 0")
  return b, omega0


def laplace_sin_moments(x) -> tuple[np.ndarray, np.ndarray]:
  """(E[sin^2(omega0 w)], E|sin(omega0 w)|) for w ~ Laplace(0, b), x = b omega0.

  Overflow-free for every x in [0, inf]: for x <= 1 as written
  (coth(pi/(2x)) = 1/tanh, exactly 1 at x = 0); for x > 1, where x^2 may
  overflow, as 2 / (4 + x^-2) and (2/pi) (y coth y) / (1 + x^-2) with
  y = pi/(2x), y coth y -> 1.
  """
  x = np.asarray(x, np.float64)
  small = x <= 1.0
  xs = np.where(small, x, 1.0)   # the x <= 1 branch sees only x <= 1
  xl = np.where(small, 1.0, x)   # the x > 1 branch sees only x > 1
  with np.errstate(divide="ignore"):
    ys = np.pi / (2.0 * xs)      # inf at x = 0, where tanh = 1
  sin2_small = 2.0 * xs * xs / (1.0 + 4.0 * xs * xs)
  abs_small = xs / (1.0 + xs * xs) / np.tanh(ys)
  inv = 1.0 / xl                 # in [0, 1); 0 only at x = inf
  yl = (np.pi / 2.0) * inv
  y_coth_y = np.where(yl > 0, yl / np.tanh(np.where(yl > 0, yl, 1.0)), 1.0)
  sin2_large = 2.0 / (4.0 + inv * inv)
  abs_large = (2.0 / np.pi) * y_coth_y / (1.0 + inv * inv)
  return np.where(small, sin2_small, sin2_large), np.where(small, abs_small, abs_large)


def quantization_error(b, omega0):
  """QE(x) = 2x^2/(1+4x^2) - x^2 coth^2(pi/(2x))/(1+x^2)^2, x = b omega0 (Eq. 4).

  Args:
    b: Laplace scale(s) >= 0 (scalar or array).
    omega0: frequency (frequencies) > 0; broadcast against b.

  Returns:
    A float for scalar inputs, else an array of the broadcast shape. Exactly
    0 at b = 0; 1/2 - 4/pi^2 at b = inf.
  """
  b, omega0 = check_scale("quantization_error", b, omega0)
  sin2, abs_sin = laplace_sin_moments(b * omega0)
  qe = sin2 - abs_sin ** 2
  return float(qe) if qe.ndim == 0 else qe


# --------------------------------------------------------------------------
# The methods
# --------------------------------------------------------------------------

PARAMS = {
    "omega0": Param(20.0, positive, doc="frequency of the square wave and its fundamental"),
    "tau": Param(0.0, nonnegative, schedulable=True,
                 doc="weight of the sin^2 regulariser (public code: 0.037, then 0.0468)"),
}


class BiPerMethod(Method):
  """Shared by both stages: the fundamental sin(omega0 w), its QE and the regulariser."""
  params = PARAMS

  def regularizer(self, w, p):
    tau = p["tau"]
    if isinstance(tau, float) and tau == 0.0:
      return None
    return tau * biper_regularizer(w, p["omega0"])

  def fundamental(self, w, p):
    return np.sin(p["omega0"] * np.asarray(w, np.float64))

  def laplace_qe(self, b, p):
    return quantization_error(b, p["omega0"])


# Activations as ReCU / BiPer: each sample divided by its own std, then sign with the
# ApproxSign backward; a learned per-channel scale on the binary layers' outputs.
ACTIVATIONS = {"input_quantizer": {"name": "approx_sign"}, "scaling": "learned", "prenorm": True}


class BiPer(BiPerMethod):
  scale_invariant = False
  name = "biper"
  summary = "square wave sign(sin(w0 x)), sine backward (BiPer)"
  usage = {"kernel_quantizer": {"name": "biper", "tau": 0.0468}, **ACTIVATIONS}

  def forward(self, x, p):
    return biper(x, p["omega0"])

  def deploy(self, x, p, aux=None, role="input"):
    return square_wave(x, p["omega0"])


class BiPerSine(BiPerMethod):
  scale_invariant = False
  name = "biper_sine"
  summary = "real weights sin(w0 x): BiPer stage 1 (not binary)"
  binary = False
  usage = {"kernel_quantizer": {"name": "biper_sine", "tau": 0.037}, **ACTIVATIONS}

  def forward(self, x, p):
    return biper_sine(x, p["omega0"])

  def deploy(self, x, p, aux=None, role="input"):
    return sine(x, p["omega0"])

  def binary_view(self, quantizer):
    """Stage 2 binarizes stage 1's weights with the square wave of the same omega0."""
    return get({**quantizer.config(), "name": "biper"})
