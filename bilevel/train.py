"""The outer loop: one jitted, data-parallel training step for any problem/solver.

Parallelism: the batch (examples, or the tasks of a meta-batch) is split
across devices with ``jax.shard_map`` over a 1-D mesh axis ``"batch"``;
parameters are replicated and gradients averaged with ``lax.pmean``. We use
``shard_map`` rather than ``jax.pmap`` because pmap is in maintenance mode (and
implemented on shard_map in jax 0.10), and because each device then runs its
own equilibrium while-loops: a device stops iterating as soon as *its*
examples have converged, with no cross-device synchronisation inside the
relaxation. The same code runs on 1 device, on N forced CPU devices and on a
multi-host mesh (``jax.distributed``), since the mesh is just an argument.

With equal per-device shards the pmean of per-device means equals the
single-device mean, so 1-device and N-device training give the same parameters
up to floating-point summation order.
"""

from __future__ import annotations

from typing import Any, Callable, NamedTuple, Optional

import jax
import jax.numpy as jnp
import numpy as np
import optax
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from bilevel import tree as tu
from bilevel.problem import BilevelProblem
from solvers.base import GradientEstimate, Solver

PyTree = Any
BATCH_AXIS = "batch"


class TrainState(NamedTuple):
  """Everything that must be checkpointed to resume exactly."""
  step: jax.Array
  params: PyTree
  solver_params: PyTree
  opt_state: PyTree
  skipped: jax.Array  # number of batches skipped for non-finite updates


def init_train_state(problem: BilevelProblem, solver: Solver,
                     optimizer: optax.GradientTransformation, key: jax.Array,
                     example: PyTree, params: Optional[PyTree] = None) -> TrainState:
  """Initialises params (unless given), solver state and optimizer state.

  Validates the problem against ``example`` first, so shape mistakes surface
  here as a :class:`bilevel.ProblemError` rather than inside a trace.
  """
  k_params, k_solver = jax.random.split(key)
  if params is None:
    if problem.init_params is None:
      raise ValueError(f"{problem.name}: pass `params` or give the problem `init_params`")
    params = problem.init_params(k_params, example)
  problem.validate(params, example)
  solver_params = solver.init(problem, params, k_solver)
  opt_state = optimizer.init((params, solver_params))
  return TrainState(jnp.zeros((), jnp.int32), params, solver_params, opt_state,
                    jnp.zeros((), jnp.int32))


def data_mesh(num_devices: Optional[int] = None) -> Mesh:
  """A 1-D mesh over the first ``num_devices`` devices (all by default)."""
  devices = jax.devices()
  n = len(devices) if num_devices is None else num_devices
  if n > len(devices):
    raise ValueError(f"asked for {n} devices but only {len(devices)} exist; on CPU set "
                     "XLA_FLAGS=--xla_force_host_platform_device_count=N before "
                     "importing jax")
  return Mesh(np.array(devices[:n]), (BATCH_AXIS,))


def summarize(est: GradientEstimate, problem: BilevelProblem, batch: PyTree) -> dict:
  """Batch-level metrics from per-example solver diagnostics.

  Means of every per-example stat; for convergence flags the fraction that
  converged, and for residuals also the worst example.
  """
  out = {"loss": est.loss}
  for key, value in est.stats.items():
    value = jnp.asarray(value)
    if value.dtype == jnp.bool_:
      out[key.replace("converged", "converged_fraction")] = jnp.mean(value)
    elif key.endswith("/status"):
      out[key.replace("status", "nonfinite_fraction")] = jnp.mean(value == 2)
    else:
      out[key] = jnp.mean(value.astype(jnp.float32))
      if key.endswith("residual"):
        out[key + "_max"] = jnp.max(value)
  if "psi_norm" in est.stats:
    out["H"] = 0.5 * jnp.mean(jnp.asarray(est.stats["psi_norm"]) ** 2)
  if problem.metrics is not None:
    per_example = jax.vmap(problem.metrics)(est.outputs, batch)
    out.update({k: jnp.mean(v) for k, v in per_example.items()})
  return out


