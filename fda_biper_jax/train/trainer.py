"""The trainer: config -> data and model -> data-parallel steps -> checkpoints.

`train_and_evaluate(config, workdir)` is the one entry point; the command
line (`fda_biper_jax/cli/train.py`), the notebooks and the tests all call it.

One training step (`make_train_step`), jitted once for the whole run:

1. the input source (`inputs`) hands over the step's global batch, sharded
   over the mesh: gathered on device from each process's shards of a small
   dataset, or streamed by tf.data workers (ImageNet); its `preprocess` runs
   on the global batch (for small datasets: random crop with zero padding,
   flip and normalisation, with a key derived from (seed, step); JAX's
   partitionable PRNG makes these values independent of the device count);
2. per device (`jax.shard_map` over parallel.AXIS, pmap semantics): the
   model in training mode inside `methods.training_step(state.step, ...)`
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
import re
import time
from typing import Any, Mapping

import flax
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
from etils import epath
from jax import lax
from jax.sharding import PartitionSpec as P

from fda_biper_jax import analysis, methods, models, parallel, trace, xla_cpu
from fda_biper_jax import data as data_lib
from fda_biper_jax.data import inputs
from fda_biper_jax.train import checkpoints as ckpt_lib
from fda_biper_jax.train import runlog as runlog_lib
from fda_biper_jax.train import runs
from fda_biper_jax.train import schedules as schedules_lib

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
  if config.model not in models.NAMES and ":" not in str(config.model):
    _fail(f"model={config.model!r} is not allowed; allowed: {list(models.NAMES)} or a "
          "factory's import path 'package.module:function'")
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
  if config.init_from and not epath.Path(config.init_from).is_dir():
    _fail(f"init_from={config.init_from!r} is not a directory (a stage-1 workdir is expected)")


# --------------------------------------------------------------------------
# Pieces of the step
# --------------------------------------------------------------------------


def create_model(config, num_classes: int, axis_name: str | None = None):
  """The config's model with `num_classes` logits: a zoo model with the config's
  quantization, dtype, BatchNorm init and architecture options (`config.model_kwargs`),
  or a factory's (`config.model` an import path) with `config.model_kwargs`."""
  dtype = COMPUTE_DTYPES[config.compute_dtype]
  kwargs = config.get("model_kwargs") or {}
  kwargs = kwargs.to_dict() if hasattr(kwargs, "to_dict") else dict(kwargs)
  if config.model in models.NAMES:
    return models.create(config.model, num_classes, dtype=dtype, axis_name=axis_name,
                         bn_scale_init=config.get("bn_scale_init", 1.0),
                         **quantization(config), **kwargs)
  return models.create(config.model, num_classes, dtype=dtype, axis_name=axis_name, **kwargs)


