"""Binary layers: `linen` (Flax Linen), alongside the same quantizer core for NNX."""

from fda_biper_jax.nn.linen import BinaryConv, BinaryDense, BinaryLayer, BinarySpec, Settings

__all__ = ["BinaryConv", "BinaryDense", "BinaryLayer", "BinarySpec", "Settings"]
