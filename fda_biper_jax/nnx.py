"""The binary NNX layers under their stable import path, `fda_biper_jax.nnx`.

They are defined in `fda_biper_jax.nn.nnx` (which see); this module only
re-exports its public names.
"""

from fda_biper_jax.nn.nnx import BinaryConv, BinaryLinear, Regularizer, pop_regularizers

__all__ = ["BinaryConv", "BinaryLinear", "Regularizer", "pop_regularizers"]
