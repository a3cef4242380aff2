"""Exports a training run's checkpoint to a packed binary network file (`fda-biper-jax-export`).

  fda-biper-jax-export --workdir=runs/biper_resnet20_stage2 --out=resnet20.safetensors \
      [--which=latest|best] [--stablehlo=resnet20.stablehlo]

The run restores without its optimizer (`fda_biper_jax.train.runs.restore`: the model
rebuilt from the configuration saved with the checkpoint); `fda_biper_jax.deploy.export`
packs it; the file is read back and checked against its model (`deploy.inference.load`)
before the report is printed. `--stablehlo` also writes the packed predictor as a
`jax.export` artifact (`fda_biper_jax.deploy.stablehlo`; it runs with jax alone).
A bad flag or a workdir without the checkpoint stops with
one line (exit status 2), a file that cannot be written too (1).
"""

import os
from typing import Any

from absl import flags

from fda_biper_jax.cli import command
from fda_biper_jax.deploy import export, inference, packed, stablehlo
from fda_biper_jax.train import runs

FLAGS = flags.FLAGS


def define_flags() -> None:
  flags.DEFINE_string("workdir", None, "The training run's workdir (holds checkpoints/).")
  flags.DEFINE_string("out", None, "The file to write.")
  flags.DEFINE_enum("which", "latest", list(runs.WHICH), "The latest or the best checkpoint.")
  flags.DEFINE_string("stablehlo", None, "Also write the StableHLO artifact (jax.export) here.")
  flags.mark_flags_as_required(["workdir", "out"])


def export_run(workdir: str, out: str, which: str = "latest",
               stablehlo_out: str | None = None) -> dict[str, Any]:
  """Exports a run's latest (or best) checkpoint to the file `out` (and, given
  `stablehlo_out`, to a StableHLO artifact there); returns a report: the model name,
  step, the file's bytes against the model's float32 parameter bytes and the orbax step
  folder's bytes, the packed layers and folded BatchNorms, the artifact's bytes."""
  run = runs.restore(workdir, which)
  network = export.export(run.model, run.variables, run.input_shape)
  packed.save(network, out)
  inference.load(out)
  if stablehlo_out:
    stablehlo.save(export.stablehlo(network, model=run.model), stablehlo_out)
    stablehlo.load(stablehlo_out)
  folder = os.path.join(workdir, "checkpoints", str(run.step))
  folder_bytes = sum(os.path.getsize(os.path.join(d, f))
                     for d, _, files in os.walk(folder) for f in files)
  entries = network.header["layers"]
  return {"model": network.header["model"]["name"], "step": run.step, "which": which,
          "out": out, **network.sizes(), "checkpoint_bytes": folder_bytes,
          "packed_layers": len(entries),
          "folded_batch_norms": sum(e["folded_bn"] is not None for e in entries.values()),
          "stablehlo_bytes": os.path.getsize(stablehlo_out) if stablehlo_out else None}


def main(argv) -> None:
  command.no_arguments(argv)
  try:
    r = export_run(FLAGS.workdir, FLAGS.out, FLAGS.which, FLAGS.stablehlo)
  except ValueError as e:
    command.fail(e)
  except OSError as e:  # the file cannot be written
    command.fail(e, command.FAILURE)
  print(f"exported {r['model']} ({r['which']} checkpoint, step {r['step']}) to {r['out']}: "
        f"{r['file_bytes']:,} bytes = 1/{1 / r['ratio']:.1f} of its float32 parameters "
        f"({r['float32_param_bytes']:,} bytes), 1/{r['checkpoint_bytes'] / r['file_bytes']:.1f} "
        f"of the orbax checkpoint folder ({r['checkpoint_bytes']:,} bytes); "
        f"{r['packed_layers']} packed layers, {r['folded_batch_norms']} BatchNorms folded")
  if FLAGS.stablehlo:
    print(f"wrote the StableHLO artifact {FLAGS.stablehlo}: {r['stablehlo_bytes']:,} bytes")


def run() -> None:
  """The console script."""
  command.run(main, define_flags, doc=__doc__)


if __name__ == "__main__":
  run()
