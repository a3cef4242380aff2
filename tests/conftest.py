"""Test session setup: 8 fake CPU devices, set once before JAX starts.

Every test sees `jax.devices()` of length 8, so shard_map and the with_pmap
chex variant run over a real named axis on a CPU-only machine.

Compiled programs go to a persistent compilation cache in a fresh temporary
folder for this session only: tests that build the same model and step
(several training runs of the tiny model) compile it once, while a cold run
still pays every first compile, so the suite's time stays honest.
"""
import os
import tempfile

os.environ["XLA_FLAGS"] = " ".join(
    [os.environ.get("XLA_FLAGS", ""), "--xla_force_host_platform_device_count=8"]).strip()
os.environ.setdefault("JAX_PLATFORMS", "cpu")
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")

import jax  # noqa: E402  (after the flags above)

assert jax.device_count() == 8, "conftest must run before anything initialises JAX"

jax.config.update("jax_compilation_cache_dir", tempfile.mkdtemp(prefix="fda_biper_jax_xla_"))
jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.2)
jax.config.update("jax_persistent_cache_min_entry_size_bytes", 0)
