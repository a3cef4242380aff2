"""End-to-end tests of the trainer on a tiny model and generated data."""

import glob
import importlib
import json
import os
import shutil
import signal
import subprocess
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from experiments.configs import recipes, tiny
from fda_biper_jax import models, parallel, trace, train
from fda_biper_jax.train import checkpoints
from fda_biper_jax.data import inputs

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def tiny_config(**overrides):
  c = tiny.get_config()
  for k, v in overrides.items():
    node = c
    *path, last = k.split(".")
    for p in path:
      node = node[p]
    node[last] = v
  return c


def records(workdir, kind="train"):
  with open(os.path.join(workdir, "metrics.jsonl")) as f:
    return [r for r in map(json.loads, f) if r["kind"] == kind]


def params_of(summary):
  return jax.device_get(summary["state"].params)


def test_tiny_binary_model_learns(tmp_path):
  out = train.train_and_evaluate(tiny_config(num_epochs=6), str(tmp_path))
  assert out["best_eval_accuracy"] >= 0.9, out["best_eval_accuracy"]
  ev = records(str(tmp_path), "eval")
  assert len(ev) == 6 and ev[-1]["accuracy"] == out["final_eval_accuracy"]
  tr = records(str(tmp_path))
  assert tr[-1]["loss"] < tr[0]["loss"]
  layers = records(str(tmp_path), "layers")
  assert len(layers) == 6
  assert sorted(layers[0]["layers"]) == ["unit1/conv", "unit2/conv"]
  for rec in layers:
    for stats in rec["layers"].values():
      assert stats["laplace_b"] > 0 and 0 <= stats["qe"] <= 0.5
      assert 0 <= stats["sign_flip_share"] <= 1
  assert layers[0]["sign_flip_share"] > 0  # weights move in the first epoch


def test_one_and_eight_devices_give_the_same_losses(tmp_path):
  runs = {}
  for n in (1, 8):
    wd = str(tmp_path / f"d{n}")
    train.train_and_evaluate(tiny_config(num_devices=n, num_epochs=1, log_every_steps=1), wd)
    runs[n] = [r["loss"] for r in records(wd)]
  assert len(runs[1]) == 8
  np.testing.assert_allclose(runs[1], runs[8], rtol=2e-4)


@pytest.fixture(scope="module")
def reference_run(tmp_path_factory):
  """One uninterrupted 16-step run (checkpoints every 4 steps), shared."""
  wd = str(tmp_path_factory.mktemp("reference"))
  return wd, train.train_and_evaluate(tiny_config(), wd)


def copy_run(src, dst, keep_upto=None):
  shutil.copytree(src, dst)
  if keep_upto is not None:
    for d in glob.glob(os.path.join(dst, "checkpoints", "*")):
      if os.path.basename(d).isdigit() and int(os.path.basename(d)) > keep_upto:
        shutil.rmtree(d)
  return dst


def test_resumed_run_equals_uninterrupted_bit_for_bit(tmp_path, reference_run):
  full, ref = reference_run
  # An interrupted run: everything after the step-8 checkpoint was lost.
  part = copy_run(full, str(tmp_path / "part"), keep_upto=8)
  resumed = train.train_and_evaluate(tiny_config(), part)
  assert resumed["steps"] == ref["steps"] == 16
  jax.tree.map(np.testing.assert_array_equal, params_of(ref), params_of(resumed))
  jax.tree.map(np.testing.assert_array_equal, jax.device_get(ref["state"].batch_stats),
               jax.device_get(resumed["state"].batch_stats))
  # The metrics log keeps the first run's lines and continues after them.
  assert [r["step"] for r in records(part)][-2:] == [12, 16]


def _template(config):
  model = models.create("tiny_cnn", 4, **train.quantization(config))
  tx = train.make_optimizer(config, train.learning_rate(config, 8))
  return train.create_state(model, tx, jax.random.key(0), (8, 8, 3))


def test_corrupt_latest_checkpoint_falls_back(tmp_path, reference_run, caplog):
  wd = copy_run(reference_run[0], str(tmp_path / "run"))
  for f in glob.glob(os.path.join(wd, "checkpoints", "16", "state", "**", "*"), recursive=True):
    if os.path.isfile(f):
      with open(f, "wb") as fh:
        fh.write(b"garbage")
  with caplog.at_level("WARNING"):
    step, _, meta = checkpoints.Checkpoints(wd).restore_latest(_template(tiny_config()))
  assert step == 12
  assert "unreadable" in caplog.text
  assert meta["model"]["kernel_quantizer"] == {"name": "biper", "omega0": 20.0, "tau": 0.0}


