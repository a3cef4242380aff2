"""Analysis of binarizers: quantization error, FDA series, per-layer statistics.

Quantization error (QE). A binary layer replaces a latent tensor by a scaled
two-valued one. Write u = phi(w) for the *fundamental* the binarizer takes the
sign of: phi(w) = sin(omega0 w) for BiPer (whose forward is sign(sin(omega0 w))),
phi(w) = w for every sign binarizer (STE, ApproxSign, SignSwish, FDA, BNN++).
The best scaled binary approximation alpha sign(u) of u has
alpha = E|u| and mean squared error

    QE = min_alpha E[(u - alpha sign u)^2] = E[u^2] - (E|u|)^2 = Var|u|     (1)

(the BiPer paper's QE). `qe_relative` = QE / E[u^2] in [0, 1] is its
scale-free form, comparable across binarizers. For w ~ Laplace(0, b) and
x = b omega0, with the Laplace characteristic function E cos(t w) = 1/(1 + b^2 t^2)
and the Laplace transform of |sin|, int_0^inf e^{-s u}|sin u| du = coth(pi s / 2)/(1 + s^2):

    E[sin^2(omega0 w)] = (1 - E cos(2 omega0 w)) / 2 = 2x^2 / (1 + 4x^2)     (2)
    E|sin(omega0 w)|   = x coth(pi / (2x)) / (1 + x^2)                        (3)
    QE_BiPer(x) = 2x^2/(1 + 4x^2) - x^2 coth^2(pi/(2x)) / (1 + x^2)^2        (4)

QE -> 0 as x -> 0, QE -> 1/2 - 4/pi^2 as x -> inf, maximum 0.1028346 at
x* = 0.954882. For sign (phi = identity) and Laplace(0, b): E w^2 = 2b^2,
E|w| = b, so QE_sign = b^2 and qe_relative = 1/2 for every b.

FDA (Xu et al., NeurIPS 2021). sign(x) on |x| < pi/omega equals the square
wave s(x) = 4/pi sum_{i>=0} sin((2i+1) omega x)/(2i+1); its n-th partial sum is
s_n, whose derivative (FDA-BNN Eq. 10), the FDA backward, is
`methods.fda.fda_series_derivative`.

Per-layer statistics. `binarized_layers(model, input_shape)` finds the layers
whose kernel is binarized with the model tracer (`trace`, no arithmetic runs):
a layer counts when its kernel quantizer's method has a binary view (itself
when binary; for BiPer's stage-1 `biper_sine` the square wave stage 2
binarizes with). The fundamental u and the Laplace QE of a layer are its
method's (`Method.fundamental`, `Method.laplace_qe`). Layers are keyed by
their '/'-joined module path (e.g. 'unit1/conv'), in call order; the kernel
is `params[path...]['kernel']`. Paths come from the model's structure, never
from parameter names, so a layer named 'stem' or 'fc' is no special case.
A trainer finds the layers once and logs per epoch:

    found = binarized_layers(model, image_shape)
    stats = layer_stats(params, found)
    flips = sign_flip_share(binarized_kernels(previous_params, found),
                            binarized_kernels(params, found), found)

Gradient mismatch. `gradient_mismatch` compares a model's parameter gradient
under one kernel quantizer with its gradient under a reference one, on the
same variables and batch; the default reference is 'identity', the
full-precision twin (the gradient the latent weights would get without
binarization).
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any, Mapping, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import linen as nn

from fda_biper_jax import methods, trace
from fda_biper_jax.nn import linen as layers
from fda_biper_jax.methods import schedule
from fda_biper_jax.methods.biper import check_scale, laplace_sin_moments  # noqa: F401
from fda_biper_jax.methods.biper import quantization_error as biper_quantization_error

Array = jax.Array
LAWS = ("laplace", "gaussian", "uniform")
SIGN_QE_LIMIT = 0.5 - 4.0 / math.pi ** 2  # QE_BiPer as b omega0 -> inf


# --------------------------------------------------------------------------
# BiPer quantization error of Laplace weights: closed form, Monte Carlo
# --------------------------------------------------------------------------


def _scalar_or_array(v: np.ndarray):
  return float(v) if v.ndim == 0 else v


class Estimate(NamedTuple):
  """A Monte-Carlo estimate and its standard error."""
  value: float
  stderr: float


def sample_weights(law: str, b: float, num_samples: int, seed: int) -> np.ndarray:
  """num_samples float64 draws of scale b from `law` (see `LAWS`).

  'laplace': Laplace(0, b) (E|w| = b); 'gaussian': N(0, b^2);
  'uniform': U(-b, b).
  """
  if law not in LAWS:
    raise ValueError(f"law={law!r} is not allowed; allowed: {list(LAWS)}")
  if not isinstance(num_samples, int) or num_samples < 2:
    raise ValueError(f"num_samples={num_samples!r} is not allowed; an int >= 2 is required")
  rng = np.random.default_rng(seed)
  if law == "laplace":
    return rng.laplace(0.0, b, num_samples)
  if law == "gaussian":
    return rng.normal(0.0, b, num_samples)
  return rng.uniform(-b, b, num_samples)


def biper_quantization_error_mc(b: float, omega0: float, num_samples: int = 100_000,
                                seed: int = 0, law: str = "laplace") -> Estimate:
  """Monte-Carlo estimate of Var|sin(omega0 w)| (Eq. 1) for w drawn from `law`.

  With a = |sin(omega0 w)|, the estimate is mean(a^2) - mean(a)^2; its
  standard error is the delta method's std(a^2 - 2 mean(a) a) / sqrt(N).
  For 'laplace' it estimates `biper_quantization_error(b, omega0)`.
  """
  b, omega0 = (float(v) for v in check_scale("biper_quantization_error_mc", b, omega0))
  a = np.abs(np.sin(omega0 * sample_weights(law, b, num_samples, seed)))
  m1 = a.mean()
  value = float(np.mean(a * a) - m1 * m1)
  stderr = float(np.std(a * a - 2.0 * m1 * a, ddof=1) / math.sqrt(num_samples))
  return Estimate(value, stderr)


def qe_maximum() -> tuple[float, float]:
  """(x*, QE(x*)): the maximum of Eq. 4 over x = b omega0, by bounded Brent search.

  Gives x* = 0.954882, QE* = 0.1028346 (the paper: 0.954882, 0.102835); the
  maximum is flat, so x* is determined to about 1e-8.
  """
  from scipy import optimize  # noqa: PLC0415 -- the 'analysis' extra; nothing else needs it
  res = optimize.minimize_scalar(lambda x: -biper_quantization_error(x, 1.0),
                                 bounds=(0.1, 10.0), method="bounded",
                                 options={"xatol": 1e-10})
  return float(res.x), float(-res.fun)


# --------------------------------------------------------------------------
# Per-tensor statistics
# --------------------------------------------------------------------------


def laplace_scale(w, *, estimate_location: bool = False) -> float:
  """Maximum-likelihood Laplace scale of the entries of w.

  Default: location fixed at 0, as BiPer's weight model Laplace(0, b)
  assumes: b = mean|w|. With `estimate_location`, the location is also
  estimated (its MLE is the median): b = mean|w - median(w)|.
  """
  w = np.asarray(w, np.float64).ravel()
  if w.size == 0:
    raise ValueError("laplace_scale: w is empty; at least one weight is required")
  loc = np.median(w) if estimate_location else 0.0
  return float(np.mean(np.abs(w - loc)))


def fundamental(w, omega0: float | None = None) -> np.ndarray:
  """u = phi(w): sin(omega0 w) for BiPer (omega0 given), w itself for sign (None)."""
  w = np.asarray(w, np.float64)
  return w if omega0 is None else np.sin(omega0 * w)


def empirical_qe(w, omega0: float | None = None, *, relative: bool = False) -> float:
  """Var|u| over the tensor, u = phi(w) (Eq. 1), the empirical counterpart of Eq. 4.

  Args:
    w: a latent weight tensor.
    omega0: BiPer's frequency (u = sin(omega0 w)); None for sign binarizers (u = w).
    relative: divide by mean(u^2): the relative error in [0, 1] (0 if u = 0).
  """
  if omega0 is not None:
    check_scale("empirical_qe", 0.0, omega0)
  return fundamental_qe(fundamental(w, omega0), relative=relative)


def fundamental_qe(u, *, relative: bool = False) -> float:
  """Var|u| (Eq. 1) of a layer's fundamental u (`Method.fundamental` of its kernel)."""
  a = np.abs(np.asarray(u, np.float64)).ravel()
  if a.size == 0:
    raise ValueError("empirical_qe: w is empty; at least one weight is required")
  m2 = float(np.mean(a * a))
  qe = max(m2 - float(np.mean(a)) ** 2, 0.0)
  if not relative:
    return qe
  return qe / m2 if m2 > 0 else 0.0


