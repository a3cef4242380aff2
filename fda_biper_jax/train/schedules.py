"""The learning rate per step, an optax schedule of the training config.

'cosine': linear warm-up from 0 over the warm-up steps, then cosine decay to 0
at the last step; 'constant': the peak throughout; 'one_cycle': optax's
one-cycle (cosine up from peak/25 for 30% of training, or over the warm-up
steps if given, then cosine down to peak/1e4). Method parameters that follow
schedules are their methods' own (`fda_biper_jax.methods.schedule`).
"""

from __future__ import annotations

import optax

DECAYS = ("cosine", "constant", "one_cycle")


def learning_rate(peak: float, total_steps: int, warmup_steps: int = 0,
                  decay: str = "cosine") -> optax.Schedule:
  """The learning-rate schedule (module docstring)."""
  if decay == "constant":
    return optax.constant_schedule(peak)
  if decay == "one_cycle":
    pct = warmup_steps / total_steps if warmup_steps else 0.3
    return optax.cosine_onecycle_schedule(max(total_steps, 1), peak,
                                          pct_start=min(max(pct, 1e-6), 0.99))
  if decay != "cosine":
    raise ValueError(f"lr decay={decay!r} is not allowed; allowed: {list(DECAYS)}")
  return optax.warmup_cosine_decay_schedule(
      init_value=0.0, peak_value=peak, warmup_steps=warmup_steps,
      decay_steps=max(total_steps, warmup_steps + 1), end_value=0.0)
