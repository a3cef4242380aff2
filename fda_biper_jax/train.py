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
   model in training mode inside `schedules.training_step(state.step, ...)`
   (every scheduled method parameter follows the traced step), cross-entropy
   plus the methods' weighted regularisers (BiPer's sin^2 term), the
   gradient of `pmean(loss)` (the mean over devices), the optax update, and
   BatchNorm statistics averaged over the axis by BatchNorm itself. The
   trainer names no method: it logs whatever scheduled values the model's
   quantizers have (`trace.quantizers`) and every kernel's gradient norm.

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
import re
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
from fda_biper_jax import methods
from fda_biper_jax import models
from fda_biper_jax import parallel
from fda_biper_jax import schedules as schedules_lib
from fda_biper_jax import trace
from fda_biper_jax import xla_cpu

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
  """The model's quantization keywords, as plain values, from `config.quantization`."""
  q = config.quantization
  return q.to_dict() if hasattr(q, "to_dict") else dict(q)


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
  removed = methods.removed_settings(config)
  if removed:
    _fail(removed)
  if config.model not in models.NAMES:
    _fail(f"model={config.model!r} is not allowed; allowed: {list(models.NAMES)}")
  opt = config.optimizer
  if opt.name not in OPTIMIZERS:
    _fail(f"optimizer.name={opt.name!r} is not allowed; allowed: {list(OPTIMIZERS)}")
  for key in ("learning_rate", "weight_decay", "warmup_epochs"):
    if not opt[key] >= 0:
      _fail(f"optimizer.{key}={opt[key]!r} is not allowed; it must be >= 0")
  decay_mask(opt.weight_decay_mask)
  if opt.decay not in schedules_lib.DECAYS:
    _fail(f"optimizer.decay={opt.decay!r} is not allowed; allowed: {list(schedules_lib.DECAYS)}")
  if config.compute_dtype not in COMPUTE_DTYPES:
    _fail(f"compute_dtype={config.compute_dtype!r} is not allowed; "
          f"allowed: {list(COMPUTE_DTYPES)}")
  for key in ("num_epochs", "batch_size", "log_every_steps", "checkpoint_every_steps",
              "keep_checkpoints", "eval_every_epochs"):
    if not (isinstance(config[key], int) and config[key] >= 1):
      _fail(f"{key}={config[key]!r} is not allowed; it must be an integer >= 1")
  # The model and its quantizers: unknown names and bad values raise here.
  create_model(config, 10)
  if config.init_from and not os.path.isdir(config.init_from):
    _fail(f"init_from={config.init_from!r} is not a directory (a stage-1 workdir is expected)")


# --------------------------------------------------------------------------
# Pieces of the step
# --------------------------------------------------------------------------


def create_model(config, num_classes: int, axis_name: str | None = None):
  """The config's model with `num_classes` logits (quantization, dtype, BN init)."""
  return models.create(config.model, num_classes, dtype=COMPUTE_DTYPES[config.compute_dtype],
                       axis_name=axis_name, bn_scale_init=config.get("bn_scale_init", 1.0),
                       **quantization(config))


def learning_rate(config, steps_per_epoch: int) -> optax.Schedule:
  """The config's learning-rate schedule over num_epochs of steps_per_epoch steps."""
  opt = config.optimizer
  return schedules_lib.learning_rate(opt.learning_rate, config.num_epochs * steps_per_epoch,
                                     int(opt.warmup_epochs * steps_per_epoch), opt.decay)


def _path(key_path) -> str:
  return "/".join(str(getattr(k, "key", getattr(k, "name", k))) for k in key_path)


def decay_mask(spec: str):
  """The weight-decay mask of `optimizer.weight_decay_mask`: None ('all'), the
  kernels ('kernels'), or the parameters whose '/'-joined path matches a
  regular expression ('re:PATTERN', searched; e.g. the public BiPer ImageNet
  code decays parameters named conv / fc but not the downsample conv:
  're:^(?!.*downsample/).*(conv|fc)/')."""
  if spec == "all":
    return None
  if spec == "kernels":
    return lambda params: jax.tree_util.tree_map_with_path(
        lambda path, _: getattr(path[-1], "key", None) == "kernel", params)
  if isinstance(spec, str) and spec.startswith("re:"):
    try:
      pattern = re.compile(spec[3:])
    except re.error as e:
      _fail(f"optimizer.weight_decay_mask={spec!r} is not a valid regular expression: {e}")
    return lambda params: jax.tree_util.tree_map_with_path(
        lambda path, _: pattern.search(_path(path)) is not None, params)
  _fail(f"optimizer.weight_decay_mask={spec!r} is not allowed; allowed: {list(DECAY_MASKS)} "
        "or 're:PATTERN' (a regular expression over parameter paths)")


def make_optimizer(config, lr: optax.Schedule) -> optax.GradientTransformation:
  """SGD (momentum, L2 as PyTorch's weight_decay), Adam (L2) or AdamW."""
  opt = config.optimizer
  mask = decay_mask(opt.weight_decay_mask)
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


