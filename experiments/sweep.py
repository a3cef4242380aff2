"""The estimator leaderboard: every registered method, N seeds, one model and budget.

  python -m experiments.sweep --workdir=runs/leaderboard --config=experiments/configs/quick.py \
      --seeds=3 --readme=docs/results.md

`--config` is a config file whose `get_config(method)` gives the run of one
method with its own quantization settings (`Method.usage`) under the file's
budget (model, data, optimizer, epochs); each (method, seed) trains through
`train.train_and_evaluate` in WORKDIR/<method>/seed<k> with `config.seed = k`.
`--quantizers=a,b` picks methods ('NAME/VARIANT' for a variant),
`--imports=mypkg.methods` imports modules that register a user's own methods
first. A config file that declares `RUNS` (a sequence of get_config
arguments) is swept over those instead of the registered methods: a recipe
search is such a file, each argument one recipe
(experiments/configs/fast_search.py); when the runs' budgets differ, the
table gives each row its own. A killed sweep resumes where it stopped: finished runs (their
result.json) are skipped and an unfinished one resumes from its checkpoint.

Written to WORKDIR: results.json (every run: final and best test accuracy,
train time, the eval curve, the last logged gradient norm of every layer;
the machine, date, budget and command), results.md (per method: mean ± std
over seeds of the final and best test accuracy, train minutes, the largest
layer gradient norm) and, with matplotlib, accuracy.png (test accuracy per
epoch, mean with a ±std band per method; a point with ±std bars per method
when every run evaluated once) and grad_norms.png (per-layer
gradient norm, mean over seeds). `--readme=FILE` writes the table between
FILE's `<!-- leaderboard -->` markers and `--publish_dir=DIR` copies
results.json and the plots there (the README's table is regenerated from that
JSON, never typed); `--report_only` rebuilds every output from WORKDIR's
result.json files without training.
"""

from __future__ import annotations

import datetime
import importlib
import json
import os
import platform
import shlex
import shutil
import signal
import sys
import time
from typing import Any, Mapping, Sequence

import numpy as np
from absl import flags, logging

from experiments.configs import recipes
from fda_biper_jax import train
from fda_biper_jax.train import runlog
from fda_biper_jax.cli import command, config_flag

FLAGS = flags.FLAGS


def define_flags() -> None:
  flags.DEFINE_string("workdir", "runs/leaderboard", "Parent folder of the runs and the reports.")
  flags.DEFINE_string("config", "experiments/configs/quick.py",
                      "Config file whose get_config(method) gives one method's run.")
  flags.DEFINE_list("quantizers", None, "Methods to train (default: every registered one).")
  flags.DEFINE_integer("seeds", 3, "Seeds per method (0 .. seeds - 1).", lower_bound=1)
  flags.DEFINE_list("imports", [], "Modules to import first (they may register methods).")
  flags.DEFINE_string("readme", None, "A Markdown file whose leaderboard block is rewritten.")
  flags.DEFINE_bool("report_only", False, "Rebuild the reports from finished runs; train nothing.")
  flags.DEFINE_string("publish_dir", None,
                      "A folder (e.g. in the repository) that receives results.json and the plots.")


RESULT_FILE = "result.json"
BEGIN, END = "<!-- leaderboard -->", "<!-- /leaderboard -->"


# --------------------------------------------------------------------------
# Runs
# --------------------------------------------------------------------------


def run_dir(workdir: str, method: str, seed: int) -> str:
  return os.path.join(workdir, method.replace("/", "-"), f"seed{seed}")


def run_result(folder: str, method: str, seed: int) -> dict[str, Any]:
  """One finished run, from its metrics.jsonl: final and best test accuracy, train
  seconds (the logged windows' wall time, resumed runs included), the eval curve and
  the last logged gradient norm of every kernel."""
  records = runlog.read(folder)
  evals = [r for r in records if r["kind"] == "eval"]
  trains = [r for r in records if r["kind"] == "train"]
  if not evals:
    raise ValueError(f"{folder}: metrics.jsonl holds no evaluation")
  norms = trains[-1].get("grad_norms", {}) if trains else {}
  return {"method": method, "seed": seed, "steps": evals[-1]["step"],
          "final_accuracy": evals[-1]["accuracy"],
          "best_accuracy": max(r["accuracy"] for r in evals),
          "train_time_s": sum(r.get("window_s", 0.0) for r in trains),
          "curve": [[r["epoch"], r["accuracy"]] for r in evals],
          "grad_norms": norms, "max_layer_grad_norm": max(norms.values(), default=None)}


