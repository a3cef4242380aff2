"""fda_biper_jax: binary neural networks in JAX/Flax with principled gradient estimators.

The package's folders are its architecture: `methods` (one file per
estimator), `nn` (binary Linen layers; `layers` is their stable import
path), `models` (the papers' architectures; a user's own through a factory), `train` (trainer, checkpoints,
runs), `data` (datasets in memory or streamed), `deploy` (bit-packed export
and XNOR inference), `cli` (the commands); `trace`, `summary` and `analysis`
read any model built from the library's layers, `plots` draws the analyses.
`fda_biper_jax.binarize(model, ...)` binarizes an
existing Linen model by rules; `fda_biper_jax.nnx` holds the NNX layers;
`fda_biper_jax.training_step(...)` binds the step the methods' schedules
read. Importing the package loads none of them.
"""

import importlib

__version__ = "0.2.0"

_LAZY = {"training_step": ("fda_biper_jax.methods", "training_step"),
         "binarize": ("fda_biper_jax.nn.binarize", "binarize")}


def __getattr__(name: str):
  if name in _LAZY:
    module, attr = _LAZY[name]
    return getattr(importlib.import_module(module), attr)
  raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
