"""Checkpoints of a training run with orbax: resume, keep the best, fall back.

A run's workdir holds two orbax `CheckpointManager`s:

* `checkpoints/`: every `every_steps` steps and at the end; the last `keep`;
* `best/`: the single checkpoint with the best eval accuracy.

Each checkpoint holds the train state (`state`, an orbax PyTree item, restored
whole onto a template of the same structure, or only its variables without
the optimizer: `partial`) and `meta`, a JSON item with the model's
configuration (model name and every quantizer parameter), the per-example
input shape and the training config, so that evaluation and export always
rebuild the model exactly as it was trained.

`restore_latest` walks back from the newest step when one cannot be read
(a corrupted or half-written directory), warning on each one it skips.
"""

from __future__ import annotations

import logging
import os
from typing import Any

import jax
import orbax.checkpoint as ocp

log = logging.getLogger(__name__)


def _options(keep: int, best: bool) -> ocp.CheckpointManagerOptions:
  # Synchronous saves: a kill -9 right after `save` returns must find the step
  # committed; saves are rare next to training steps.
  kw = dict(max_to_keep=keep, create=True, enable_async_checkpointing=False)
  if best:
    kw.update(best_fn=lambda m: m["accuracy"], best_mode="max")
  return ocp.CheckpointManagerOptions(**kw)


def _abstract(tree):
  return jax.tree.map(ocp.utils.to_shape_dtype_struct, tree)


class Checkpoints:
  """The run's latest-k and best checkpoint managers."""

  def __init__(self, workdir: str, keep: int = 3):
    root = os.path.abspath(workdir)
    self.latest = ocp.CheckpointManager(os.path.join(root, "checkpoints"),
                                        options=_options(keep, best=False))
    self.best = ocp.CheckpointManager(os.path.join(root, "best"), options=_options(1, best=True))

  @staticmethod
  def _save_args(state, meta):
    return ocp.args.Composite(state=ocp.args.PyTreeSave(state), meta=ocp.args.JsonSave(meta))

  def save(self, step: int, state, meta: dict[str, Any]) -> None:
    if step not in self.latest.all_steps():
      self.latest.save(step, args=self._save_args(state, meta), force=True)

  def save_best(self, step: int, state, meta: dict[str, Any], accuracy: float) -> None:
    if step not in self.best.all_steps():
      self.best.save(step, args=self._save_args(state, meta),
                     metrics={"accuracy": float(accuracy)}, force=True)

  @staticmethod
  def _restore(manager, step, template, partial: bool = False):
    args = {"meta": ocp.args.JsonRestore()}
    if template is not None:
      abstract = _abstract(template)
      restore_args = jax.tree.map(
          lambda a: ocp.ArrayRestoreArgs(sharding=a.sharding) if a.sharding is not None
          else ocp.RestoreArgs(), abstract)
      args["state"] = ocp.args.PyTreeRestore(item=abstract, restore_args=restore_args,
                                             partial_restore=partial)
    out = manager.restore(step, args=ocp.args.Composite(**args))
    return (out["state"] if template is not None else None), out["meta"]

  def restore_latest(self, template, partial: bool = False):
    """(step, state, meta) of the newest readable checkpoint, or None if none.

    `partial`: the template is a subtree of the state (e.g. {'params',
    'batch_stats'}): only that is read. A step that fails to restore is
    skipped with a warning; the one before it is tried next.
    """
    for step in sorted(self.latest.all_steps(), reverse=True):
      try:
        state, meta = self._restore(self.latest, step, template, partial)
        return step, state, meta
      except Exception as e:  # noqa: BLE001 -- any unreadable step is skipped
        log.warning("checkpoint at step %d is unreadable (%s: %s); falling back to an "
                    "earlier one", step, type(e).__name__, str(e).splitlines()[0][:200])
    return None

  def restore_best(self, template, partial: bool = False):
    """(step, state, meta) of the best checkpoint, or None if none."""
    step = self.best.best_step()
    if step is None:
      return None
    state, meta = self._restore(self.best, step, template, partial)
    return step, state, meta

  def read_meta(self, which: str = "latest"):
    """The meta item of the latest (or best) readable checkpoint, or None."""
    if which == "best":
      found = self.restore_best(None)
    else:
      found = self.restore_latest(None)
    return None if found is None else found[2]

  def wait(self) -> None:
    self.latest.wait_until_finished()
    self.best.wait_until_finished()

  def close(self) -> None:
    self.latest.close()
    self.best.close()
