"""Test inputs: `normal(key, shape, dtype)` gives `jax.random.normal`'s exact values.

Run eagerly, `jax.random.normal` compiles its threefry program with XLA:CPU's default LLVM
level for every new shape, about 0.7-1 s each on 2 cores; compiled at level 1
(`xla_cpu.INIT_COMPILER_OPTIONS`, as the library's initialisation is) it takes about 0.1 s
and gives the same bits (test_xla_cpu.py checks both).
"""

import functools

import jax
import jax.numpy as jnp

from fda_biper_jax import xla_cpu


@functools.partial(jax.jit, static_argnums=(1, 2),
                   compiler_options=xla_cpu.init_compiler_options())
def normal(key, shape, dtype=jnp.float32):
  return jax.random.normal(key, shape, dtype)