def grad_norms(grads) -> dict[str, jax.Array]:
  """{'/'-joined path of a kernel: its gradient's L2 norm}, and 'all' for every parameter."""
  out = {_path(kp[:-1]): jnp.sqrt(jnp.sum(jnp.square(g.astype(jnp.float32))))
         for kp, g in jax.tree_util.tree_leaves_with_path(grads)
         if getattr(kp[-1], "key", None) == "kernel"}
  out["all"] = optax.global_norm(grads)
  return out


def make_train_step(model, tx, learning_rate: optax.Schedule, mesh, preprocess, *,
                    total_steps: int, steps_per_epoch: int,
                    quantizers: Mapping[str, Any] | None = None, donate: bool = True):
  """Returns step(state, images, labels, key) -> (state, metrics) on a global
  batch sharded over the mesh (an input source's `train_batch`, see `inputs`);
  `preprocess(key, images)` (the source's augmentation and normalisation) runs
  on the global batch inside the step, with the key folded with the step.

  The model runs inside `schedules.training_step(state.step, total_steps,
  steps_per_epoch)`, so every scheduled method parameter follows the traced
  step; the metrics carry the learning rate, the scheduled values of
  `quantizers` ({label: quantizer}, e.g. `trace.quantizers(model, shape)`),
  the methods' regularisers and the gradient norm of every kernel. Compiled with
  `xla_cpu.compiler_options()` (XLA:CPU's kernel choice; nothing on other backends).
  """
  quantizers = dict(quantizers or {})

  def per_device(state: TrainState, x, y):
    with schedules_lib.training_step(state.step, total_steps, steps_per_epoch) as progress:
      def loss_fn(params):
        logits, mut = model.apply(
            {"params": params, "batch_stats": state.batch_stats}, x, train=True,
            mutable=["batch_stats", "losses"])
        ce = optax.softmax_cross_entropy_with_integer_labels(
            logits.astype(jnp.float32), y).mean()
        reg = _sum_losses(mut.get("losses", {}))
        # pmean of the loss, then grad: the gradient w.r.t. the replicated
        # params is the mean over devices (differentiating the local loss would
        # return it already summed over the axis under check_vma).
        return lax.pmean(ce + reg, parallel.AXIS), (logits, mut, ce, reg)

      (_, (logits, mut, ce, reg)), grads = jax.value_and_grad(loss_fn, has_aux=True)(
          state.params)
      scheduled = trace.scheduled_values(quantizers, progress)
    updates, opt_state = tx.update(grads, state.opt_state, state.params)
    new = TrainState(step=state.step + 1, params=optax.apply_updates(state.params, updates),
                     batch_stats=mut.get("batch_stats", state.batch_stats), opt_state=opt_state)
    correct = lax.psum(jnp.sum(jnp.argmax(logits, -1) == y), parallel.AXIS)
    metrics = {"loss": lax.pmean(ce, parallel.AXIS), "regularizer": lax.pmean(reg, parallel.AXIS),
               "correct": correct, "count": lax.psum(y.shape[0], parallel.AXIS),
               "learning_rate": jnp.asarray(learning_rate(state.step), jnp.float32),
               "scheduled": {k: jnp.asarray(v, jnp.float32) for k, v in scheduled.items()},
               "grad_norm": grad_norms(grads)}
    return new, metrics

  mapped = jax.shard_map(per_device, mesh=mesh, in_specs=(P(), P(parallel.AXIS), P(parallel.AXIS)),
                         out_specs=(P(), P()))
  def step(state, images, labels, key):
    return mapped(state, preprocess(jax.random.fold_in(key, state.step), images), labels)

  return jax.jit(step, donate_argnums=(0,) if donate else (),
                 compiler_options=xla_cpu.compiler_options())


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
  model = create_model(config, source.num_classes, axis_name=parallel.AXIS)
  lr = learning_rate(config, steps_per_epoch)
  tx = make_optimizer(config, lr)
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
  total = config.num_epochs * steps_per_epoch
  train_step = make_train_step(model, tx, lr, mesh, source.preprocess, total_steps=total,
                               steps_per_epoch=steps_per_epoch,
                               quantizers=trace.quantizers(model, source.image_shape))
  eval_step = make_eval_step(model, mesh, source.eval_preprocess)

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
                    "learning_rate": float(last["learning_rate"]),
                    "regularizer": float(last["regularizer"]),
                    **{k: float(v) for k, v in last["scheduled"].items()},
                    "grad_norm": float(last["grad_norm"]["all"]),
                    "grad_norms": {k: float(v) for k, v in last["grad_norm"].items()
                                   if k != "all"}})
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
  template = create_state(model, make_optimizer(saved, learning_rate(saved, 1)),
                          jax.random.key(0), source.image_shape)
  step, state, _ = ckpts.restore_latest(template)
  ckpts.close()
  ev = evaluate(make_eval_step(model, mesh, source.eval_preprocess),
                parallel.replicate(state, mesh), source.eval_batches())
  runlog.say(f"eval of {meta['model']['name']} at step {step} ({workdir}): "
             f"accuracy {100 * ev['accuracy']:.2f}%, loss {ev['loss']:.4f}")
  return {"workdir": workdir, "step": step, "model": meta["model"], **ev}
