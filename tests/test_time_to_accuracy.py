"""experiments.time_to_accuracy on the tiny config: the stages chained, the clock and report."""

import json
import os
import subprocess
import sys

import jax
import pytest

from experiments import time_to_accuracy
from experiments.configs import tiny

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TINY = "--config=experiments/configs/tiny.py"


def _run(*args):
  env = {**os.environ, "JAX_COMPILATION_CACHE_DIR": jax.config.jax_compilation_cache_dir or ""}
  return subprocess.run([sys.executable, "-m", "experiments.time_to_accuracy", TINY, *args],
                        cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)


def test_the_stages_chain_and_the_report_times_the_target(tmp_path):
  wd = tmp_path / "tta"
  out = _run(f"--workdir={wd}", "--target=0.01")
  assert out.returncode == 0, out.stderr[-3000:]
  report = json.loads((wd / time_to_accuracy.RESULT_FILE).read_text())
  assert [os.path.basename(s["workdir"]) for s in report["stages"]] == ["biper_sine", "biper"]
  # stage 2 started from stage 1's weights, with BiPer's square wave
  second = json.loads((wd / "biper" / "config.json").read_text())
  assert second["init_from"] == str(wd / "biper_sine")
  assert second["quantization"]["kernel_quantizer"]["name"] == "biper"
  minutes = [p["minutes"] for s in report["stages"] for p in s["curve"]]
  assert len(minutes) == 2 * tiny.get_config().num_epochs
  assert 0 < minutes[0] and minutes == sorted(minutes) and minutes[-1] <= report["total_minutes"]
  assert report["minutes_to_target"] == minutes[0]  # any accuracy reaches 1%
  assert report["final_accuracy"] == report["stages"][-1]["curve"][-1]["accuracy"]
  table = (wd / time_to_accuracy.TABLE_FILE).read_text()
  assert out.stdout.endswith(table + "\n") and table == time_to_accuracy.markdown(report)
  assert table.startswith(f"`biper`: 1% test accuracy at {minutes[0]:.1f} min; ")
  assert table.count("| biper_sine |") == table.count("| biper |") == 2


def test_the_target_is_the_first_evaluation_at_or_above_it():
  curve = [{"accuracy": a, "minutes": m} for a, m in ((0.5, 1.0), (0.85, 2.0), (0.9, 3.0))]
  assert time_to_accuracy.minutes_to(0.85, curve) == 2.0
  assert time_to_accuracy.minutes_to(0.86, curve) == 3.0
  assert time_to_accuracy.minutes_to(0.95, curve) is None


def test_against_reads_this_curve_at_the_other_recipes_minute():
  curve = [{"epoch": e, "accuracy": a, "minutes": m}
           for e, a, m in ((1, 0.80, 3.0), (2, 0.86, 6.0), (3, 0.88, 9.0))]
  other = {"recipe": "biper", "target": 0.85, "minutes_to_target": 8.5, "total_minutes": 10.0}
  assert time_to_accuracy.against(other, curve) == {
      "recipe": "biper", "target": 0.85, "minutes": 8.5, "reached": True, "accuracy": 0.86}
  other["minutes_to_target"] = None  # not reached: at the minute it ended
  assert time_to_accuracy.against(other, curve)["accuracy"] == 0.88
  assert time_to_accuracy.accuracy_at(2.0, curve) is None
  report = {"recipe": "identity", "target": 0.85, "minutes_to_target": 6.0,
            "final_accuracy": 0.88, "total_minutes": 9.5, "budget": "B", "machine": "M",
            "date": "D", "command": "C", "against": time_to_accuracy.against(other, curve),
            "stages": [{"workdir": "w/identity", "curve": curve}]}
  table = time_to_accuracy.markdown(report)
  assert table.splitlines()[:3] == [
      "`identity`: 85% test accuracy at 6.0 min; 88.00% after 9.5 min.", "",
      "At 10.0 min, when `biper` ended: 88.00%."]
  assert "| identity | 2 | 6.00 | 86.00% |" in table


@pytest.mark.parametrize("args, message", [
    (["--target=1.5"], "--target=1.5 is not allowed; allowed: a number in (0, 1]"),
    (["--recipe=nope"], "--recipe=nope is not allowed; allowed: biper"),
    (["--config=nope.py"], "--config='nope.py' does not exist"),
    (["--against=/nonexistent"], "--against='/nonexistent' is not allowed: it holds no "),
])
def test_bad_settings_are_one_line_before_any_work(tmp_path, args, message):
  out = subprocess.run([sys.executable, "-m", "experiments.time_to_accuracy",
                        f"--workdir={tmp_path / 'w'}", *([TINY] if "--config" not in args[0]
                                                         else []), *args],
                       cwd=ROOT, capture_output=True, text=True, timeout=120)
  assert out.returncode == 2, out.stderr
  (line,) = out.stderr.strip().splitlines()
  assert line.startswith("python -m experiments.time_to_accuracy: error: ") and message in line
  assert not (tmp_path / "w").exists()


def test_a_workdir_with_files_is_refused_and_kept(tmp_path):
  (tmp_path / "keep.txt").write_text("mine")
  out = _run(f"--workdir={tmp_path}")
  assert out.returncode == 2 and "is not empty" in out.stderr
  assert os.listdir(tmp_path) == ["keep.txt"]


def test_the_readme_headline_and_results_page_are_the_published_runs():
  """README's figure and docs/results.md's tables come from the committed reports."""
  published = os.path.join(ROOT, "docs", "results")
  reports = {}
  for recipe in ("biper", "identity"):
    with open(os.path.join(published, f"time_to_accuracy_{recipe}.json")) as f:
      reports[recipe] = json.load(f)
  biper, twin = reports["biper"], reports["identity"]
  readme = open(os.path.join(ROOT, "README.md")).read()
  assert f"at {biper['minutes_to_target']:.1f} minutes" in " ".join(readme.split())
  assert f"{100 * twin['against']['accuracy']:.2f}%" in readme
  assert twin["against"]["minutes"] == biper["minutes_to_target"]
  page = open(os.path.join(ROOT, "docs", "results.md")).read()
  for report in reports.values():
    assert time_to_accuracy.markdown(report) in page
