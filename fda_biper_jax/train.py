"""The trainer: config -> data and model -> data-parallel steps -> checkpoints.

`train_and_evaluate(config, workdir)` is the one entry point; the command
line (`experiments/cifar.py`), the notebooks and the tests all call it.

One training step (`make_train_step`), jitted once for the whole run:

1. the input source (`inputs`) hands over the step's global batch, sharded
   over the mesh: gathered on device from each process's shards of a small
   dataset, or streamed by tf.data workers (ImageNet); its `preprocess` runs
   on the global batch (for small datasets: random crop with zero padding,
   flip and normalisation, with a key derived from (seed, step); JAX's
   partitionable PRNG makes these values independent of the device count);
2. per device (`jax.shard_map` over parallel.AXIS, pmap semantics): the
   schedule values of this step (learning rate, FDA n and alpha, BNN++ beta,
   tau) from `state.step`, the model in training mode, cross-entropy plus
   tau times the quantizers' weight regularisers (BiPer's sin^2 term), the
   gradient of `pmean(loss)` (the mean over devices), the optax update, and
   BatchNorm statistics averaged over the axis by BatchNorm itself.

Resumption is exact: the state carries the step, the data order of epoch e
is a function of (seed, e) and the augmentation key of (seed, step) (a stream
restarts its epoch at the step), so a run resumed from a checkpoint takes the
same steps as an uninterrupted one.
"""

from __future__ import annotations

import json
import logging
import math
import os
import time
from typing import Any, Mapping

import flax
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
from jax import lax
from jax.sharding import PartitionSpec as P

from fda_biper_jax import analysis
from fda_biper_jax import checkpoints as ckpt_lib
from fda_biper_jax import data as data_lib
from fda_biper_jax import inputs
from fda_biper_jax import models
from fda_biper_jax import parallel
from fda_biper_jax import schedules as schedules_lib

log = logging.getLogger(__name__)

OPTIMIZERS = ("sgd", "adam", "adamw")
DECAY_MASKS = ("all", "kernels")
COMPUTE_DTYPES = {"float32": None, "bfloat16": jnp.bfloat16}


@flax.struct.dataclass
class TrainState:
  step: jax.Array
  params: Any
  batch_stats: Any
  opt_state: Any


# --------------------------------------------------------------------------
# Configuration checks: everything that can be wrong, before any work
# --------------------------------------------------------------------------


def quantization(config) -> dict[str, Any]:
  """The model's quantization kwargs; FDA's max_terms bound to the n schedule."""
  q = config.quantization.to_dict() if hasattr(config.quantization, "to_dict") \
      else dict(config.quantization)
  for key in ("kernel_quantizer", "input_quantizer"):
    spec = q.get(key)
    if isinstance(spec, str):
      spec = {"name": spec}
    if isinstance(spec, Mapping) and spec.get("name") == "fda" and spec.get("max_terms") is None:
      spec = {**spec, "max_terms": int(config.fda.n_end)}
    if spec is not None:
      q[key] = spec
  return q


def _fail(msg: str):
  raise ValueError(msg)


