"""The one evaluator of every problem: metrics at the solver's free equilibrium.

``Task.evaluate(params, solver)`` of each builder is made from an
:class:`Evaluator`. It relaxes held-out examples (or meta-test tasks) to the
free equilibrium with ``solver.free_equilibrium`` -- the same relaxation as in
training -- in fixed-size batches, jitted once per solver and batch size, split
over this process's devices with ``shard_map`` (each device stops iterating when
its own examples converge, as in the train step). Per example it records the
problem's outer loss (optional), ``problem.metrics``, the free phase's
``free/iterations`` and ``free/converged_fraction`` (1.0 if converged) and,
optionally, ``free/residual``; :meth:`Evaluator.mean` averages them.

Averages are exact means over the examples: the last batch is padded with
copies of the last example and the copies are dropped. Each batch is summed in
the metric's dtype, the batch sums in Python floats.
"""

from __future__ import annotations

from typing import Any, Callable, Mapping

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from bilevel.problem import BilevelProblem
from bilevel.train import BATCH_AXIS

PyTree = Any
Evaluate = Callable[[PyTree, Any], dict]

__all__ = ["Evaluator", "num_examples"]


def num_examples(data: PyTree) -> int:
  """Length of the leading (example) axis of a pytree of arrays."""
  return len(jax.tree.leaves(data)[0])


def _local_mesh(num_devices: int = 0) -> Mesh:
  """A 1-D mesh over this process's devices (all if ``num_devices`` is 0). Local: the
  runner evaluates host copies of the parameters on every process."""
  devices = jax.local_devices()
  n = min(int(num_devices), len(devices)) if num_devices else len(devices)
  return Mesh(np.array(devices[:n]), (BATCH_AXIS,))


def _pad(batch: PyTree, size: int) -> PyTree:
  """``batch`` padded to ``size`` examples with copies of its last one (finite values)."""
  def one(a):
    extra = size - len(a)
    return np.concatenate([a, np.repeat(a[-1:], extra, axis=0)]) if extra else a
  return jax.tree.map(one, batch)


class Evaluator:
  """Per-example and mean metrics of ``problem`` at a solver's free equilibrium.

  ``loss``: also record the outer loss as ``"loss"``. ``residual``: also record
  ``"free/residual"`` (the final ``||f||`` of each example). ``num_devices``: how
  many of this process's devices share a batch (0 = all).
  """

  def __init__(self, problem: BilevelProblem, *, loss: bool = True, residual: bool = False,
               num_devices: int = 0):
    self.problem, self.loss, self.residual = problem, loss, residual
    self.mesh = _local_mesh(num_devices)
    # id(solver) -> (solver, jitted pass); holding the solver keeps its id unique, and
    # solvers need not be hashable.
    self._compiled: dict[int, tuple[Any, Callable]] = {}

  def _values(self, solver: Any, params: PyTree, batch: PyTree) -> dict:
    problem = self.problem
    free = solver.free_equilibrium(problem, params, batch)
    out = jax.vmap(problem.output)(free.value)
    values = {"loss": jax.vmap(problem.loss)(out, batch)} if self.loss else {}
    if problem.metrics is not None:
      values.update(jax.vmap(problem.metrics)(out, batch))
    values["free/iterations"] = free.iterations.astype(jnp.float32)
    values["free/converged_fraction"] = free.converged.astype(jnp.float32)
    if self.residual:
      values["free/residual"] = free.residual
    return values

  def _pass(self, solver: Any) -> Callable:
    if id(solver) not in self._compiled:
      local = lambda params, batch: self._values(solver, params, batch)
      fn = jax.jit(jax.shard_map(local, mesh=self.mesh, in_specs=(P(), P(BATCH_AXIS)),
                                 out_specs=P(BATCH_AXIS), check_vma=False))
      self._compiled[id(solver)] = (solver, fn)
    return self._compiled[id(solver)][1]

  def batch_size(self, batch_size: int, n: int) -> int:
    """The batch size used for ``n`` examples: ``min(batch_size, n)`` rounded up to a
    multiple of the device count."""
    n_dev = self.mesh.devices.size
    return -(-min(int(batch_size), n) // n_dev) * n_dev

  def per_example(self, params: PyTree, solver: Any, data: PyTree,
                  batch_size: int) -> dict[str, np.ndarray]:
    """``{name: [n]}`` for the ``n`` examples of ``data`` (arrays with a leading axis)."""
    n = num_examples(data)
    size = self.batch_size(batch_size, n)
    fn = self._pass(solver)
    # Replicated on the evaluation mesh once (params may come from the host, or be
    # committed to the training mesh's devices).
    params = jax.device_put(params, NamedSharding(self.mesh, P()))
    parts = []
    for start in range(0, n, size):
      batch = jax.tree.map(lambda a: a[start:start + size], data)
      valid = min(size, n - start)
      out = jax.device_get(fn(params, _pad(batch, size)))
      parts.append({k: np.asarray(v)[:valid] for k, v in out.items()})
    return {k: np.concatenate([p[k] for p in parts]) for k in parts[0]}

  def mean(self, params: PyTree, solver: Any, data: PyTree, batch_size: int) -> dict:
    """Means over the examples of ``data`` of every per-example value (host floats)."""
    values = self.per_example(params, solver, data, batch_size)
    n = num_examples(data)
    size = self.batch_size(batch_size, n)
    # Each batch summed in the metric's dtype (small sums, small error), the batch sums
    # in float64: one float32 running sum over 10^4 examples would lose digits.
    return {k: sum(float(np.sum(v[i:i + size])) for i in range(0, n, size)) / n
            for k, v in values.items()}

  def make_evaluate(self, sets: Mapping[str, PyTree], batch_size: int) -> Evaluate:
    """``Task.evaluate``: the means over each data set of ``sets``, keys prefixed by
    the set's name (e.g. ``{"test/": test_data}`` -> ``test/accuracy``)."""
    def evaluate(params: PyTree, solver: Any) -> dict:
      out = {}
      for prefix, data in sets.items():
        means = self.mean(params, solver, data, batch_size)
        out.update({prefix + k: v for k, v in means.items()})
      return out
    return evaluate
