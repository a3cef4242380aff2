"""FDA's noise adaptation module: a learned model of the series' error.

FDA-BNN (Xu et al., NeurIPS 2021, Sec. 3.3, Eq. 13-14) approximates sign(t)
by the truncated Fourier series s_n(t); the residual r(t) = sign(t) - s_n(t)
is modelled by a small bias-free MLP with a fixed shortcut,

    e(t) = relu(t W1) W2 + eta(t),    W1: d x d/k,  W2: d/k x d,  k = 64,
    eta(t) = a sin(t)  (a = 0.1, the best shortcut of the paper's Table 4),

(the sine and its derivative evaluated by `quantizers.vsin`, vectorised),

and in training a binarized value is sign(t) + alpha e(t), sign's backward
being the series derivative (`quantizers.fda`), with alpha decaying to 0 so
that inference is pure sign. Layers apply the module to a weight kernel with
one row per output channel (d = C_in kh kw) and to activations per pixel
across channels (d = C_in).

Differences from the BiBench port, on purpose: the hidden width is
max(d // k, min_width) rather than d // 64, which is 0 for d < 64; and the
module is an ordinary Flax submodule created with the layer, so its
parameters are in the model's `params` and are trained with the rest (the
port builds the activation module after the optimizer, so it never trains).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import linen as nn

from fda_biper_jax.quantizers import vsin

SHORTCUTS = ("sin", "linear", "none")


def hidden_width(d: int, reduction: int, min_width: int) -> int:
  """Width of the MLP's hidden layer: d // reduction, never below min_width."""
  return max(d // reduction, min_width)


class NoiseAdapter(nn.Module):
  """e(t) = relu(t W1) W2 + a * shortcut(t) over the last axis of t (Eq. 13-14).

  Attributes:
    reduction: k, the hidden width is d // k (64 in the paper).
    min_width: lower bound of the hidden width (the port collapses to 0).
    shortcut: 'sin' (a sin t, the paper's choice), 'linear' (a t) or 'none',
      the three rows of the paper's Table 4.
    a: the shortcut's scale (0.1 in the paper).
  """
  reduction: int = 64
  min_width: int = 4
  shortcut: str = "sin"
  a: float = 0.1

  def __post_init__(self):
    if self.shortcut not in SHORTCUTS:
      raise ValueError(f"NoiseAdapter: shortcut={self.shortcut!r} is not allowed; "
                       f"allowed: {list(SHORTCUTS)}")
    if self.reduction < 1 or self.min_width < 1:
      raise ValueError(f"NoiseAdapter: reduction={self.reduction}, min_width="
                       f"{self.min_width} are not allowed; both must be integers >= 1")
    super().__post_init__()

  @nn.compact
  def __call__(self, t: jax.Array) -> jax.Array:
    d = t.shape[-1]
    h = hidden_width(d, self.reduction, self.min_width)
    # Zero-mean fan-in initialisation (as torch.nn.Linear's default, bias-free).
    init = nn.initializers.variance_scaling(1.0 / 3.0, "fan_in", "uniform")
    w1 = self.param("w1", init, (d, h), jnp.float32)
    w2 = self.param("w2", init, (h, d), jnp.float32)
    # As one [pixels, d] matrix: XLA:CPU runs these thin products 1.4-2x faster
    # (forward and backward, same values) than on t's [B, H, W, d] directly.
    rows = t.reshape(-1, d)
    e = jnp.dot(nn.relu(jnp.dot(rows, w1.astype(t.dtype))), w2.astype(t.dtype)).reshape(t.shape)
    if self.shortcut == "sin":
      # `vsin`: XLA:CPU's jnp.sin (and its gradient's cos) is a scalar libm call per element.
      e = e + self.a * vsin(t)
    elif self.shortcut == "linear":
      e = e + self.a * t
    return e