# --------------------------------------------------------------------------
# Per-layer statistics of a model
# --------------------------------------------------------------------------


def binarized_layers(model: nn.Module, input_shape) -> dict[str, methods.Quantizer]:
  """{path: binarizer} of every layer whose kernel is binarized, in call order.

  Traces the model (`trace.binary_layers`, nothing runs) on one example of
  per-example shape `input_shape` (e.g. (32, 32, 3)); the binarizer is the
  kernel quantizer's `binary_view` (`trace.kernel_binarizer`): itself when
  binary, BiPer's square wave for the stage-1 sine.
  """
  found = trace.binary_layers(model, input_shape, analysis=True)
  return {path: trace.kernel_binarizer(m) for path, m in found.items()}


def binarized_kernels(params, layer_map: Mapping[str, Any]) -> dict[str, Array]:
  """{path: params[...path]['kernel']} for the paths of `binarized_layers`."""
  out = {}
  for path in layer_map:
    node = params
    for part in path.split("/"):
      if part not in node:
        raise ValueError(f"binarized_kernels: params has no layer {path!r}; "
                         f"layers under that level: {sorted(node)}")
      node = node[part]
    out[path] = node["kernel"]
  return out


def layer_stats(params, layer_map: Mapping[str, methods.Quantizer]
                ) -> dict[str, dict[str, float]]:
  """Per binarized layer: {laplace_b, qe, qe_relative, qe_laplace, sign_share, num_weights}.

  * laplace_b: `laplace_scale` of the latent kernel (location 0);
  * qe, qe_relative: `empirical_qe` with the layer's fundamental (Eq. 1);
  * qe_laplace: the QE Laplace(0, laplace_b) weights would have: Eq. 4 for
    BiPer, b^2 for sign binarizers;
  * sign_share: share of the binarized kernel equal to +1;
  * num_weights: kernel size.
  """
  stats = {}
  for path, kernel in binarized_kernels(params, layer_map).items():
    q = methods.get(layer_map[path])
    w = np.asarray(kernel, np.float64)
    b = laplace_scale(w)
    if isinstance(q, methods.Quantizer):
      u, qe_laplace = q.method.fundamental(w, q.values()), q.method.laplace_qe(b, q.values())
    else:
      u, qe_laplace = w, b * b
    stats[path] = {
        "laplace_b": b,
        "qe": fundamental_qe(u),
        "qe_relative": fundamental_qe(u, relative=True),
        "qe_laplace": qe_laplace,
        "sign_share": float(np.mean(np.asarray(methods.binarize_compiled(q, kernel)) > 0)),
        "num_weights": int(w.size),
    }
  return stats


