"""Deployment: the bit-packed file format, export of a model, XNOR-popcount inference.

* `packed`: the file (`Packed`, `save`, `load`, `to_bytes`, `from_bytes`);
* `export`: a model and its variables to a `Packed` network;
* `inference`: packed operations and `Predictor`, which runs a `Packed`
  network (and checks that a file fits its model).

Nothing here imports the trainer, the data pipeline, optax or TensorFlow: a
finished run restores with `fda_biper_jax.train.runs.restore`.
"""
