"""Method parameters that follow training: schedule shapes and the training step.

A method parameter that may follow a schedule (FDA's `n_terms`, BNN++'s
`beta`, ...) is written in the quantizer's own config either as a plain
number (a constant, honoured as given) or as a schedule

    {"schedule": SHAPE, "start": a, "end": b}          (optionally "per": "step" | "epoch")

whose value at progress p in [0, 1] is

    linear          a + (b - a) p
    cosine          b + (a - b) (1 + cos(pi p)) / 2        half a cosine wave, a -> b
    quarter_cosine  a + (b - a) (1 - cos(pi p / 2))        ReSTE's o
    geometric       a (b / a)^p                            a, b > 0 (BNN++'s beta, IR-Net's t)
    stepwise        min(a + floor(p (b - a + 1)), b)       FDA's n: n_s -> 2 n_s, a step per
                                                           (b - a + 1)-th of training

Progress is counted per step, p = step / (total_steps - 1), so that the last
step takes the end value exactly, or per epoch, p = e / E for epoch e of E
(as the papers' epoch loops: the last epoch has p = (E - 1) / E).
`stepwise` counts epochs by default, every other shape steps.

Schedules are evaluated from the traced step inside the jitted training
step: a schedule never recompiles anything. The trainer (or a user's own
loop) binds the step for the duration of a model call with
`training_step(step, total_steps, steps_per_epoch)`; the quantizers of every
binary layer read it from there.
"""

from __future__ import annotations

import contextlib
import contextvars
import dataclasses
import math
import numbers
from typing import Any, Iterator, Mapping

import jax
import jax.numpy as jnp
import numpy as np

SHAPES = ("linear", "cosine", "quarter_cosine", "geometric", "stepwise")
PER = ("step", "epoch")
FIELDS = ("schedule", "start", "end", "per")


