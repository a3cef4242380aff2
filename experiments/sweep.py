"""Trains the quick recipe once per quantizer and tabulates the test accuracy.

  python -m experiments.sweep --workdir=runs/sweep

Each quantizer (experiments/configs/quick.py's arguments, or --quantizers=a,b)
trains in its own workdir under --workdir through `train.train_and_evaluate`,
so a rerun resumes where it stopped. The markdown table, with machine and
date, is printed and written to --workdir/results.md, the numbers to
results.json.
"""

import datetime
import json
import os
import platform
import sys

import jax
from absl import app, flags, logging

from experiments.configs import quick, recipes
from fda_biper_jax import train

FLAGS = flags.FLAGS
flags.DEFINE_string("workdir", "runs/sweep", "Parent folder of the runs.")
flags.DEFINE_list("quantizers", list(recipes.QUICK_QUANTIZERS), "Quantizers to train.")


def main(argv):
  del argv
  logging.set_verbosity(logging.WARNING)  # orbax logs every save at INFO
  bad = [q for q in FLAGS.quantizers if q not in recipes.QUICK_QUANTIZERS]
  if bad:
    sys.exit(f"error: quantizers {bad} are not allowed; allowed: {list(recipes.QUICK_QUANTIZERS)}")
  results = {}
  for q in FLAGS.quantizers:
    config = quick.get_config(q)
    config.tensorboard = False
    try:
      out = train.train_and_evaluate(config, os.path.join(FLAGS.workdir, q))
    except (ValueError, FloatingPointError) as e:
      sys.exit(f"error: {q}: {e}")
    results[q] = {"test_accuracy": out["final_eval_accuracy"], "steps": out["steps"]}
  stamp = datetime.date.today().isoformat()
  machine = f"{platform.machine()}, {os.cpu_count()} CPU cores, JAX on {jax.devices()[0].platform}"
  lines = ["| quantizer | Fashion-MNIST test accuracy |", "|---|---|"]
  lines += [f"| `{q}` | {100 * r['test_accuracy']:.2f}% |" for q, r in results.items()]
  lines.append(f"\n`python -m experiments.sweep`, {stamp}, {machine}")
  table = "\n".join(lines)
  print(table)
  with open(os.path.join(FLAGS.workdir, "results.md"), "w") as f:
    f.write(table + "\n")
  with open(os.path.join(FLAGS.workdir, "results.json"), "w") as f:
    json.dump({"date": stamp, "machine": machine, "results": results}, f, indent=1)


if __name__ == "__main__":
  app.run(main)
