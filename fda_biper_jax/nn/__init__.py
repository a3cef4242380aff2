"""Binary layers: `linen` (Flax Linen), `nnx` (Flax NNX), on one operand core (`core`);
`binarize` binarizes an existing Linen model by rules."""

from fda_biper_jax.nn.linen import BinaryConv, BinaryDense, BinaryLayer, BinarySpec, Settings

__all__ = ["BinaryConv", "BinaryDense", "BinaryLayer", "BinarySpec", "Settings"]
