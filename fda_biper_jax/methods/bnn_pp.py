"""BNN++ (ProxConnect++, Lu et al., NeurIPS 2023): SignSwish forward and backward.

PC++ reads a binarizer as a pair (F, B) and requires F = P o B for a
proximal map P. BNN++ takes B = the SignSwish map SS_beta
(`sign_swish.sign_swish_map`) and uses it in the forward pass too: during
training the network sees the smooth SS_beta(x) (values in [-1.2, 1.2], its
extrema +-1.19968), with beta growing over training so that SS_beta -> sign
pointwise; the gradient is SS_beta'(x). Training output is therefore not
binary; the deployed network uses sign, the limit beta -> inf.

Schedule: the paper's exact schedule was not retrievable here; the default
anneals beta geometrically from 2 to 200 over training (per step).

Usage: the text of the paper available here does not say whether BNN++
binarizes activations with SS_beta. This library's usage binarizes weights
and activations with it (a fully binary network, as the other estimators);
its surrogate's peak slope beta then compounds through the binary layers
(per-layer gradient norms are logged), so `WEIGHTS_ONLY` offers the
variant with SS_beta on the weights and ApproxSign on the activations.
"""

from __future__ import annotations

from fda_biper_jax.methods.base import Array, Method, Param, check_float, positive, surrogate
from fda_biper_jax.methods.sign_swish import sign_swish_derivative, sign_swish_map
from fda_biper_jax.xla_cpu import compute_dtype

_bnn_pp = surrogate(
    lambda x, beta: sign_swish_map(x.astype(compute_dtype(x.dtype)), beta).astype(x.dtype),
    sign_swish_derivative)


def bnn_pp(x: Array, beta) -> Array:
  """SS_beta(x); backward SS_beta'(x). beta may be traced (a schedule)."""
  x = check_float("bnn_pp", x)
  positive("bnn_pp", "beta", beta)
  return _bnn_pp(x, beta)


DEFAULT_BETA = {"schedule": "geometric", "start": 2.0, "end": 200.0}
WEIGHTS_ONLY = {"kernel_quantizer": {"name": "bnn_pp"}, "input_quantizer": {"name": "approx_sign"},
                "scaling": "mean_abs", "prenorm": False}


class BNNPlusPlus(Method):
  name = "bnn_pp"
  summary = "SignSwish forward and backward, annealed to sign (BNN++)"
  params = {"beta": Param(DEFAULT_BETA, positive, schedulable=True,
                          doc="SS_beta's slope at 0; grows so that SS_beta -> sign")}
  usage = {"kernel_quantizer": {"name": "bnn_pp"}, "input_quantizer": {"name": "bnn_pp"},
           "scaling": "mean_abs", "prenorm": False}
  variants = {"weights_only": WEIGHTS_ONLY}

  def forward(self, x, p):
    return bnn_pp(x, p["beta"])
