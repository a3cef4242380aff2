"""Binarization methods: one file per estimator family, one registry.

=============  =========================  ==========================================
name           forward F(x)               backward: dF/dx is replaced by
=============  =========================  ==========================================
identity       x                          1 (the full-precision twin)
ste            sign(x)                    1, or 1[|x| <= clip]  (BinaryConnect, Larq)
approx_sign    sign(x)                    (2 - 2|x|) 1[|x| <= 1]  (Bi-Real Net)
sign_swish     sign(x)                    SS_beta'(x)  (BNN+, beta = 5)
fda            sign(x) [+ alpha e(x)]     s_n'(x) = 4w/pi sum_{i=0..n} cos((2i+1)wx)  (FDA)
biper          sign(sin(w0 x))            w0 cos(w0 x)  (BiPer, CVPR 2024)
biper_sine     sin(w0 x)                  w0 cos(w0 x)  (BiPer stage 1, not binary)
bnn_pp         SS_beta(x)                 SS_beta'(x)  (BNN++, ProxConnect++)
ir_net         sign(x)                    k t (1 - tanh^2(t x))  (IR-Net's EDE)
reste          sign(x)                    d/dx sign(x)|x|^(1/o), rectified  (ReSTE)
rsign          sign(x - alpha_c)          ApproxSign around alpha_c  (ReActNet)
=============  =========================  ==========================================

ProxConnect++ (Lu et al., NeurIPS 2023) reads every binarizer as such a pair:
a forward quantizer F and a backward one whose derivative replaces dF/dx.
Each file defines the pure `jax.custom_vjp` functions and a `Method` (see
`base`) that declares the parameters, schedules, deployed form, learned
parts, regulariser and analysis hooks; nothing else in the library names a
method. `get(name, **params)` binds parameters (constants or schedules,
`schedule`); `register(method)` adds a user's own; `training_step(step,
total_steps, steps_per_epoch)` binds the step the schedules read.
"""

from __future__ import annotations

from fda_biper_jax.methods import (approx_sign, biper, bnn_pp, fda, identity, ir_net, reactnet,
                                   reste, sign_swish, ste)
from fda_biper_jax.methods.base import (REGISTRY, CallableQuantizer, Method, Param, Quantizer,
                                        Values, binarize_compiled, get, lookup, sign)
from fda_biper_jax.methods.schedule import Progress, Schedule, training_step


def register(method, *, replace: bool = False) -> Method:
  """Adds a `Method` (an instance or a subclass) to the registry under its `name`.

  It is then found by name everywhere: `get`, configs, checkpoints, the
  sweep, summaries and export. Raises ValueError for a nameless method or a
  name already taken (unless `replace`).
  """
  if isinstance(method, type):
    method = method()
  if not isinstance(method, Method):
    raise ValueError(f"register: {method!r} is not a fda_biper_jax.methods.Method")
  if not isinstance(method.name, str) or not method.name.isidentifier():
    raise ValueError(f"register: name={method.name!r} is not allowed; a Python identifier "
                     "such as 'my_estimator' is required")
  if method.name in REGISTRY and not replace:
    raise ValueError(f"register: a method named {method.name!r} is already registered; "
                     "pass replace=True to override it")
  bad = set(method.roles) - {"kernel", "input"}
  if bad or not method.roles:
    raise ValueError(f"register: {method.name}.roles={method.roles!r} is not allowed; "
                     "a non-empty subset of ('kernel', 'input')")
  REGISTRY[method.name] = method
  return method


# Config fields that method definitions replaced: an old config that still sets one gets
# one line saying what to write instead (the trainer's validation calls this).
REMOVED_SETTINGS = {
    "fda": "the FDA schedules live in its quantizer config: quantization.kernel_quantizer = "
           "{'name': 'fda', 'n_terms': {'schedule': 'stepwise', 'start': 9, 'end': 18}, "
           "'noise': True, 'alpha': {'schedule': 'cosine', 'start': 0.1, 'end': 0.0}}",
    "bnn_pp": "BNN++'s beta lives in its quantizer config: quantization.kernel_quantizer = "
              "{'name': 'bnn_pp', 'beta': {'schedule': 'geometric', 'start': 2, 'end': 200}}",
    "regularizer_tau": "BiPer's regulariser weight is its quantizer's tau: "
                       "quantization.kernel_quantizer = {'name': 'biper', 'tau': 0.0468}",
}
REMOVED_QUANTIZATION = ("kernel_noise", "input_noise")


def removed_settings(config) -> str | None:
  """The one-line error for a training config that sets a removed field, else None."""
  for key, instead in REMOVED_SETTINGS.items():
    value = config.get(key)
    if hasattr(value, "to_dict"):
      value = {k: v for k, v in value.to_dict().items() if v is not None} or None
    if value is not None:
      return f"config.{key} was removed; {instead}"
  quantization = config.get("quantization") or {}
  for key in REMOVED_QUANTIZATION:
    if quantization.get(key) is not None:
      return f"quantization.{removed_layer_setting(key)}"
  return None


def removed_layer_setting(key: str) -> str:
  """The one line for a removed layer setting (FDA's former kernel_noise / input_noise)."""
  role = key.replace("_noise", "_quantizer")
  return (f"{key} was removed: FDA's noise module is part of the quantizer, e.g. "
          f"{role}={{'name': 'fda', 'noise': {{'reduction': 64, 'min_width': 4, "
          "'shortcut': 'sin', 'a': 0.1}}")


def names() -> tuple[str, ...]:
  """The registered methods' names, built-in ones first."""
  return tuple(REGISTRY)


# The built-in methods: one line each.
register(identity.Identity)
register(ste.STE)
register(approx_sign.ApproxSign)
register(sign_swish.SignSwish)
register(fda.FDA)
register(biper.BiPer)
register(biper.BiPerSine)
register(bnn_pp.BNNPlusPlus)
register(ir_net.IRNet)
register(reste.ReSTE)
register(reactnet.RSign)

__all__ = ["CallableQuantizer", "Method", "Param", "Progress", "Quantizer", "Schedule", "Values",
           "binarize_compiled", "get", "lookup", "names", "register", "removed_settings", "sign",
           "training_step"]
