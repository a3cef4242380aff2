"""ApproxSign (Bi-Real Net, Liu et al., ECCV 2018).

Forward sign(x); backward the derivative of the piecewise quadratic
2x - x|x| on |x| <= 1: (2 - 2|x|) 1[|x| <= 1].
"""

from __future__ import annotations

import jax.numpy as jnp

from fda_biper_jax.methods.base import Array, Method, check_float, sign, surrogate


def approx_sign_derivative(x: Array) -> Array:
  """(2 - 2|x|) on |x| <= 1, else 0."""
  return jnp.where(jnp.abs(x) <= 1.0, 2.0 - 2.0 * jnp.abs(x), 0.0)


_approx_sign = surrogate(lambda x: sign(x), approx_sign_derivative)


def approx_sign(x: Array) -> Array:
  """sign(x); backward 2 - 2|x| on |x| <= 1, else 0."""
  return _approx_sign(check_float("approx_sign", x))


class ApproxSign(Method):
  name = "approx_sign"
  summary = "sign, Bi-Real ApproxSign backward"
  usage = {"kernel_quantizer": {"name": "approx_sign"}, "input_quantizer": {"name": "approx_sign"},
           "scaling": "mean_abs", "prenorm": False}

  def forward(self, x, p):
    return approx_sign(x)