@dataclasses.dataclass(frozen=True)
class Progress:
  """Where training is: `step` (an int or a traced int32 scalar) of
  `total_steps`, with `steps_per_epoch` steps per epoch."""
  step: Any
  total_steps: int
  steps_per_epoch: int

  def __post_init__(self):
    for name in ("total_steps", "steps_per_epoch"):
      v = getattr(self, name)
      if not isinstance(v, numbers.Integral) or isinstance(v, bool) or v < 1:
        raise ValueError(f"{name}={v!r} is not allowed; it must be an integer >= 1")

  @property
  def epochs(self) -> int:
    return max(self.total_steps // self.steps_per_epoch, 1)

  def fraction(self, per: str) -> jax.Array:
    """p in [0, 1]: step / (total_steps - 1), or epoch / epochs."""
    step = jnp.asarray(self.step)
    if per == "epoch":
      return (step // self.steps_per_epoch).astype(jnp.float32) / self.epochs
    return jnp.clip(step.astype(jnp.float32) / max(self.total_steps - 1, 1), 0.0, 1.0)


_PROGRESS: contextvars.ContextVar[Progress | None] = contextvars.ContextVar(
    "fda_biper_jax_progress", default=None)


@contextlib.contextmanager
def training_step(step, total_steps: int, steps_per_epoch: int | None = None
                  ) -> Iterator[Progress]:
  """Binds the training step for the model calls inside the `with` block.

  Every scheduled quantizer parameter is evaluated from it. `step` may be a
  traced scalar (the jitted step's `state.step`); `steps_per_epoch` defaults
  to `total_steps` (one epoch). The binding is a context variable read while
  the model is traced, so the compiled step holds the schedules' arithmetic
  on the traced step, nothing else.
  """
  progress = Progress(step, int(total_steps), int(steps_per_epoch or total_steps))
  token = _PROGRESS.set(progress)
  try:
    yield progress
  finally:
    _PROGRESS.reset(token)


def current() -> Progress | None:
  """The training step bound by `training_step`, or None outside one."""
  return _PROGRESS.get()


@dataclasses.dataclass(frozen=True)
class Schedule:
  """A parameter schedule (module docstring); `config()` is its plain-dict form."""
  shape: str
  start: float
  end: float
  per: str = "step"

  def __call__(self, progress: Progress) -> jax.Array:
    p = progress.fraction(self.per)
    a, b = self.start, self.end
    if self.shape == "linear":
      return a + (b - a) * p
    if self.shape == "cosine":
      return b + (a - b) * 0.5 * (1.0 + jnp.cos(math.pi * p))
    if self.shape == "quarter_cosine":
      return a + (b - a) * (1.0 - jnp.cos(0.5 * math.pi * p))
    if self.shape == "geometric":
      return a * (b / a) ** p
    return self._stepwise(progress)

  def _stepwise(self, progress: Progress) -> jax.Array:
    """a + floor(p (b - a + 1)) in integer arithmetic (exact at every boundary)."""
    step = jnp.asarray(progress.step).astype(jnp.int32)
    if self.per == "epoch":
      num, den = step // progress.steps_per_epoch, progress.epochs
    else:
      num, den = jnp.clip(step, 0, progress.total_steps - 1), max(progress.total_steps - 1, 1)
    a, b = int(self.start), int(self.end)
    return jnp.minimum(a + (num * (b - a + 1)) // den, b).astype(jnp.float32)

  @property
  def bounds(self) -> tuple[float, float]:
    """(lowest, highest) value the schedule takes."""
    return min(self.start, self.end), max(self.start, self.end)

  def config(self) -> dict[str, Any]:
    return {"schedule": self.shape, "start": self.start, "end": self.end, "per": self.per}


def is_schedule(value) -> bool:
  """Whether a config value is written as a schedule (a mapping with 'schedule')."""
  return isinstance(value, Schedule) or (isinstance(value, Mapping) and "schedule" in value)


def _number(where: str, key: str, v) -> float:
  if isinstance(v, bool) or not isinstance(v, numbers.Real) or not math.isfinite(float(v)):
    raise ValueError(f"{where}: {key}={v!r} is not allowed; it must be a finite number")
  return float(v)


def parse(value, where: str = "schedule") -> Schedule:
  """A `Schedule` from its config mapping; ValueError naming the bad field."""
  if isinstance(value, Schedule):
    return value
  cfg = dict(value)
  bad = set(cfg) - set(FIELDS)
  if bad:
    raise ValueError(f"{where}: schedule fields {sorted(bad)} are not allowed; "
                     f"allowed: {list(FIELDS)}")
  shape = cfg.get("schedule")
  if shape not in SHAPES:
    raise ValueError(f"{where}: schedule={shape!r} is not allowed; allowed: {list(SHAPES)}")
  missing = {"start", "end"} - set(cfg)
  if missing:
    raise ValueError(f"{where}: a {shape} schedule needs {sorted(missing)}")
  start, end = _number(where, "start", cfg["start"]), _number(where, "end", cfg["end"])
  per = cfg.get("per", "epoch" if shape == "stepwise" else "step")
  if per not in PER:
    raise ValueError(f"{where}: per={per!r} is not allowed; allowed: {list(PER)}")
  if shape == "geometric" and not (start > 0 and end > 0):
    raise ValueError(f"{where}: a geometric schedule needs start > 0 and end > 0, "
                     f"got start={start}, end={end}")
  if shape == "stepwise" and (start != math.floor(start) or end != math.floor(end)
                              or end < start):
    raise ValueError(f"{where}: a stepwise schedule needs integers start <= end, "
                     f"got start={start}, end={end}")
  return Schedule(shape, start, end, per)


def at(schedule: Schedule | Mapping, step: int, total_steps: int,
       steps_per_epoch: int | None = None) -> float:
  """The schedule's value at a concrete step (for plots and tests)."""
  s = parse(schedule)
  return float(np.asarray(s(Progress(step, total_steps, steps_per_epoch or total_steps))))
