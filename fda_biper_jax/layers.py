"""The binary Linen layers under their stable import path, `fda_biper_jax.layers`.

They are defined in `fda_biper_jax.nn.linen` (which see); this module only
re-exports its public names.
"""

from fda_biper_jax.nn.linen import (PRENORM_EPS, SCALINGS, BinaryConv, BinaryDense, BinaryLayer,
                                    BinarySpec, Settings, deployed_input, kernel_scale,
                                    prenormalize, resolve)

__all__ = ["PRENORM_EPS", "SCALINGS", "BinaryConv", "BinaryDense", "BinaryLayer", "BinarySpec",
           "Settings", "deployed_input", "kernel_scale", "prenormalize", "resolve"]
