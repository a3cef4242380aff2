"""The --config flag: a Python file whose get_config() gives the config, and overrides.

`--config=FILE[:ARG]` runs `get_config(ARG)` of the Python file FILE; `--config.a.b=value`
overrides a field (ml_collections.config_flags, config locked: no new field). When
parsing fails, `problem(argv)` says in one line which of them is wrong: a missing
file (with the nearest file of its folder), one that cannot be loaded or has no
get_config(), a get_config that raises, or an override of a field that does not
exist (with the fields that do, and the nearest), or a value its field's type rejects
(with the field's value).
"""

from __future__ import annotations

import difflib
import glob
import importlib.machinery
import importlib.util
import os
import re
from typing import Any, Iterator, Sequence

import ml_collections
from absl import flags
from ml_collections import config_flags

NAME = "config"
FILE = "a Python file that defines get_config()"


def define(help_: str) -> None:
  config_flags.DEFINE_config_file(NAME, None, help_, lock_config=True)
  flags.register_validator(NAME, loaded)


def loaded(config) -> bool:
  """A validator: a file that failed to load (ml_collections defers its error to the
  config's first use) raises here, while the flags are parsed."""
  if config is not None:
    config.keys()
  return True


def value_of(argv: Sequence[str]) -> str | None:
  """The last --config value in argv (`--config=X` or `--config X`), or None."""
  value = None
  for i, arg in enumerate(argv):
    flag, eq, text = arg.lstrip("-").partition("=")
    if arg.startswith("-") and flag == NAME:
      value = text if eq else (argv[i + 1] if i + 1 < len(argv) else None)
  return value


def overrides(argv: Sequence[str]) -> Iterator[tuple[str, str]]:
  """(field path, the argument as written) of each `--config.PATH[=VALUE]` in argv."""
  for arg in argv:
    m = re.match(rf"^--?(?:no)?{NAME}\.([^=]+)", arg)
    if m:
      yield m.group(1), arg


def nearest_file(path: str) -> str:
  folder = os.path.dirname(path) or "."
  near = difflib.get_close_matches(path, glob.glob(os.path.join(folder, "*.py")), n=1)
  return f", e.g. {near[0]}" if near else ""


def exec_file(path: str, name: str):
  """The module that runs the Python file `path` under `name` (exceptions propagate)."""
  loader = importlib.machinery.SourceFileLoader(name, path)
  module = importlib.util.module_from_spec(importlib.util.spec_from_loader(loader.name, loader))
  loader.exec_module(module)
  return module


def config_module(path: str, needs: Sequence[str], example: str):
  """The module of the config file `path` (a sweep's or a recipe's, whose get_config takes
  an argument); ValueError (one line) unless it exists, loads and defines every name of
  `needs`. `example` is a file that does."""
  if not os.path.isfile(path):
    raise ValueError(f"--config={path!r} does not exist; allowed: a config file defining "
                     f"{' and '.join(needs)} (e.g. {example}){nearest_file(path)}")
  try:
    module = exec_file(path, f"{NAME}_module")
  except Exception as e:  # noqa: BLE001  (the file's own code)
    raise ValueError(f"--config={path!r} cannot be loaded ({type(e).__name__}: {e})") from None
  missing = [n for n in needs if not hasattr(module, n)]
  if missing:
    raise ValueError(f"--config={path!r} defines no {', '.join(missing)}; allowed: a config "
                     f"file defining {' and '.join(needs)} (e.g. {example})")
  return module


def load(value: str) -> tuple[Any, str | None]:
  """(config, None), or (None, what is wrong) for `--config=value`, as the flag loads it."""
  path, *arg = value.split(":", 1)
  if not os.path.isfile(path):
    return None, f"{path} is not a file; allowed: {FILE}{nearest_file(path)}"
  try:
    module = exec_file(path, f"{NAME}_file")
  except Exception as e:  # noqa: BLE001  (the file's own code)
    return None, f"{path} cannot be loaded ({type(e).__name__}: {e}); allowed: {FILE}"
  if not callable(getattr(module, "get_config", None)):
    return None, f"{path} defines no get_config(); allowed: {FILE}"
  try:
    config = module.get_config(*arg)
  except Exception as e:  # noqa: BLE001
    return None, f"get_config({', '.join(map(repr, arg))}) raised {type(e).__name__}: {e}"
  if not isinstance(config, ml_collections.ConfigDict):
    return None, f"get_config() returned {type(config).__name__}; allowed: a ConfigDict"
  return config, None


def field(config: ml_collections.ConfigDict, path: str) -> tuple[Any, str | None]:
  """(the value of the field `path` ('a.b') of `config`, None), or (None, why there is none)."""
  node, walked = config, [NAME]
  for part in path.split("."):
    fields = sorted(node.keys()) if isinstance(node, (ml_collections.ConfigDict, dict)) else []
    if part not in fields:
      where = ".".join(walked)
      if not fields:
        return None, f"{where} is {node!r}, which has no fields"
      near = difflib.get_close_matches(part, fields, n=1)
      hint = f" (did you mean --{where}.{near[0]}?)" if near else ""
      return None, f"{where} has no field {part!r}{hint}; allowed: {', '.join(fields)}"
    node = node[part]
    walked.append(part)
  return node, None


def value_problem(path: str, arg: str, current: Any) -> str | None:
  """What is wrong with the value in `--config.PATH=VALUE` (the field now holds
  `current`), by the override flag's own parser, or None."""
  name, (_, eq, text) = f"{NAME}.{path}", arg.partition("=")
  if not eq or name not in flags.FLAGS:
    return None
  parser = flags.FLAGS[name].parser
  try:
    parser.parse(text)
  except (TypeError, ValueError):
    shown = current.to_dict() if isinstance(current, ml_collections.ConfigDict) else current
    kind = parser.syntactic_help or f"a {type(shown).__name__}"
    return f"{name} is {shown!r}; allowed: {kind}"
  return None


def problem(argv: Sequence[str]) -> str | None:
  """One line for what is wrong with --config or a --config.FIELD override in argv, or None
  when neither is (then the error is some other flag's)."""
  value = value_of(argv)
  if value is None:
    return None
  config, error = load(value)
  if error:
    return f"--{NAME}={value} is not allowed: {error}"
  for path, arg in overrides(argv):
    current, error = field(config, path)
    error = error or value_problem(path, arg, current)
    if error:
      return f"{arg} is not allowed: {error}"
  return None
