"""The notebooks' links, written from one setting: pyproject.toml's [project.urls] Repository.

  python -m notebooks.links                     # rewrite the notebooks from pyproject.toml
  python -m notebooks.links --repository URL    # a fork: set URL in pyproject.toml, then rewrite

Every notebook opens with a badge cell (Open in Colab, Open in Kaggle: the notebook on the
repository's main branch), and its install cell sets `REPO_URL`, from which pip installs the
package and git clones the repository. Both are written here and nowhere else;
tests/test_notebooks.py fails when a notebook disagrees with pyproject.toml.
"""

import copy
import os
import re
import tomllib

import nbformat
from absl import app, flags

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PYPROJECT = os.path.join(ROOT, "pyproject.toml")
NOTEBOOK_DIR = os.path.join(ROOT, "notebooks")
BRANCH = "main"
COLAB_BADGE = "https://colab.research.google.com/assets/colab-badge.svg"
KAGGLE_BADGE = "https://kaggle.com/static/images/open-in-kaggle.svg"
REPO_URL_LINE = re.compile(r'^REPO_URL = "[^"\n]*"', re.M)
_GITHUB_URL = re.compile(r"https://github\.com/([\w.-]+/[\w.-]+)")
_PYPROJECT_LINE = re.compile(r'^Repository = "[^"\n]*"', re.M)

FLAGS = flags.FLAGS
flags.DEFINE_string("repository", None, "A GitHub URL to write into pyproject.toml first "
                    "(a fork); without it the URL already there.")


def repository_url(pyproject: str = PYPROJECT) -> str:
  """pyproject.toml's [project.urls] Repository."""
  with open(pyproject, "rb") as f:
    return tomllib.load(f)["project"]["urls"]["Repository"]


def github_repository(url: str) -> str:
  """'<owner>/<name>' of https://github.com/<owner>/<name>; a ValueError for any other URL
  (the badges open notebooks from GitHub)."""
  m = _GITHUB_URL.fullmatch(url)
  if not m or m.group(1).endswith(".git"):
    raise ValueError(f"repository={url!r} is not allowed: it must be "
                     "https://github.com/<owner>/<name>")
  return m.group(1)


def set_repository_url(url: str, pyproject: str = PYPROJECT) -> None:
  """Writes `url` into pyproject.toml's one `Repository = "..."` line, nothing else."""
  github_repository(url)
  with open(pyproject) as f:
    text, n = _PYPROJECT_LINE.subn(lambda m: f'Repository = "{url}"', f.read())
  if n != 1:
    raise ValueError(f"{pyproject}: {n} lines 'Repository = \"...\"', expected one")
  with open(pyproject, "w") as f:
    f.write(text)


def badges(url: str, name: str) -> str:
  """The badge cell's markdown: notebooks/<name>.ipynb of `url`'s main branch, opened in
  Colab and in Kaggle."""
  blob = f"{github_repository(url)}/blob/{BRANCH}/notebooks/{name}.ipynb"
  return (f"[![Open in Colab]({COLAB_BADGE})](https://colab.research.google.com/github/{blob}) "
          f"[![Open in Kaggle]({KAGGLE_BADGE})]"
          f"(https://kaggle.com/kernels/welcome?src=https://github.com/{blob})")


def is_badge_cell(cell) -> bool:
  return cell.cell_type == "markdown" and COLAB_BADGE in cell.source


def install_cell(nb):
  """The notebook's one code cell that sets REPO_URL; a ValueError unless exactly one does."""
  cells = [c for c in nb.cells if c.cell_type == "code" and REPO_URL_LINE.search(c.source)]
  if len(cells) != 1:
    raise ValueError(f"{len(cells)} code cells set REPO_URL, expected one (the install cell)")
  return cells[0]


def install_path(nb) -> list:
  """The notebook's code cells from the first through the one after the install cell: the
  setup, install and runtime cells, which run before the notebook's own work."""
  code = [c for c in nb.cells if c.cell_type == "code"]
  return code[:code.index(install_cell(nb)) + 2]


def with_links(nb, url: str, name: str):
  """A copy of notebook `nb` (notebooks/<name>.ipynb) with its links to `url`: the badge
  cell first (added when missing, other badge cells dropped) and the install cell's REPO_URL."""
  nb = copy.deepcopy(nb)
  cell = install_cell(nb)
  cell.source = REPO_URL_LINE.sub(lambda m: f'REPO_URL = "{url}"', cell.source)
  old = [c for c in nb.cells if is_badge_cell(c)]
  badge = old[0] if old else nbformat.v4.new_markdown_cell(id=f"{name}-badges")
  badge.source = badges(url, name)
  nb.cells = [badge] + [c for c in nb.cells if not is_badge_cell(c)]
  return nb


def notebook_names(directory: str = NOTEBOOK_DIR) -> list[str]:
  """The notebooks of `directory`, by name without .ipynb."""
  return sorted(f[:-len(".ipynb")] for f in os.listdir(directory) if f.endswith(".ipynb"))


def write_links(url: str, directory: str = NOTEBOOK_DIR) -> list[str]:
  """Rewrites each notebook of `directory` that disagrees with `url`; returns their names."""
  changed = []
  for name in notebook_names(directory):
    path = os.path.join(directory, f"{name}.ipynb")
    nb = nbformat.read(path, as_version=4)
    linked = with_links(nb, url, name)
    if linked != nb:
      nbformat.write(linked, path)
      changed.append(name)
  return changed


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {argv[1:]}")
  if FLAGS.repository:
    try:
      set_repository_url(FLAGS.repository)
    except ValueError as e:
      raise app.UsageError(str(e)) from None
  url = repository_url()
  changed = write_links(url)
  print(f"{url}: rewrote {', '.join(changed) if changed else 'no notebook'}")


if __name__ == "__main__":
  app.run(main)
