"""A command under absl: its flags defined when it starts, one line for anything wrong.

`run(main, define_flags)` defines the command's flags (so importing several
commands into one process defines none of them), makes them the flags `--help`
lists, parses sys.argv, then calls `main(argv)` (argv: the arguments that are not
flags) through `absl.app.run`. Whatever the parsing rejects ends in one line on
stderr and exit status `USAGE_ERROR`, before `main` runs:

    PROG: error: --batch_sizes=0 is not allowed; allowed: comma-separated positive integers

The parsers below reject a text with ValueError; `allowed` is what they accept,
shown by `--help` and in that line.
"""

from __future__ import annotations

import difflib
import math
import os
import sys
from typing import Any, Callable, NoReturn, Sequence

from absl import app, flags, logging

FLAGS = flags.FLAGS
USAGE_ERROR = 2   # a flag, the config or a setting is rejected: nothing was done
FAILURE = 1       # the settings are valid, the work failed

LIST = flags.CsvListSerializer(",")

Diagnose = Callable[[Sequence[str]], "str | None"]


def prog() -> str:
  """How this process was started: 'python -m experiments.cifar', or the script's name."""
  spec = getattr(sys.modules.get("__main__"), "__spec__", None)
  return f"python -m {spec.name}" if spec is not None else os.path.basename(sys.argv[0])


def one_line(message: Any) -> str:
  return " ".join(str(message).split())


def fail(message: Any, status: int = USAGE_ERROR) -> NoReturn:
  """Prints `PROG: error: MESSAGE` as one line on stderr and exits with `status`."""
  print(f"{prog()}: error: {one_line(message)}", file=sys.stderr)
  sys.exit(status)


def run(main: Callable[[list[str]], Any], define_flags: Callable[[], None], *,
        doc: str | None = None, diagnose: Diagnose | None = None) -> None:
  """Runs a command: defines its flags, parses sys.argv, calls `main(argv)`.

  `doc` is the usage `--help` prints when the main module has no docstring (an
  installed console script); `diagnose(argv)` may explain a parsing error
  better than the flag's own message (it returns None to leave it).
  """
  before = set(FLAGS)
  define_flags()
  for name in sorted(set(FLAGS) - before):
    FLAGS.register_key_flag_for_module(sys.argv[0], FLAGS[name])  # what --help lists
  main_module = sys.modules["__main__"]
  if not main_module.__doc__:
    main_module.__doc__ = doc
  app.run(main, flags_parser=lambda argv: parse_flags(argv, diagnose))


def parse_flags(argv: Sequence[str], diagnose: Diagnose | None = None) -> list[str]:
  """FLAGS(argv): the arguments that are not flags; anything rejected: one line, exit 2.
  absl logs warnings and errors only, unless --verbosity is given."""
  try:
    argv = FLAGS(argv)
  except Exception as error:  # noqa: BLE001  (a config file's own code may raise anything)
    fail((diagnose and diagnose(argv)) or flag_error(error))
  if not FLAGS["verbosity"].present:
    logging.set_verbosity(logging.WARNING)  # not absl's INFO: JAX and orbax log much there
  return argv


def own_flags() -> list[str]:
  """The names of the command's own flags (those `run` defined), sorted."""
  return sorted({f.name for f in FLAGS.get_key_flags_for_module(sys.argv[0])})


def unknown_flag(name: str) -> str:
  own = own_flags()
  near = difflib.get_close_matches(name, own, n=1)
  hint = f" (did you mean --{near[0]}?)" if near else ""
  return f"--{name} is not allowed{hint}; allowed: {', '.join('--' + n for n in own)}"


def allowed(flag: flags.Flag) -> str:
  """What a flag accepts: its choices, or its parser's description, and its default."""
  choices = getattr(flag.parser, "enum_values", None)
  if choices:
    return ", ".join(choices)
  default = flag.default
  if default is None:
    return flag.parser.syntactic_help or flag.help
  text = flag.parser.syntactic_help or f"a {type(default).__name__}"
  shown = ",".join(map(str, default)) if isinstance(default, (list, tuple)) else default
  return f"{text} (default {shown})"


