"""Minutes from the command's start to a test accuracy: a recipe's stages, timed end to end.

  python -m experiments.time_to_accuracy --recipe=biper --target=0.85 --workdir=runs/fast_biper

`--config` (default experiments/configs/fast.py) declares `STAGES`, {recipe:
(config argument, ...)}, and `get_config(argument)`; the stages train in
order through `train.train_and_evaluate` in WORKDIR/<argument>, each stage
after the first starting from the previous one's best checkpoint
(`init_from`). The time to the target is the wall time from this command's
start (data loading and compilation included) to the first evaluation that
reaches it (its `time` in metrics.jsonl). Written to WORKDIR/time_to_accuracy.json:
per stage its epochs, wall seconds and eval curve (epoch, accuracy, minutes
since the start); the minutes to the target or null; the budget, machine and
date; and beside it the same as a Markdown table (`TABLE_FILE`). `--against=DIR`
(another recipe's finished run, e.g. BiPer's for the float twin) adds this
recipe's accuracy at the minute that one reached its target.
"""

from __future__ import annotations

import datetime
import json
import os
import shlex
import sys
import time
from typing import Any

from absl import flags, logging

from experiments import sweep
from fda_biper_jax import train
from fda_biper_jax.train import runlog
from fda_biper_jax.cli import command, config_flag

FLAGS = flags.FLAGS


def define_flags() -> None:
  flags.DEFINE_string("config", "experiments/configs/fast.py",
                      "Config file with STAGES and get_config(argument).")
  flags.DEFINE_string("recipe", "biper", "A key of the config file's STAGES.")
  flags.DEFINE_float("target", 0.85, "Test accuracy to reach, in (0, 1].")
  flags.DEFINE_string("workdir", None, "Parent folder of the stages' workdirs (new or empty).")
  flags.DEFINE_integer("seed", 0, "config.seed of every stage.")
  flags.DEFINE_string("against", None, "A finished run of this command (its workdir): the "
                      "report adds this recipe's accuracy at the minute that one reached its "
                      "target (or ended).")
  flags.mark_flags_as_required(["workdir"])


RESULT_FILE = "time_to_accuracy.json"
TABLE_FILE = os.path.splitext(RESULT_FILE)[0] + ".md"  # the same, as a Markdown table


def load_config_module(path: str):
  """The config file's module, with STAGES (a dict) and get_config; ValueError otherwise."""
  module = config_flag.config_module(path, ("STAGES", "get_config"),
                                     "experiments/configs/fast.py")
  if not isinstance(module.STAGES, dict):
    raise ValueError(f"--config={path!r}: STAGES is not allowed to be a "
                     f"{type(module.STAGES).__name__}; allowed: a dict")
  return module


def stage_configs(module, recipe: str, workdir: str, seed: int) -> list[tuple[str, Any]]:
  """[(workdir, config)] of the recipe's stages, chained by init_from."""
  if recipe not in module.STAGES:
    raise ValueError(f"--recipe={recipe} is not allowed; allowed: {', '.join(module.STAGES)}")
  out = []
  for arg in module.STAGES[recipe]:
    config = module.get_config(arg)
    config.seed = seed
    if out:
      config.init_from = out[-1][0]
    out.append((os.path.join(workdir, arg.replace(",", "-")), config))
  return out


def eval_curve(workdir: str, start: float) -> list[dict[str, float]]:
  records = runlog.read(workdir)
  return [{"epoch": r["epoch"], "accuracy": r["accuracy"],
           "minutes": (r["time"] - start) / 60} for r in records if r["kind"] == "eval"]


def minutes_to(target: float, curve: list[dict[str, float]]) -> float | None:
  """The minutes of the first evaluation at or above `target`, or None."""
  return next((p["minutes"] for p in curve if p["accuracy"] >= target), None)


def accuracy_at(minutes: float, curve: list[dict[str, float]]) -> float | None:
  """The accuracy of the last evaluation at or before `minutes`, or None."""
  return next((p["accuracy"] for p in reversed(curve) if p["minutes"] <= minutes), None)


def read_report(workdir: str) -> dict[str, Any]:
  path = os.path.join(workdir, RESULT_FILE)
  if not os.path.isfile(path):
    raise ValueError(f"--against={workdir!r} is not allowed: it holds no {RESULT_FILE}; "
                     "allowed: the workdir of a finished run of this command")
  with open(path) as f:
    return json.load(f)


