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

Invalid examples (a relaxation with status NONFINITE, or a non-finite loss)
are dropped from the batch means by default (``invalid_examples="drop"``): the
means are then ``psum(sum over valid) / psum(count)`` across devices, and the
metric ``dropped_examples`` counts them. ``"keep"`` averages every example.
"""

from __future__ import annotations

from typing import Any, Callable, Literal, NamedTuple, Optional

import jax
import jax.numpy as jnp
import numpy as np
import optax
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from bilevel import tree as tu
from bilevel.fixed_point import Status
from bilevel.problem import BilevelProblem
from bilevel.solver import GradientEstimate, Solver

PyTree = Any
BATCH_AXIS = "batch"
INVALID_EXAMPLES = ("drop", "keep")


class TrainState(NamedTuple):
  """Everything that must be checkpointed to resume exactly."""
  step: jax.Array
  params: PyTree
  solver_params: PyTree
  opt_state: PyTree
  skipped: jax.Array  # number of batches skipped for non-finite updates
  rng: jax.Array  # the run's key; step t's solver key is fold_in(rng, t)


def init_train_state(problem: BilevelProblem, solver: Solver,
                     optimizer: optax.GradientTransformation, key: jax.Array,
                     example: PyTree, params: Optional[PyTree] = None) -> TrainState:
  """Initialises params (unless given), solver state and optimizer state.

  Validates the problem against ``example`` first, so shape mistakes surface
  here as a :class:`bilevel.ProblemError` rather than inside a trace.
  """
  k_params, k_solver = jax.random.split(key)
  # A third, independent stream for the solvers' noise; the first two keys stay
  # what they were so initial params and solver state do not change.
  k_run = jax.random.fold_in(key, 2)
  if params is None:
    if problem.init_params is None:
      raise ValueError(f"{problem.name}: pass `params` or give the problem `init_params`")
    params = problem.init_params(k_params, example)
  problem.validate(params, example)
  solver_params = solver.init(problem, params, k_solver)
  opt_state = optimizer.init((params, solver_params))
  return TrainState(jnp.zeros((), jnp.int32), params, solver_params, opt_state,
                    jnp.zeros((), jnp.int32), jax.random.key_data(k_run))


def data_mesh(num_devices: Optional[int] = None) -> Mesh:
  """A 1-D mesh over the first ``num_devices`` devices (all by default)."""
  devices = jax.devices()
  n = len(devices) if num_devices is None else num_devices
  if n > len(devices):
    raise ValueError(f"asked for {n} devices but only {len(devices)} exist; on CPU set "
                     "XLA_FLAGS=--xla_force_host_platform_device_count=N before "
                     "importing jax")
  return Mesh(np.array(devices[:n]), (BATCH_AXIS,))


def _phase_metrics(name: str, phase) -> dict:
  """Converged and non-finite fractions, mean iterations and residuals (+ worst)."""
  out = {}
  for field, value in phase._asdict().items():
    key = f"{name}/{field}"
    if field == "converged":
      out[f"{name}/converged_fraction"] = jnp.mean(value)
    elif field == "status":
      out[f"{name}/nonfinite_fraction"] = jnp.mean(value == Status.NONFINITE)
    else:
      out[key] = jnp.mean(value.astype(jnp.float32))
      if field.endswith("residual"):
        out[key + "_max"] = jnp.max(value)
  return out


def summarize(est: GradientEstimate, problem: BilevelProblem, batch: PyTree) -> dict:
  """Batch-level metrics from per-example solver diagnostics.

  Means of every per-example stat; for convergence flags the fraction that
  converged, and for residuals also the worst example. ``H`` is the least-control
  objective ``1/2 ||psi*||^2`` (eq. 2) when the solver reports ``psi_norm``.
  """
  out = {"loss": est.loss}
  for name, phase in est.phases.items():
    out.update(_phase_metrics(name, phase))
  for key, value in est.extras.items():
    out[key] = jnp.mean(jnp.asarray(value).astype(jnp.float32))
  if "psi_norm" in est.extras:
    out["H"] = 0.5 * jnp.mean(jnp.asarray(est.extras["psi_norm"]) ** 2)
  if problem.metrics is not None:
    per_example = jax.vmap(problem.metrics)(est.outputs, batch)
    out.update({k: jnp.mean(v) for k, v in per_example.items()})
  return out


def _combine(est: GradientEstimate, n_dev: int, drop: bool) -> GradientEstimate:
  """Means over every device's examples: pmean of equal shards, or, when
  dropping, ``psum(local mean * local count) / psum(count)``."""
  pmean = lambda t: jax.lax.pmean(t, BATCH_AXIS)
  if not drop or n_dev == 1:
    # One device: pmean is the identity, so today's bits are kept exactly.
    return est._replace(grads=pmean(est.grads), solver_grads=pmean(est.solver_grads),
                        loss=pmean(est.loss))
  count = jnp.sum(est.valid.astype(jnp.int32))
  total = jax.lax.psum(count, BATCH_AXIS)
  every = total == jax.lax.psum(est.valid.shape[0], BATCH_AXIS)

  def mean(tree):
    def leaf(x):
      weighted = jax.lax.psum(x * count.astype(x.dtype), BATCH_AXIS) / total.astype(x.dtype)
      return jnp.where(every, jax.lax.pmean(x, BATCH_AXIS), weighted)
    return jax.tree.map(leaf, tree)

  return est._replace(grads=mean(est.grads), solver_grads=mean(est.solver_grads),
                      loss=mean(est.loss))


def _apply(state: TrainState, est: GradientEstimate, optimizer, skip_nonfinite: bool):
  """The optimizer update, or (``skip_nonfinite``) no update when it is not finite."""
  grads = (est.grads, est.solver_grads)
  updates, opt_state = optimizer.update(grads, state.opt_state,
                                        (state.params, state.solver_params))
  params, solver_params = optax.apply_updates((state.params, state.solver_params), updates)
  # The norm catches finite-but-overflowing updates (e.g. a blown-up control).
  finite = jnp.isfinite(tu.tree_norm(grads)) & jnp.isfinite(est.loss)
  new = state._replace(step=state.step + 1, params=params, solver_params=solver_params,
                       opt_state=opt_state)
  if skip_nonfinite:
    keep = jax.tree.map(lambda a, b: jnp.where(finite, a, b), new, state)
    new = keep._replace(step=state.step + 1,
                        skipped=state.skipped + (~finite).astype(jnp.int32))
  return new, finite


def make_train_step(problem: BilevelProblem, solver: Solver,
                    optimizer: optax.GradientTransformation, *,
                    mesh: Optional[Mesh] = None,
                    skip_nonfinite: bool = False,
                    invalid_examples: Literal["drop", "keep"] = "drop"
                    ) -> Callable[[TrainState, PyTree], tuple[TrainState, dict]]:
  """Returns ``step(state, batch) -> (state, metrics)``, jitted end to end.

  The batch's leading axis is split over ``mesh`` (default: all devices) and
  must be divisible by its size. ``invalid_examples="drop"`` averages over the
  examples whose relaxations did not diverge and whose loss is finite (metric
  ``dropped_examples``); ``"keep"`` averages over all. If ``skip_nonfinite``, an
  update whose gradients are not finite leaves the state unchanged and
  increments ``state.skipped`` (the metric ``nonfinite_update`` says so);
  otherwise the caller decides from that metric (see ``launch/``). The solver's
  key at step t is ``fold_in(state.rng, t)``, folded with the device index.
  """
  if invalid_examples not in INVALID_EXAMPLES:
    raise ValueError(f"invalid_examples must be one of {INVALID_EXAMPLES}, got "
                     f"{invalid_examples!r}")
  mesh = mesh or data_mesh()
  n_dev, drop = mesh.devices.size, invalid_examples == "drop"

  def local_estimate(params, solver_params, batch, key):
    key = jax.random.fold_in(key, jax.lax.axis_index(BATCH_AXIS))
    est = solver(problem, params, solver_params, batch, key, drop_invalid=drop)
    return _combine(est, n_dev, drop)

  def step(state: TrainState, batch: PyTree):
    key = jax.random.fold_in(jax.random.wrap_key_data(state.rng), state.step)
    batched = P(BATCH_AXIS)
    sharded = jax.shard_map(
        local_estimate, mesh=mesh, in_specs=(P(), P(), batched, P()),
        out_specs=GradientEstimate(P(), P(), P(), batched, batched, batched, batched),
        check_vma=False)
    est = sharded(state.params, state.solver_params, batch, key)
    new, finite = _apply(state, est, optimizer, skip_nonfinite)
    metrics = summarize(est, problem, batch)
    metrics["grad_norm"] = tu.tree_norm(est.grads)
    metrics["nonfinite_update"] = ~finite
    metrics["dropped_examples"] = jnp.sum(~est.valid)
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


def replicate_on(mesh: Mesh, tree: PyTree) -> PyTree:
  """Places a pytree replicated on every device of ``mesh``."""
  return jax.device_put(tree, NamedSharding(mesh, P()))