def test_two_stage_handoff(tmp_path, reference_run):
  s1, out1 = reference_run
  stage2 = tiny_config(init_from=s1, num_epochs=1)
  fresh = _template(stage2)
  handed = train.init_from_stage(fresh, s1)
  best = checkpoints.Checkpoints(s1).restore_best(fresh)
  assert best[0] == out1["best_step"]
  jax.tree.map(np.testing.assert_array_equal, jax.device_get(handed.params),
               jax.device_get(best[1].params))
  assert int(handed.step) == 0  # fresh optimizer and step counter
  jax.tree.map(np.testing.assert_array_equal, handed.opt_state, fresh.opt_state)
  out2 = train.train_and_evaluate(stage2, str(tmp_path / "s2"))
  assert out2["steps"] == 8


def test_eval_only_uses_the_saved_quantizer_settings(tmp_path, reference_run):
  wd = copy_run(reference_run[0], str(tmp_path / "run"))
  # The command line says omega0 = 30 (the public BiPer eval script's default);
  # the checkpoint was trained at 20 and must be evaluated at 20.
  c = tiny_config(eval_only=True, **{"quantization.kernel_quantizer": {"name": "biper",
                                                                      "omega0": 30.0}})
  ev = train.train_and_evaluate(c, wd)
  assert ev["model"]["kernel_quantizer"]["omega0"] == 20.0
  assert ev["accuracy"] == pytest.approx(reference_run[1]["final_eval_accuracy"], abs=1e-6)


KILL_OVERRIDES = {"num_epochs": 40, "checkpoint_every_steps": 16, "log_every_steps": 2}


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory):
  wd = str(tmp_path_factory.mktemp("uninterrupted"))
  return wd, train.train_and_evaluate(tiny_config(**KILL_OVERRIDES), wd)


def _run_until_logged(cmd, wd, stderr, steps: int):
  """Starts the CLI run and returns it once metrics.jsonl has a step >= `steps`."""
  env = {**os.environ, "JAX_COMPILATION_CACHE_DIR": jax.config.jax_compilation_cache_dir}
  with open(stderr, "wb") as err:  # a file, not a pipe: a full pipe would stall the run
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL, stderr=err)
  logged = 0
  deadline = time.time() + 120
  while logged < steps and time.time() < deadline and proc.poll() is None:
    time.sleep(0.02)
    if os.path.exists(os.path.join(wd, "metrics.jsonl")):
      logged = max([r["step"] for r in records(wd)] or [0])
  assert proc.poll() is None, f"run ended before the signal: {stderr.read_text()[-2000:]}"
  return proc


def _stop(proc, sig, wd) -> tuple[int, int, int]:
  """Sends `sig`; returns the exit status, the last logged step and the last saved step."""
  proc.send_signal(sig)
  rc = proc.wait(timeout=120)
  saved = [int(d) for d in os.listdir(os.path.join(wd, "checkpoints")) if d.isdigit()]
  return rc, max(r["step"] for r in records(wd)), max(saved)


