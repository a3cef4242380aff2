"""Straight-through estimator (BinaryConnect, Courbariaux et al. 2015; Larq `ste_sign`).

Forward sign(x); backward the identity, or 1[|x| <= clip] when `clip` is
given (Larq's default clip is 1: the gradient of hardtanh).
"""

from __future__ import annotations

import jax.numpy as jnp

from fda_biper_jax.methods.base import (Array, Method, Param, check_float, clip_mask,
                                        optional, positive, sign, surrogate)

_ste = surrogate(lambda x: sign(x), lambda x: jnp.ones_like(x))
_ste_clip = surrogate(lambda x, clip: sign(x), lambda x, clip: clip_mask(x, clip, jnp.ones_like(x)))


def ste_sign(x: Array, clip=None) -> Array:
  """sign(x); backward 1, or 1 where |x| <= clip and 0 elsewhere."""
  x = check_float("ste_sign", x)
  if clip is None:
    return _ste(x)
  positive("ste_sign", "clip", clip)
  return _ste_clip(x, clip)


class STE(Method):
  name = "ste"
  summary = "sign, straight-through (optionally clipped)"
  params = {"clip": Param(None, optional(positive), doc="zero the gradient where |x| > clip")}
  usage = {"kernel_quantizer": {"name": "ste"}, "input_quantizer": {"name": "ste"},
           "scaling": "mean_abs", "prenorm": False}

  def forward(self, x, p):
    return ste_sign(x, p["clip"])
