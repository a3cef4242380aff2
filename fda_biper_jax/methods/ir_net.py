"""IR-Net (Qin et al., CVPR 2020): the Error Decay Estimator (EDE).

Forward sign(x); backward the derivative of k tanh(t x),

    k t (1 - tanh^2(t x)),   k = max(1 / t, 1),

with t growing geometrically over training from T_min = 0.1 to T_max = 10,
t = T_min 10^(e/E log10(T_max / T_min)) for epoch e of E (the public code
updates it per epoch): early on a near-identity STE (k t = 1 at t <= 1),
late a near-sign. Weights and activations.

Libra-PB (`balance`, weights only, off by default): IR-Net balances and
standardises each output channel's weights before the sign,
w -> (w - mean_c) / std_c (std with Bessel's correction, as torch.std), in
training and deployment alike, the gradient flowing through it. IR-Net also
scales by 2^round(log2 mean|w_balanced|); after standardisation mean|w| is
near sqrt(2/pi) = 0.8, whose power of two is 1, so this library leaves the
scale to the layer's `scaling`.
"""

from __future__ import annotations

import jax.numpy as jnp

from fda_biper_jax.methods.base import (Array, Method, Param, boolean, check_float, positive, sign,
                                        surrogate)


def ede_derivative(x: Array, t) -> Array:
  """k t (1 - tanh^2(t x)), k = max(1/t, 1)."""
  k = jnp.maximum(1.0 / t, 1.0)
  th = jnp.tanh(t * x)
  return k * t * (1.0 - th * th)


_ir_net = surrogate(lambda x, t: sign(x), ede_derivative)


def ir_net(x: Array, t) -> Array:
  """sign(x); backward k t (1 - tanh^2(t x)), k = max(1/t, 1). t may be traced."""
  x = check_float("ir_net", x)
  positive("ir_net", "t", t)
  return _ir_net(x, t)


def balance(w: Array) -> Array:
  """Libra-PB: each output channel of a kernel [..., Cout] to zero mean, unit std."""
  axes = tuple(range(w.ndim - 1))
  c = w - jnp.mean(w, axis=axes, keepdims=True)
  n = max(c.size // c.shape[-1] - 1, 1)
  return c / jnp.sqrt(jnp.sum(c * c, axis=axes, keepdims=True) / n)


class IRNet(Method):
  name = "ir_net"
  summary = "sign, Error Decay Estimator backward, t 0.1 -> 10 (IR-Net)"
  params = {
      "t": Param({"schedule": "geometric", "start": 0.1, "end": 10.0, "per": "epoch"}, positive,
                 schedulable=True, doc="sharpness of tanh(t x); k = max(1/t, 1)"),
      "balance": Param(False, boolean, doc="Libra-PB: balance and standardise weights (kernels)"),
  }
  usage = {"kernel_quantizer": {"name": "ir_net"}, "input_quantizer": {"name": "ir_net"},
           "scaling": "mean_abs", "prenorm": False}

  def _operand(self, x, p, role):
    if not p["balance"]:
      return x
    if role != "kernel":
      raise ValueError("ir_net: balance=True (Libra-PB) applies to weights; use it in the "
                       "kernel_quantizer only")
    return balance(x)

  def forward(self, x, p):
    return ir_net(x, p["t"])

  def quantize(self, x, p, aux=None, role="input"):
    return ir_net(self._operand(x, p, role), p["t"])

  def deploy(self, x, p, aux=None, role="input"):
    return sign(self._operand(x, p, role))
