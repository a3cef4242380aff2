"""What a binarization method is, and the pieces every method file shares.

A method (one file in this package, or a user's own) is a `Method` subclass
that declares, in one place:

* `params`: every parameter with its default and validation (`Param`), and
  which of them may follow a schedule (`schedule`);
* `forward(x, p)`: the training forward with its surrogate gradient, a pure
  `jax.custom_vjp` function (`surrogate` builds one from F and B');
* `deploy(x, p, aux, role)`: the exact deployed map (two values for a binary
  method; `binary` says which);
* learned auxiliary parts, if any: `has_aux`, `init_aux`, and `quantize`,
  the training forward that uses them (FDA's noise adapter, ReActNet's
  thresholds); `aux_name` names them among the layer's parameters;
* `regularizer(w, p)`: a weighted weight regulariser, if any (BiPer's
  tau mean sin^2(omega0 w));
* for the analysis: `fundamental` (the u whose sign is taken), `laplace_qe`
  and `binary_view`;
* `usage`: how a network trained with the method quantizes its layers
  (what the sweep and the quick recipes use).

`Quantizer` is a method with its parameters bound (constants or schedules):
what layers hold and checkpoints save (`config()`). The registry maps names
to methods; `fda_biper_jax.methods.register` adds one.

Conventions shared by every method:

* sign(0) = +1 (and sign(-0.0) = +1), so a binarized tensor holds exactly two
  values; forwards are `jnp.where(x >= 0, 1, -1)` in x's dtype, exact in
  float16, bfloat16, float32 and float64 (never `x + stop_gradient(...)`,
  which is not exact in bfloat16);
* surrogate derivatives are evaluated in at least float32 and the gradient
  is cast back to the input dtype;
* parameters are array arguments of the custom_vjp (traced values allowed,
  so schedules never recompile) and receive no gradient; a concrete bad
  value raises ValueError naming the value and what is allowed.
"""

from __future__ import annotations

import dataclasses
import functools
import math
import numbers
from typing import Any, Callable, ClassVar, Iterator, Mapping

import jax
import jax.numpy as jnp
import numpy as np
from flax.core import FrozenDict

from fda_biper_jax.methods import schedule
from fda_biper_jax.xla_cpu import compute_dtype

Array = jax.Array
ROLES = ("kernel", "input")


# --------------------------------------------------------------------------
# Shared numerics
# --------------------------------------------------------------------------


def sign(x: Array) -> Array:
  """sign with sign(0) = +1, exactly +-1 in x's dtype. No gradient rule."""
  return jnp.where(x >= 0, jnp.ones_like(x), -jnp.ones_like(x))


def check_float(fn: str, x) -> Array:
  x = jnp.asarray(x)
  if not jnp.issubdtype(x.dtype, jnp.floating):
    raise ValueError(
        f"{fn}: x has dtype {x.dtype}; a floating dtype (float16, bfloat16, "
        "float32, float64) is required")
  return x


def clip_mask(x: Array, clip, d: Array) -> Array:
  """d where |x| <= clip, else 0 (d unchanged when clip is None)."""
  return d if clip is None else jnp.where(jnp.abs(x) <= clip, d, 0.0)


def surrogate(forward: Callable, derivative: Callable, static_argnums=()) -> Callable:
  """The custom_vjp of the pair (F, B): value F(x), gradient g * B'(x).

  `forward(x, *params)` and `derivative(x, *params)`; params after x are
  array-like (traced allowed) except those listed in `static_argnums`
  (indices into the full argument list), which must be hashable Python
  values. B' is evaluated in at least float32 and the gradient cast back to
  x's dtype; parameters receive a zero cotangent.
  """
  nondiff = tuple(static_argnums)

  def f(x, *params):
    return forward(x, *params)

  f = jax.custom_vjp(f, nondiff_argnums=nondiff)

  def fwd(*args):
    return f(*args), tuple(a for i, a in enumerate(args) if i not in nondiff)

  def bwd(*args):
    static, (res, g) = args[:-2], args[-2:]
    x, dyn = res[0], list(res[1:])
    full, it_s, it_d = [], iter(static), iter(dyn)
    for i in range(1, 1 + len(static) + len(dyn)):
      full.append(next(it_s) if i in nondiff else next(it_d))
    xc = x.astype(compute_dtype(x.dtype))
    dx = (g.astype(xc.dtype) * derivative(xc, *full)).astype(x.dtype)
    return (dx,) + (None,) * len(dyn)

  f.defvjp(fwd, bwd)
  return f


