"""Trains or evaluates a binary network on CIFAR-10/100 or another small dataset.

  python -m experiments.cifar --config=experiments/configs/biper_resnet20.py:stage1 \
      --workdir=runs/biper_resnet20_s1

The logic lives in `fda_biper_jax.train`; this file only parses flags. A bad
setting stops with one line before anything is written.
"""

import signal
import sys

from absl import app, flags, logging
from ml_collections import config_flags

from fda_biper_jax import train

FLAGS = flags.FLAGS
config_flags.DEFINE_config_file("config", None, "Training config file (see experiments/configs).",
                                lock_config=True)
flags.DEFINE_string("workdir", None, "Where checkpoints and logs go; a rerun resumes there.")
flags.mark_flags_as_required(["config", "workdir"])


def main(argv):
  del argv
  logging.set_verbosity(logging.WARNING)  # orbax logs every save at INFO
  try:
    summary = train.train_and_evaluate(FLAGS.config, FLAGS.workdir)
  except (ValueError, FloatingPointError) as e:
    sys.exit(f"error: {e}")
  if summary.get("stopped"):  # saved at a SIGTERM: exit as the signal would have
    sys.exit(128 + signal.SIGTERM)


if __name__ == "__main__":
  app.run(main)
