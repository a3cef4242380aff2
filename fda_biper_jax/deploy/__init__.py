"""Deployment: the bit-packed file format, export of a model, XNOR-popcount inference.

* `packed`: the file (`Packed`, `save`, `load`, `to_bytes`, `from_bytes`);
* `export`: a model and its variables to a `Packed` network, and a `Packed`
  network to a StableHLO artifact (`export.stablehlo`);
* `inference`: packed operations and `Predictor`, which runs a `Packed`
  network (and checks that a file fits its model);
* `stablehlo`: the artifact's file and its loader, which needs jax and
  numpy only (no Flax, no model code).

Nothing here imports the trainer, the data pipeline, optax or TensorFlow: a
finished run restores with `fda_biper_jax.train.runs.restore`.
"""
