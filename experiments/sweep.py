"""Trains the quick recipe once per quantizer and tabulates the test accuracy.

  python -m experiments.sweep --workdir=runs/sweep

Each registered method (experiments/configs/quick.py's arguments, or
--quantizers=a,b, 'NAME/VARIANT' for a variant) trains with its own
quantization settings in its own workdir under --workdir through
`train.train_and_evaluate`; --imports=mypkg.methods imports modules that
register a user's own methods first, which are then swept like the built-in ones,
so a rerun resumes where it stopped. The markdown table, with machine and
date, is printed and written to results.md in --workdir, the numbers to
results.json.
"""

import datetime
import importlib
import json
import os
import platform
import signal
import sys

import jax
from absl import app, flags, logging

from experiments.configs import quick, recipes
from fda_biper_jax import train

FLAGS = flags.FLAGS
flags.DEFINE_string("workdir", "runs/sweep", "Parent folder of the runs.")
flags.DEFINE_list("quantizers", None, "Methods to train (default: every registered one).")
flags.DEFINE_list("imports", [], "Modules to import first (they may register methods).")


def last_grad_norms(workdir: str) -> dict[str, float]:
  """The per-layer gradient norms of a run's last logged training step: a surrogate whose
  slope compounds through the binary layers shows here (module docstring of sign_swish)."""
  norms = {}
  with open(os.path.join(workdir, "metrics.jsonl")) as f:
    for line in f:
      record = json.loads(line)
      if record.get("kind") == "train":
        norms = record.get("grad_norms", {})
  return norms


def main(argv):
  del argv
  logging.set_verbosity(logging.WARNING)  # orbax logs every save at INFO
  for module in FLAGS.imports:
    try:
      importlib.import_module(module)
    except ImportError as e:
      sys.exit(f"error: --imports: module {module!r} cannot be imported: {e}")
  allowed = recipes.quick_methods()
  chosen = FLAGS.quantizers or list(allowed)
  bad = [q for q in chosen if q.partition("/")[0] not in allowed]
  if bad:
    sys.exit(f"error: quantizers {bad} are not allowed; allowed: {list(allowed)}")
  results = {}
  for q in chosen:
    try:
      config = quick.get_config(q)
    except ValueError as e:
      sys.exit(f"error: {q}: {e}")
    try:
      workdir = os.path.join(FLAGS.workdir, q.replace("/", "-"))
      out = train.train_and_evaluate(config, workdir)
    except (ValueError, FloatingPointError) as e:
      sys.exit(f"error: {q}: {e}")
    if out["stopped"]:  # saved at a SIGTERM; a rerun resumes this run
      sys.exit(128 + signal.SIGTERM)
    norms = last_grad_norms(workdir)
    results[q] = {"test_accuracy": out["final_eval_accuracy"], "steps": out["steps"],
                  "grad_norms": norms, "max_layer_grad_norm": max(norms.values(), default=None)}
  stamp = datetime.date.today().isoformat()
  machine = f"{platform.machine()}, {os.cpu_count()} CPU cores, JAX on {jax.devices()[0].platform}"
  lines = ["| quantizer | Fashion-MNIST test accuracy | largest layer gradient norm |",
           "|---|---|---|"]
  lines += [f"| `{q}` | {100 * r['test_accuracy']:.2f}% | {r['max_layer_grad_norm']:.3g} |"
            for q, r in results.items()]
  lines.append(f"\n`python -m experiments.sweep`, {stamp}, {machine}")
  table = "\n".join(lines)
  print(table)
  with open(os.path.join(FLAGS.workdir, "results.md"), "w") as f:
    f.write(table + "\n")
  with open(os.path.join(FLAGS.workdir, "results.json"), "w") as f:
    json.dump({"date": stamp, "machine": machine, "results": results}, f, indent=1)


if __name__ == "__main__":
  app.run(main)
