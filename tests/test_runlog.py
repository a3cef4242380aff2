"""What a run leaves behind: config.json, TensorBoard, one checkpoint manager, epath workdirs."""

import json
import os
import signal
import subprocess
import sys

import jax
import numpy as np
import pytest
from fda_biper_jax import train
from fda_biper_jax.train import checkpoints, runlog
from tensorboard.backend.event_processing import event_accumulator, event_file_loader
from tensorboard.util import tensor_util

from experiments.configs import tiny

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def tiny_config(**overrides):
  c = tiny.get_config()
  for k, v in overrides.items():
    c[k] = v
  return c


def _events(folder):
  ea = event_accumulator.EventAccumulator(
      str(folder), size_guidance={event_accumulator.SCALARS: 0, event_accumulator.HISTOGRAMS: 0,
                                  event_accumulator.TENSORS: 0})
  ea.Reload()
  return ea


@pytest.fixture(scope="module")
def watched_run(tmp_path_factory):
  wd = tmp_path_factory.mktemp("watched")
  out = train.train_and_evaluate(tiny_config(tensorboard=True, num_epochs=2), str(wd))
  return wd, out


def test_config_json_is_the_resolved_config(watched_run):
  wd, _ = watched_run
  saved = json.loads((wd / "config.json").read_text())
  assert saved == json.loads(tiny_config(tensorboard=True, num_epochs=2).to_json_best_effort())
  assert saved["quantization"]["kernel_quantizer"] == {"name": "biper", "omega0": 20.0}


def test_tensorboard_holds_scalars_layer_statistics_and_weight_histograms(watched_run):
  wd, out = watched_run
  ea = _events(wd / "tensorboard")
  scalars, histograms = set(ea.Tags()["scalars"]), set(ea.Tags()["histograms"])
  layers = [r for r in map(json.loads, (wd / "metrics.jsonl").read_text().splitlines())
            if r["kind"] == "layers"]
  paths = sorted(layers[-1]["layers"])
  assert paths, "tiny_cnn has binarized layers"
  for tag in ("train/loss", "train/accuracy", "train/learning_rate", "eval/accuracy",
              "layers/sign_flip_share", *(f"grad_norm/{p}" for p in paths),
              *(f"layers/{s}/{p}" for s in ("laplace_b", "qe", "sign_flip_share") for p in paths)):
    assert tag in scalars, tag
  assert histograms == {f"weights/{p}" for p in paths}
  # the values are the ones in metrics.jsonl
  evals = [r for r in map(json.loads, (wd / "metrics.jsonl").read_text().splitlines())
           if r["kind"] == "eval"]
  assert [e.step for e in ea.Scalars("eval/accuracy")] == [r["step"] for r in evals]
  assert [e.value for e in ea.Scalars("eval/accuracy")] == pytest.approx(
      [r["accuracy"] for r in evals])
  b = ea.Scalars(f"layers/laplace_b/{paths[0]}")[-1].value
  assert b == pytest.approx(layers[-1]["layers"][paths[0]]["laplace_b"], rel=1e-6)
  # the histogram counts every latent weight of the layer
  kernel = out["state"].params
  for part in paths[0].split("/"):
    kernel = kernel[part]
  assert ea.Histograms(f"weights/{paths[0]}")[-1].histogram_value.num == kernel["kernel"].size


def test_tensorboard_hparams_of_a_finished_run(watched_run):
  wd, out = watched_run
  values = {}
  for path in (wd / "tensorboard" / "hparams").glob("events.out.tfevents.*"):
    for event in event_file_loader.EventFileLoader(str(path)).Load():
      for v in event.summary.value:
        values[v.tag] = v
  assert values["_hparams_/experiment"].metadata.plugin_data.plugin_name == "hparams"
  info = values["_hparams_/session_start_info"].metadata.plugin_data.content
  assert b"quantization/kernel_quantizer/name" in info and b"biper" in info
  best = float(tensor_util.make_ndarray(values["hparams/best_eval_accuracy"].tensor))
  assert best == pytest.approx(out["best_eval_accuracy"])


