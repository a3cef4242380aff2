"""The notebooks in notebooks/: stripped of outputs, their links from pyproject.toml, one
install path, and run top to bottom (their install path in a fresh environment:
test_notebook_install.py).

Each notebook is executed by nbclient in a fresh IPython kernel (the
`python3` kernelspec of ipykernel, started with this interpreter), with
FDA_BIPER_JAX_NOTEBOOK_TEST=1: the notebooks' first code cell reads it and
switches to the tiny configuration of experiments/configs/tiny.py (tiny_cnn
on generated data), skips `pip install` and Google Drive and writes into
temporary folders. Any cell error fails the test with the cell's traceback.

The kernel is a separate process: it gets this session's environment (CPU
only and the 8 fake devices of conftest.py, so the trainer runs data-parallel
as on a TPU), the repository on PYTHONPATH and its working directory at the
repository root, and shares this session's persistent compilation cache so
that notebooks training the same step compile it once.
"""

import os
import shutil

import jax
import nbclient
import nbformat
import pytest

from notebooks import links

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
NOTEBOOK_DIR = os.path.join(REPO, "notebooks")
NOTEBOOKS = sorted(f for f in os.listdir(NOTEBOOK_DIR) if f.endswith(".ipynb"))
TEST_ENV = "FDA_BIPER_JAX_NOTEBOOK_TEST"
EXPECTED = {"quickstart.ipynb", "quantizers.ipynb", "two_stage_biper.ipynb"}
TRAINING = {"quickstart.ipynb", "two_stage_biper.ipynb"}
CELL_TIMEOUT_S = 600
# The retired Colab TPU v2-8, and the placeholder of the old install cell.
RETIRED = ("OWNER", "V28", "TPU v2", "8 TPU cores")
FORK = "https://github.com/someone/fda_biper_jax_fork"


def _read(name: str):
  return nbformat.read(os.path.join(NOTEBOOK_DIR, name), as_version=4)


def _kernel_env() -> dict[str, str]:
  env = dict(os.environ)  # JAX_PLATFORMS=cpu and XLA_FLAGS (8 devices) from conftest.py
  env[TEST_ENV] = "1"
  env["PYTHONPATH"] = os.pathsep.join(p for p in (REPO, env.get("PYTHONPATH")) if p)
  cache = jax.config.jax_compilation_cache_dir
  if cache:
    env["JAX_COMPILATION_CACHE_DIR"] = cache
    env["JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS"] = str(
        jax.config.jax_persistent_cache_min_compile_time_secs)
    env["JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES"] = str(
        jax.config.jax_persistent_cache_min_entry_size_bytes)
  return env


def _stream_text(nb) -> str:
  return "".join(out.get("text", "") for cell in nb.cells if cell.cell_type == "code"
                 for out in cell.get("outputs", []) if out.get("output_type") == "stream")


def _listing() -> dict[str, set[str]]:
  """The entries of the repository root and of the folders a notebook's real path writes to."""
  dirs = (REPO, NOTEBOOK_DIR, os.path.join(REPO, "runs"), os.path.join(REPO, "figures"))
  return {d: set(os.listdir(d)) for d in dirs if os.path.isdir(d)}


def test_the_notebooks_exist():
  assert EXPECTED <= set(NOTEBOOKS), f"missing notebooks: {sorted(EXPECTED - set(NOTEBOOKS))}"


@pytest.mark.parametrize("name", NOTEBOOKS)
def test_notebook_is_committed_without_outputs(name):
  nb = _read(name)
  nbformat.validate(nb)
  for i, cell in enumerate(nb.cells):
    if cell.cell_type != "code":
      continue
    assert cell.outputs == [], f"{name} cell {i} has outputs; strip them before committing"
    assert cell.execution_count is None, f"{name} cell {i} has an execution count"
  first_code = next(c for c in nb.cells if c.cell_type == "code")
  assert TEST_ENV in first_code.source, f"{name}: the first code cell must read {TEST_ENV}"


@pytest.mark.parametrize("name", NOTEBOOKS)
def test_notebook_links_come_from_pyproject(name):
  nb = _read(name)
  url = links.repository_url()
  assert links.with_links(nb, url, name[:-len(".ipynb")]) == nb, (
      f"{name}: its badges or REPO_URL disagree with pyproject.toml's {url}; "
      "run python -m notebooks.links")
  with open(os.path.join(NOTEBOOK_DIR, name)) as f:
    text = f.read()
  assert not [word for word in RETIRED if word in text], name


def test_every_notebook_installs_the_same_way():
  """Setup, install and runtime cells alike, so that test_notebook_install.py runs them all."""
  paths = {name: [c.source for c in links.install_path(_read(name))] for name in NOTEBOOKS}
  assert len({tuple(p) for p in paths.values()}) == 1, paths


def test_links_follow_a_new_repository_url(tmp_path):
  shutil.copy(links.PYPROJECT, tmp_path / "pyproject.toml")
  shutil.copytree(NOTEBOOK_DIR, tmp_path / "notebooks",
                  ignore=shutil.ignore_patterns("*.py", "__pycache__"))
  links.set_repository_url(FORK, str(tmp_path / "pyproject.toml"))
  assert links.repository_url(str(tmp_path / "pyproject.toml")) == FORK
  assert links.write_links(FORK, str(tmp_path / "notebooks")) == links.notebook_names()
  assert links.write_links(FORK, str(tmp_path / "notebooks")) == []  # idempotent
  nb = nbformat.read(tmp_path / "notebooks" / "quickstart.ipynb", as_version=4)
  assert nb.cells[0].source.count(
      "someone/fda_biper_jax_fork/blob/main/notebooks/quickstart.ipynb") == 2  # Colab, Kaggle
  assert f'REPO_URL = "{FORK}"' in links.install_cell(nb).source
  with pytest.raises(ValueError, match="must be https://github.com/<owner>/<name>"):
    links.set_repository_url("https://gitlab.com/someone/fork", str(tmp_path / "pyproject.toml"))


@pytest.mark.parametrize("name", NOTEBOOKS)
def test_notebook_runs_in_test_mode(name):
  nb = _read(name)
  before = _listing()
  client = nbclient.NotebookClient(nb, timeout=CELL_TIMEOUT_S, kernel_name="python3",
                                   resources={"metadata": {"path": REPO}})
  client.execute(env=_kernel_env())  # raises CellExecutionError on the first failing cell

  text = _stream_text(nb)
  assert "TEST MODE" in text
  if name in TRAINING:  # the tiny configuration trained, not CIFAR-10's resnet20
    assert "training tiny_cnn on synthetic" in text
  assert _listing() == before, "test mode must write into temporary folders only"