# --------------------------------------------------------------------------
# Parameter validation
# --------------------------------------------------------------------------


def is_concrete(v) -> bool:
  return not isinstance(v, jax.core.Tracer)


def _real(where: str, name: str, v, bound: str) -> float:
  a = np.asarray(v)
  if a.ndim != 0 or not np.issubdtype(a.dtype, np.number) or np.issubdtype(a.dtype, np.bool_) \
      or isinstance(v, bool):
    raise ValueError(f"{where}: {name}={v!r} is not allowed; {name} must be a real scalar "
                     f"{bound}")
  return float(a)


def positive(where: str, name: str, v):
  """A finite number > 0, as a float (traced values pass unchecked)."""
  if not is_concrete(v):
    return v
  x = _real(where, name, v, "> 0")
  if not (x > 0 and math.isfinite(x)):
    raise ValueError(f"{where}: {name}={x!r} is not allowed; {name} must be finite and > 0")
  return x


def nonnegative(where: str, name: str, v):
  """A finite number >= 0, as a float (traced values pass unchecked)."""
  if not is_concrete(v):
    return v
  x = _real(where, name, v, ">= 0")
  if not (x >= 0 and math.isfinite(x)):
    raise ValueError(f"{where}: {name}={x!r} is not allowed; {name} must be finite and >= 0")
  return x


def integer(minimum: int = 0) -> Callable:
  """An integer >= minimum, as an int (traced values pass unchecked)."""
  def check(where: str, name: str, v):
    if not is_concrete(v):
      return v
    a = np.asarray(v)
    if (a.ndim != 0 or not np.issubdtype(a.dtype, np.number) or isinstance(v, bool)
        or float(a) != math.floor(float(a)) or float(a) < minimum):
      raise ValueError(f"{where}: {name}={v!r} is not allowed; {name} must be an integer "
                       f">= {minimum}")
    return int(a)
  return check


def optional(check: Callable) -> Callable:
  """None, or what `check` accepts."""
  def check_optional(where: str, name: str, v):
    return None if v is None else check(where, name, v)
  return check_optional


def boolean(where: str, name: str, v) -> bool:
  if not isinstance(v, (bool, np.bool_)):
    raise ValueError(f"{where}: {name}={v!r} is not allowed; it must be True or False")
  return bool(v)


@dataclasses.dataclass(frozen=True)
class Param:
  """A method parameter: its default, its validation and whether it may follow
  a schedule. `check(where, name, value)` returns the normalised value or
  raises ValueError; `integer` values of a schedule are rounded down."""
  default: Any
  check: Callable[[str, str, Any], Any] = positive
  schedulable: bool = False
  integer: bool = False
  doc: str = ""


# --------------------------------------------------------------------------
# Methods and bound quantizers
# --------------------------------------------------------------------------