def validate(config, mesh=None, *, data: bool = True) -> None:
  """Raises ValueError (one line) for any bad setting; touches no file. With
  `data`, also when the dataset surely cannot be had (`data.check_obtainable`)."""
  mesh = mesh or parallel.make_mesh()
  inputs.check(config, mesh)
  if data and config.input == "memory" and config.dataset != "synthetic":
    data_lib.check_obtainable(config.dataset, data_dir=config.data_dir or None,
                              manual_dir=config.manual_dir or None)
  if config.model not in models.NAMES:
    _fail(f"model={config.model!r} is not allowed; allowed: {list(models.NAMES)}")
  opt = config.optimizer
  if opt.name not in OPTIMIZERS:
    _fail(f"optimizer.name={opt.name!r} is not allowed; allowed: {list(OPTIMIZERS)}")
  for key in ("learning_rate", "weight_decay", "warmup_epochs"):
    if not opt[key] >= 0:
      _fail(f"optimizer.{key}={opt[key]!r} is not allowed; it must be >= 0")
  if opt.weight_decay_mask not in DECAY_MASKS:
    _fail(f"optimizer.weight_decay_mask={opt.weight_decay_mask!r} is not allowed; "
          f"allowed: {list(DECAY_MASKS)}")
  if config.compute_dtype not in COMPUTE_DTYPES:
    _fail(f"compute_dtype={config.compute_dtype!r} is not allowed; "
          f"allowed: {list(COMPUTE_DTYPES)}")
  for key in ("num_epochs", "batch_size", "log_every_steps", "checkpoint_every_steps",
              "keep_checkpoints", "eval_every_epochs"):
    if not (isinstance(config[key], int) and config[key] >= 1):
      _fail(f"{key}={config[key]!r} is not allowed; it must be an integer >= 1")
  if not 0 <= config.fda.n_start <= config.fda.n_end:
    _fail(f"fda.n_start={config.fda.n_start}, fda.n_end={config.fda.n_end} are not allowed; "
          "need 0 <= n_start <= n_end")
  if not 0 < config.bnn_pp.beta_start <= config.bnn_pp.beta_end:
    _fail(f"bnn_pp.beta_start={config.bnn_pp.beta_start}, beta_end={config.bnn_pp.beta_end} "
          "are not allowed; need 0 < beta_start <= beta_end")
  if config.regularizer_tau < 0:
    _fail(f"regularizer_tau={config.regularizer_tau} is not allowed; it must be >= 0")
  # The model and its quantizers: unknown names and bad values raise here.
  models.create(config.model, 10, **quantization(config))
  if config.init_from and not os.path.isdir(config.init_from):
    _fail(f"init_from={config.init_from!r} is not a directory (a stage-1 workdir is expected)")


# --------------------------------------------------------------------------
# Pieces of the step
# --------------------------------------------------------------------------


def make_optimizer(config, lr: optax.Schedule) -> optax.GradientTransformation:
  """SGD (momentum, L2 as PyTorch's weight_decay), Adam (L2) or AdamW."""
  opt = config.optimizer
  mask = None
  if opt.weight_decay_mask == "kernels":
    mask = lambda params: jax.tree_util.tree_map_with_path(  # noqa: E731
        lambda path, _: getattr(path[-1], "key", None) == "kernel", params)
  if opt.name == "adamw":
    return optax.adamw(lr, b1=opt.b1, b2=opt.b2, weight_decay=opt.weight_decay, mask=mask)
  base = (optax.sgd(lr, momentum=opt.momentum or None, nesterov=opt.nesterov)
          if opt.name == "sgd" else optax.adam(lr, b1=opt.b1, b2=opt.b2))
  if opt.weight_decay == 0:
    return base
  return optax.chain(optax.add_decayed_weights(opt.weight_decay, mask), base)


def create_state(model, tx, rng, image_shape) -> TrainState:
  variables = jax.jit(lambda k: model.init(k, jnp.zeros((1, *image_shape)), train=False))(rng)
  params = variables["params"]
  return TrainState(step=jnp.zeros((), jnp.int32), params=params,
                    batch_stats=variables.get("batch_stats", {}),
                    opt_state=tx.init(params))


def _sum_losses(collection) -> jax.Array:
  leaves = jax.tree.leaves(collection)
  return sum(leaves) if leaves else jnp.zeros((), jnp.float32)


def make_train_step(model, tx, schedules: schedules_lib.Schedules, mesh, preprocess,
                    donate: bool = True):
  """Returns step(state, images, labels, key) -> (state, metrics) on a global
  batch sharded over the mesh (an input source's `train_batch`, see `inputs`);
  `preprocess(key, images)` (the source's augmentation and normalisation) runs
  on the global batch inside the step, with the key folded with the step."""

  def per_device(state: TrainState, x, y):
    values = schedules.values(state.step)

    def loss_fn(params):
      logits, mut = model.apply(
          {"params": params, "batch_stats": state.batch_stats}, x, train=True,
          schedule=values, mutable=["batch_stats", "losses"])
      ce = optax.softmax_cross_entropy_with_integer_labels(
          logits.astype(jnp.float32), y).mean()
      reg = _sum_losses(mut.get("losses", {}))
      # pmean of the loss, then grad: the gradient w.r.t. the replicated
      # params is the mean over devices (differentiating the local loss would
      # return it already summed over the axis under check_vma).
      return lax.pmean(ce + values["tau"] * reg, parallel.AXIS), (logits, mut, ce, reg)

    (_, (logits, mut, ce, reg)), grads = jax.value_and_grad(loss_fn, has_aux=True)(state.params)
    updates, opt_state = tx.update(grads, state.opt_state, state.params)
    new = TrainState(step=state.step + 1, params=optax.apply_updates(state.params, updates),
                     batch_stats=mut.get("batch_stats", state.batch_stats), opt_state=opt_state)
    correct = lax.psum(jnp.sum(jnp.argmax(logits, -1) == y), parallel.AXIS)
    metrics = {"loss": lax.pmean(ce, parallel.AXIS), "regularizer": reg,
               "correct": correct, "count": lax.psum(y.shape[0], parallel.AXIS),
               "learning_rate": values["learning_rate"], "n_terms": values["n_terms"],
               "alpha": values["alpha"], "beta": values["beta"]}
    return new, metrics

  mapped = jax.shard_map(per_device, mesh=mesh, in_specs=(P(), P(parallel.AXIS), P(parallel.AXIS)),
                         out_specs=(P(), P()))
  def step(state, images, labels, key):
    return mapped(state, preprocess(jax.random.fold_in(key, state.step), images), labels)

  return jax.jit(step, donate_argnums=(0,) if donate else ())


