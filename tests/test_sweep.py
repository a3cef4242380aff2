"""The estimator leaderboard (experiments.sweep) on the tiny config: seeds, resumption, table."""

import json
import os
import re
import subprocess
import sys

import jax
import numpy as np
import pytest

from experiments import sweep

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _sweep(*args, cwd=ROOT):
  env = {**os.environ, "JAX_COMPILATION_CACHE_DIR": jax.config.jax_compilation_cache_dir or ""}
  return subprocess.run([sys.executable, "-m", "experiments.sweep",
                         "--config=experiments/configs/tiny.py", "--quantizers=biper,ste", *args],
                        cwd=cwd, env=env, capture_output=True, text=True, timeout=600)


def _rows(table: str) -> dict[str, list[str]]:
  return {cells[0].strip("` "): [c.strip() for c in cells[1:]]
          for cells in (line.strip("|").split("|") for line in table.splitlines()
                        if line.startswith("| `"))}


@pytest.fixture(scope="module")
def two_seeds(tmp_path_factory):
  """One seed, then two: the second invocation trains only seed 1."""
  wd = tmp_path_factory.mktemp("sweep")
  readme = wd / "README.md"
  readme.write_text(f"# x\n\n{sweep.BEGIN}\nold\n{sweep.END}\n\nafter\n")
  first = _sweep(f"--workdir={wd}", "--seeds=1")
  assert first.returncode == 0, first.stderr[-3000:]
  stamps = {p: os.path.getmtime(wd / p / "seed0" / sweep.RESULT_FILE) for p in ("biper", "ste")}
  second = _sweep(f"--workdir={wd}", "--seeds=2", f"--readme={readme}",
                  f"--publish_dir={wd / 'published'}")
  assert second.returncode == 0, second.stderr[-3000:]
  return wd, readme, first.stdout, second.stdout, stamps


def test_finished_runs_are_skipped_on_rerun(two_seeds):
  wd, _, first, second, stamps = two_seeds
  assert re.findall(r"^(\w+) seed (\d)", first, re.M) == [("biper", "0"), ("ste", "0")]
  assert re.findall(r"^(\w+) seed (\d)", second, re.M) == [("biper", "1"), ("ste", "1")]
  for p, t in stamps.items():
    assert os.path.getmtime(wd / p / "seed0" / sweep.RESULT_FILE) == t


def test_the_table_is_the_mean_and_std_of_the_runs(two_seeds):
  wd, readme, *_ = two_seeds
  summary = json.loads((wd / "results.json").read_text())
  assert sorted((r["method"], r["seed"]) for r in summary["runs"]) == [
      ("biper", 0), ("biper", 1), ("ste", 0), ("ste", 1)]
  table = (wd / "results.md").read_text().strip()
  rows = _rows(table)
  assert set(rows) == {"biper", "ste"}
  for method, cells in rows.items():
    finals = [100 * r["final_accuracy"] for r in summary["runs"] if r["method"] == method]
    mean, std = (float(x) for x in cells[1].split("±"))
    assert cells[0] == "2"
    assert mean == pytest.approx(np.mean(finals), abs=0.006)
    assert std == pytest.approx(np.std(finals, ddof=1), abs=0.006)
  assert "Budget: tiny_cnn on synthetic, 2 epoch(s), batch 32, adam" in table
  assert (f"Command: `python -m experiments.sweep --config=experiments/configs/tiny.py "
          f"--quantizers=biper,ste --workdir={wd} --seeds=2`.") in table
  # the README block is the table, regenerated from the JSON alone
  assert sweep.readme_block(str(readme)) == table == sweep.markdown(summary)
  assert readme.read_text().endswith(f"{sweep.END}\n\nafter\n")
  published = sorted(os.listdir(wd / "published"))
  assert published == ["accuracy.png", "grad_norms.png", "results.json"]