def train_one(get_config, method: str, seed: int, folder: str) -> dict[str, Any] | None:
  """Trains (or resumes) one run and writes its result.json; None if it was stopped.
  A run whose loss becomes NaN / Inf is recorded as diverged, with the error."""
  config = get_config(method)
  config.seed = seed
  try:
    out = train.train_and_evaluate(config, folder)
  except FloatingPointError as e:
    result = {"method": method, "seed": seed, "diverged": str(e)}
  else:
    if out["stopped"]:
      return None
    result = run_result(folder, method, seed)
  with open(os.path.join(folder, RESULT_FILE), "w") as f:
    json.dump(result, f, indent=1)
  return result


def finished(workdir: str) -> list[dict[str, Any]]:
  """The result.json of every finished run under workdir."""
  out = []
  for root, _, files in sorted(os.walk(workdir)):
    if RESULT_FILE in files:
      with open(os.path.join(root, RESULT_FILE)) as f:
        out.append(json.load(f))
  return out


# --------------------------------------------------------------------------
# Reports
# --------------------------------------------------------------------------


def _mean_std(values: Sequence[float]) -> tuple[float, float]:
  a = np.asarray(values, np.float64)
  return float(a.mean()), float(a.std(ddof=1)) if a.size > 1 else 0.0


def aggregate(results: Sequence[Mapping[str, Any]]) -> dict[str, dict[str, Any]]:
  """Per method, in first-seen order: the seeds that finished, mean and std of their
  final and best accuracy and train time, mean largest layer gradient norm, and the
  number of diverged runs."""
  by: dict[str, list] = {}
  for r in results:
    by.setdefault(r["method"], []).append(r)
  out = {}
  for method, every in by.items():
    runs = [r for r in every if "diverged" not in r]
    if not runs:
      out[method] = {"seeds": [], "diverged": len(every)}
      continue
    norms = [r["max_layer_grad_norm"] for r in runs if r["max_layer_grad_norm"] is not None]
    out[method] = {"seeds": sorted(r["seed"] for r in runs),
                   "final_accuracy": _mean_std([r["final_accuracy"] for r in runs]),
                   "best_accuracy": _mean_std([r["best_accuracy"] for r in runs]),
                   "train_time_s": _mean_std([r["train_time_s"] for r in runs]),
                   "max_layer_grad_norm": float(np.mean(norms)) if norms else None,
                   "diverged": len(every) - len(runs)}
  return out


def budget(config) -> str:
  """The budget every method shares, in words."""
  opt = config.optimizer
  return (f"{config.model} on {config.dataset}, {config.num_epochs} epoch(s), batch "
          f"{config.batch_size}, {opt.name} lr {opt.learning_rate:g} ({opt.decay} decay, "
          f"{opt.warmup_epochs:g} warm-up epochs), weight decay {opt.weight_decay:g}")


def markdown(summary: Mapping[str, Any]) -> str:
  """The leaderboard table with its provenance. Rows are sorted by mean final accuracy,
  best first, a method's variants ('NAME/VARIANT') kept together; runs whose budgets
  differ (a recipe search) get a budget column instead of one budget line."""
  methods = summary["methods"]
  acc = {m: a["final_accuracy"][0] if a["seeds"] else -1.0 for m, a in methods.items()}
  group = lambda m: m.partition("/")[0]  # noqa: E731
  best = {}
  for m, a in acc.items():
    best[group(m)] = max(best.get(group(m), -1.0), a)
  rows = sorted(methods.items(), key=lambda kv: (-best[group(kv[0])], group(kv[0]), -acc[kv[0]]))
  budgets = summary.get("budgets")
  if budgets:  # the phrases every run shares go to the budget line, the rest to the column
    phrases = {m: b.split(", ") for m, b in budgets.items()}
    common = [p for p in next(iter(phrases.values())) if all(p in q for q in phrases.values())]
    budgets = {m: ", ".join(p for p in q if p not in common) for m, q in phrases.items()}
    shared = f"Budget: {', '.join(common)}; the rest per row. " if common else ""
  else:
    shared = f"Budget: {summary['budget']}. "
  pct = lambda ms: f"{100 * ms[0]:.2f} ± {100 * ms[1]:.2f}"  # noqa: E731
  head = ["method", "seeds", "final test accuracy (%)", "best test accuracy (%)",
          "train time (min)", "largest layer gradient norm"] + (["budget"] if budgets else [])
  lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
  for method, a in rows:
    diverged = f" ({a['diverged']} diverged)" if a["diverged"] else ""
    if not a["seeds"]:
      cells = [f"`{method}`", f"0{diverged}", "-", "-", "-", "-"]
    else:
      norm = "n/a" if a["max_layer_grad_norm"] is None else f"{a['max_layer_grad_norm']:.3g}"
      cells = [f"`{method}`", f"{len(a['seeds'])}{diverged}", pct(a["final_accuracy"]),
               pct(a["best_accuracy"]), f"{a['train_time_s'][0] / 60:.1f}", norm]
    if budgets:
      cells.append(budgets.get(method, "-"))
    lines.append("| " + " | ".join(cells) + " |")
  lines += ["", f"Mean ± standard deviation over seeds. {shared}"
            f"Machine: {summary['machine']}. Date: {summary['date']}.",
            f"Command: `{summary['command']}`."]
  return "\n".join(lines)