def make_eval_step(model, mesh, preprocess):
  """Returns eval(state, images, labels, mask) -> {'correct', 'loss_sum', 'count'};
  `preprocess(images)` is the input source's evaluation transform."""

  def per_device(state, x, y, mask):
    logits = model.apply({"params": state.params, "batch_stats": state.batch_stats},
                         preprocess(x), train=False)
    ce = optax.softmax_cross_entropy_with_integer_labels(logits.astype(jnp.float32), y)
    return {"correct": lax.psum(jnp.sum((jnp.argmax(logits, -1) == y) * mask), parallel.AXIS),
            "loss_sum": lax.psum(jnp.sum(ce * mask), parallel.AXIS),
            "count": lax.psum(jnp.sum(mask), parallel.AXIS)}

  return parallel.data_parallel(
      per_device, mesh, in_specs=(P(), P(parallel.AXIS), P(parallel.AXIS), P(parallel.AXIS)),
      out_specs=P())


def evaluate(eval_step, state, batches) -> dict[str, float]:
  """Accuracy and mean loss over global (images, labels, mask) batches, such as
  an input source's `eval_batches()` (the whole split, padding masked out)."""
  totals = None
  for batch in batches:
    out = eval_step(state, *batch)
    totals = out if totals is None else jax.tree.map(jnp.add, totals, out)
  totals = jax.device_get(totals)
  return {"accuracy": float(totals["correct"] / totals["count"]),
          "loss": float(totals["loss_sum"] / totals["count"])}


# --------------------------------------------------------------------------
# Logging
# --------------------------------------------------------------------------


class RunLog:
  """Progress lines on stdout, metrics as JSON lines (appended) in the workdir,
  and TensorBoard event files when TensorFlow is importable."""

  def __init__(self, workdir: str, tensorboard: bool):
    self.path = os.path.join(workdir, "metrics.jsonl")
    self.tb = None
    if tensorboard and jax.process_index() == 0:
      try:  # optional: TensorFlow's summary writer needs the tensorboard package too
        import tensorboard  # noqa: F401, PLC0415
        import tensorflow as tf  # noqa: PLC0415
        tf.config.set_visible_devices([], "GPU")
        self.tb = tf.summary.create_file_writer(os.path.join(workdir, "tensorboard"))
      except ImportError:
        log.warning("TensorBoard is not installed: metrics go to metrics.jsonl only")

  def write(self, record: dict[str, Any]) -> None:
    if jax.process_index() != 0:
      return
    with open(self.path, "a") as f:
      f.write(json.dumps(record) + "\n")
    if self.tb is not None:
      with self.tb.as_default(step=record["step"]):
        import tensorflow as tf  # noqa: PLC0415
        for k, v in record.items():
          if isinstance(v, (int, float)) and k not in ("step",):
            tf.summary.scalar(f"{record['kind']}/{k}", v)
      self.tb.flush()

  @staticmethod
  def say(msg: str) -> None:
    if jax.process_index() == 0:
      print(msg, flush=True)


def _duration(seconds: float) -> str:
  seconds = int(max(seconds, 0))
  h, rem = divmod(seconds, 3600)
  m, s = divmod(rem, 60)
  return f"{h}h{m:02d}m" if h else f"{m}m{s:02d}s"


# --------------------------------------------------------------------------
# The run
# --------------------------------------------------------------------------