class Method:
  """A binarization method: subclass, set the class attributes, register.

  Every hook receives `p`, the parameter values (a `Values` mapping: a
  scheduled parameter is evaluated at the bound training step when read).
  """
  name: ClassVar[str] = ""
  summary: ClassVar[str] = ""          # one line, for tables
  params: ClassVar[Mapping[str, Param]] = {}
  binary: ClassVar[bool] = True        # `deploy` takes exactly two values
  # deploy(c x) == deploy(x) for every c > 0 (true of sign): a layer's per-sample input
  # normalisation (prenorm) may then be skipped at deployment.
  scale_invariant: ClassVar[bool] = True
  roles: ClassVar[tuple[str, ...]] = ROLES
  aux_name: ClassVar[str] = "aux"      # the layer's parameter holding the learned parts
  usage: ClassVar[Mapping[str, Any] | None] = None
  variants: ClassVar[Mapping[str, Mapping[str, Any]]] = {}  # other usages, by name
  # The activation the method's papers put after a binary layer whose input it
  # binarizes (a Flax module class, e.g. ReActNet's RPReLU); None: the model's own.
  activation: ClassVar[Any] = None

  def forward(self, x: Array, p: Mapping[str, Any]) -> Array:
    """The training forward with its surrogate gradient (a custom_vjp)."""
    raise NotImplementedError

  def deploy(self, x: Array, p: Mapping[str, Any], aux=None, role: str = "input") -> Array:
    """The exact deployed forward, no custom gradient; sign(x) unless overridden."""
    return sign(x)

  def check(self, params: dict[str, Any], given: frozenset) -> dict[str, Any]:
    """Cross-parameter validation of the normalised params (`given`: the names set
    explicitly); may drop parameters that the others make unused."""
    return params

  def has_aux(self, p: Mapping[str, Any], role: str) -> bool:
    return False

  def init_aux(self, key, role: str, shape: tuple[int, ...], p: Mapping[str, Any]):
    """The learned parts' initial parameters (a pytree) for an operand of `shape`."""
    return None

  def quantize(self, x: Array, p: Mapping[str, Any], aux=None, role: str = "input") -> Array:
    """The training forward of a layer operand, learned parts included."""
    return self.forward(x, p)

  def regularizer(self, w: Array, p: Mapping[str, Any]) -> Array | None:
    """The weighted regulariser of a latent kernel w, or None."""
    return None

  def fundamental(self, w: np.ndarray, p: Mapping[str, Any]) -> np.ndarray:
    """u whose sign the deployed kernel is (w for sign binarizers)."""
    return w

  def laplace_qe(self, b: float, p: Mapping[str, Any]) -> float:
    """Quantization error Var|u| of Laplace(0, b) weights (b^2 for u = w)."""
    return b * b

  def binary_view(self, quantizer: "Quantizer") -> "Quantizer | None":
    """The binarizer the analysis studies for this quantizer (None: full precision)."""
    return quantizer if self.binary else None

  def __repr__(self) -> str:
    return f"<method {self.name!r}>"


REGISTRY: dict[str, Method] = {}


def lookup(name: str) -> Method:
  """The registered method `name`; ValueError naming the registered ones."""
  try:
    return REGISTRY[name]
  except (KeyError, TypeError):
    raise ValueError(f"unknown quantizer {name!r}; allowed names: {list(REGISTRY)}") from None


class Values(Mapping):
  """A quantizer's parameter values, schedules evaluated when read.

  A scheduled parameter is evaluated at `progress` (default: the step bound
  by `schedule.training_step`); reading one with no step bound raises, so a
  schedule is never silently replaced by a default.
  """

  def __init__(self, quantizer: "Quantizer", progress=None, overrides=None):
    self._q = quantizer
    self._progress = progress
    self._overrides = dict(overrides or {})

  def __getitem__(self, key: str):
    if key in self._overrides:
      return self._overrides[key]
    v = self._q.kwargs[key]
    if not isinstance(v, schedule.Schedule):
      return v
    progress = self._progress or schedule.current()
    if progress is None:
      raise ValueError(
          f"quantizer {self._q.name!r}: {key} follows a {v.shape} schedule, so training needs "
          "the step: call the model inside `with fda_biper_jax.training_step(step, "
          "total_steps, steps_per_epoch):` (the trainer does), or pass "
          f"{key}= explicitly")
    value = v(progress)
    if self._q.method.params[key].integer:
      value = jnp.floor(value).astype(jnp.int32)
    return value

  def __iter__(self) -> Iterator[str]:
    return iter(self._q.kwargs)

  def __len__(self) -> int:
    return len(self._q.kwargs)


