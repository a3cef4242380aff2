"""The commands: pyproject's entry points, one line for a bad flag, config file or override."""

import importlib
import os
import subprocess
import sys
import tomllib

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
with open(os.path.join(ROOT, "pyproject.toml"), "rb") as _f:
  SCRIPTS = tomllib.load(_f)["project"]["scripts"]
OWN_FLAGS = {"fda-biper-jax-train": "--config, --workdir",
             "fda-biper-jax-export": "--out, --stablehlo, --which, --workdir",
             "fda-biper-jax-summary": "--input_quantizer, --input_shape, --json, "
                                      "--kernel_quantizer, --model, --num_classes, --scaling",
             "fda-biper-jax-analysis": "--out, --workdir, --workdirs"}
_AS_SCRIPT = "import sys; from {module} import {function}; sys.argv[0] = {name!r}; {function}()"


def _run(args, *, script=None, prelude="", cwd=ROOT):
  """A command in a fresh interpreter: `script` as its console script would, or `args[0]`
  with `python -m`."""
  if script is not None:
    module, function = SCRIPTS[script].split(":")
    code = prelude + _AS_SCRIPT.format(module=module, function=function, name=script)
    cmd = [sys.executable, "-c", code, *args]
  else:
    cmd = [sys.executable, "-m", *args]
  return subprocess.run(cmd, cwd=cwd, capture_output=True, text=True, timeout=300)


def _one_line_error(proc, prog, status=2) -> str:
  assert proc.returncode == status, proc.stderr[-2000:]
  lines = proc.stderr.strip().splitlines()
  assert len(lines) == 1 and lines[0].startswith(f"{prog}: error: "), proc.stderr[-2000:]
  return lines[0][len(f"{prog}: error: "):]


def test_every_entry_point_is_a_function_of_the_installed_package():
  assert set(SCRIPTS) == set(OWN_FLAGS)
  for name, target in SCRIPTS.items():
    module, function = target.split(":")
    assert module.startswith("fda_biper_jax."), name  # experiments/ is not installed
    assert callable(getattr(importlib.import_module(module), function)), name


@pytest.mark.parametrize("script", sorted(OWN_FLAGS))
def test_every_entry_point_helps_and_rejects_an_unknown_flag_in_one_line(script):
  helped = _run(["--help"], script=script)
  assert script in helped.stdout and "Traceback" not in helped.stderr, helped.stderr[-2000:]
  for flag in OWN_FLAGS[script].split(", "):
    assert f"  {flag}:" in helped.stdout or f"  --[no]{flag[2:]}:" in helped.stdout, flag
  error = _one_line_error(_run(["--no_such_flag=1"], script=script), script)
  assert error == f"--no_such_flag is not allowed; allowed: {OWN_FLAGS[script]}"


def test_analysis_without_matplotlib_says_what_to_install(tmp_path):
  proc = _run(["qe", f"--out={tmp_path / 'figures'}"], script="fda-biper-jax-analysis",
              prelude="import sys; sys.modules['matplotlib'] = None; ")
  error = _one_line_error(proc, "fda-biper-jax-analysis", status=1)
  assert error == 'the analysis needs matplotlib: pip install "fda_biper_jax[analysis]"'
  assert not (tmp_path / "figures").exists()


# --------------------------------------------------------------------------
# The config file and its overrides
# --------------------------------------------------------------------------

TINY = "--config=experiments/configs/tiny.py"


@pytest.fixture(scope="module")
def no_get_config(tmp_path_factory):
  path = tmp_path_factory.mktemp("configs") / "no_get_config.py"
  path.write_text("config = {}\n")
  return str(path)


@pytest.mark.parametrize("args, expected", [
    (["--config=nope.py"], "--config=nope.py is not allowed: nope.py is not a file; allowed: "
                           "a Python file that defines get_config()"),
    (["--config=experiments/configs/tinny.py"],
     "--config=experiments/configs/tinny.py is not allowed: experiments/configs/tinny.py is "
     "not a file; allowed: a Python file that defines get_config(), e.g. "
     "experiments/configs/tiny.py"),
    (["--config={no_get_config}"], "--config={no_get_config} is not allowed: {no_get_config} "
                                   "defines no get_config(); allowed: a Python file that "
                                   "defines get_config()"),
    (["--config=experiments/configs/quick.py:nope"],
     "--config=experiments/configs/quick.py:nope is not allowed: get_config('nope') raised "
     "ValueError: config argument quantizer='nope' is not allowed; allowed: ['identity', "),
    ([TINY, "--config.num_epoch=3"], "--config.num_epoch=3 is not allowed: config has no "
                                     "field 'num_epoch' (did you mean --config.num_epochs?); "
                                     "allowed: batch_size, bn_scale_init, "),
    ([TINY, "--config.optimizer.nme=sgd"],
     "--config.optimizer.nme=sgd is not allowed: config.optimizer has no field 'nme' (did you "
     "mean --config.optimizer.name?); allowed: b1, b2, decay, learning_rate, momentum, name, "
     "nesterov, warmup_epochs, weight_decay, weight_decay_mask"),
    ([TINY, "--config.num_epochs=abc"], "--config.num_epochs=abc is not allowed: "
                                        "config.num_epochs is 2; allowed: an integer"),
    ([TINY, "--config.optimizer=3"], "--config.optimizer=3 is not allowed: config.optimizer is "
                                     "{'b1': 0.9, "),
    ([TINY, "--config.num_epochs=0"], "num_epochs=0 is not allowed; it must be an integer >= 1"),
    (["--workdir_typo=x", TINY], "--workdir_typo is not allowed (did you mean --workdir?); "
                                 "allowed: --config, --workdir"),
])
def test_a_bad_config_stops_with_one_line_before_writing(args, expected, no_get_config,
                                                         tmp_path):
  workdir = tmp_path / "run"
  args = [a.replace("{no_get_config}", no_get_config) for a in args]
  proc = _run(["experiments.cifar", *args, f"--workdir={workdir}"])
  error = _one_line_error(proc, "python -m experiments.cifar")
  assert error.startswith(expected.replace("{no_get_config}", no_get_config)), error
  assert not workdir.exists()


@pytest.mark.parametrize("script", [None, "fda-biper-jax-train"])
def test_imagenet_and_the_train_entry_point_share_the_config_errors(script, tmp_path):
  workdir = tmp_path / "run"
  args = [TINY, "--config.seeed=1", f"--workdir={workdir}"]
  proc = _run(args if script else ["experiments.imagenet", *args], script=script)
  error = _one_line_error(proc, script or "python -m experiments.imagenet")
  assert error.startswith("--config.seeed=1 is not allowed: config has no field 'seeed' "
                          "(did you mean --config.seed?)"), error
  assert not workdir.exists()


def test_the_sweep_rejects_a_bad_flag_in_one_line(tmp_path):
  proc = _run(["experiments.sweep", "--quantizers=biper,nope", f"--workdir={tmp_path / 'sweep'}"])
  error = _one_line_error(proc, "python -m experiments.sweep")
  assert error.startswith("--quantizers=nope is not allowed; allowed: identity, ste, ")
  assert not (tmp_path / "sweep").exists()
