"""The meta-gradient solver protocol shared by every solver in ``solvers/``.

A solver is a frozen dataclass of options (gains, tolerances, relaxations)
with three methods:

* ``init(problem, params, key) -> solver_params`` -- learned state of the solver
  itself (feedback weights for Kolen-Pollack or linear feedback; ``()`` if
  none). The training loop optimises and checkpoints it next to ``params``.
* ``__call__(problem, params, solver_params, batch, key) -> GradientEstimate`` --
  the update direction for ``params`` (a gradient to descend, e.g. eq. 4 or
  eq. 5) and for ``solver_params``, averaged over the valid examples of the
  batch, plus typed per-phase diagnostics. ``key`` seeds any noise.
* ``free_equilibrium(problem, params, batch)`` -- phi* with f(phi*) = 0 (eq. 1)
  for every example; evaluators use it.

:class:`Solver` owns the common sequence (free phase -> per-example validity ->
solver-specific gradient -> batch loss and outputs -> stats); a solver writes
only :meth:`Solver.gradient`. Solvers never know which problem they solve:
they use only the methods of :class:`bilevel.problem.BilevelProblem`.
"""

from __future__ import annotations

import dataclasses
from typing import Any, ClassVar, NamedTuple, Optional

import jax
import jax.numpy as jnp

from bilevel import tree as tu
from bilevel.fixed_point import FixedPointResult, Status
from bilevel.problem import BilevelProblem
from bilevel.relaxation import Relaxation
from bilevel.stability import leading_eigenvalue

PyTree = Any


class PhaseStats(NamedTuple):
  """Per-example outcome of one relaxation phase (leading batch axis)."""
  iterations: jax.Array
  residual: jax.Array
  relative_residual: jax.Array
  converged: jax.Array
  status: jax.Array  # int32 :class:`bilevel.fixed_point.Status` codes
  block_relative_residual: jax.Array  # what the stopping rule compared with rtol
  residual_reduction: jax.Array  # ||F(z_final)|| / ||F(z_0)||: how far the phase got

  @classmethod
  def of(cls, result: FixedPointResult) -> "PhaseStats":
    tiny = jnp.finfo(result.residual.dtype).tiny
    return cls(result.iterations, result.residual, result.relative_residual,
               result.converged, result.status, result.block_relative_residual,
               result.residual / jnp.maximum(result.initial_residual, tiny))

  @property
  def nonfinite(self) -> jax.Array:
    return self.status == Status.NONFINITE


class GradientEstimate(NamedTuple):
  """What every solver returns for a batch.

  grads: pytree like params, the direction to descend (mean over valid examples).
  solver_grads: pytree like solver_params (``()`` if the solver has none).
  loss: scalar, mean outer loss L over the valid examples, at the (free)
    equilibrium the solver reached.
  outputs: per-example outputs y at that equilibrium, leading batch axis.
  phases: ``{phase name: PhaseStats}`` in the order the phases ran.
  extras: per-example solver-specific quantities (``psi_norm``, ...).
  valid: per-example bool, the examples the means above are taken over.
  """
  grads: PyTree
  solver_grads: PyTree
  loss: jax.Array
  outputs: PyTree
  phases: dict
  extras: dict
  valid: jax.Array

  @property
  def stats(self) -> dict:
    """Flat ``{"<phase>/<field>": per-example array, **extras}`` view."""
    flat = {f"{name}/{field}": value for name, phase in self.phases.items()
            for field, value in phase._asdict().items()}
    return {**flat, **self.extras}


class BatchMask(NamedTuple):
  """The examples a batch mean is taken over: ``mean = sum_valid / count``.

  When every example is valid, ``where`` returns its input unchanged and
  ``count`` equals the batch size exactly, so the arithmetic is the plain mean's.
  """
  valid: jax.Array  # bool [B]
  drop: bool = True  # False: every example counts ("keep" policy)

  @property
  def count(self) -> jax.Array:
    return jnp.sum(self.valid.astype(jnp.int32))

  def refine(self, phase: FixedPointResult, relaxation: Optional[Relaxation] = None
             ) -> "BatchMask":
    """Also drops the examples whose ``phase`` diverged (if dropping at all), and
    those a ``relaxation`` with a quorum left unconverged."""
    if not self.drop:
      return self
    keep = phase.status != Status.NONFINITE
    if relaxation is not None and relaxation.quorum < 1:
      keep = keep & phase.converged
    return BatchMask(self.valid & keep)

  def select(self, tree: PyTree) -> PyTree:
    """Per-example leaves with dropped examples zeroed (``where`` kills NaN too)."""
    def zero(x):
      mask = self.valid.reshape(self.valid.shape + (1,) * (x.ndim - 1))
      return jnp.where(mask, x, jnp.zeros((), x.dtype))
    return jax.tree.map(zero, tree)

  def substitute(self, tree: PyTree) -> PyTree:
    """Dropped examples replaced by the first valid one, so that derivatives
    taken there are finite (a zero cotangent times a NaN Jacobian is NaN)."""
    first = jnp.argmax(self.valid)

    def swap(x):
      mask = self.valid.reshape(self.valid.shape + (1,) * (x.ndim - 1))
      return jnp.where(mask, x, x[first])
    return jax.tree.map(swap, tree)

  def mean(self, tree: PyTree) -> PyTree:
    """Mean over the valid examples of per-example leaves."""
    every = jnp.all(self.valid)

    def leaf(x):
      # The plain mean when nothing is dropped keeps today's bits exactly.
      kept = jnp.sum(self.select(x), axis=0) / self.count.astype(x.dtype)
      return jnp.where(every, jnp.mean(x, axis=0), kept)

    return jax.tree.map(leaf, tree)

  def scale(self, summed: PyTree) -> PyTree:
    """``summed / count`` for a sum over the selected examples."""
    every, size = jnp.all(self.valid), self.valid.shape[0]
    return jax.tree.map(
        lambda x: jnp.where(every, (1.0 / size) * x, (1.0 / self.count.astype(x.dtype)) * x),
        summed)

  def params_vjp(self, problem: BilevelProblem, params: PyTree, states: PyTree,
                 batch: PyTree, cotangents: PyTree) -> PyTree:
    """``(1/count) sum_valid d_theta f(phi_i)^T c_i`` as one VJP (eqs. 4, 5)."""
    summed = problem.params_vjp(params, self.substitute(states), self.substitute(batch),
                                self.select(cotangents), count=1)
    return self.scale(summed)