def _freeze(v):
  if isinstance(v, Mapping) and not isinstance(v, schedule.Schedule):
    return FrozenDict({k: _freeze(x) for k, x in v.items()})
  return v


def _thaw(v):
  if isinstance(v, Mapping):
    return {k: _thaw(x) for k, x in v.items()}
  return v


@dataclasses.dataclass(frozen=True)
class Quantizer:
  """A registered method with its parameters bound (constants or schedules).

  `q(x)` is the training forward with its surrogate gradient; schedulable
  parameters may be given per call, `q(x, n_terms=n)`. `q.binarize(x)` is
  the exact deployed forward. `q.config()` is a plain dict that `get`
  turns back into an equal quantizer, so a checkpoint carries the values
  (and schedules) it was trained with.
  """
  name: str
  params: tuple[tuple[str, Any], ...]

  @property
  def method(self) -> Method:
    return lookup(self.name)

  @property
  def kwargs(self) -> dict[str, Any]:
    return dict(self.params)

  @property
  def is_binary(self) -> bool:
    """Whether the deployed forward has exactly two values."""
    return self.method.binary

  @property
  def scale_invariant(self) -> bool:
    return self.method.scale_invariant

  @property
  def schedulable(self) -> frozenset:
    """Parameters that may follow a schedule or be given per call."""
    return frozenset(k for k, _ in self.params if self.method.params[k].schedulable)

  @property
  def scheduled(self) -> tuple[str, ...]:
    """Parameters that follow a schedule in this quantizer."""
    return tuple(k for k, v in self.params if isinstance(v, schedule.Schedule))

  def values(self, progress=None, **overrides) -> Values:
    return Values(self, progress, overrides)

  def __call__(self, x: Array, **overrides) -> Array:
    bad = set(overrides) - self.schedulable
    if bad:
      raise ValueError(f"quantizer {self.name!r}: cannot override {sorted(bad)} per call; "
                       f"schedulable parameters are {sorted(self.schedulable)}")
    x = check_float(self.name, x)
    return self.method.forward(x, self.values(**overrides))

  def quantize(self, x: Array, aux=None, role: str = "input") -> Array:
    """The training forward of a layer operand (learned parts included)."""
    return self.method.quantize(check_float(self.name, x), self.values(), aux, role)

  def binarize(self, x: Array, aux=None, role: str = "input") -> Array:
    """The exact deployed forward: two values for binary quantizers."""
    return self.method.deploy(check_float(self.name, x), self.values(), aux, role)

  def has_aux(self, role: str) -> bool:
    return self.method.has_aux(self.values(), role)

  def init_aux(self, key, role: str, shape) -> Any:
    return self.method.init_aux(key, role, tuple(int(d) for d in shape), self.values())

  @property
  def aux_name(self) -> str:
    return self.method.aux_name

  def regularizer(self, w: Array) -> Array | None:
    """The method's weighted regulariser of a latent kernel, or None."""
    return self.method.regularizer(w, self.values())

  def scheduled_values(self, progress) -> dict[str, Array]:
    """{parameter: value at `progress`} of the scheduled parameters."""
    v = self.values(progress)
    return {k: v[k] for k in self.scheduled}

  def config(self) -> dict[str, Any]:
    out = {"name": self.name}
    for k, v in self.params:
      out[k] = v.config() if isinstance(v, schedule.Schedule) else _thaw(v)
    return out


