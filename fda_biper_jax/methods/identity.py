"""The full-precision twin: F(x) = x, gradient 1.

The same network with the identity in place of each binarizer: the
reference every estimator is compared with (accuracy, speed, gradients).
"""

from __future__ import annotations

import jax.numpy as jnp

from fda_biper_jax.methods.base import Array, Method, check_float, surrogate

_identity = surrogate(lambda x: x, lambda x: jnp.ones_like(x))


def identity(x: Array) -> Array:
  """x, gradient 1."""
  return _identity(check_float("identity", x))


class Identity(Method):
  scale_invariant = False
  name = "identity"
  summary = "full precision"
  binary = False
  usage = {"kernel_quantizer": {"name": "identity"}, "input_quantizer": {"name": "identity"},
           "scaling": "none", "prenorm": False}

  def forward(self, x, p):
    return identity(x)

  def deploy(self, x, p, aux=None, role="input"):
    return x
