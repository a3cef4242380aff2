"""A training run as an artifact: its model, variables and meta, without the optimizer.

`restore(workdir)` reads a run's latest (or best) checkpoint into a `Run`:
the model rebuilt from the configuration saved with the weights (every
quantizer parameter and schedule, the full-precision rule), its variables
({'params', 'batch_stats'}, read alone from the checkpointed train state: the
optimizer state is never loaded, nor optax, nor the data pipeline), the
per-example input shape and the training config, on one device. Evaluation
(`eval_only`), export and analysis all start from it.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Mapping

import jax
import jax.numpy as jnp
from flax import linen as nn

from fda_biper_jax import models
from fda_biper_jax.train import checkpoints

WHICH = ("latest", "best")


@dataclasses.dataclass(frozen=True)
class Run:
  """A restored run: `model`, `variables`, `meta` (model config, input shape, training
  config, as saved) and the checkpoint's `step`."""
  workdir: str
  step: int
  model: nn.Module
  variables: Mapping[str, Any]
  meta: Mapping[str, Any]

  @property
  def input_shape(self) -> tuple[int, ...]:
    """One example's shape, e.g. (32, 32, 3)."""
    return tuple(int(d) for d in self.meta["input_shape"])

  @property
  def config(self) -> Mapping[str, Any]:
    """The training config the run was started with (a plain dict)."""
    return self.meta["config"]


def variables_template(model: nn.Module, input_shape, device=None) -> dict[str, Any]:
  """The shapes of `model`'s {'params', 'batch_stats'} (traced, nothing allocated),
  placed on `device` (default: the first)."""
  shapes = jax.eval_shape(lambda: model.init(jax.random.key(0),
                                             jnp.zeros((1, *input_shape), jnp.float32),
                                             train=False))
  sharding = jax.sharding.SingleDeviceSharding(device or jax.devices()[0])
  return {c: jax.tree.map(lambda a: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=sharding),
                          shapes.get(c, {}))
          for c in ("params", "batch_stats")}


def restore(workdir: str, which: str = "latest", *, axis_name: str | None = None) -> Run:
  """The run in `workdir` at its latest (or best) readable checkpoint.

  Raises:
    ValueError: `which` is not 'latest' or 'best', or the workdir holds no
      such readable checkpoint (one line).
  """
  if which not in WHICH:
    raise ValueError(f"which={which!r} is not allowed; allowed: {list(WHICH)}")
  if not checkpoints.directory(workdir).is_dir():
    raise ValueError(f"workdir={workdir!r} holds no checkpoints/ folder (a training run's "
                     "workdir is expected)")
  ckpts = checkpoints.Checkpoints(workdir)
  try:
    meta = ckpts.read_meta(which)
    if meta is None:
      raise ValueError(f"workdir={workdir!r} holds no {which} checkpoint")
    if "input_shape" not in meta:
      raise ValueError(f"workdir={workdir!r}: its checkpoints predate the saved input shape; "
                       "retrain, or evaluate them with the version that wrote them")
    model = models.from_config(meta["model"], axis_name=axis_name)
    template = variables_template(model, meta["input_shape"])
    found = (ckpts.restore_best(template, partial=True) if which == "best"
             else ckpts.restore_latest(template, partial=True))
  finally:
    ckpts.close()
  if found is None:
    raise ValueError(f"workdir={workdir!r}: no {which} checkpoint could be read")
  step, variables, meta = found
  return Run(workdir, int(step), model, variables, meta)
