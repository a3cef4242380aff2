"""ReSTE (Wu et al., ICCV 2023): the rectified straight-through estimator.

Forward sign(x); backward the derivative of the power function
sign(x) |x|^(1/o), which tends to sign as o grows and is the identity (an
STE) at o = 1:

    (1/o) |x|^((1 - o)/o)        on 0.1 < |x| <= t,
    0.1^(1/o) / 0.1              on |x| <= 0.1 (the public code's choice: the
                                 power function's secant slope from 0 to 0.1,
                                 where its derivative is unbounded),
    0                            for |x| > t,

with t = 1.5 and o growing from 1 to o_end = 3 as
o = 1 + (o_end - 1)(1 - cos(pi/2 e/E)) for epoch e of E (a quarter cosine).
Weights and activations; the public code scales the weights by mean|W| of
the whole tensor (`scaling='mean_abs_tensor'`).
"""

from __future__ import annotations

import jax.numpy as jnp

from fda_biper_jax.methods.base import Array, Method, Param, check_float, positive, sign, surrogate

INTERVAL = 0.1  # below this |x|, the secant slope (public code)


def reste_derivative(x: Array, t, o) -> Array:
  """The ReSTE surrogate's derivative (module docstring)."""
  a = jnp.abs(x)
  inv = 1.0 / o
  power = inv * jnp.power(jnp.maximum(a, INTERVAL), inv - 1.0)
  secant = jnp.power(INTERVAL, inv) / INTERVAL
  return jnp.where(a <= INTERVAL, secant, jnp.where(a <= t, power, 0.0))


_reste = surrogate(lambda x, t, o: sign(x), reste_derivative)


def reste(x: Array, t=1.5, o=1.0) -> Array:
  """sign(x); backward the power-function derivative of threshold t and order o."""
  x = check_float("reste", x)
  positive("reste", "t", t)
  positive("reste", "o", o)
  return _reste(x, t, o)


class ReSTE(Method):
  name = "reste"
  summary = "sign, power-function backward, o 1 -> 3 (ReSTE)"
  params = {
      "t": Param(1.5, positive, schedulable=True, doc="zero the gradient where |x| > t"),
      "o": Param({"schedule": "quarter_cosine", "start": 1.0, "end": 3.0, "per": "epoch"},
                 positive, schedulable=True, doc="order of the power function |x|^(1/o)"),
  }
  usage = {"kernel_quantizer": {"name": "reste"}, "input_quantizer": {"name": "reste"},
           "scaling": "mean_abs_tensor", "prenorm": False}

  def forward(self, x, p):
    return reste(x, p["t"], p["o"])
