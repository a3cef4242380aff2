"""Trains or evaluates a network from a config file (`fda-biper-jax-train`).

  fda-biper-jax-train --config=CONFIG_FILE[:ARG] --workdir=runs/mine [--config.num_epochs=5]

The config file's get_config() returns the trainer's config: `fda_biper_jax.train.config
.default()` with a recipe's settings (the repository's experiments/configs hold the
papers'; there `python -m experiments.cifar` is this command). A rerun resumes from the
workdir's checkpoints; `--config.eval_only=True` evaluates the latest one. A bad flag,
config file or override, or a setting the trainer rejects, stops with one line before
anything is written (exit status 2); a non-finite loss stops the run with one line (1); a
SIGTERM saves the step the run is at and exits as the signal would (143).
"""

import signal
import sys

from absl import flags

from fda_biper_jax import train
from fda_biper_jax.cli import command, config_flag

FLAGS = flags.FLAGS


def define_flags() -> None:
  config_flag.define("Training config file: a Python file that defines get_config() "
                     "(e.g. experiments/configs/tiny.py); --config.FIELD=VALUE overrides.")
  flags.DEFINE_string("workdir", None, "Where checkpoints and logs go; a rerun resumes there.")
  flags.mark_flags_as_required(["config", "workdir"])


def main(argv) -> None:
  command.no_arguments(argv)
  try:
    summary = train.train_and_evaluate(FLAGS.config, FLAGS.workdir)
  except ValueError as e:
    command.fail(e)
  except FloatingPointError as e:
    command.fail(e, command.FAILURE)
  if summary.get("stopped"):  # saved at a SIGTERM: exit as the signal would have
    sys.exit(128 + signal.SIGTERM)


def run() -> None:
  """The console script."""
  command.run(main, define_flags, doc=__doc__, diagnose=config_flag.problem)


if __name__ == "__main__":
  run()
