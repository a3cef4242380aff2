"""Figures of the analyses, written as PNGs (`fda-biper-jax-analysis`).

  fda-biper-jax-analysis qe --out=DIR          # DIR/qe.png
  fda-biper-jax-analysis quantizers --out=DIR  # DIR/quantizers.png, DIR/fda_series.png
  fda-biper-jax-analysis run --workdirs=RUN1,RUN2 --out=DIR  # DIR/run.png, the runs overlaid

`--workdirs` may also be repeated (`--workdir` is the same flag). What each figure
shows: `fda_biper_jax.plots`. A bad flag or a workdir without metrics.jsonl stops with
one line before anything is written (exit status 2); without matplotlib, one line says
what to install, and a folder that cannot be written is one line too (exit status 1).
"""

from absl import flags

from fda_biper_jax.cli import command

FLAGS = flags.FLAGS
COMMANDS = ("qe", "quantizers", "run")
INSTALL = 'pip install "fda_biper_jax[analysis]"'


def define_flags() -> None:
  flags.DEFINE_string("out", None, "Folder for the PNGs (created).")
  flags.DEFINE_multi_string("workdirs", [], "'run': training runs' workdirs (each holds "
                            "metrics.jsonl), comma-separated or repeated.")
  flags.DEFINE_alias("workdir", "workdirs")
  flags.mark_flag_as_required("out")


def workdirs(values) -> list[str]:
  """The workdirs of `--workdirs=a,b --workdirs=c`: [a, b, c]."""
  return [w for value in values for w in value.split(",") if w]


def the_command(argv) -> str:
  """The one argument that is not a flag: one of COMMANDS; else one line, exit 2."""
  if len(argv) != 2 or argv[1] not in COMMANDS:
    given = " ".join(argv[1:]) or "nothing"
    command.fail(f"the command is {given!r}; allowed: one of {', '.join(COMMANDS)}")
  return argv[1]


def main(argv) -> None:
  name = the_command(argv)
  if name == "run" and not FLAGS.workdirs:
    command.fail("--workdirs is required for 'run': the training runs' workdirs")
  try:
    from fda_biper_jax import plots  # noqa: PLC0415  (matplotlib: an optional extra)
  except ImportError as e:
    if e.name is None or e.name.partition(".")[0] != "matplotlib":
      raise
    command.fail(f"the analysis needs matplotlib: {INSTALL}", command.FAILURE)
  try:
    written = plots.write_figures(name, FLAGS.out, workdirs(FLAGS.workdirs))
  except ValueError as e:
    command.fail(e)
  except OSError as e:  # the folder or a file cannot be written
    command.fail(e, command.FAILURE)
  for path in written:
    print(path)


def run() -> None:
  """The console script."""
  command.run(main, define_flags, doc=__doc__)


if __name__ == "__main__":
  run()
