"""Test session setup: 8 fake CPU devices, set once before JAX starts.

Every test sees `jax.devices()` of length 8, so shard_map and the with_pmap
chex variant run over a real named axis on a CPU-only machine.

The suite runs on two pytest-xdist workers, a test file per worker
(pyproject.toml's addopts; `-n 0` runs it in one process): XLA:CPU compiles on
one thread, so two workers keep a 2-core machine busy where one process used
about 1.2 cores.

Compiled programs go to a persistent compilation cache in a fresh temporary
folder for this session only, shared by its workers (the process that loads
this file first creates it, passes it on in the environment and removes it at
exit), and to the processes the tests start through the environment: tests
that build the same model and step (several training runs of the tiny model, a
run killed and resumed) compile it once, while a cold run still pays every first
compile, so the suite's time stays honest.
"""
import atexit
import os
import shutil
import tempfile

os.environ["XLA_FLAGS"] = " ".join(
    [os.environ.get("XLA_FLAGS", ""), "--xla_force_host_platform_device_count=8"]).strip()
os.environ.setdefault("JAX_PLATFORMS", "cpu")
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")

import jax  # noqa: E402  (after the flags above)

assert jax.device_count() == 8, "conftest must run before anything initialises JAX"

_CACHE_VAR = "FDA_BIPER_JAX_TEST_XLA_CACHE"
if _CACHE_VAR not in os.environ:  # the first process of the session: xdist's controller
  os.environ[_CACHE_VAR] = tempfile.mkdtemp(prefix="fda_biper_jax_xla_")
  atexit.register(shutil.rmtree, os.environ[_CACHE_VAR], ignore_errors=True)
_CACHE_CONFIG = {"jax_compilation_cache_dir": os.environ[_CACHE_VAR],
                 "jax_persistent_cache_min_compile_time_secs": 0.2,
                 "jax_persistent_cache_min_entry_size_bytes": 0}
for _name, _value in _CACHE_CONFIG.items():
  jax.config.update(_name, _value)
  # and for the processes the tests start (command lines, notebooks, hosts), which read
  # JAX's options from the environment when they import it
  os.environ[_name.upper()] = str(_value)

# The longest test files (about 1-2 minutes each on 2 cores) run first, so
# the short ones fill in at the end and both workers finish together;
# alphabetically test_train.py came last and ran alone for over a minute.
_LONGEST_FIRST = ("test_train.py", "test_imagenet.py", "test_own_models.py", "test_models.py",
                  "test_export.py", "test_sweep.py", "test_benchmarks.py", "test_notebooks.py")


def pytest_collection_modifyitems(items):
  def rank(item):
    name = item.path.name
    return _LONGEST_FIRST.index(name) if name in _LONGEST_FIRST else len(_LONGEST_FIRST)
  items.sort(key=rank)  # stable: the order within a file is kept