def factory_path(factory) -> str:
  """The import path 'module:qualname' of a module-level factory (checkpoints rebuild
  the model from it); one line if it has none."""
  path = f"{getattr(factory, '__module__', '')}:{getattr(factory, '__qualname__', '')}"
  try:
    if models.resolve_factory(path) is factory:
      return path
  except ValueError:
    pass
  _fail(f"model={factory!r} cannot be imported by path: define the factory at the top level "
        "of an importable module (checkpoints and exports rebuild the model from its path)")


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
  """The model's variables from `rng` and the optimizer's state, as one compiled program
  (`xla_cpu.init_compiler_options`)."""
  def init(key):
    variables = model.init(key, jnp.zeros((1, *image_shape)), train=False)
    params = variables["params"]
    return TrainState(step=jnp.zeros((), jnp.int32), params=params,
                      batch_stats=variables.get("batch_stats", {}), opt_state=tx.init(params))

  return jax.jit(init, compiler_options=xla_cpu.init_compiler_options())(rng)


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

  The model runs inside `methods.training_step(state.step, total_steps,
  steps_per_epoch)`, so every scheduled method parameter follows the traced
  step; the metrics carry the learning rate, the scheduled values of
  `quantizers` ({label: quantizer}, e.g. `trace.quantizers(model, shape)`),
  the methods' regularisers and the gradient norm of every kernel. Compiled with
  `xla_cpu.compiler_options()` (XLA:CPU's kernel choice; nothing on other backends).
  """
  quantizers = dict(quantizers or {})

  def per_device(state: TrainState, x, y):
    with methods.training_step(state.step, total_steps, steps_per_epoch) as progress:
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
  """Returns eval(variables, images, labels, mask) -> {'correct', 'loss_sum', 'count'};
  `variables` are {'params', 'batch_stats'}; `preprocess(images)` is the input source's
  evaluation transform."""

  def per_device(variables, x, y, mask):
    logits = model.apply(variables, preprocess(x), train=False)
    ce = optax.softmax_cross_entropy_with_integer_labels(logits.astype(jnp.float32), y)
    return {"correct": lax.psum(jnp.sum((jnp.argmax(logits, -1) == y) * mask), parallel.AXIS),
            "loss_sum": lax.psum(jnp.sum(ce * mask), parallel.AXIS),
            "count": lax.psum(jnp.sum(mask), parallel.AXIS)}

  return parallel.data_parallel(
      per_device, mesh, in_specs=(P(), P(parallel.AXIS), P(parallel.AXIS), P(parallel.AXIS)),
      out_specs=P())


def variables_of(state: TrainState) -> dict[str, Any]:
  return {"params": state.params, "batch_stats": state.batch_stats}


def evaluate(eval_step, variables, batches) -> dict[str, float]:
  """Accuracy and mean loss over global (images, labels, mask) batches, such as
  an input source's `eval_batches()` (the whole split, padding masked out)."""
  totals = None
  for batch in batches:
    out = eval_step(variables, *batch)
    totals = out if totals is None else jax.tree.map(jnp.add, totals, out)
  totals = jax.device_get(totals)
  return {"accuracy": float(totals["correct"] / totals["count"]),
          "loss": float(totals["loss_sum"] / totals["count"])}


def _duration(seconds: float) -> str:
  seconds = int(max(seconds, 0))
  h, rem = divmod(seconds, 3600)
  m, s = divmod(rem, 60)
  return f"{h}h{m:02d}m" if h else f"{m}m{s:02d}s"


# --------------------------------------------------------------------------
# The run
# --------------------------------------------------------------------------


def _meta(config, model, input_shape) -> dict[str, Any]:
  return {"model": models.config(model), "input_shape": [int(d) for d in input_shape],
          "config": json.loads(config.to_json_best_effort())}


def init_from_stage(state: TrainState, workdir: str) -> TrainState:
  """Stage 2 of a two-stage recipe: params and BN statistics of the previous
  stage's best checkpoint (its latest if it kept no best), fresh optimizer."""
  try:
    run = runs.restore(workdir, "best")
  except ValueError:
    try:
      run = runs.restore(workdir, "latest")
    except ValueError:
      _fail(f"init_from={workdir!r} holds no checkpoint to start from")
  log.info("initialised from %s (step %s, model %s)", workdir, run.step,
           run.meta["model"]["name"])
  return state.replace(params=run.variables["params"], batch_stats=run.variables["batch_stats"])


def train_and_evaluate(config: ml_collections.ConfigDict, workdir: str, *,
                       model=None) -> dict[str, Any]:
  """Trains (or, with config.eval_only, evaluates) and returns a summary dict.

  `model`, optional: a model factory (a module-level callable; see
  `fda_biper_jax.models`), used in place of `config.model`, which is set to
  its import path so that checkpoints rebuild it.
  """
  if model is not None:
    config = config.copy_and_resolve_references()
    with config.unlocked():
      config.model = factory_path(model)
  if config.distributed:
    parallel.initialize_distributed(config.coordinator_address, config.num_processes,
                                    config.process_id)
  mesh = parallel.make_mesh(config.num_devices or None)
  validate(config, mesh)
  init_key, data_key, aug_key = jax.random.split(jax.random.key(config.seed), 3)
  # A missing dataset fails here, before any file is written.
  source = inputs.create(config, mesh, data_key, train=not config.eval_only)

  if config.eval_only:
    return _evaluate_only(workdir, mesh, source)

  steps_per_epoch = source.steps_per_epoch
  model = create_model(config, source.num_classes, axis_name=parallel.AXIS)
  lr = learning_rate(config, steps_per_epoch)
  tx = make_optimizer(config, lr)
  state = create_state(model, tx, init_key, source.image_shape)
  if config.init_from:
    state = init_from_stage(state, config.init_from)
  meta = _meta(config, model, source.image_shape)

  ckpts = ckpt_lib.Checkpoints(workdir, keep=config.keep_checkpoints,
                               every_steps=config.checkpoint_every_steps)
  restored = ckpts.restore_latest(state)
  if restored is not None:
    state = restored[1]
  # The records and events after the checkpoint are dropped: those steps are taken again.
  runlog = runlog_lib.RunLog(workdir, tensorboard=config.tensorboard,
                             resume_step=None if restored is None else restored[0])
  runlog.write_config(meta["config"])
  if restored is not None:
    runlog.say(f"resuming from step {restored[0]} in {workdir}")
  state = parallel.replicate(state, mesh)
  with ckpt_lib.StopSignal() as stop:
    summary = _train(config, workdir, model, tx, lr, mesh, source, state, meta, ckpts, runlog,
                     aug_key, stop)
  ckpts.close()
  if not summary["stopped"]:
    runlog.write_hparams(meta["config"], {k: summary[k] for k in (
        "final_eval_accuracy", "best_eval_accuracy")})
  runlog.close()
  return summary


def _train(config, workdir, model, tx, lr, mesh, source, state, meta, ckpts, runlog, aug_key,
           stop):
  """The training loop of `train_and_evaluate`, from `state` to the last step or a stop."""
  steps_per_epoch = source.steps_per_epoch
  layer_log = (runlog_lib.LayerLog(model, source.image_shape, state.params)
               if config.log_layer_stats else None)
  total = config.num_epochs * steps_per_epoch
  train_step = make_train_step(model, tx, lr, mesh, source.preprocess, total_steps=total,
                               steps_per_epoch=steps_per_epoch,
                               quantizers=trace.quantizers(model, source.image_shape))
  eval_step = make_eval_step(model, mesh, source.eval_preprocess)
  ckpt_dir = ckpt_lib.directory(workdir)

  step = int(state.step)
  best = {"accuracy": ckpts.best_accuracy(), "step": ckpts.best_step()}
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
            f"good checkpoint is kept in {ckpt_dir}")
    return got

  while step < total and not stop.requested:
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
                    "window_s": now - t_window,
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

    evaluated = None
    epoch_end = step % steps_per_epoch == 0
    if (epoch_end and (step // steps_per_epoch) % config.eval_every_epochs == 0) or step == total:
      flush_metrics()
      ev = evaluate(eval_step, variables_of(state), source.eval_batches())
      evaluated = last_eval = ev["accuracy"]
      runlog.write({"kind": "eval", "step": step, "epoch": step / steps_per_epoch,
                    "elapsed_s": time.time() - t_start, "time": time.time(), **ev})
      if layer_log is not None and layer_log.layers:
        runlog.write(*layer_log.record(state.params, step, step / steps_per_epoch))
    # Ties go to the later step, as in the checkpoint manager's ranking.
    improved = evaluated is not None and (best["accuracy"] is None
                                          or evaluated >= best["accuracy"])
    if improved:
      best = {"accuracy": evaluated, "step": step}
    if improved or step == total or stop.requested or ckpts.should_save(step):
      flush_metrics()
      ckpts.save(step, state, meta, evaluated)

  if stop.requested:
    runlog.say(f"stopped by signal {stop.signum} at step {step}: saved in {ckpt_dir}; "
               "rerun the same command to resume")
  else:
    runlog.say(f"done: best eval accuracy {100 * best['accuracy']:.2f}% at step {best['step']}; "
               f"checkpoints in {ckpt_dir}")
  return {"workdir": workdir, "steps": step, "stopped": stop.requested,
          "final_eval_accuracy": last_eval, "best_eval_accuracy": best["accuracy"],
          "best_step": best["step"], "best_checkpoint": str(ckpt_dir / str(best["step"])),
          "latest_checkpoint": str(ckpt_dir / str(step)), "state": state}


def _evaluate_only(workdir, mesh, source):
  """Evaluates the latest readable checkpoint with the settings saved in it."""
  try:
    run = runs.restore(workdir, axis_name=parallel.AXIS)
  except ValueError as e:
    _fail(f"eval_only: {e}")
  ev = evaluate(make_eval_step(run.model, mesh, source.eval_preprocess),
                parallel.replicate(dict(run.variables), mesh), source.eval_batches())
  print(f"eval of {run.meta['model']['name']} at step {run.step} ({workdir}): "
        f"accuracy {100 * ev['accuracy']:.2f}%, loss {ev['loss']:.4f}")
  return {"workdir": workdir, "step": run.step, "model": run.meta["model"], **ev}
