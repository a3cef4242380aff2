"""ReActNet (Liu et al., ECCV 2020): RSign with learned thresholds, and RPReLU.

RSign(x) = sign(x - alpha_c): a learned threshold per channel of the layer's
input (the public code's LearnableBias before the sign: x + b_c, b = -alpha,
initialised to 0). The backward is Bi-Real's ApproxSign around the
threshold, (2 - 2|x - alpha_c|) 1[|x - alpha_c| <= 1], for x and (negated,
summed) for alpha_c. Deployed: sign(x - alpha_c), the thresholds exported
with the packed layer.

RPReLU(x) = PReLU_beta(x - gamma_c) + zeta_c, with learned per-channel
shifts gamma, zeta (init 0) and slope beta (init 0.25): ReActNet's
activation after each binary conv's BatchNorm and shortcut, in place of
the models' hardtanh / PReLU. It is a Flax module here (`RPReLU`): a model
that uses ReActNet's block layout builds it where the paper puts it.

The weights follow ReActNet's HardBinaryConv: sign with the clipped STE
(gradient 1 on |w| <= 1) and the per-output-channel mean|W| scale.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import linen as nn

from fda_biper_jax.methods.approx_sign import approx_sign
from fda_biper_jax.methods.base import Array, Method, check_float, sign
from fda_biper_jax.xla_cpu import compute_dtype


def shifted(x: Array, threshold) -> Array:
  """x - threshold in at least float32 (the sign of the difference, not of its rounding)."""
  return x.astype(compute_dtype(x.dtype)) - jnp.asarray(threshold, jnp.float32)


def rsign(x: Array, threshold=0.0) -> Array:
  """sign(x - threshold); backward ApproxSign around the threshold, for x and threshold.

  `threshold` broadcasts against x (a per-channel vector [C] for x [..., C]);
  it is an ordinary differentiable input (its gradient is minus x's, summed
  over the broadcast axes, by autodiff of the shift), so it may be a learned
  parameter, replicated under shard_map.
  """
  x = check_float("rsign", x)
  return approx_sign(shifted(x, threshold)).astype(x.dtype)


class RSign(Method):
  scale_invariant = False
  name = "rsign"
  summary = "sign(x - alpha_c), learned per-channel thresholds (ReActNet)"
  roles = ("input",)
  aux_name = "threshold"
  activation = None  # set below: RPReLU
  usage = {"kernel_quantizer": {"name": "ste", "clip": 1.0}, "input_quantizer": {"name": "rsign"},
           "scaling": "mean_abs", "prenorm": False}

  def forward(self, x, p):
    return rsign(x)

  def has_aux(self, p, role):
    return True

  def init_aux(self, key, role, shape, p):
    return {"alpha": jnp.zeros((shape[-1],), jnp.float32)}

  def quantize(self, x, p, aux=None, role="input"):
    return rsign(x, 0.0 if aux is None else aux["alpha"])

  def deploy(self, x, p, aux=None, role="input"):
    return sign(shifted(x, 0.0 if aux is None else aux["alpha"])).astype(x.dtype)


class RPReLU(nn.Module):
  """PReLU_beta(x - gamma_c) + zeta_c over the last axis, per channel."""
  init_slope: float = 0.25

  @nn.compact
  def __call__(self, x: Array) -> Array:
    c = x.shape[-1]
    gamma = self.param("gamma", nn.initializers.zeros, (c,), jnp.float32).astype(x.dtype)
    beta = self.param("beta", nn.initializers.constant(self.init_slope), (c,),
                      jnp.float32).astype(x.dtype)
    zeta = self.param("zeta", nn.initializers.zeros, (c,), jnp.float32).astype(x.dtype)
    y = x - gamma
    return jnp.where(y >= 0, y, beta * y) + zeta


RSign.activation = RPReLU