def plot(results: Sequence[Mapping[str, Any]], out_dir: str) -> list[str]:
  """accuracy.png and grad_norms.png in out_dir; [] without matplotlib. The bands and
  bars are the table's standard deviation over seeds (ddof 1)."""
  try:
    import matplotlib  # noqa: PLC0415
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt  # noqa: PLC0415
  except ImportError:
    logging.warning("matplotlib is not installed: no plots (pip install fda_biper_jax[analysis])")
    return []
  by: dict[str, list] = {}
  for r in results:
    by.setdefault(r["method"], []).append(r)
  fig, ax = plt.subplots(figsize=(7, 4.5))
  if all(len(r["curve"]) == 1 for r in results):  # one evaluation per run: no curve to draw
    final = {m: _mean_std([100 * r["curve"][0][1] for r in runs]) for m, runs in by.items()}
    names = sorted(final, key=lambda m: final[m][0])
    ax.errorbar([final[m][0] for m in names], range(len(names)), fmt="o", capsize=3,
                xerr=[final[m][1] for m in names])
    ax.set_yticks(range(len(names)), names, fontsize=8)
    ax.grid(axis="x", alpha=0.3)
    ax.set(xlabel="test accuracy after the last epoch (%)",
           title="Test accuracy (mean ± std over seeds)")
  else:
    for method, runs in by.items():
      n = min(len(r["curve"]) for r in runs)
      epochs = np.asarray([p[0] for p in runs[0]["curve"][:n]])
      acc = 100 * np.asarray([[p[1] for p in r["curve"][:n]] for r in runs])
      mean, std = np.asarray([_mean_std(per_epoch) for per_epoch in acc.T]).T
      (line,) = ax.plot(epochs, mean, marker="o", label=method)
      ax.fill_between(epochs, mean - std, mean + std, color=line.get_color(), alpha=0.2)
    ax.set(xlabel="epoch", ylabel="test accuracy (%)",
           title="Test accuracy (mean ± std over seeds)")
    ax.legend(fontsize=8)
  paths = [os.path.join(out_dir, "accuracy.png")]
  fig.savefig(paths[0], dpi=120, bbox_inches="tight")
  plt.close(fig)
  fig, ax = plt.subplots(figsize=(7, 4.5))
  for method, runs in by.items():
    layers = list(runs[0]["grad_norms"])
    if layers:
      norms = np.asarray([[r["grad_norms"].get(k, np.nan) for k in layers] for r in runs])
      ax.plot(range(len(layers)), np.nanmean(norms, 0), marker=".", label=method)
  ax.set(xlabel="layer (network order)", ylabel="gradient norm (last logged step)", yscale="log",
         title="Per-layer gradient norm (mean over seeds)")
  ax.legend(fontsize=8)
  paths.append(os.path.join(out_dir, "grad_norms.png"))
  fig.savefig(paths[1], dpi=120, bbox_inches="tight")
  plt.close(fig)
  return paths


def write_readme_block(path: str, table: str) -> None:
  """Replaces the text between the file's leaderboard markers with `table`."""
  with open(path) as f:
    text = f.read()
  if BEGIN not in text or END not in text:
    raise ValueError(f"--readme={path!r} has no {BEGIN} ... {END} block to rewrite")
  head, rest = text.split(BEGIN, 1)
  tail = rest.split(END, 1)[1]
  with open(path, "w") as f:
    f.write(f"{head}{BEGIN}\n{table}\n{END}{tail}")


def readme_block(path: str) -> str:
  """The text between a file's leaderboard markers."""
  with open(path) as f:
    return f.read().split(BEGIN, 1)[1].split(END, 1)[0].strip("\n")