def model_layer_stats(model: nn.Module, params, input_shape) -> dict[str, dict[str, float]]:
  """`layer_stats` of every layer `binarized_layers(model, input_shape)` finds."""
  return layer_stats(params, binarized_layers(model, input_shape))


class FlipShare(NamedTuple):
  """Share of binarized weights that changed value: per layer and overall."""
  layers: dict[str, float]
  overall: float  # over all layers' weights together


def sign_flip_share(w_old: Mapping[str, Any], w_new: Mapping[str, Any], quantizer) -> FlipShare:
  """Share of weights whose binarized value differs between two snapshots.

  Args:
    w_old, w_new: {path: latent kernel} (e.g. `binarized_kernels` of two
      parameter snapshots), same paths and shapes.
    quantizer: the binarizer of every layer, or a {path: binarizer} mapping
      (`binarized_layers`); compared through `binarize`.
  """
  if set(w_old) != set(w_new):
    raise ValueError(f"sign_flip_share: snapshots have different layers "
                     f"{sorted(set(w_old) ^ set(w_new))}; both need the same paths")
  per, flipped, total = {}, 0, 0
  for path in w_old:
    q = methods.get(quantizer[path] if isinstance(quantizer, Mapping) else quantizer)
    a, c = jnp.asarray(w_old[path]), jnp.asarray(w_new[path])
    if a.shape != c.shape:
      raise ValueError(f"sign_flip_share: layer {path!r} has shape {a.shape} then {c.shape}; "
                       "snapshots must have equal shapes")
    n = int(np.sum(np.asarray(methods.binarize_compiled(q, a))
                   != np.asarray(methods.binarize_compiled(q, c))))
    per[path] = n / max(a.size, 1)
    flipped, total = flipped + n, total + a.size
  return FlipShare(per, flipped / total if total else 0.0)


