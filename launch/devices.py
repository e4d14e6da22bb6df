"""Host/device plumbing of the training loop: host copies, batch placement, replication
on a data mesh, in one process or several (``jax.distributed``)."""

from __future__ import annotations

from typing import Any

import jax
import numpy as np
from jax.experimental import multihost_utils
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

from bilevel.train import BATCH_AXIS, replicate_on

PyTree = Any


def agree(decision: bool) -> bool:
  """Process 0's ``decision`` on every process (a collective when there are several)."""
  if jax.process_count() == 1:
    return bool(decision)
  return bool(multihost_utils.broadcast_one_to_all(np.int32(decision)))


def is_primary() -> bool:
  """Process 0 writes the files of a run."""
  return jax.process_index() == 0


def to_host(tree: PyTree) -> PyTree:
  """numpy copy of a (possibly multi-process, replicated) pytree of arrays."""
  def one(x):
    if isinstance(x, jax.Array) and not x.is_fully_addressable:
      return np.asarray(x.addressable_data(0))
    return np.asarray(x)
  return jax.tree.map(one, tree)


def _global_array(mesh, spec, x: np.ndarray) -> jax.Array:
  x = np.asarray(x)
  return jax.make_array_from_callback(x.shape, NamedSharding(mesh, spec), lambda i: x[i])


def place_batch(batch: PyTree, mesh) -> PyTree:
  """Single process: the numpy batch as is. Multi-process: a global array sharded
  over the mesh, each process supplying only its own devices' rows (every process
  computes the same batch from (seed, step))."""
  if jax.process_count() == 1:
    return batch
  return jax.tree.map(lambda a: _global_array(mesh, P(BATCH_AXIS), a), batch)


def replicate(tree: PyTree, mesh) -> PyTree:
  """Places ``tree`` replicated on every device of the mesh (any process count)."""
  if jax.process_count() == 1:
    return replicate_on(mesh, tree)
  return jax.tree.map(lambda a: _global_array(mesh, P(), to_host(a)), tree)


__all__ = ["agree", "is_primary", "place_batch", "replicate", "to_host"]