def report(workdir: str, meta: Mapping[str, Any], readme: str | None = None,
           publish_dir: str | None = None) -> dict[str, Any]:
  """results.json, results.md and the plots from every finished run; the README block;
  copies of results.json and the plots in publish_dir."""
  results = finished(workdir)
  plotted = [r for r in results if "diverged" not in r]
  summary = {**meta, "methods": aggregate(results), "runs": results}
  with open(os.path.join(workdir, "results.json"), "w") as f:
    json.dump(summary, f, indent=1)
  table = markdown(summary)
  with open(os.path.join(workdir, "results.md"), "w") as f:
    f.write(table + "\n")
  files = [os.path.join(workdir, "results.json"), *plot(plotted, workdir)]
  if readme:
    write_readme_block(readme, table)
  if publish_dir:
    os.makedirs(publish_dir, exist_ok=True)
    for path in files:
      shutil.copy(path, publish_dir)
  print(table)
  return summary


# --------------------------------------------------------------------------
# The command
# --------------------------------------------------------------------------


def machine() -> str:
  from benchmarks import cpu_model  # noqa: PLC0415
  import jax  # noqa: PLC0415
  return (f"{cpu_model()}, {os.cpu_count()} CPU cores, JAX {jax.__version__} on "
          f"{jax.devices()[0].platform}")


REPORT_FLAGS = ("--readme", "--publish_dir", "--report_only", "--noreport_only")


def train_command(argv: Sequence[str]) -> str:
  """The command that trains these runs: argv without the flags that only report."""
  kept = [a for a in argv if not a.startswith(REPORT_FLAGS)]
  return shlex.join(["python", "-m", "experiments.sweep", *kept])


def chosen_methods(names: Sequence[str] | None, runs: Sequence[str] | None = None) -> list[str]:
  """`--quantizers` checked against the config's RUNS, or against the registered methods
  (NAME/VARIANT allowed) when it declares none; all of them by default."""
  allowed = list(runs) if runs is not None else recipes.quick_methods()
  chosen = list(names or allowed)
  key = (lambda q: q) if runs is not None else (lambda q: q.partition("/")[0])
  bad = [q for q in chosen if key(q) not in allowed]
  if bad:
    variants = "" if runs is not None else " (NAME/VARIANT for a variant)"
    raise ValueError(f"--quantizers={','.join(bad)} is not allowed; allowed: "
                     f"{', '.join(allowed)}{variants}")
  return chosen


def budgets_meta(configs: Mapping[str, Any]) -> dict[str, Any]:
  """{'budget': the one budget every run shares} or, when they differ,
  {'budgets': {method: budget}}."""
  each = {m: budget(c) for m, c in configs.items()}
  if len(set(each.values())) == 1:
    return {"budget": next(iter(each.values()))}
  return {"budgets": each}


def main(argv):
  command.no_arguments(argv)
  logging.set_verbosity(logging.WARNING)  # orbax logs every save at INFO
  try:
    for module in FLAGS.imports:
      try:
        importlib.import_module(module)
      except ImportError as e:
        raise ValueError(f"--imports: module {module!r} cannot be imported: {e}") from e
    module = config_flag.config_module(FLAGS.config, ("get_config",),
                                       "experiments/configs/quick.py")
    runs = getattr(module, "RUNS", None)
    chosen = chosen_methods(FLAGS.quantizers, None if runs is None else list(runs))
    get_config = module.get_config
    if FLAGS.readme and not os.path.isfile(FLAGS.readme):
      raise ValueError(f"--readme={FLAGS.readme!r} does not exist")
    configs = {m: get_config(m) for m in chosen}  # bad settings stop here, before any run
    for config in configs.values():
      train.validate(config)
  except ValueError as e:
    command.fail(e)
  os.makedirs(FLAGS.workdir, exist_ok=True)
  meta = {"date": datetime.date.today().isoformat(), "machine": machine(),
          **budgets_meta(configs), "command": train_command(sys.argv[1:])}
  if not FLAGS.report_only:
    for seed in range(FLAGS.seeds):
      for method in chosen:
        folder = run_dir(FLAGS.workdir, method, seed)
        if os.path.exists(os.path.join(folder, RESULT_FILE)):
          continue
        start = time.time()
        try:
          result = train_one(get_config, method, seed, folder)
        except ValueError as e:
          command.fail(f"{method} seed {seed}: {e}", command.FAILURE)
        if result is None:  # saved at a SIGTERM; a rerun resumes this run
          sys.exit(128 + signal.SIGTERM)
        outcome = (f"diverged: {result['diverged']}" if "diverged" in result else
                   f"final test accuracy {100 * result['final_accuracy']:.2f}%")
        print(f"{method} seed {seed}: {outcome} ({(time.time() - start) / 60:.1f} min)",
              flush=True)
  report(FLAGS.workdir, meta, FLAGS.readme, FLAGS.publish_dir)


if __name__ == "__main__":
  command.run(main, define_flags)