# --------------------------------------------------------------------------
# FDA: the truncated Fourier series of sign
# --------------------------------------------------------------------------


def _check_series(fn: str, n, omega) -> int:
  if isinstance(n, bool) or not isinstance(n, (int, np.integer)) or n < 0:
    raise ValueError(f"{fn}: n={n!r} is not allowed; n must be an integer >= 0")
  if not (isinstance(omega, (int, float, np.number)) and math.isfinite(omega) and omega > 0):
    raise ValueError(f"{fn}: omega={omega!r} is not allowed; omega must be finite and > 0")
  return int(n)


def fda_series(x, n: int, omega: float = 1.0) -> Array:
  """s_n(x) = 4/pi sum_{i=0..n} sin((2i+1) omega x)/(2i+1), sign's truncated Fourier series.

  Differentiable; its derivative is `methods.fda.fda_series_derivative(x, omega, n, n)`.
  """
  n = _check_series("fda_series", n, omega)
  x = jnp.asarray(x)
  k = (2 * jnp.arange(n + 1) + 1).astype(jnp.result_type(x.dtype, jnp.float32))
  return (4.0 / math.pi) * jnp.sum(jnp.sin(k * omega * x[..., None]) / k, axis=-1)


def fda_energy_share(n: int) -> float:
  """Share of sign's energy in s_n: sum_{i=0..n} (2i+1)^-2 / (pi^2/8) (Parseval).

  Increasing in n, -> 1.
  """
  n = _check_series("fda_energy_share", n, 1.0)
  k = 2.0 * np.arange(n + 1) + 1.0
  return float(np.sum(1.0 / k ** 2) / (math.pi ** 2 / 8.0))


def fda_approximation_error(n: int, omega: float = 1.0, half_width: float | None = None) -> float:
  """Mean squared error (1/2h) int_{-h}^{h} (sign(x) - s_n(x))^2 dx, exactly.

  With a_i = (2i+1) omega, c_i = 4/(pi (2i+1)) and s_n = sum c_i sin(a_i x):
  int sign s_n = 2 sum c_i (1 - cos(a_i h))/a_i and
  int s_n^2 = sum_ij c_i c_j h [sinc((a_i - a_j) h/pi) - sinc((a_i + a_j) h/pi)].
  The default h = pi/omega is one period, where the error is
  1 - `fda_energy_share(n)` whatever omega (Parseval); a smaller h shows
  how well s_n fits sign near 0, e.g. FDA's omega = 0.1 on |x| <= 1.
  """
  n = _check_series("fda_approximation_error", n, omega)
  h = math.pi / omega if half_width is None else half_width
  if not (isinstance(h, (int, float, np.number)) and math.isfinite(h) and h > 0):
    raise ValueError(f"fda_approximation_error: half_width={half_width!r} is not allowed; "
                     "it must be finite and > 0")
  k = 2.0 * np.arange(n + 1) + 1.0
  a, c = k * omega, 4.0 / (math.pi * k)
  cross = 2.0 * np.sum(c * (1.0 - np.cos(a * h)) / a)
  gram = h * (np.sinc((a[:, None] - a[None, :]) * h / math.pi)
              - np.sinc((a[:, None] + a[None, :]) * h / math.pi))
  return float((2.0 * h - 2.0 * cross + c @ gram @ c) / (2.0 * h))