@dataclasses.dataclass(frozen=True)
class CallableQuantizer:
  """A user's own function used as a quantizer: same forward in training and
  evaluation (its own gradient), no parameters. It cannot be saved in a
  config: `register` a method to make a model restorable."""
  fn: Callable[[Array], Array]
  is_binary: bool = True
  scale_invariant: bool = False
  schedulable: frozenset = frozenset()
  scheduled: tuple = ()

  @property
  def name(self) -> str:
    return getattr(self.fn, "__name__", repr(self.fn))

  def __call__(self, x: Array) -> Array:
    return self.fn(x)

  def quantize(self, x: Array, aux=None, role: str = "input") -> Array:
    return self.fn(x)

  def binarize(self, x: Array, aux=None, role: str = "input") -> Array:
    return self.fn(x)

  def has_aux(self, role: str) -> bool:
    return False

  def regularizer(self, w: Array) -> None:
    return None

  def scheduled_values(self, progress) -> dict[str, Array]:
    return {}

  def config(self) -> dict[str, Any]:
    raise ValueError(f"quantizer {self.name!r} is a Python callable and cannot be saved; "
                     f"use a registered name: {list(REGISTRY)}")


def binarize_compiled(q: Quantizer | CallableQuantizer, x, aux=None, role: str = "input"
                      ) -> Array:
  """`q.binarize(x, aux, role)` as one compiled program, cached per quantizer, method, role
  and shapes (run eagerly, each of binarize's operations compiles for every new shape).

  A quantizer with schedules runs eagerly: its values come from the bound step.
  """
  if q.scheduled:
    return q.binarize(x, aux, role)
  return _binarize_jit(q, getattr(q, "method", None), role, x, aux)


@functools.partial(jax.jit, static_argnums=(0, 1, 2))
def _binarize_jit(q, method, role, x, aux):
  del method  # part of the cache key: a method re-registered under the same name recompiles
  return q.binarize(x, aux, role)


def _check_value(where: str, key: str, spec: Param, v):
  if schedule.is_schedule(v):
    if not spec.schedulable:
      raise ValueError(f"{where}: {key} cannot follow a schedule; schedulable parameters "
                       "are the method's own (see its docstring)")
    s = schedule.parse(v, f"{where} {key}")
    for bound in (s.start, s.end):
      spec.check(where, key, int(bound) if spec.integer else bound)
    return s
  return spec.check(where, key, v)


def get(name, **params) -> Quantizer | CallableQuantizer:
  """The quantizer `name` with `params` bound (the method's defaults for the rest).

  `name` may also be a config mapping {'name': ..., **params} (as saved by
  `Quantizer.config()`), a `Quantizer` (returned unchanged) or a plain
  callable (wrapped as a `CallableQuantizer`). A parameter may be a
  schedule mapping when the method allows it. Raises ValueError for an
  unknown name or parameter, or a bad value, before any work starts.
  """
  if isinstance(name, (Quantizer, CallableQuantizer)):
    if params:
      raise ValueError(f"get: a Quantizer was given together with parameters {sorted(params)}")
    return name
  if isinstance(name, Mapping):
    cfg = dict(name)
    if "name" not in cfg:
      raise ValueError(f"get: quantizer config {cfg!r} has no 'name'; "
                       f"allowed names: {list(REGISTRY)}")
    name = cfg.pop("name")
    params = {**cfg, **params}
  elif callable(name):
    if params:
      raise ValueError(f"get: a callable quantizer takes no parameters, got {sorted(params)}")
    return CallableQuantizer(name)
  method = lookup(name)
  bad = set(params) - set(method.params)
  if bad:
    raise ValueError(f"quantizer {name!r} takes no parameter {sorted(bad)}; "
                     f"allowed: {sorted(method.params) or 'none'}")
  values = {key: _check_value(name, key, spec, params.get(key, spec.default))
            for key, spec in method.params.items()}
  values = method.check(values, frozenset(params))
  frozen = tuple(sorted((k, _freeze(v)) for k, v in values.items()))
  return Quantizer(name, frozen)
