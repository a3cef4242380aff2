"""Exports a training run's checkpoint to a packed binary network file.

  python -m experiments.export --workdir runs/biper_resnet20_stage2 --out resnet20.fbj \
      [--which latest|best]

The logic and the file format live in `fda_biper_jax.export`; this file only
parses flags. The model is rebuilt from the configuration saved with the
checkpoint; the file is read back (validated) before the report is printed.
"""

import sys

from absl import app, flags, logging

from fda_biper_jax import export

FLAGS = flags.FLAGS
flags.DEFINE_string("workdir", None, "The training run's workdir (holds checkpoints/).")
flags.DEFINE_string("out", None, "The file to write.")
flags.DEFINE_enum("which", "latest", list(export.WHICH), "The latest or the best checkpoint.")
flags.mark_flags_as_required(["workdir", "out"])


def main(argv):
  del argv
  logging.set_verbosity(logging.WARNING)  # orbax logs every restore at INFO
  try:
    r = export.export_checkpoint(FLAGS.workdir, FLAGS.out, FLAGS.which)
  except ValueError as e:
    sys.exit(f"error: {e}")
  print(f"exported {r['model']} ({r['which']} checkpoint, step {r['step']}) to {r['out']}: "
        f"{r['file_bytes']:,} bytes = 1/{1 / r['ratio']:.1f} of its float32 parameters "
        f"({r['float32_param_bytes']:,} bytes), 1/{r['checkpoint_bytes'] / r['file_bytes']:.1f} "
        f"of the orbax checkpoint folder ({r['checkpoint_bytes']:,} bytes); "
        f"{r['packed_layers']} packed layers, {r['folded_batch_norms']} BatchNorms folded")


if __name__ == "__main__":
  app.run(main)
