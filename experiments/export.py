"""Exports a training run's checkpoint to a packed binary network file.

  python -m experiments.export --workdir=runs/biper_resnet20_stage2 --out=resnet20.safetensors \
      [--which=latest|best] [--stablehlo=resnet20.stablehlo]

The command is `fda_biper_jax.cli.export` (installed as `fda-biper-jax-export`).
"""

from fda_biper_jax.cli import export

if __name__ == "__main__":
  export.run()