def test_killed_then_preempted_run_resumes_exactly(tmp_path, uninterrupted):
  """A real CLI run killed with SIGKILL, rerun and stopped with SIGTERM (preemption), then
  run to the end: bit-identical to an uninterrupted run. SIGKILL loses at most
  checkpoint_every_steps steps; SIGTERM saves the step it stopped at and exits with 128 + 15.
  (One run takes both signals: each costs a process start and a compilation.)"""
  wd = str(tmp_path / "stopped")
  cmd = [sys.executable, "-m", "experiments.cifar", "--config=experiments/configs/tiny.py",
         f"--workdir={wd}"] + [f"--config.{k}={v}" for k, v in KILL_OVERRIDES.items()]
  rc, killed_at, saved = _stop(_run_until_logged(cmd, wd, tmp_path / "kill.log", 40),
                               signal.SIGKILL, wd)
  assert rc == -signal.SIGKILL and killed_at < 320
  assert saved >= killed_at - 16  # at most N = 16 steps lost
  log = tmp_path / "term.log"
  rc, stopped_at, saved = _stop(_run_until_logged(cmd, wd, log, killed_at + 40),
                                signal.SIGTERM, wd)
  assert rc == 128 + signal.SIGTERM, log.read_text()[-2000:]
  assert killed_at < stopped_at < 320 and saved >= stopped_at  # nothing lost
  resumed = train.train_and_evaluate(tiny_config(**KILL_OVERRIDES), wd)
  ref_wd, ref = uninterrupted
  jax.tree.map(np.testing.assert_array_equal, params_of(ref), params_of(resumed))
  # metrics.jsonl holds each step once, as the uninterrupted run's does
  for kind in ("train", "eval"):
    steps = [r["step"] for r in records(wd, kind)]
    assert steps == [r["step"] for r in records(ref_wd, kind)]
    assert steps == sorted(set(steps))


