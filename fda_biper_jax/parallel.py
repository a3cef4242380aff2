"""Data parallelism with pmap semantics, written with `jax.shard_map`.

The training step is a per-device function over the named mesh axis
`AXIS` ('batch'): each device sees its slice of the global batch, averages
its loss with `lax.pmean` and BatchNorm averages its statistics over the same
axis (`nn.BatchNorm(axis_name=AXIS)`), exactly as under `jax.pmap`. JAX now
implements pmap as jit(shard_map) and recommends shard_map directly; this
module wraps it once so the trainer, tests and benchmarks share it.

Two traps of shard_map handled here:

1. `jax.make_mesh` defaults to Explicit axes, with which an unsharded input to
   `in_specs=P(AXIS)` raises: the mesh is built with Auto axes.
2. With `check_vma=True`, the gradient of a per-device loss with respect to
   replicated parameters comes back already summed over the axis, and a
   further pmean would leave it N times too large. The step therefore
   differentiates `pmean(local_loss)` (`train.trainer`), which yields the
   mean gradient directly; a test compares 1 against 8 devices.
"""

from __future__ import annotations

from typing import Callable

import jax
import numpy as np
from jax.sharding import NamedSharding, PartitionSpec as P

AXIS = "batch"


def initialize_distributed(coordinator_address: str = "", num_processes: int = 0,
                           process_id: int = -1) -> None:
  """Starts JAX's multi-process runtime when asked to (several hosts).

  With no arguments JAX reads the cluster environment (TPU pods, SLURM...);
  with an address the processes meet at coordinator_address.
  """
  kwargs = {}
  if coordinator_address:
    kwargs = dict(coordinator_address=coordinator_address, num_processes=num_processes,
                  process_id=process_id)
  jax.distributed.initialize(**kwargs)


def make_mesh(num_devices: int | None = None) -> jax.sharding.Mesh:
  """A 1-D mesh over all (or the first `num_devices`) devices, axis AXIS."""
  n = jax.device_count() if num_devices is None else num_devices
  if not 1 <= n <= jax.device_count():
    raise ValueError(f"num_devices={n} is not allowed; 1..{jax.device_count()} devices exist")
  return jax.make_mesh((n,), (AXIS,), axis_types=(jax.sharding.AxisType.Auto,),
                       devices=jax.devices()[:n])


def check_batch_size(global_batch: int, mesh: jax.sharding.Mesh) -> int:
  """Per-device batch size; a one-line ValueError unless it divides evenly."""
  n = mesh.size
  if global_batch < 1 or global_batch % n:
    raise ValueError(f"batch_size={global_batch} is not allowed: it must be a positive "
                     f"multiple of the device count {n}")
  return global_batch // n


def replicate(tree, mesh):
  """Places a pytree on every device of the mesh (the pmap 'replicated' state)."""
  return jax.device_put(tree, NamedSharding(mesh, P()))


def shard_batch(tree, mesh):
  """One global array per leaf from each process's part of a batch.

  Every process passes its own rows (the same count on each); the result is
  split across the mesh's devices along the leading axis. With one process
  this is a plain split of the batch across the devices.
  """
  sharding = NamedSharding(mesh, P(AXIS))
  return jax.tree.map(lambda a: jax.make_array_from_process_local_data(sharding, a), tree)


def local_mesh(mesh: jax.sharding.Mesh) -> jax.sharding.Mesh:
  """The part of `mesh` on this process's devices, in the same order."""
  local = [d for d in mesh.devices.flat if d.process_index == jax.process_index()]
  return jax.sharding.Mesh(np.array(local), (AXIS,),
                           axis_types=(jax.sharding.AxisType.Auto,))


def host_batch_gatherer(mesh: jax.sharding.Mesh) -> Callable:
  """Returns gather(images, labels, idx) -> global (images, labels) batch arrays.

  Each process holds its own shard of a small dataset on its local devices
  (replicated there) and draws its part of the global batch from it with
  `idx`; the pieces, already sharded over the local devices, become one global
  array sharded over the whole mesh without a copy. With one process this is
  simply images[idx], labels[idx] split across the devices.
  """
  lmesh = local_mesh(mesh)
  local_sharding = NamedSharding(lmesh, P(AXIS))
  global_sharding = NamedSharding(mesh, P(AXIS))
  gather = jax.jit(lambda images, labels, idx: (images[idx], labels[idx]),
                   out_shardings=(local_sharding, local_sharding))

  def globalize(x):
    shape = (x.shape[0] * jax.process_count(), *x.shape[1:])
    order = {d: i for i, d in enumerate(lmesh.devices.flat)}
    shards = sorted(x.addressable_shards, key=lambda s: order[s.device])
    return jax.make_array_from_single_device_arrays(shape, global_sharding,
                                                    [s.data for s in shards])

  def batch(images, labels, idx):
    return tuple(globalize(a) for a in gather(images, labels, idx))

  return batch


def replicate_local(tree, mesh):
  """Places this process's pytree on each of its local devices of `mesh`."""
  return jax.device_put(tree, NamedSharding(local_mesh(mesh), P()))


def data_parallel(fn: Callable, mesh, in_specs, out_specs, donate_argnums=()) -> Callable:
  """jit(shard_map(fn)): fn runs once per device with pmap semantics."""
  return jax.jit(jax.shard_map(fn, mesh=mesh, in_specs=in_specs, out_specs=out_specs),
                 donate_argnums=donate_argnums)