class Gradient(NamedTuple):
  """What :meth:`Solver.gradient` returns (the solver-specific part)."""
  grads: PyTree
  solver_grads: PyTree
  phases: dict  # {name: FixedPointResult}, the phases after the free one
  extras: dict
  mask: BatchMask


@dataclasses.dataclass(frozen=True)
class Solver:
  """Base class: holds the free-phase relaxation and owns the common sequence."""
  name: ClassVar[str] = "solver"
  needs_energy: ClassVar[bool] = False

  free: Relaxation = Relaxation()
  # > 0: estimate max Re eig(d_phi f) at every free equilibrium with this many
  # power steps (bilevel/stability.py) and report it as `free/max_real_eig` and
  # `free/stable`. Anderson also converges to unstable fixed points, where eq. 5
  # differentiates a state the dynamics never settle to.
  stability_check_steps: int = 0

  def init(self, problem: BilevelProblem, params: PyTree, key: jax.Array) -> PyTree:
    """Learned solver state; checks the problem suits the solver."""
    if self.needs_energy and not problem.has_energy:
      raise ValueError(f"solver {self.name!r} needs a problem stated with an inner "
                       f"`energy`; {problem.name!r} gives only `dynamics`. Use "
                       "another solver (e.g. 'rbp' or 'lcp_di') or give an energy.")
    return ()

  def __call__(self, problem: BilevelProblem, params: PyTree, solver_params: PyTree,
               batch: PyTree, key: jax.Array, *, drop_invalid: bool = True
               ) -> GradientEstimate:
    """Free phase, validity, :meth:`gradient`, batch loss and stats.

    With ``drop_invalid`` the means skip examples whose loss is not finite or
    whose relaxations diverged (status NONFINITE); otherwise all count.
    """
    first = self.first_phase(problem, params, batch)
    losses = jax.vmap(problem.outer_loss)(first.value, batch)
    valid = jnp.isfinite(losses)
    mask = BatchMask(valid if drop_invalid else jnp.ones_like(valid), drop_invalid)
    mask = mask.refine(first, self.free)
    key, stability_key = jax.random.split(key)
    part = self.gradient(problem, params, solver_params, batch, first, mask, key)
    results = {"free": first, **part.phases}
    phases = {name: PhaseStats.of(r) for name, r in results.items()}
    extras = {**part.extras, **self.stability(problem, params, first, batch, stability_key)}
    return GradientEstimate(part.grads, part.solver_grads, part.mask.mean(losses),
                            jax.vmap(problem.output)(first.value), phases, extras,
                            part.mask.valid)

  def stability(self, problem: BilevelProblem, params: PyTree, free: FixedPointResult,
                batch: PyTree, key: jax.Array) -> dict:
    """``{free/max_real_eig, free/stable}`` per example, if asked for."""
    if not self.stability_check_steps:
      return {}

    def one(phi, example, k):
      field = lambda s: problem.f(params, s, example)
      return leading_eigenvalue(field, phi, k, self.stability_check_steps)

    keys = jax.random.split(key, jax.tree.leaves(free.value)[0].shape[0])
    estimate, stable = jax.vmap(one)(free.value, batch, keys)
    return {"free/max_real_eig": estimate, "free/stable": stable}

  def first_phase(self, problem: BilevelProblem, params: PyTree,
                  batch: PyTree) -> FixedPointResult:
    """The phase reported as ``free`` (whose state gives the loss and outputs)."""
    return self.free_equilibrium(problem, params, batch)

  def gradient(self, problem: BilevelProblem, params: PyTree, solver_params: PyTree,
               batch: PyTree, free: FixedPointResult, mask: BatchMask,
               key: jax.Array) -> Gradient:
    """The solver-specific part: later phases and the update directions."""
    raise NotImplementedError

  def free_equilibrium(self, problem: BilevelProblem, params: PyTree,
                       batch: PyTree) -> FixedPointResult:
    """phi* with f(phi*, theta) = 0 for every example (vmapped relaxation)."""

    starts = jax.vmap(lambda example: problem.init_state(params, example))(batch)
    return self.free.solve_batch(lambda example: lambda s: problem.f(params, s, example),
                                 batch, starts)

  @staticmethod
  def batch_loss(problem: BilevelProblem, states: PyTree, batch: PyTree):
    """(mean outer loss, per-example outputs) at per-example states."""
    losses = jax.vmap(problem.outer_loss)(states, batch)
    return jnp.mean(losses), jax.vmap(problem.output)(states)


def per_example_norm(tree: PyTree) -> jax.Array:
  """``||x_i||`` of every example of a batched pytree."""
  return jax.vmap(tu.tree_norm)(tree)