def make_train_step(problem: BilevelProblem, solver: Solver,
                    optimizer: optax.GradientTransformation, *,
                    mesh: Optional[Mesh] = None,
                    skip_nonfinite: bool = False
                    ) -> Callable[[TrainState, PyTree], tuple[TrainState, dict]]:
  """Returns ``step(state, batch) -> (state, metrics)``, jitted end to end.

  The batch's leading axis is split over ``mesh`` (default: all devices) and
  must be divisible by its size. If ``skip_nonfinite``, an update whose
  gradients are not finite leaves the state unchanged and increments
  ``state.skipped`` (the metric ``nonfinite_update`` says so); otherwise the
  caller decides from that metric (see ``launch/``).
  """
  mesh = mesh or data_mesh()
  n_dev = mesh.devices.size

  def local_estimate(params, solver_params, batch):
    est = solver(problem, params, solver_params, batch)
    mean = lambda t: jax.lax.pmean(t, BATCH_AXIS)
    return est._replace(grads=mean(est.grads), solver_grads=mean(est.solver_grads),
                        loss=mean(est.loss))

  def step(state: TrainState, batch: PyTree):
    sharded = jax.shard_map(
        local_estimate, mesh=mesh,
        in_specs=(P(), P(), P(BATCH_AXIS)),
        out_specs=GradientEstimate(P(), P(), P(), P(BATCH_AXIS), P(BATCH_AXIS)),
        check_vma=False)
    est = sharded(state.params, state.solver_params, batch)
    grads = (est.grads, est.solver_grads)
    updates, opt_state = optimizer.update(grads, state.opt_state,
                                          (state.params, state.solver_params))
    params, solver_params = optax.apply_updates((state.params, state.solver_params),
                                                updates)
    # The norm catches finite-but-overflowing updates (e.g. a blown-up control).
    finite = jnp.isfinite(tu.tree_norm(grads)) & jnp.isfinite(est.loss)
    new = TrainState(state.step + 1, params, solver_params, opt_state, state.skipped)
    if skip_nonfinite:
      keep = jax.tree.map(lambda a, b: jnp.where(finite, a, b), new, state)
      new = keep._replace(step=state.step + 1,
                          skipped=state.skipped + (~finite).astype(jnp.int32))
    metrics = summarize(est, problem, batch)
    metrics["grad_norm"] = tu.tree_norm(est.grads)
    metrics["nonfinite_update"] = ~finite
    return new, metrics

  jitted = jax.jit(step)

  def checked_step(state, batch):
    size = jax.tree.leaves(batch)[0].shape[0]
    if size % n_dev:
      raise ValueError(f"batch size {size} is not divisible by the {n_dev} devices of "
                       "the mesh; choose a batch size that is a multiple of the device "
                       "count")
    return jitted(state, batch)

  return checked_step


def make_eval_fn(problem: BilevelProblem, solver: Solver, *, mesh: Optional[Mesh] = None):
  """``evaluate(params, batch) -> metrics`` at the free equilibrium (no gradients)."""
  mesh = mesh or data_mesh()

  def local(params, batch):
    free = solver.free_equilibrium(problem, params, batch)
    return free, jax.vmap(problem.outer_loss)(free.value, batch)

  def evaluate(params, batch):
    free, losses = jax.shard_map(local, mesh=mesh, in_specs=(P(), P(BATCH_AXIS)),
                                 out_specs=P(BATCH_AXIS), check_vma=False)(params, batch)
    out = {"loss": jnp.mean(losses), "free/iterations": jnp.mean(free.iterations),
           "free/converged_fraction": jnp.mean(free.converged)}
    if problem.metrics is not None:
      per_example = jax.vmap(problem.metrics)(jax.vmap(problem.output)(free.value), batch)
      out.update({k: jnp.mean(v) for k, v in per_example.items()})
    return out

  return jax.jit(evaluate)


def replicate_on(mesh: Mesh, tree: PyTree) -> PyTree:
  """Places a pytree replicated on every device of ``mesh``."""
  return jax.device_put(tree, NamedSharding(mesh, P()))