def test_an_unfinished_run_resumes_from_its_checkpoint(two_seeds, tmp_path):
  wd, *_ = two_seeds
  (wd / "ste" / "seed1" / sweep.RESULT_FILE).unlink()
  again = _sweep(f"--workdir={wd}", "--seeds=2")
  assert again.returncode == 0, again.stderr[-3000:]
  assert re.findall(r"^(\w+) seed (\d)", again.stdout, re.M) == [("ste", "1")]
  result = json.loads((wd / "ste" / "seed1" / sweep.RESULT_FILE).read_text())
  with open(wd / "ste" / "seed1" / "metrics.jsonl") as f:
    steps = [json.loads(line)["step"] for line in f if '"train"' in line]
  assert steps == sorted(set(steps)) and result["steps"] == 16  # resumed at its last step


def test_bad_settings_stop_with_one_line_before_any_run(tmp_path):
  for args, match in ((["--config=nope.py"], "--config='nope.py' does not exist"),
                      (["--quantizers=nope"], "--quantizers=nope is not allowed")):
    out = subprocess.run([sys.executable, "-m", "experiments.sweep", f"--workdir={tmp_path / 'w'}",
                          *args], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert out.returncode != 0 and match in out.stderr
    assert len(out.stderr.strip().splitlines()) == 1, out.stderr
    assert not (tmp_path / "w").exists()


def test_diverged_runs_are_counted_not_averaged():
  runs = [{"method": "a", "seed": 0, "final_accuracy": 0.5, "best_accuracy": 0.6,
           "train_time_s": 60.0, "max_layer_grad_norm": 1.0},
          {"method": "a", "seed": 1, "diverged": "loss became nan at step 3"},
          {"method": "b", "seed": 0, "diverged": "loss became inf at step 1"}]
  agg = sweep.aggregate(runs)
  assert agg["a"]["final_accuracy"] == (0.5, 0.0) and agg["a"]["diverged"] == 1
  assert agg["b"] == {"seeds": [], "diverged": 1}
  table = sweep.markdown({"methods": agg, "budget": "B", "machine": "M", "date": "D",
                          "command": "C"})
  assert _rows(table) == {"a": ["1 (1 diverged)", "50.00 ± 0.00", "60.00 ± 0.00", "1.0", "1"],
                          "b": ["0 (1 diverged)", "-", "-", "-", "-"]}


@pytest.mark.parametrize("page, published", [("README.md", "docs/leaderboard"),
                                             ("docs/results.md", "docs/recipe_search")])
def test_the_published_tables_are_their_json(page, published):
  """The README's leaderboard and docs/results.md's recipe search are regenerated from
  the published results.json, never typed; every run of the command is in it."""
  with open(os.path.join(ROOT, published, "results.json")) as f:
    summary = json.load(f)
  assert sweep.readme_block(os.path.join(ROOT, page)) == sweep.markdown(summary)
  from experiments.configs import fast_search, recipes  # noqa: PLC0415
  every = recipes.quick_methods() if page == "README.md" else fast_search.RUNS
  assert set(summary["methods"]) == {r["method"] for r in summary["runs"]} == set(every)
  seeds = int(re.search(r"--seeds=(\d+)", summary["command"]).group(1))
  assert all(len(a["seeds"]) + a["diverged"] == seeds for a in summary["methods"].values())


def test_a_config_with_runs_sweeps_them_and_keeps_tensorboard_on(tmp_path):
  """A config file's RUNS replace the registered methods (a recipe search), and the sweep's
  runs write TensorBoard events as any run does (it never turns them off)."""
  config = tmp_path / "search.py"
  config.write_text("from experiments.configs import tiny\n\nRUNS = ('ste_lr0.01',)\n\n\n"
                    "def get_config(arg):\n  c = tiny.get_config(arg.split('_')[0])\n"
                    "  c.tensorboard, c.num_epochs, c.optimizer.learning_rate = True, 1, 0.01\n"
                    "  return c\n")
  wd = tmp_path / "sweep"
  env = {**os.environ, "JAX_COMPILATION_CACHE_DIR": jax.config.jax_compilation_cache_dir or ""}
  out = subprocess.run([sys.executable, "-m", "experiments.sweep", f"--config={config}",
                        "--seeds=1", f"--workdir={wd}"], cwd=ROOT, env=env,
                       capture_output=True, text=True, timeout=600)
  assert out.returncode == 0, out.stderr[-3000:]
  assert re.findall(r"^(\S+) seed (\d)", out.stdout, re.M) == [("ste_lr0.01", "0")]
  summary = json.loads((wd / "results.json").read_text())
  assert "lr 0.01 " in summary["budget"] and list(summary["methods"]) == ["ste_lr0.01"]
  events = list((wd / "ste_lr0.01" / "seed0" / "tensorboard").rglob("events.out.tfevents.*"))
  assert events and all(e.stat().st_size > 0 for e in events)
  bad = subprocess.run([sys.executable, "-m", "experiments.sweep", f"--config={config}",
                        "--quantizers=ste", f"--workdir={tmp_path / 'w'}"], cwd=ROOT,
                       capture_output=True, text=True, timeout=120)
  assert bad.returncode != 0 and not (tmp_path / "w").exists()
  assert bad.stderr.strip().endswith(": error: --quantizers=ste is not allowed; allowed: "
                                    "ste_lr0.01"), bad.stderr


def test_runs_with_different_budgets_get_a_budget_column():
  from experiments.configs import fast_search  # noqa: PLC0415
  configs = {r: fast_search.get_config(r) for r in fast_search.RUNS}
  meta = sweep.budgets_meta(configs)
  assert list(meta) == ["budgets"] and set(meta["budgets"]) == set(fast_search.RUNS)
  assert sweep.budgets_meta({"a": configs["identity/sgd_lr0.1"]})["budget"] == (
      meta["budgets"]["identity/sgd_lr0.1"])
  run = {"final_accuracy": (0.8, 0.0), "best_accuracy": (0.8, 0.0), "train_time_s": (60.0, 0.0),
         "max_layer_grad_norm": 1.0, "seeds": [0], "diverged": 0}
  methods = {"b/x": {**run, "final_accuracy": (0.7, 0.0)}, "a/y": run,
             "b/z": {**run, "final_accuracy": (0.9, 0.0)}, "a/w": {**run, "final_accuracy": (0.6, 0.0)}}
  table = sweep.markdown({"methods": methods, "machine": "M", "date": "D",
                          "command": "C", "budgets": {m: f"m, lr {m}" for m in methods}})
  rows = _rows(table)
  assert list(rows) == ["b/z", "b/x", "a/y", "a/w"]  # groups by their best, then within
  assert rows["b/x"][-1] == "lr b/x" and "Budget: m; the rest per row." in table


def test_the_recipe_search_config_trains_what_it_names():
  from experiments.configs import fast, fast_search  # noqa: PLC0415
  assert len(fast_search.RUNS) == len(set(fast_search.RUNS)) == sum(
      map(len, fast_search.POINTS.values()))
  for run in fast_search.RUNS:
    stage, _, point = run.partition("/")
    c, base = fast_search.get_config(run), fast.get_config(stage)
    assert c.num_epochs == fast_search.SEARCH_EPOCHS
    assert c.quantization.to_dict() == base.quantization.to_dict()
    assert c.init_from == base.init_from
    for field, value in fast_search.POINTS[stage][point].items():
      assert c.optimizer[field] == value
  c = fast_search.get_config("biper_stage1/adam_lr0.001").optimizer
  assert (c.name, c.learning_rate, c.decay, c.weight_decay) == ("adam", 1e-3, "cosine", 0.0)
  with pytest.raises(ValueError, match="allowed"):
    fast_search.get_config("biper_stage1/sgd_lr9")


@pytest.mark.parametrize("evals", [1, 3])
def test_the_plots_draw_one_evaluation_or_a_curve(evals, tmp_path):
  """A point ± std per method when every run evaluated once (a one-epoch budget), a band
  over epochs otherwise."""
  runs = [{"method": m, "seed": s, "grad_norms": {"conv": 1.0 + s, "fc": 2.0},
           "curve": [[e + 1, 0.5 + 0.1 * s + 0.01 * e] for e in range(evals)]}
          for m in ("a", "b") for s in (0, 1)]
  paths = sweep.plot(runs, str(tmp_path))
  assert [os.path.basename(p) for p in paths] == ["accuracy.png", "grad_norms.png"]
  assert all(os.path.getsize(p) > 1000 for p in paths)
