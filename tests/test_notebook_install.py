"""The notebooks' install path, run as on Colab or Kaggle in a fresh environment.

The runtime is a new virtual environment holding what Colab and Kaggle ship beside Python:
an IPython kernel, and jax (requirements.txt's version, standing in for the runtime's TPU or
GPU build). The repository is a git snapshot of this checkout's sources as they are now, and
the install cell, read from the notebook, runs with its REPO_URL pointing there (file://),
so that pip installs `fda_biper_jax[notebooks] @ git+...` and git clones the repository as
they would from GitHub; where the cell leaves pip a choice, it takes requirements.txt's
versions (`installs.pip_env`). The notebook's cells up to its runtime cell run in that
kernel, then a cell of checks: jax kept at the runtime's version, the package from the
environment, experiments/ from the clone, and a few training steps of the tiny config on
Fashion-MNIST through tensorflow-datasets (mock data, decoded by TensorFlow).
"""

import copy
import json
import os
import subprocess

import nbclient
import nbformat
import pytest

from notebooks import links

import installs  # tests/installs.py

NOTEBOOK = "quickstart"
CELL_TIMEOUT_S = 900

_CHECKS = """
import importlib.metadata
import os
import sys
import tempfile

import experiments
import fda_biper_jax
import jax
import tensorflow_datasets as tfds
from experiments.configs import tiny
from fda_biper_jax import train

assert open(JAX_PINS).read() == "jax=={jax}\\njaxlib=={jax}\\n", open(JAX_PINS).read()
assert importlib.metadata.version("jax") == jax.__version__ == "{jax}"
assert fda_biper_jax.__file__.startswith(sys.prefix), fda_biper_jax.__file__
assert experiments.__file__.startswith(CHECKOUT + os.sep), experiments.__file__

config = tiny.get_config()
config.dataset, config.num_epochs, config.batch_size, config.eval_batch_size = (
    "fashion_mnist", 1, 16, 16)
with tfds.testing.mock_data(num_examples=32):
  result = train.train_and_evaluate(config, tempfile.mkdtemp())
print(f"trained {{result['steps']}} steps")
"""


def _snapshot(dest) -> str:
  """A git repository holding this checkout's package, experiments and build files, as they
  are now, in one commit; returns its file:// URL."""
  installs.copy_sources(dest, "experiments")
  git = ["git", "-C", str(dest), "-c", "user.name=test", "-c", "user.email=test@invalid"]
  for args in (["init", "-q"], ["add", "-A"], ["commit", "-q", "-m", "snapshot"]):
    subprocess.run(git + args, check=True, capture_output=True, timeout=60)
  return f"file://localhost{dest}"  # pip takes no empty host in git+file:


def _kernelspec(python: str, jupyter_dir) -> None:
  """A kernelspec 'runtime' under jupyter_dir (a JUPYTER_PATH entry) that runs `python`."""
  spec = jupyter_dir / "kernels" / "runtime"
  spec.mkdir(parents=True)
  (spec / "kernel.json").write_text(json.dumps({
      "argv": [python, "-m", "ipykernel_launcher", "-f", "{connection_file}"],
      "display_name": "runtime", "language": "python"}))


def _install_path(nb, repo_url: str):
  """The notebook's code cells through its runtime cell (the one after the install cell),
  the install cell's REPO_URL set to repo_url."""
  cells = copy.deepcopy(links.install_path(nb))
  url_line = f'REPO_URL = "{links.repository_url()}"'
  cell = cells[-2]
  assert cell.source.count(url_line) == 1, "the install cell must set REPO_URL from pyproject"
  cell.source = cell.source.replace(url_line, f'REPO_URL = "{repo_url}"')
  return cells


def _kernel_env() -> dict[str, str]:
  """This session's environment (CPU, 8 fake devices) with pip set as the tests install,
  without the repository on the path or the notebooks' test mode."""
  return {k: v for k, v in installs.pip_env().items()
          if k not in ("PYTHONPATH", "FDA_BIPER_JAX_NOTEBOOK_TEST")}


@pytest.mark.install
def test_the_install_cell_installs_into_a_fresh_runtime_that_then_trains(tmp_path, monkeypatch):
  python = installs.fresh_venv(tmp_path / "venv")
  installs.pip_install(python, "ipykernel", "jax")  # what the runtime ships
  jax_version = subprocess.run([python, "-c", "import jax; print(jax.__version__)"],
                               capture_output=True, text=True, check=True).stdout.strip()
  _kernelspec(python, tmp_path / "jupyter")
  monkeypatch.setenv("JUPYTER_PATH", str(tmp_path / "jupyter"))

  nb = nbformat.read(os.path.join(links.NOTEBOOK_DIR, f"{NOTEBOOK}.ipynb"), as_version=4)
  nb.cells = _install_path(nb, _snapshot(tmp_path / "repository"))
  nb.cells.append(nbformat.v4.new_code_cell(_CHECKS.format(jax=jax_version)))
  content = tmp_path / "content"  # the runtime's working directory (Colab: /content)
  content.mkdir()
  client = nbclient.NotebookClient(nb, timeout=CELL_TIMEOUT_S, kernel_name="runtime",
                                   resources={"metadata": {"path": str(content)}})
  client.execute(env=_kernel_env())  # raises CellExecutionError on the first failing cell

  text = "".join(out.get("text", "") for cell in nb.cells for out in cell.outputs
                 if out.get("output_type") == "stream")
  assert f"jax {jax_version}: backend cpu, 8 x cpu" in text, text
  assert "trained 2 steps" in text, text
  assert (content / "fda_biper_jax_repo" / "experiments").is_dir()