def test_scheduled_values_follow_the_step_and_never_recompile_it():
  """The trainer names no method: it logs whatever the quantizers schedule, generically."""
  c = tiny_config(**{
      "quantization.kernel_quantizer": {"name": "fda"},  # n: stepwise 9 -> 18 per epoch
      "quantization.input_quantizer": {"name": "bnn_pp", "beta": {
          "schedule": "geometric", "start": 1.0, "end": 50.0}}})
  mesh = parallel.make_mesh()
  source = inputs.create(c, mesh, jax.random.key(2))
  model = train.create_model(c, 4, axis_name=parallel.AXIS)
  lr = train.learning_rate(c, 8)
  tx = train.make_optimizer(c, lr)
  state = parallel.replicate(train.create_state(model, tx, jax.random.key(0), (8, 8, 3)), mesh)
  step = train.make_train_step(model, tx, lr, mesh, source.preprocess, total_steps=16,
                               steps_per_epoch=8,
                               quantizers=trace.quantizers(model, (8, 8, 3)))
  seen = []
  for i in range(16):
    state, m = step(state, *source.train_batch(i), jax.random.key(1))
    assert set(m["scheduled"]) == {"kernel/fda/n_terms", "input/bnn_pp/beta"}
    n, beta = int(m["scheduled"]["kernel/fda/n_terms"]), float(m["scheduled"]["input/bnn_pp/beta"])
    assert n == 9 + (i // 8) * 10 // 2  # epoch 0: 9, epoch 1: 9 + floor(1 * 10 / 2) = 14
    np.testing.assert_allclose(beta, 50.0 ** (i / 15), rtol=1e-5)
    seen.append((n, beta))
  assert len(set(seen)) == 16  # a new value every step
  assert step._cache_size() == 1


def _first_step(config, workdir):
  train.train_and_evaluate(config, workdir)
  return records(workdir)[0]


def test_a_constant_in_the_config_is_the_value_training_uses(tmp_path):
  """Two constant betas give two first-step losses; the checkpoint records the one used."""
  losses = []
  for beta in (2.5, 5.0):
    wd = str(tmp_path / str(beta))
    c = tiny_config(num_epochs=1, log_every_steps=1, **{
        "quantization.kernel_quantizer": {"name": "ste"},
        "quantization.input_quantizer": {"name": "bnn_pp", "beta": beta}})
    losses.append(_first_step(c, wd)["loss"])
    meta = checkpoints.Checkpoints(wd).read_meta()
    assert meta["model"]["input_quantizer"] == {"name": "bnn_pp", "beta": beta}
  assert abs(losses[0] - losses[1]) > 1e-4, losses


def test_the_log_holds_scheduled_values_regularizer_and_gradient_norms(tmp_path):
  c = tiny_config(num_epochs=1, log_every_steps=4, **{
      "quantization.kernel_quantizer": {"name": "biper", "tau": {
          "schedule": "linear", "start": 0.0, "end": 0.1}}})
  first = _first_step(c, str(tmp_path))
  assert first["kernel/biper/tau"] == pytest.approx(0.1 * 3 / 7, rel=1e-5)  # step 3 of 0..7
  assert first["regularizer"] > 0
  assert set(first["grad_norms"]) == {"stem/conv", "unit1/conv", "unit2/conv", "head/fc"}
  assert all(v > 0 for v in first["grad_norms"].values()) and first["grad_norm"] > 0


@pytest.mark.parametrize("override, match", [
    ({"fda.n_end": 18}, r"^config\.fda was removed; the FDA schedules live in its quantizer"),
    ({"bnn_pp.beta_start": 2.0}, r"^config\.bnn_pp was removed; BNN\+\+'s beta"),
    ({"regularizer_tau": 0.037}, r"^config\.regularizer_tau was removed; .*'tau': 0\.0468"),
    ({"quantization.input_noise": {}}, r"^quantization\.input_noise was removed: FDA's noise"),
])
def test_removed_settings_get_one_line_saying_what_to_write(override, match, tmp_path):
  c = tiny_config(**override)
  with pytest.raises(ValueError, match=match) as e:
    train.train_and_evaluate(c, str(tmp_path / "run"))
  assert "\n" not in str(e.value)
  assert not os.path.exists(tmp_path / "run")


def test_an_old_config_file_stops_with_one_line(tmp_path):
  """A config file written for the old layout, run from the command line."""
  old = tmp_path / "old_fda.py"
  old.write_text(
      "from experiments.configs import tiny\n"
      "def get_config():\n"
      "  c = tiny.get_config()\n"
      "  c.quantization.kernel_quantizer = {'name': 'fda', 'max_terms': 18}\n"
      "  c.fda.n_start, c.fda.n_end = 9, 18\n"
      "  return c\n")
  wd = tmp_path / "run"
  proc = subprocess.run([sys.executable, "-m", "experiments.cifar", f"--config={old}",
                         f"--workdir={wd}"], capture_output=True, text=True, cwd=ROOT,
                        timeout=300)
  assert proc.returncode != 0
  err = proc.stderr.strip().splitlines()
  assert err[-1].startswith("python -m experiments.cifar: error: config.fda was removed;"), proc.stderr[-2000:]
  assert "Traceback" not in proc.stderr
  assert not wd.exists()


def test_nan_loss_stops_and_keeps_last_good_checkpoint(tmp_path):
  c = tiny_config(log_every_steps=1, checkpoint_every_steps=1, **{
      "optimizer.name": "sgd", "optimizer.learning_rate": 1e30,
      "quantization.kernel_quantizer": {"name": "identity"},
      "quantization.input_quantizer": {"name": "identity"},
      "quantization.scaling": "none", "quantization.prenorm": False})
  with pytest.raises(FloatingPointError, match="loss became nan"):
    train.train_and_evaluate(c, str(tmp_path))
  steps = [int(os.path.basename(d)) for d in glob.glob(str(tmp_path / "checkpoints" / "*"))
           if os.path.basename(d).isdigit()]
  assert steps and min(steps) >= 1
  assert all(np.isfinite(r["loss"]) for r in records(str(tmp_path)))


@pytest.mark.parametrize("override, match", [
    ({"model": "resnet99"}, "model='resnet99' is not allowed"),
    ({"dataset": "imagenet21k"}, "dataset='imagenet21k' is not allowed with input='memory'"),
    ({"input": "disk"}, "input='disk' is not allowed; allowed: .'memory', 'stream'."),
    ({"input": "stream"}, "input='stream' needs a tfds dataset, not dataset='synthetic'"),
    ({"data_shards": 3}, "data_shards=3 is not allowed: it must be a multiple of the process"),
    ({"optimizer.name": "lion"}, "optimizer.name='lion' is not allowed"),
    ({"optimizer.learning_rate": -0.1}, "learning_rate=-0.1 is not allowed"),
    ({"batch_size": 30, "num_devices": 8},
     "batch_size=30 is not allowed: it must be a positive multiple of"),
    ({"quantization.kernel_quantizer": {"name": "sgn"}}, "unknown quantizer 'sgn'"),
    ({"quantization.scaling": "max"}, "scaling='max' is not allowed"),
    ({"compute_dtype": "int8"}, "compute_dtype='int8' is not allowed"),
    ({"num_epochs": 0}, "num_epochs=0 is not allowed"),
    ({"init_from": "/nonexistent/stage1"}, "init_from='/nonexistent/stage1' is not a directory"),
])
def test_config_errors_stop_fast_before_writing(tmp_path, override, match):
  wd = tmp_path / "run"
  t = time.time()
  with pytest.raises(ValueError, match=match):
    train.train_and_evaluate(tiny_config(**override), str(wd))
  assert time.time() - t < 1.0
  assert not wd.exists()


_MISSING_DATA = """
import sys, time
from fda_biper_jax.train import train_and_evaluate  # the trainer loads here, not in the timing
from fda_biper_jax.data import memory
from experiments.configs import tiny
memory._resolves = lambda host, timeout=5.0: False  # no network, whatever this machine has
c = tiny.get_config()
c.dataset, c.data_dir, c.manual_dir = "cifar10", sys.argv[1], sys.argv[2]
t = time.perf_counter()
try:
  train_and_evaluate(c, sys.argv[3])
except ValueError as e:
  print(f"{time.perf_counter() - t:.3f}", "tensorflow" in sys.modules)
  print(e)
"""


def test_missing_data_stops_with_one_line_before_writing(tmp_path):
  # A fresh interpreter, as a user's run: TensorFlow is not imported yet, so
  # the file-system and DNS check stops the run before tfds is ever loaded.
  wd = tmp_path / "run"
  env = {k: v for k, v in os.environ.items() if "proxy" not in k.lower()}
  out = subprocess.run(
      [sys.executable, "-c", _MISSING_DATA, str(tmp_path / "empty"), str(tmp_path / "none"),
       str(wd)], capture_output=True, text=True, check=True, env=env, timeout=120,
      cwd=os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
  timing, message = out.stdout.strip().split("\n")
  seconds, tf_loaded = timing.split()
  assert float(seconds) < 1.0 and tf_loaded == "False", timing
  assert message.startswith("cifar10: not prepared in data_dir=") and "no network" in message
  assert "cifar-10-binary.tar.gz" in message
  assert not wd.exists()


def test_fashion_mnist_through_tfds(tmp_path):
  import tensorflow_datasets as tfds
  c = tiny_config(dataset="fashion_mnist", num_epochs=1, batch_size=16, eval_batch_size=16)
  with tfds.testing.mock_data(num_examples=32):
    out = train.train_and_evaluate(c, str(tmp_path))
  assert out["steps"] == 2
  assert 0.0 <= out["final_eval_accuracy"] <= 1.0


CONFIGS = sorted(os.path.basename(p)[:-3] for p in glob.glob("experiments/configs/*.py")
                 if os.path.basename(p) not in ("__init__.py", "base.py", "recipes.py"))


@pytest.mark.parametrize("name", CONFIGS)
def test_every_recipe_config_is_valid(name):
  mod = importlib.import_module(f"experiments.configs.{name}")
  c = mod.get_config()
  entry = "imagenet" if c.input == "stream" else "cifar"
  assert f"python -m experiments.{entry} --config=experiments/configs/{name}.py" in mod.__doc__
  c.init_from = ""
  train.validate(c, data=False)  # the settings; CIFAR-10 itself is not on this machine


def test_biper_recipe_values():
  s1, s2 = recipes.biper("resnet20", "stage1"), recipes.biper("resnet20", "stage2")
  q1, q2 = s1.quantization.to_dict(), s2.quantization.to_dict()
  assert q1["kernel_quantizer"] == {"name": "biper_sine", "omega0": 20.0, "tau": 0.037}
  assert q2["kernel_quantizer"] == {"name": "biper", "omega0": 20.0, "tau": 0.0468}
  assert q2["input_quantizer"] == {"name": "approx_sign"}
  assert (s1.num_epochs, s1.optimizer.learning_rate) == (600, 0.021)
  assert (s2.num_epochs, s2.optimizer.learning_rate) == (300, 0.0037)
  assert s2.init_from == recipes.stage_workdir("resnet20", "stage1")
  with pytest.raises(ValueError, match="stage='stage3' is not allowed"):
    recipes.biper("resnet20", "stage3")


def test_bfloat16_compute_with_float32_master_weights(tmp_path):
  out = train.train_and_evaluate(tiny_config(compute_dtype="bfloat16", num_epochs=1),
                                 str(tmp_path))
  assert all(leaf.dtype == jnp.float32 for leaf in jax.tree.leaves(out["state"].params))
  assert all(np.isfinite(r["loss"]) for r in records(str(tmp_path)))
