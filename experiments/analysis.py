"""Figures of the analysis tools (`fda_biper_jax.analysis`), written as PNGs.

  python -m experiments.analysis qe --out=DIR          # DIR/qe.png
  python -m experiments.analysis quantizers --out=DIR  # DIR/quantizers.png, DIR/fda_series.png
  python -m experiments.analysis run --workdirs=RUN1,RUN2 --out=DIR  # DIR/run.png, overlaid

The command is `fda_biper_jax.cli.analysis` (installed as `fda-biper-jax-analysis`); the
figures are `fda_biper_jax.plots`.
"""

from fda_biper_jax.cli import analysis

if __name__ == "__main__":
  analysis.run()
