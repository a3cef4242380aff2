"""Multi-host data parallelism, proven on one machine.

Two processes with 2 CPU devices each (JAX's own multi-process runtime,
`jax.distributed.initialize`, CPU collectives over Gloo) train the tiny config
a few steps; a single process with 4 devices and the same global batches must
reach the same losses and parameters, and the checkpoints the two processes
wrote must restore in one process. Both runs use data_shards=2, which fixes
the data order independently of the process count (see fda_biper_jax/inputs.py).
"""

import json
import os
import socket
import subprocess
import sys

import jax
import numpy as np
import pytest

from experiments.configs import tiny
from fda_biper_jax import models, parallel, train
from fda_biper_jax.train import checkpoints
from fda_biper_jax.data import inputs

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

WORKER = """
import os, sys
os.environ["XLA_FLAGS"] = "--xla_force_host_platform_device_count=2"
os.environ["JAX_PLATFORMS"] = "cpu"
import jax
from experiments.configs import tiny
from fda_biper_jax import train
from tests.test_multihost import config
c = config()
c.distributed, c.coordinator_address = True, sys.argv[1]
c.num_processes, c.process_id = 2, int(sys.argv[2])
c.data_shards = 2
train.train_and_evaluate(c, sys.argv[3])
assert (jax.process_count(), jax.device_count(), jax.local_device_count()) == (2, 4, 2)
"""


def config():
  """The tiny config, with SGD: Adam divides each gradient by its running size,
  so on weights whose gradient is ~0 it turns float rounding (the devices'
  sums are added in another order across processes) into whole learning-rate
  steps; SGD keeps the two runs' parameters as close as their gradients."""
  c = tiny.get_config()
  c.num_devices = 0  # every device of every process (tiny.py takes one)
  c.optimizer.name, c.optimizer.learning_rate = "sgd", 0.05
  c.log_every_steps = 1
  return c


def _free_port() -> int:
  with socket.socket() as s:
    s.bind(("localhost", 0))
    return s.getsockname()[1]


def _losses(workdir):
  with open(os.path.join(workdir, "metrics.jsonl")) as f:
    records = [json.loads(line) for line in f]
  return ([r["loss"] for r in records if r["kind"] == "train"],
          [r["accuracy"] for r in records if r["kind"] == "eval"])


@pytest.fixture(scope="module")
def two_processes(tmp_path_factory):
  """Workdir of the 2-process x 2-device run."""
  workdir = str(tmp_path_factory.mktemp("two_processes"))
  address = f"localhost:{_free_port()}"
  env = {**os.environ, "PYTHONPATH": ROOT}
  procs = [subprocess.Popen([sys.executable, "-c", WORKER, address, str(i), workdir], cwd=ROOT,
                            env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
           for i in range(2)]
  outputs = []
  for p in procs:
    try:
      outputs.append(p.communicate(timeout=300)[0])
    except subprocess.TimeoutExpired:
      for q in procs:
        q.kill()
      raise
  for p, out in zip(procs, outputs):
    assert p.returncode == 0, out[-3000:]
  assert "done: best eval accuracy" in outputs[0]  # process 0 reports
  return workdir


def _single_process(workdir, data_shards):
  c = config()
  c.num_devices, c.data_shards = 4, data_shards
  return train.train_and_evaluate(c, workdir)


def test_two_processes_equal_one_process_with_four_devices(two_processes, tmp_path):
  one = _single_process(str(tmp_path / "one"), data_shards=2)
  losses2, evals2 = _losses(two_processes)
  losses1, evals1 = _losses(str(tmp_path / "one"))
  assert len(losses1) == len(losses2) == 16
  np.testing.assert_allclose(losses2, losses1, rtol=1e-5)
  assert evals2 == evals1

  # The checkpoints the two processes wrote restore in this single process.
  c = config()
  model = models.create(c.model, c.synthetic.num_classes, axis_name=parallel.AXIS,
                        **train.quantization(c))
  tx = train.make_optimizer(c, lambda step: 0.0)
  template = train.create_state(model, tx, jax.random.key(0), tuple(c.synthetic.image_shape))
  ckpts = checkpoints.Checkpoints(two_processes)
  step, restored, meta = ckpts.restore_latest(template)
  ckpts.close()
  assert step == 16 and meta["config"]["data_shards"] == 2
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-6),
               jax.device_get(restored.params), jax.device_get(one["state"].params))

  # ... and evaluate there, with the settings saved beside them.
  c.eval_only = True
  ev = train.train_and_evaluate(c, two_processes)
  assert ev["step"] == 16 and ev["accuracy"] == evals2[-1]


def test_the_data_order_depends_on_the_shards_not_the_processes():
  """The control: with one shard instead of two the global batches differ, so the
  equality above is not a property of any data order."""
  mesh = parallel.make_mesh(4)
  order = {}
  for shards in (1, 2):
    c = config()
    c.num_devices, c.data_shards = 4, shards
    source = inputs.create(c, mesh, jax.random.key(0))
    order[shards] = np.asarray(source.host_indices(0))
  assert order[1].shape == order[2].shape
  assert not np.array_equal(np.sort(order[1][0]), np.sort(order[2][0]))
