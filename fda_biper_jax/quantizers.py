"""The public entry point for the binarizers' pure functions and the registry.

Every binarizer is a pure `jax.custom_vjp` function defined with its method
in `fda_biper_jax.methods` (one file per family); this module gathers them
under one name, as `quantizers.fda(x, omega, n_terms)`, and re-exports the
registry: `get(name, **params)` returns a bound `Quantizer`, `register`
adds a user's own method, `names()` (or `NAMES`) lists the registered ones.
"""

from __future__ import annotations

from fda_biper_jax.methods import (CallableQuantizer, Method, Param, Quantizer, get, names,
                                   register, sign)
from fda_biper_jax.methods.approx_sign import approx_sign
from fda_biper_jax.methods.biper import biper, biper_regularizer, biper_sine, square_wave
from fda_biper_jax.methods.bnn_pp import bnn_pp
from fda_biper_jax.methods.fda import fda, fda_series_derivative
from fda_biper_jax.methods.identity import identity
from fda_biper_jax.methods.ir_net import ir_net
from fda_biper_jax.methods.reactnet import rsign
from fda_biper_jax.methods.reste import reste
from fda_biper_jax.methods.sign_swish import sign_swish, sign_swish_derivative, sign_swish_map
from fda_biper_jax.methods.ste import ste_sign
from fda_biper_jax.xla_cpu import vcos, vsin


def __getattr__(name: str):
  if name == "NAMES":  # the registry changes when users register: read it each time
    return names()
  raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


__all__ = ["CallableQuantizer", "Method", "Param", "Quantizer", "approx_sign", "biper",
           "biper_regularizer", "biper_sine", "bnn_pp", "fda", "fda_series_derivative", "get",
           "identity", "ir_net", "names", "register", "reste", "rsign", "sign", "sign_swish",
           "sign_swish_derivative", "sign_swish_map", "square_wave", "ste_sign", "vcos", "vsin"]