def test_one_manager_keeps_the_latest_and_the_best(tmp_path):
  """keep=2 latest plus the best, which is older; no second manager or folder."""
  template = {"w": np.zeros(3, np.float32)}
  ckpts = checkpoints.Checkpoints(tmp_path, keep=2, every_steps=3)
  assert [s for s in range(1, 10) if ckpts.should_save(s)] == [3, 6, 9]
  accuracy = {2: 0.5, 4: 0.9, 6: 0.7, 8: 0.6}
  for step in range(1, 11):
    if step in accuracy or step % 3 == 0:
      ckpts.save(step, {"w": np.full(3, step, np.float32)}, {"step": step}, accuracy.get(step))
  assert sorted(ckpts.manager.all_steps()) == [4, 8, 9]
  assert ckpts.best_step() == 4 and ckpts.best_accuracy() == pytest.approx(0.9)
  step, state, meta = ckpts.restore_best(template)
  assert step == 4 and meta == {"step": 4}
  np.testing.assert_array_equal(state["w"], np.full(3, 4.0))
  assert ckpts.restore_latest(template)[0] == 9
  ckpts.close()
  assert os.listdir(tmp_path) == ["checkpoints"]


def test_saving_a_replicated_state_on_cpu_compiles_nothing(tmp_path):
  """On CPU the arrays of an 8-device replicated state are written whole, not split across
  replicas (one compiled slice per array shape and device); they restore equal, replicated."""
  mesh = jax.make_mesh((8,), ("data",))
  replicated = jax.sharding.NamedSharding(mesh, jax.P())
  state = {"w": jax.device_put(np.arange(96, dtype=np.float32).reshape(3, 32), replicated),
           "b": jax.device_put(np.arange(37, dtype=np.float32), replicated)}
  compiles = []
  listener = lambda event, duration, **kw: compiles.append(event) if "backend_compile" in event \
      else None
  jax.monitoring.register_event_duration_secs_listener(listener)
  ckpts = checkpoints.Checkpoints(tmp_path)
  try:
    ckpts.save(1, state, {"step": 1})
  finally:
    jax.monitoring.unregister_event_duration_listener(listener)
  assert compiles == []
  step, restored, _ = ckpts.restore_latest(state)
  assert step == 1 and restored["w"].sharding == replicated
  jax.tree.map(np.testing.assert_array_equal, restored, jax.device_get(state))
  ckpts.close()


def test_a_step_without_evaluation_is_never_the_best(tmp_path):
  ckpts = checkpoints.Checkpoints(tmp_path, keep=3, every_steps=1)
  ckpts.save(1, {"w": np.zeros(1)}, {})
  assert ckpts.best_step() is None and ckpts.restore_best({"w": np.zeros(1)}) is None
  ckpts.close()


def test_stop_signal_turns_sigterm_into_a_request():
  with checkpoints.StopSignal() as stop:
    assert not stop.requested
    signal.raise_signal(signal.SIGTERM)
    assert stop.requested and stop.signum == signal.SIGTERM
  assert signal.getsignal(signal.SIGTERM) is signal.SIG_DFL


GS_RUN_LOG = """
import json, os, sys
import fsspec
from fsspec.implementations.memory import MemoryFileSystem
from etils import epath
from fda_biper_jax.train import runlog
for protocol in ("gs", "gcs"):  # gs:// held in memory
  fsspec.register_implementation(protocol, MemoryFileSystem, clobber=True)
log = runlog.RunLog("gs://bucket/runs/a", tensorboard=False)
log.write_config({"model": "tiny_cnn"})
for step in (1, 2, 3):
  log.write({"kind": "train", "step": step, "loss": 1.0 / step})
log.truncate_after(2)
root = epath.Path("gs://bucket/runs/a")
print(json.dumps({"config": json.loads((root / "config.json").read_text()),
                  "steps": [json.loads(x)["step"] for x in (root / "metrics.jsonl").read_text().splitlines()],
                  "files": sorted(p.name for p in root.iterdir())}))
"""


def test_the_run_log_writes_through_epath_uris(tmp_path):
  """config.json and metrics.jsonl go through etils.epath: a gs:// workdir stays gs://
  (served here from fsspec's in-memory filesystem, in a fresh process so that epath
  picks its fsspec backend)."""
  env = {**os.environ, "EPATH_USE_TF": "false", "PYTHONPATH": ROOT}
  out = subprocess.run([sys.executable, "-c", GS_RUN_LOG], cwd=tmp_path, env=env,
                       capture_output=True, text=True, timeout=120)
  assert out.returncode == 0, out.stderr[-2000:]
  got = json.loads(out.stdout.splitlines()[-1])
  assert got == {"config": {"model": "tiny_cnn"}, "steps": [1, 2],
                 "files": ["config.json", "metrics.jsonl"]}
  assert os.listdir(tmp_path) == []  # nothing went to a local folder


def test_a_uri_workdir_reaches_orbax_as_a_uri():
  assert str(checkpoints.directory("gs://bucket/runs/a")) == "gs://bucket/runs/a/checkpoints"
  assert str(checkpoints.directory("runs/a")) == os.path.join(os.getcwd(), "runs/a/checkpoints")
