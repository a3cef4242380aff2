"""Training: the trainer, its learning-rate schedules, checkpoints and finished runs.

* `trainer`: `train_and_evaluate(config, workdir)`, the one trainer, and the
  pieces of its step; its public names are available here (`train.validate`,
  `train.make_train_step`, ...), loaded on first use;
* `schedules`: the learning rate per step;
* `checkpoints`: the run's orbax checkpoint manager and the stop signal;
* `runlog`: config.json, metrics.jsonl and TensorBoard events of a workdir;
* `runs`: a finished run as an artifact, (model, variables, meta), restored
  without the optimizer (what evaluation, export and analysis use).

Importing `fda_biper_jax.train.runs` or `.checkpoints` does not load the
trainer (optax, the data pipeline).
"""

import importlib

_TRAINER = ("COMPUTE_DTYPES", "DECAY_MASKS", "OPTIMIZERS", "TrainState",
            "create_model", "create_state", "decay_mask", "evaluate", "factory_path", "grad_norms", "init_from_stage",
            "learning_rate", "make_eval_step", "make_optimizer", "make_train_step",
            "quantization", "train_and_evaluate", "validate", "variables_of")


def __getattr__(name: str):
  if name in _TRAINER:
    return getattr(importlib.import_module("fda_biper_jax.train.trainer"), name)
  raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def __dir__():
  return sorted([*globals(), *_TRAINER])