class LayerLog:
  """Per binarized layer, at each evaluation: the Laplace scale b of the latent
  weights, the quantization error of the layer's binarizer (BiPer Eq. 1 / 4;
  `analysis.layer_stats`) and the share of binarized weights that flipped
  since the previous evaluation (BiPer Fig. 4)."""

  def __init__(self, model, image_shape, state):
    self.layers = analysis.binarized_layers(model, image_shape)
    self.previous = self._kernels(state)

  def _kernels(self, state):
    return analysis.binarized_kernels(jax.device_get(state.params), self.layers)

  def record(self, state, step: int, epoch: float) -> dict[str, Any]:
    kernels = self._kernels(state)
    stats = analysis.layer_stats(jax.device_get(state.params), self.layers)
    flips = analysis.sign_flip_share(self.previous, kernels, self.layers)
    for path, share in flips.layers.items():
      stats[path]["sign_flip_share"] = share
    self.previous = kernels
    return {"kind": "layers", "step": step, "epoch": epoch, "sign_flip_share": flips.overall,
            "layers": stats}


def _meta(config, model) -> dict[str, Any]:
  return {"model": models.config(model), "config": json.loads(config.to_json_best_effort())}


def _init_from_stage(state: TrainState, workdir: str) -> TrainState:
  """Stage 2 of a two-stage recipe: params and BN statistics of the previous
  stage's best checkpoint (its latest if it kept no best), fresh optimizer."""
  prev = ckpt_lib.Checkpoints(workdir)
  found = prev.restore_best(state) or prev.restore_latest(state)
  prev.close()
  if found is None:
    _fail(f"init_from={workdir!r} holds no checkpoint to start from")
  _, restored, meta = found
  log.info("initialised from %s (step %s, model %s)", workdir, int(restored.step),
           meta["model"]["name"])
  return state.replace(params=restored.params, batch_stats=restored.batch_stats)


