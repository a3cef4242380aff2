"""SignSwish (BNN+, Darabi et al., 2018; Larq `swish_sign`).

Forward sign(x); backward the derivative of the SignSwish map

    SS_beta(x) = 2 sigmoid(bx) (1 + bx (1 - sigmoid(bx))) - 1,
    SS_beta'(x) = 2b s (1 - s) (2 + bx (1 - 2s)) = b (2 - bx tanh(bx/2)) / (1 + cosh bx),

s = sigmoid(bx), beta = 5 in BNN+ and Larq. Both are evaluated as rational
functions of e = exp(-|bx|) in (0, 1] (`sign_swish_map`,
`sign_swish_derivative`): no overflow, no cancellation in 1 - s.

The surrogate's peak slope is beta (at x = 0): on activations it multiplies
through every binary layer of a deep network (benchmarks/NOTES.md measures
the stem gradient norm); the sweep logs per-layer gradient norms.
"""

from __future__ import annotations

import jax.numpy as jnp

from fda_biper_jax.methods.base import Array, Method, Param, check_float, positive, sign, surrogate

# |beta x| beyond this is saturated: exp(-|beta x|) is 0 in float32 there, and clipping
# keeps |beta x| * exp(-|beta x|) = inf * 0 from producing nan.
SATURATION = 100.0


def sign_swish_map(x: Array, beta) -> Array:
  """SS_beta(x), evaluated as +-(1 + 2 a e - e^2) / (1 + e)^2, a = |bx|, e = exp(-a).

  One exponential and a division last: XLA:CPU computes a division once and
  stores it, where a cheap last operation would be recomputed in every
  consumer (see `fda_biper_jax.xla_cpu`).
  """
  bx = jnp.clip(beta * x, -SATURATION, SATURATION)
  a = jnp.abs(bx)
  e = jnp.exp(-a)
  return (jnp.where(bx < 0, -1.0, 1.0) * (1.0 + (2.0 * a - e) * e)) / jnp.square(1.0 + e)


def sign_swish_derivative(x: Array, beta) -> Array:
  """SS_beta'(x) = 2 b e (2 (1 + e) + a (e - 1)) / (1 + e)^3, a = |bx|, e = h^2, h = exp(-a/2).

  exp(-a/2) rather than exp(-a): XLA would merge two identical exponentials
  of BNN++'s forward and backward into one stored tensor, where the backward
  can recompute its own inside its fusion.
  """
  a = jnp.abs(jnp.clip(beta * x, -SATURATION, SATURATION))
  h = jnp.exp(-0.5 * a)
  e = h * h
  return (2.0 * beta * e * (2.0 * (1.0 + e) + a * (e - 1.0))) / ((1.0 + e) * jnp.square(1.0 + e))


_sign_swish = surrogate(lambda x, beta: sign(x), sign_swish_derivative)


def sign_swish(x: Array, beta=5.0) -> Array:
  """sign(x); backward SS_beta'(x)."""
  x = check_float("sign_swish", x)
  positive("sign_swish", "beta", beta)
  return _sign_swish(x, beta)


class SignSwish(Method):
  """BNN+ introduces SignSwish as the derivative of the sign *activation*; this
  library's usage applies it to weights and activations alike (the paper's
  text available here does not settle the weights), and `variants` offers
  'weights_only' (SignSwish on the weights, ApproxSign on the activations),
  where its slope cannot compound. beta is fixed (5) unless given a schedule."""
  name = "sign_swish"
  summary = "sign, SignSwish backward (BNN+)"
  params = {"beta": Param(5.0, positive, schedulable=True, doc="slope at 0 of SS_beta")}
  usage = {"kernel_quantizer": {"name": "sign_swish"}, "input_quantizer": {"name": "sign_swish"},
           "scaling": "mean_abs", "prenorm": False}
  variants = {"weights_only": {"kernel_quantizer": {"name": "sign_swish"},
                               "input_quantizer": {"name": "approx_sign"},
                               "scaling": "mean_abs", "prenorm": False}}

  def forward(self, x, p):
    return sign_swish(x, p["beta"])
