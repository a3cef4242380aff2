"""Per-step training values: learning rate, FDA n and alpha, BNN++ beta, tau.

Every value is a function of the (traced) global step built from optax
schedules, evaluated inside the jitted training step, so a schedule never
recompiles anything and never costs a host round trip. `Schedules.values(step)`
returns the mapping that models receive as `schedule=`.

* learning rate: linear warm-up from 0, then cosine decay to 0
  (`optax.warmup_cosine_decay_schedule`; BiPer: 5 warm-up epochs), or
  constant;
* FDA n_terms (FDA-BNN Sec. 3.2, "setting 3"): grows stepwise from n_start to
  n_end over training, n(e) = n_start + floor(e (n_end - n_start + 1) / E)
  for epoch e of E, clipped at n_end (the BiBench port uses n_start = 9 and
  n = 9 + int(9 e / E));
* FDA noise weight alpha: cosine decay from alpha_start to exactly 0 at the
  last step (BiBench: 0.05 (1 + cos(pi (e+1) / E)) per epoch), so inference
  is pure sign;
* BNN++ beta: geometric growth from beta_start to beta_end (SS_beta -> sign);
* tau: the BiPer regulariser's weight, constant within a stage.
"""

from __future__ import annotations

import dataclasses
from typing import Mapping

import jax
import jax.numpy as jnp
import optax


@dataclasses.dataclass(frozen=True)
class Schedules:
  """The schedules of one training run; `values(step)` evaluates them."""
  total_steps: int
  steps_per_epoch: int
  learning_rate: optax.Schedule
  n_start: int = 9
  n_end: int = 18
  alpha_start: float = 0.1
  beta_start: float = 1.0
  beta_end: float = 1.0
  tau: float = 0.0

  def n_terms(self, step) -> jax.Array:
    epochs = max(self.total_steps // self.steps_per_epoch, 1)
    epoch = jnp.asarray(step) // self.steps_per_epoch
    n = self.n_start + (epoch * (self.n_end - self.n_start + 1)) // epochs
    return jnp.minimum(n, self.n_end).astype(jnp.int32)

  def alpha(self, step) -> jax.Array:
    return optax.cosine_decay_schedule(self.alpha_start, max(self.total_steps - 1, 1))(step)

  def beta(self, step) -> jax.Array:
    progress = jnp.clip(jnp.asarray(step, jnp.float32) / max(self.total_steps - 1, 1), 0.0, 1.0)
    return self.beta_start * (self.beta_end / self.beta_start) ** progress

  def values(self, step) -> Mapping[str, jax.Array]:
    return {
        "learning_rate": jnp.asarray(self.learning_rate(step), jnp.float32),
        "n_terms": self.n_terms(step),
        "alpha": jnp.asarray(self.alpha(step), jnp.float32),
        "beta": jnp.asarray(self.beta(step), jnp.float32),
        "tau": jnp.asarray(self.tau, jnp.float32),
    }


def learning_rate(peak: float, total_steps: int, warmup_steps: int = 0,
                  decay: str = "cosine") -> optax.Schedule:
  """Warm-up + cosine to 0 ('cosine') or a constant peak ('constant')."""
  if decay == "constant":
    return optax.constant_schedule(peak)
  if decay != "cosine":
    raise ValueError(f"lr decay={decay!r} is not allowed; allowed: ['cosine', 'constant']")
  return optax.warmup_cosine_decay_schedule(
      init_value=0.0, peak_value=peak, warmup_steps=warmup_steps,
      decay_steps=max(total_steps, warmup_steps + 1), end_value=0.0)


def from_config(config, steps_per_epoch: int) -> Schedules:
  """Builds the run's schedules from a training config (see experiments/configs)."""
  total = config.num_epochs * steps_per_epoch
  lr = learning_rate(config.optimizer.learning_rate, total,
                     int(config.optimizer.warmup_epochs * steps_per_epoch),
                     config.optimizer.decay)
  return Schedules(total_steps=total, steps_per_epoch=steps_per_epoch, learning_rate=lr,
                   n_start=config.fda.n_start, n_end=config.fda.n_end,
                   alpha_start=config.fda.alpha_start,
                   beta_start=config.bnn_pp.beta_start, beta_end=config.bnn_pp.beta_end,
                   tau=config.regularizer_tau)