def train_and_evaluate(config: ml_collections.ConfigDict, workdir: str) -> dict[str, Any]:
  """Trains (or, with config.eval_only, evaluates) and returns a summary dict."""
  if config.distributed:
    parallel.initialize_distributed(config.coordinator_address, config.num_processes,
                                    config.process_id)
  mesh = parallel.make_mesh(config.num_devices or None)
  validate(config, mesh)
  init_key, data_key, aug_key = jax.random.split(jax.random.key(config.seed), 3)
  # A missing dataset fails here, before any file is written.
  source = inputs.create(config, mesh, data_key, train=not config.eval_only)

  os.makedirs(workdir, exist_ok=True)
  ckpts = ckpt_lib.Checkpoints(workdir, keep=config.keep_checkpoints)
  runlog = RunLog(workdir, config.tensorboard)

  if config.eval_only:
    return _evaluate_only(workdir, ckpts, mesh, source, runlog)

  steps_per_epoch = source.steps_per_epoch
  model = models.create(config.model, source.num_classes,
                        dtype=COMPUTE_DTYPES[config.compute_dtype], axis_name=parallel.AXIS,
                        **quantization(config))
  sched = schedules_lib.from_config(config, steps_per_epoch)
  tx = make_optimizer(config, sched.learning_rate)
  state = create_state(model, tx, init_key, source.image_shape)
  if config.init_from:
    state = _init_from_stage(state, config.init_from)
  meta = _meta(config, model)

  restored = ckpts.restore_latest(state)
  if restored is not None:
    step0, state, _ = restored
    runlog.say(f"resuming from step {step0} in {workdir}")
  state = parallel.replicate(state, mesh)

  layer_log = LayerLog(model, source.image_shape, state) if config.log_layer_stats else None
  train_step = make_train_step(model, tx, sched, mesh, source.preprocess)
  eval_step = make_eval_step(model, mesh, source.eval_preprocess)

  total = sched.total_steps
  step = int(state.step)
  best = {"accuracy": -1.0, "step": None}
  if ckpts.best.best_step() is not None:
    best = {"accuracy": ckpts.best.metrics(ckpts.best.best_step())["accuracy"],
            "step": ckpts.best.best_step()}
  pending: list = []
  last_eval = None
  t_window, n_window, t_start, step_start = time.time(), 0, time.time(), step
  runlog.say(f"training {config.model} on {config.dataset} ({source.num_train} images, "
             f"{mesh.size} device(s), {total} steps, {config.num_epochs} epochs) -> {workdir}")

  def flush_metrics():
    """Fetches pending step metrics; stops the run on a non-finite loss."""
    nonlocal pending
    got = jax.device_get(pending)
    pending = []
    for m in got:
      if not math.isfinite(float(m["loss"])):
        raise FloatingPointError(
            f"loss became {float(m['loss'])} at step {int(m['step'])}; stopping. The last "
            f"good checkpoint is kept in {os.path.join(workdir, 'checkpoints')}")
    return got

  while step < total:
    state, metrics = train_step(state, *source.train_batch(step), aug_key)
    metrics["step"] = step + 1
    pending.append(metrics)
    step += 1
    n_window += config.batch_size

    if step % config.log_every_steps == 0 or step == total:
      got = flush_metrics()
      now = time.time()
      rate = n_window / max(now - t_window, 1e-9)
      eta = (total - step) * (now - t_start) / max(step - step_start, 1)
      loss = float(np.mean([float(m["loss"]) for m in got]))
      acc = float(sum(int(m["correct"]) for m in got) / sum(int(m["count"]) for m in got))
      last = got[-1]
      runlog.write({"kind": "train", "step": step, "epoch": step / steps_per_epoch,
                    "loss": loss, "accuracy": acc, "images_per_sec": rate,
                    **{k: float(last[k]) for k in ("learning_rate", "n_terms", "alpha", "beta",
                                                   "regularizer")}})
      eval_txt = "" if last_eval is None else f" | eval acc {100 * last_eval:.2f}%"
      runlog.say(f"step {step}/{total} | epoch {step / steps_per_epoch:.2f}/{config.num_epochs}"
                 f" | loss {loss:.4f} | train acc {100 * acc:.2f}%{eval_txt}"
                 f" | {rate:,.0f} img/s | ETA {_duration(eta)}")
      t_window, n_window = time.time(), 0

    epoch_end = step % steps_per_epoch == 0
    if (epoch_end and (step // steps_per_epoch) % config.eval_every_epochs == 0) or step == total:
      flush_metrics()
      ev = evaluate(eval_step, state, source.eval_batches())
      last_eval = ev["accuracy"]
      runlog.write({"kind": "eval", "step": step, "epoch": step / steps_per_epoch, **ev})
      if layer_log is not None and layer_log.layers:
        runlog.write(layer_log.record(state, step, step / steps_per_epoch))
      if ev["accuracy"] > best["accuracy"]:
        best = {"accuracy": ev["accuracy"], "step": step}
        ckpts.save_best(step, state, meta, ev["accuracy"])
    if step % config.checkpoint_every_steps == 0 or step == total:
      flush_metrics()
      ckpts.save(step, state, meta)

  ckpts.wait()
  ckpts.close()
  summary = {"workdir": workdir, "steps": step, "final_eval_accuracy": last_eval,
             "best_eval_accuracy": best["accuracy"], "best_step": best["step"],
             "best_checkpoint": os.path.join(workdir, "best", str(best["step"])),
             "latest_checkpoint": os.path.join(workdir, "checkpoints", str(step))}
  runlog.say(f"done: best eval accuracy {100 * best['accuracy']:.2f}% at step {best['step']}; "
             f"checkpoints in {os.path.join(workdir, 'checkpoints')} (best: "
             f"{summary['best_checkpoint']})")
  summary["state"] = state
  return summary


def _evaluate_only(workdir, ckpts, mesh, source, runlog):
  """Evaluates the latest readable checkpoint with the settings saved in it."""
  meta = ckpts.read_meta()
  if meta is None:
    ckpts.close()
    _fail(f"eval_only: no checkpoint in {os.path.join(workdir, 'checkpoints')}")
  model = models.from_config(meta["model"], axis_name=parallel.AXIS)
  saved = ml_collections.ConfigDict(meta["config"])
  # The optimizer state's structure (for the restore template) needs a schedule,
  # not its length.
  sched = schedules_lib.from_config(saved, 1)
  template = create_state(model, make_optimizer(saved, sched.learning_rate),
                          jax.random.key(0), source.image_shape)
  step, state, _ = ckpts.restore_latest(template)
  ckpts.close()
  ev = evaluate(make_eval_step(model, mesh, source.eval_preprocess),
                parallel.replicate(state, mesh), source.eval_batches())
  runlog.say(f"eval of {meta['model']['name']} at step {step} ({workdir}): "
             f"accuracy {100 * ev['accuracy']:.2f}%, loss {ev['loss']:.4f}")
  return {"workdir": workdir, "step": step, "model": meta["model"], **ev}
