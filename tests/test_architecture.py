"""The house's rules, checked on the source: no import cycle, deployment independent of
training and data, no private names imported across modules, no comment pointing outside
the repository, and the README's code runs as written."""

import ast
import io
import os
import re
import subprocess
import sys
import tokenize

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PACKAGE = "fda_biper_jax"


def _tracked(*suffixes) -> list[str]:
  out = subprocess.run(["git", "ls-files", "--cached", "--others", "--exclude-standard"],
                       cwd=ROOT, capture_output=True, text=True, check=True).stdout.split()
  return sorted(f for f in out if f.endswith(suffixes) and os.path.exists(os.path.join(ROOT, f)))


def _module_name(path: str) -> str:
  name = path[:-len(".py")].replace("/", ".")
  return name[:-len(".__init__")] if name.endswith(".__init__") else name


def _is_package(name: str, modules: set[str]) -> bool:
  return any(m.startswith(name + ".") for m in modules)


def _imports(path: str, modules: set[str]) -> set[str]:
  """The package's modules that `path` imports (anywhere in the file), resolved to
  submodules where an imported name is one."""
  tree = ast.parse(open(os.path.join(ROOT, path)).read())
  me = _module_name(path)
  found = set()
  for node in ast.walk(tree):
    if isinstance(node, ast.Import):
      found |= {a.name for a in node.names}
    elif isinstance(node, ast.ImportFrom):
      base = node.module or ""
      if node.level:
        parent = me.split(".")
        if not path.endswith("__init__.py"):
          parent = parent[:-1]
        parent = parent[:len(parent) - node.level + 1]
        base = ".".join(parent + ([base] if base else []))
      for a in node.names:
        sub = f"{base}.{a.name}"
        found.add(sub if sub in modules else base)
  return {m for m in found if m in modules and m != me}


def test_no_import_cycle_in_the_package():
  files = [f for f in _tracked(".py") if f.startswith(PACKAGE + "/")]
  modules = {_module_name(f) for f in files}
  graph = {_module_name(f): _imports(f, modules) for f in files}
  state, stack, cycles = {}, [], []

  def visit(m):
    state[m] = "open"
    stack.append(m)
    for n in sorted(graph.get(m, ())):
      if state.get(n) == "open":
        cycles.append(stack[stack.index(n):] + [n])
      elif n not in state:
        visit(n)
    stack.pop()
    state[m] = "done"

  for m in sorted(graph):
    if m not in state:
      visit(m)
  # A package's __init__ importing its own submodules is how a package is built, not a
  # cycle; every other back edge is.
  real = [c for c in cycles if not all(_is_package(a, modules) and b.startswith(a + ".")
                                       or _is_package(b, modules) and a.startswith(b + ".")
                                       for a, b in zip(c, c[1:]))]
  assert not real, real


_PROBE = """
import sys
import fda_biper_jax.deploy.export, fda_biper_jax.deploy.inference, fda_biper_jax.deploy.packed
import fda_biper_jax.train.runs
deploy = sorted(m for m in sys.modules if m.startswith(("fda_biper_jax.train",
                "fda_biper_jax.data", "optax", "tensorflow")))
print(deploy)
"""


def test_deployment_loads_nothing_from_training_or_data():
  """The deploy modules, and restoring a run, load neither the trainer, the data
  pipeline, optax nor TensorFlow (runs.py is the only train/ module allowed, last)."""
  out = subprocess.run([sys.executable, "-c", _PROBE], cwd=ROOT, capture_output=True,
                       text=True, check=True, timeout=120).stdout.strip()
  assert out == "['fda_biper_jax.train', 'fda_biper_jax.train.checkpoints', " \
                "'fda_biper_jax.train.runs']", out


_STABLEHLO_PROBE = """
import sys
from fda_biper_jax.deploy import stablehlo
print(sorted(m for m in sys.modules if m.startswith(("fda_biper_jax", "flax", "optax",
             "safetensors", "tensorflow", "orbax"))))
"""


def test_the_stablehlo_loader_loads_only_jax():
  """Loading a StableHLO artifact needs jax and numpy: importing its loader loads no Flax,
  optax, models, layers, trainer or data, and nothing else of the package."""
  out = subprocess.run([sys.executable, "-c", _STABLEHLO_PROBE], cwd=ROOT, capture_output=True,
                       text=True, check=True, timeout=120).stdout.strip()
  assert out == "['fda_biper_jax', 'fda_biper_jax.deploy', 'fda_biper_jax.deploy.stablehlo']", out


def _python_sources() -> list[str]:
  return [f for f in _tracked(".py") if f.split("/")[0] in (PACKAGE, "experiments",
                                                           "benchmarks", "notebooks")]


def test_no_private_name_is_imported_across_modules():
  bad = []
  for path in _python_sources():
    for node in ast.walk(ast.parse(open(os.path.join(ROOT, path)).read())):
      if isinstance(node, ast.ImportFrom) and (node.module or "").split(".")[0] in (
          PACKAGE, "experiments", "benchmarks", "notebooks"):
        bad += [f"{path}: from {node.module} import {a.name}" for a in node.names
                if a.name.startswith("_")]
  assert not bad, bad


# A path-like reference (x/y.py, z.md) in a comment or docstring must name a file of this
# repository; outputs a command writes (runs/..., results.*, *.json) are not references.
_REF = re.compile(r"(?<![\w/.-])([\w.-]+(?:/[\w.-]+)*\.(?:py|md|ipynb))\b")


def test_no_comment_points_outside_the_repository():
  files = set(_tracked(".py", ".md", ".ipynb", ".toml", ".txt"))
  names = {os.path.basename(f) for f in files}
  bad = []
  for path in _python_sources():
    src = open(os.path.join(ROOT, path)).read()
    for tok in tokenize.generate_tokens(io.StringIO(src).readline):
      if tok.type not in (tokenize.COMMENT, tokenize.STRING):
        continue
      for ref in _REF.findall(tok.string):
        if ref.startswith("runs/") or ref in files or os.path.basename(ref) in names and (
            "/" not in ref or any(f.endswith("/" + ref) for f in files)):
          continue
        bad.append(f"{path}:{tok.start[0]}: {ref}")
  assert not bad, bad


def test_the_readme_is_a_front_door_and_its_code_runs():
  text = open(os.path.join(ROOT, "README.md")).read()
  assert len(text.splitlines()) <= 150
  for heading in ("## Add an estimator", "## Add a model", "## Use it"):
    assert heading in text
  for link in re.findall(r"\]\(([^)#]+\.md)\)", text):
    assert os.path.exists(os.path.join(ROOT, link)), link
  for block in re.findall(r"```python\n(.*?)```", text, re.S):
    exec(compile(block, "README.md", "exec"), {})  # noqa: S102
