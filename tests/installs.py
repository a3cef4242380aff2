"""Installing this checkout as a user does, for the tests that need a fresh environment: a
copy of its sources, a new virtual environment, pip with requirements.txt's versions."""

import os
import pathlib
import shutil
import subprocess
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
REQUIREMENTS = os.path.join(ROOT, "requirements.txt")
PIP_TIMEOUT_S = 900


def copy_sources(dest: pathlib.Path, *extra: str) -> pathlib.Path:
  """Copies what a build reads (the package, pyproject.toml, README.md) and the repository
  folders `extra` into dest, without caches; returns dest. Building writes build/ beside
  the sources: it writes into the copy."""
  for folder in ("fda_biper_jax", *extra):
    shutil.copytree(os.path.join(ROOT, folder), dest / folder,
                    ignore=shutil.ignore_patterns("__pycache__"))
  for item in ("pyproject.toml", "README.md"):
    shutil.copy(os.path.join(ROOT, item), dest / item)
  return dest


def fresh_venv(path: pathlib.Path) -> str:
  """A new virtual environment at path (pip only); returns its python."""
  subprocess.run([sys.executable, "-m", "venv", str(path)], check=True, timeout=120)
  return str(path / "bin" / "python")


def pip_env() -> dict[str, str]:
  """This process's environment with pip set as the tests install: requirements.txt's
  versions as constraints, and no bytecode compiled at install (Python compiles what it
  imports; compiling every file of TensorFlow took longer than the install itself)."""
  return {**os.environ, "PIP_CONSTRAINT": REQUIREMENTS, "PIP_COMPILE": "0"}


def pip_install(python: str, *args: str) -> None:
  """`python -m pip install -q *args` under pip_env(); fails the test with pip's last words
  unless it succeeds."""
  pip = subprocess.run([python, "-m", "pip", "install", "-q", *args], env=pip_env(),
                       capture_output=True, text=True, timeout=PIP_TIMEOUT_S)
  assert pip.returncode == 0, pip.stderr[-3000:]