def against(other: dict[str, Any], curve: list[dict[str, float]]) -> dict[str, Any]:
  """This run's accuracy at the minute `other` reached its target (or ended)."""
  minutes = other["minutes_to_target"]
  minutes = other["total_minutes"] if minutes is None else minutes
  return {"recipe": other["recipe"], "target": other["target"], "minutes": minutes,
          "reached": other["minutes_to_target"] is not None,
          "accuracy": accuracy_at(minutes, curve)}


def markdown(report: dict[str, Any]) -> str:
  """The report as Markdown: a headline and every evaluation (stage, epoch, minutes, accuracy)."""
  got = report["minutes_to_target"]
  lines = [f"`{report['recipe']}`: " + (f"{100 * report['target']:g}% test accuracy at "
                                         f"{got:.1f} min" if got is not None else
                                         f"{100 * report['target']:g}% not reached") +
           f"; {100 * report['final_accuracy']:.2f}% after {report['total_minutes']:.1f} min.", ""]
  other = report.get("against")
  if other:
    acc = "-" if other["accuracy"] is None else f"{100 * other['accuracy']:.2f}%"
    event = "reached its target" if other["reached"] else "ended"
    lines += [f"At {other['minutes']:.1f} min, when `{other['recipe']}` {event}: {acc}.", ""]
  lines += ["| stage | epoch | minutes | test accuracy |", "|---|---|---|---|"]
  for stage in report["stages"]:
    name = os.path.basename(stage["workdir"])
    lines += [f"| {name} | {p['epoch']:g} | {p['minutes']:.2f} | {100 * p['accuracy']:.2f}% |"
              for p in stage["curve"]]
  lines += [""] + ([f"Budget: {report['budget']}."] if "budget" in report else []) + [
      f"Machine: {report['machine']}; date: {report['date']}.",
      f"Command: `{report['command']}`."]
  return "\n".join(lines) + "\n"


def budget(stages: list[tuple[str, Any]]) -> str:
  """Each stage's model, data and optimizer (`sweep.budget`), one phrase each."""
  return "; ".join(f"{os.path.basename(w)}: {sweep.budget(c)}" for w, c in stages)


def main(argv):
  command.no_arguments(argv)
  start = time.time()
  logging.set_verbosity(logging.WARNING)
  try:
    if not 0 < FLAGS.target <= 1:
      raise ValueError(f"--target={FLAGS.target} is not allowed; allowed: a number in (0, 1]")
    module = load_config_module(FLAGS.config)
    stages = stage_configs(module, FLAGS.recipe, FLAGS.workdir, FLAGS.seed)
    train.validate(stages[0][1])  # later stages need the earlier ones' checkpoints
    other = read_report(FLAGS.against) if FLAGS.against else None
    if os.path.exists(FLAGS.workdir) and os.listdir(FLAGS.workdir):
      raise ValueError(f"--workdir={FLAGS.workdir!r} is not allowed: it is not empty, and a "
                       "timing starts from nothing; allowed: a new or empty folder")
  except ValueError as e:
    command.fail(e)
  report: dict[str, Any] = {
      "recipe": FLAGS.recipe, "target": FLAGS.target, "date": datetime.date.today().isoformat(),
      "machine": sweep.machine(),
      "command": shlex.join(["python", "-m", "experiments.time_to_accuracy", *sys.argv[1:]]),
      "budget": budget(stages), "stages": [], "minutes_to_target": None}
  for workdir, config in stages:
    t0 = time.time()
    try:
      train.train_and_evaluate(config, workdir)
    except (ValueError, FloatingPointError) as e:
      command.fail(f"{workdir}: {e}", command.FAILURE)
    curve = eval_curve(workdir, start)
    report["stages"].append({"workdir": workdir, "epochs": config.num_epochs,
                             "wall_s": time.time() - t0, "curve": curve})
    if report["minutes_to_target"] is None:
      report["minutes_to_target"] = minutes_to(FLAGS.target, curve)
  report["total_minutes"] = (time.time() - start) / 60
  report["final_accuracy"] = report["stages"][-1]["curve"][-1]["accuracy"]
  if other is not None:
    report["against"] = against(other, [p for s in report["stages"] for p in s["curve"]])
  with open(os.path.join(FLAGS.workdir, RESULT_FILE), "w") as f:
    json.dump(report, f, indent=1)
  table = markdown(report)
  with open(os.path.join(FLAGS.workdir, TABLE_FILE), "w") as f:
    f.write(table)
  print(table)


if __name__ == "__main__":
  command.run(main, define_flags)