# --------------------------------------------------------------------------
# Gradient mismatch
# --------------------------------------------------------------------------


def gradient_cosine(g_a, g_b) -> float:
  """<g_a, g_b> / (|g_a| |g_b|) over all leaves of two pytrees of equal structure.

  nan when either has norm 0 (no direction).
  """
  la, ta = jax.tree_util.tree_flatten(g_a)
  lb, tb = jax.tree_util.tree_flatten(g_b)
  if ta != tb:
    raise ValueError(f"gradient_cosine: pytrees differ ({ta} vs {tb}); equal structures required")
  a = np.concatenate([np.asarray(v, np.float64).ravel() for v in la] or [np.zeros(0)])
  c = np.concatenate([np.asarray(v, np.float64).ravel() for v in lb] or [np.zeros(0)])
  if a.shape != c.shape:
    raise ValueError(f"gradient_cosine: {a.size} vs {c.size} entries; equal shapes required")
  norm = np.linalg.norm(a) * np.linalg.norm(c)
  return float(np.dot(a, c) / norm) if norm > 0 else math.nan


class Mismatch(NamedTuple):
  """Cosines between two gradients: of all parameters, and per binarized kernel."""
  overall: float
  layers: dict[str, float]


def gradient_mismatch(model: nn.Module, variables, batch, quantizer=None,
                      reference="identity", *, progress=None) -> Mismatch:
  """Cosine between the parameter gradients under two kernel quantizers.

  Both gradients are of the mean softmax cross-entropy of
  `model.apply(variables, images, train=True)` (batch
  statistics from the batch, as in training) with respect to `params`; the
  two models differ only in the kernel quantizer of their binary layers
  (input quantizers, scaling, everything else as `model.spec`). The
  reference 'identity' is the full-precision twin's gradient at the same
  latent weights; a high-order FDA series (`methods.get('fda',
  n_terms=..., clip=None)`) is another choice.

  Args:
    model: a zoo model (it has a `spec`, `layers.BinarySpec`).
    variables: {'params': ..., 'batch_stats': ...}.
    batch: (images [N, H, W, C] float, already normalised; labels [N] int).
    quantizer: the kernel quantizer compared (None: the model's own).
    reference: the kernel quantizer of the reference gradient.
    progress: the training step (`schedule.Progress`) at which scheduled
      method parameters are evaluated; needed when the quantizers have any.
  """
  spec = getattr(model, "spec", None)
  if not isinstance(spec, layers.BinarySpec):
    raise ValueError(f"gradient_mismatch: {type(model).__name__} has no BinarySpec `spec`; "
                     "a model of fda_biper_jax.models is required")
  images, labels = batch
  images, labels = jnp.asarray(images), jnp.asarray(labels)

  def with_kernel_quantizer(q):
    q = None if q is None else methods.get(q)
    return model.clone(spec=dataclasses.replace(spec, kernel_quantizer=q))

  def grad(m):
    def loss(params):
      logits, _ = m.apply({**variables, "params": params}, images, train=True,
                          mutable=["batch_stats"])
      return optax.softmax_cross_entropy_with_integer_labels(
          logits.astype(jnp.float32), labels).mean()

    def bound(params):
      if progress is None:
        return jax.grad(loss)(params)
      with schedule.training_step(progress.step, progress.total_steps,
                                   progress.steps_per_epoch):
        return jax.grad(loss)(params)

    return jax.jit(bound)(variables["params"])

  compared = with_kernel_quantizer(spec.kernel_quantizer if quantizer is None else quantizer)
  g, g_ref = grad(compared), grad(with_kernel_quantizer(reference))
  paths = binarized_layers(compared, images.shape[1:])
  ka, kb = binarized_kernels(g, paths), binarized_kernels(g_ref, paths)
  return Mismatch(gradient_cosine(g, g_ref),
                  {p: gradient_cosine(ka[p], kb[p]) for p in paths})
