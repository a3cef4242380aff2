"""Checkpoints of a training run: one orbax manager, its policies deciding.

A run's workdir (a local path or an `etils.epath` URI such as gs://) holds
one orbax `CheckpointManager` in `checkpoints/`:

* what is kept (preservation policies): the `keep` latest steps (`LatestN`)
  and the step with the best eval accuracy (`BestN`, n=1), which may be
  older;
* when to save (save-decision policies): every `every_steps` steps
  (`FixedIntervalPolicy`) and at a preemption sync point of a multi-host job
  (`PreemptionCheckpointingPolicy`). The trainer also saves, whatever the
  policy says, the final step, an evaluation that improved the best
  accuracy, and the step at which the process was asked to stop (SIGTERM,
  see `StopSignal`).

Each step's metrics hold the eval accuracy when that step was evaluated
({} otherwise), which `BestN` and `best_step` rank.

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
import math
import signal
import threading
from typing import Any

import jax
import orbax.checkpoint as ocp
from etils import epath
from orbax.checkpoint import checkpoint_managers as policies

log = logging.getLogger(__name__)

CHECKPOINT_DIR = "checkpoints"


def accuracy(metrics) -> float:
  """The ranking of a step's metrics: its eval accuracy, -inf when it was not evaluated."""
  value = (metrics or {}).get("accuracy")
  return -math.inf if value is None else float(value)


def _options(keep: int, every_steps: int) -> ocp.CheckpointManagerOptions:
  # Synchronous saves: a kill -9 right after `save` returns must find the step
  # committed; saves are rare next to training steps.
  return ocp.CheckpointManagerOptions(
      create=True, enable_async_checkpointing=False,
      best_fn=accuracy, best_mode="max",
      preservation_policy=policies.AnyPreservationPolicy([
          policies.LatestN(n=keep),
          policies.BestN(get_metric_fn=accuracy, reverse=False, n=1,
                         keep_checkpoints_without_metrics=False)]),
      save_decision_policy=policies.AnySavePolicy([
          policies.FixedIntervalPolicy(every_steps),
          policies.PreemptionCheckpointingPolicy()]))


def _type_handlers() -> Any:
  """orbax's standard type handlers; on CPU, jax.Array saved without replica parallelism.

  orbax splits the device-to-host copy of a replicated array across its replicas
  (one compiled slice per array shape and device) unless the platform is a GPU.
  On CPU every device is the same host memory, so the split saves nothing and
  costs the compiles at the first save of a multi-device run (benchmarks/NOTES.md).
  """
  handlers = ocp.type_handlers
  chosen = {ty: handlers.get_type_handler(ty) for ty in handlers.supported_types()}
  if jax.default_backend() == "cpu":
    # orbax exposes no constructor for its array-metadata store: the default
    # handler's store is kept, so checkpoints hold the same metadata either way.
    store = getattr(chosen[jax.Array], "_array_metadata_store", None)
    chosen[jax.Array] = handlers.ArrayHandler(use_replica_parallel=False,
                                              array_metadata_store=store)
  return handlers.create_type_handler_registry(*chosen.items())


def _abstract(tree):
  return jax.tree.map(ocp.utils.to_shape_dtype_struct, tree)


def directory(workdir) -> epath.Path:
  """The checkpoint folder of a workdir; local paths are made absolute, URIs kept."""
  path = epath.Path(workdir)
  return (path if "://" in str(workdir) else path.absolute()) / CHECKPOINT_DIR


class Checkpoints:
  """The run's checkpoint manager (see the module doc)."""

  def __init__(self, workdir, keep: int = 3, every_steps: int = 1):
    self.manager = ocp.CheckpointManager(
        directory(workdir), options=_options(keep, every_steps),
        item_handlers={"state": ocp.PyTreeCheckpointHandler(type_handler_registry=_type_handlers()),
                       "meta": ocp.JsonCheckpointHandler()})

  @staticmethod
  def _save_args(state, meta):
    return ocp.args.Composite(state=ocp.args.PyTreeSave(state), meta=ocp.args.JsonSave(meta))

  def should_save(self, step: int) -> bool:
    """Whether the save-decision policies want this step (interval, preemption)."""
    return self.manager.should_save(step)

  def save(self, step: int, state, meta: dict[str, Any],
           accuracy: float | None = None) -> None:
    """Saves `step` (with its eval accuracy when it was evaluated), whatever the policies."""
    if step not in self.manager.all_steps():
      metrics = {} if accuracy is None else {"accuracy": float(accuracy)}
      self.manager.save(step, args=self._save_args(state, meta), metrics=metrics, force=True)

  def best_step(self) -> int | None:
    """The evaluated step with the best accuracy, or None."""
    step = self.manager.best_step()
    if step is None or accuracy(self.manager.metrics(step)) == -math.inf:
      return None
    return step

  def best_accuracy(self) -> float | None:
    step = self.best_step()
    return None if step is None else accuracy(self.manager.metrics(step))

  def _restore(self, step, template, partial: bool = False):
    args = {"meta": ocp.args.JsonRestore()}
    if template is not None:
      abstract = _abstract(template)
      restore_args = jax.tree.map(
          lambda a: ocp.ArrayRestoreArgs(sharding=a.sharding) if a.sharding is not None
          else ocp.RestoreArgs(), abstract)
      args["state"] = ocp.args.PyTreeRestore(item=abstract, restore_args=restore_args,
                                             partial_restore=partial)
    out = self.manager.restore(step, args=ocp.args.Composite(**args))
    return (out["state"] if template is not None else None), out["meta"]

  def restore_latest(self, template, partial: bool = False):
    """(step, state, meta) of the newest readable checkpoint, or None if none.

    `partial`: the template is a subtree of the state (e.g. {'params',
    'batch_stats'}): only that is read. A step that fails to restore is
    skipped with a warning; the one before it is tried next.
    """
    for step in sorted(self.manager.all_steps(), reverse=True):
      try:
        state, meta = self._restore(step, template, partial)
        return step, state, meta
      except Exception as e:  # noqa: BLE001 -- any unreadable step is skipped
        log.warning("checkpoint at step %d is unreadable (%s: %s); falling back to an "
                    "earlier one", step, type(e).__name__, str(e).splitlines()[0][:200])
    return None

  def restore_best(self, template, partial: bool = False):
    """(step, state, meta) of the best evaluated checkpoint, or None if none."""
    step = self.best_step()
    if step is None:
      return None
    state, meta = self._restore(step, template, partial)
    return step, state, meta

  def read_meta(self, which: str = "latest"):
    """The meta item of the latest (or best) readable checkpoint, or None."""
    found = self.restore_best(None) if which == "best" else self.restore_latest(None)
    return None if found is None else found[2]

  def close(self) -> None:
    self.manager.wait_until_finished()
    self.manager.close()


class StopSignal:
  """A context in which SIGTERM (Colab, spot VMs and schedulers stop a job
  with it) asks the run to stop instead of killing it: `requested` turns
  True, the trainer saves the current step and returns. Outside the main
  thread (where Python cannot install handlers) it does nothing. The
  previous handler is restored on exit."""

  SIGNALS = (signal.SIGTERM,)

  def __init__(self):
    self.requested = False
    self.signum = None
    self._previous = {}

  def _handle(self, signum, frame):
    del frame
    self.requested, self.signum = True, signum

  def __enter__(self):
    if threading.current_thread() is threading.main_thread():
      for s in self.SIGNALS:
        self._previous[s] = signal.signal(s, self._handle)
    return self

  def __exit__(self, *exc):
    for s, handler in self._previous.items():
      signal.signal(s, handler)
    return False