def flag_error(error: Exception) -> str:
  """One line for what parsing the flags raised: the flag, its value, what is allowed."""
  if isinstance(error, flags.UnrecognizedFlagError):
    return unknown_flag(error.flagname)
  text = str(error)
  name = text[len("flag --"):].partition("=")[0] if text.startswith("flag --") else ""
  if name not in FLAGS:
    return text.splitlines()[0] if isinstance(error, flags.Error) else \
        f"{type(error).__name__}: {text}"
  flag = FLAGS[name]
  value = text[len(f"flag --{name}="):]
  cause = f": {error.__context__}"
  value = value[:-len(cause)] if value.endswith(cause) else value.partition(": ")[0]
  if value == "None" and not flag.present:
    return f"--{name} is required: {flag.help}"
  return f"--{name}={value} is not allowed; allowed: {allowed(flag)}"


def no_arguments(argv: Sequence[str]) -> None:
  """Stops with one line when the command line holds an argument that is not a flag."""
  if len(argv) > 1:
    fail(f"{argv[1]!r} is not allowed: the command takes flags only; allowed: "
         f"{', '.join('--' + n for n in own_flags())}")


# --------------------------------------------------------------------------
# Parsers: text -> value, ValueError for a text they reject
# --------------------------------------------------------------------------


class Parser(flags.ArgumentParser):
  """An absl parser from `convert(text)`; `allowed` describes the texts it accepts."""

  def __init__(self, convert: Callable[[str], Any], allowed_text: str):
    self.convert = convert
    self.syntactic_help = allowed_text

  def parse(self, argument):
    return self.convert(argument) if isinstance(argument, str) else argument


def define(name: str, default: str | None, convert: Callable[[str], Any], allowed_text: str,
           help_: str, serializer: flags.ArgumentSerializer | None = None,
           flag_values: flags.FlagValues = FLAGS) -> flags.FlagHolder:
  """A flag whose text `convert` turns into its value (a default is given as text), in
  `flag_values` (absl's global FLAGS, or a module's own for a command called in-process)."""
  return flags.DEFINE(Parser(convert, allowed_text), name, default, help_,
                      serializer=serializer or flags.ArgumentSerializer(),
                      flag_values=flag_values)


def integers(text: str, count: int | None = None) -> tuple[int, ...]:
  """'1,256' -> (1, 256): positive integers (exactly `count` of them if given)."""
  try:
    values = tuple(int(t) for t in text.split(","))
  except ValueError:
    values = ()
  if not values or min(values) < 1 or count not in (None, len(values)):
    raise ValueError(f"{text!r} is not {count or 'a list of'} positive integers")
  return values


def positive_number(text: str) -> float:
  """A finite number > 0."""
  try:
    x = float(text)
  except ValueError:
    x = math.nan
  if not 0 < x < math.inf:
    raise ValueError(f"{text!r} is not a positive finite number")
  return x


def define_names(name: str, default: str, choices: Sequence[str], help_: str,
                 flag_values: flags.FlagValues = FLAGS) -> flags.FlagHolder:
  """A comma-separated list of names, each one of `choices`."""
  choices = tuple(choices)

  def convert(text: str) -> list[str]:
    names = text.split(",")
    if not all(n in choices for n in names):
      raise ValueError(f"{text!r}: not every name is one of {choices}")
    return names

  return define(name, default, convert, f"comma-separated names from {', '.join(choices)}",
                help_, LIST, flag_values)


def define_integers(name: str, default: str | None, help_: str,
                    flag_values: flags.FlagValues = FLAGS) -> flags.FlagHolder:
  """A comma-separated list of positive integers, as a list."""
  return define(name, default, lambda text: list(integers(text)),
                "comma-separated positive integers", help_, LIST, flag_values)


def define_positive_number(name: str, default: float | None, help_: str,
                           flag_values: flags.FlagValues = FLAGS) -> flags.FlagHolder:
  return define(name, None if default is None else repr(default), positive_number,
                "a positive finite number", help_, flag_values=flag_values)
